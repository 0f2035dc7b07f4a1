"""The README's five-minute tour, run for real.

Each command runs as a user types it (``python -m cosim_dask ...``) in a fresh folder, and its
output (stdout and stderr, in order) is printed as a console transcript: the block README.md
shows between ``<!-- tour -->`` and ``<!-- /tour -->``. ``tests/test_readme.py`` runs it again
and checks that the README still matches what the commands print.

    python scripts/readme_tour.py            # print the transcript
    python scripts/readme_tour.py --write    # and put it into README.md

Piped, the commands write plain progress lines: train one a step (shown as the first two,
``…`` and the last), the others one about every 10 s and a final line (shown: the final
line, since how many come before it depends on the machine's speed). distributed's warning
that a worker was slow to exit at shutdown (a loaded machine's) is left out.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

COMMANDS = [
    "cosim generate pairs.zarr --pairs 200000 --dim 64 --rank 8 --noise 0.3 --targets binary",
    "cosim info pairs.zarr",
    "cosim train pairs.zarr --out model.zarr --steps 30",
    "cosim evaluate model.zarr pairs.zarr",
    "cosim report model.zarr --out report.html",
    "cosim transform model.zarr pairs.zarr pairs-learned.zarr",
]
README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- tour -->\n```console\n)(.*?)(```\n<!-- /tour -->)", re.S)


def run_tour(folder: Path, commands: list[str] = COMMANDS) -> str:
    """The transcript of ``commands`` run one after the other in ``folder``."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
    lines = []
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, "-m", "cosim_dask", *argv[1:]], cwd=folder,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=600)
        if done.returncode:
            raise SystemExit(f"`{command}` failed ({done.returncode}):\n{done.stdout}")
        lines.append(f"$ {command}\n{shortened(done.stdout)}")
    return "".join(lines)


PROGRESS = re.compile(r"^(generate|ingest|train|evaluate|transform): ")
#: distributed's warning when a LocalCluster's worker is slow to exit at shutdown: it comes
#: and goes with the machine's load, and is not part of what the tour shows.
SLOW_SHUTDOWN = re.compile(r"^\S+ \S+ - distributed\.nanny - WARNING - Worker process still "
                           r"alive after")


def shortened(output: str) -> str:
    """``output`` with each run of progress lines cut to its final line; train's (one a
    step) to its first two, ``…`` and its last; without slow-shutdown warnings."""
    out: list[str] = []
    run: list[str] = []
    for line in [*output.splitlines(keepends=True), None]:
        if line is not None and SLOW_SHUTDOWN.match(line):
            continue
        if line is not None and PROGRESS.match(line):
            run.append(line)
            continue
        if run and run[0].startswith("train: ") and len(run) > 3:
            out += [*run[:2], "…\n", run[-1]]
        elif run:
            out += run if run[0].startswith("train: ") else run[-1:]
        run = []
        if line is not None:
            out.append(line)
    return "".join(out)


def readme_transcript(text: str) -> str:
    """The tour block of the README's ``text``."""
    match = BLOCK.search(text)
    if match is None:
        raise SystemExit("README.md has no <!-- tour --> block")
    return match.group(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the README's block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        transcript = run_tour(Path(folder))
    print(transcript, end="")
    if args.write:
        text = README.read_text()
        readme_transcript(text)  # the block must exist
        README.write_text(BLOCK.sub(lambda m: m.group(1) + transcript + m.group(3), text))


if __name__ == "__main__":
    main()
