"""The README's tour is what the commands print: scripts/readme_tour.py runs them for real and
the README's block must match it line by line, with every figure within a tolerance (times,
ports, ids and dates masked)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import readme_tour  # noqa: E402

#: Varies from run to run: dates, durations, rates, ports, run ids, fingerprints.
VOLATILE = [
    re.compile(r"\d{4}-\d{2}-\d{2}T[\d:+]+"),
    re.compile(r"[\d.]+ s\b"),
    re.compile(r"[\d.,]+ \w+/s"),  # pairs/s, steps/s, chunks/s
    re.compile(r"(elapsed|eta ≤|eta) [\d.]+s|(elapsed|eta ≤|eta) \d+m\d+s"),
    re.compile(r"127\.0\.0\.1:\d+"),
    re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}"),
    re.compile(r"fingerprint [0-9a-f]{16}"),
    re.compile(r"\|grad\| \S+"),
]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def masked(line: str) -> tuple[str, list[float]]:
    """The line's shape (volatile parts and numbers replaced) and its numbers."""
    for pattern in VOLATILE:
        line = pattern.sub("~", line)
    numbers = [float(n.replace(",", "")) for n in NUMBER.findall(line)]
    return NUMBER.sub("#", line).rstrip(), numbers


@pytest.mark.slow
def test_the_readme_tour_is_what_the_commands_print(tmp_path):
    shown = readme_tour.readme_transcript((ROOT / "README.md").read_text()).splitlines()
    real = readme_tour.run_tour(tmp_path).splitlines()
    assert [masked(line)[0] for line in shown] == [masked(line)[0] for line in real]
    for was, now in zip(shown, real, strict=True):
        a, b = masked(was)[1], masked(now)[1]
        # Figures are deterministic given the seeds; the tolerance covers BLAS differences
        # between machines (the last digit of a loss, a step more or less to converge).
        assert a == pytest.approx(b, rel=0.02, abs=2e-3), (was, now)
