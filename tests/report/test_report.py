"""`cosim report`: the self-contained HTML training report (inline SVG charts), drawn from a
real trained model, checked as HTML, against the model's numbers, and in a real Chromium."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.errors import CosimError, ModelError
from cosim_dask.fit.model import Model, load_model, save_model
from cosim_dask.report import page as report_mod
from cosim_dask.report.page import effective_rank, write_report

runner = CliRunner()
TITLES = {
    "loss": ("Loss per step", "step", "loss"),
    "val_auc": ("Validation ROC AUC per step", "step", "ROC AUC"),
    "roc": ("ROC on the validation split", "false positive rate", "true positive rate"),
    "spectrum": ("Eigenvalue spectrum of A", "index (largest first)", "eigenvalue (log scale)"),
}


def cosim(*args, expect=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cluster_address) -> Path:
    """A real model: 10 L-BFGS steps on a small binary store, validation on every step."""
    root = tmp_path_factory.mktemp("report")
    cosim("generate", root / "S", "--pairs", 20000, "--dim", 16, "--rank", 3, "--targets",
          "binary", "--chunk-pairs", 4000)
    cosim("train", root / "S", "--out", root / "M", "--steps", 10, "--solver", "lbfgs",
          "--scheduler", cluster_address)
    return root / "M"


@pytest.fixture(scope="module")
def page(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = cosim("report", trained, "--out", out)
    assert f"report written to {out}" in result.output
    return out


class Parsed(HTMLParser):
    """Every element's tag and attributes, and the text inside each chart's <text> elements."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.svg_text: dict[str, list[tuple[str, str]]] = {}  # chart id -> (class, text)
        self._chart: str | None = None
        self._text_class: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "svg":
            self._chart = a.get("id", "").removeprefix("chart-")
            self.svg_text[self._chart] = []
        elif tag == "text":
            self._text_class = a.get("class", "")

    def handle_endtag(self, tag):
        if tag == "text":
            self._text_class = None

    def handle_data(self, data):
        if self._text_class is not None and self._chart:
            self.svg_text[self._chart].append((self._text_class, data))

    def series(self) -> dict[str, dict[str, str]]:
        return {a["data-key"]: a for tag, a in self.elements if tag == "polyline"}


def external_references(text: str) -> list[str]:
    """src/href/xlink:href attributes and CSS url()/@import that point off the page."""
    refs = [v for _, a in Parsed(text).elements for k, v in a.items()
            if k in ("src", "href", "xlink:href", "srcset", "action", "data")]
    refs += re.findall(r"url\(\s*['\"]?([^'\")]+)", text)
    refs += re.findall(r"@import\s+['\"]?([^'\";]+)", text)
    return [r for r in refs if not r.startswith(("#", "data:"))]


# -------------------------------------------------------------------------------- the page


def test_page_is_self_contained_with_titles_and_axes(page):
    text = page.read_text(encoding="utf-8")
    assert external_references(text) == []
    assert not re.search(r"https?://", text)  # not even a namespace URL: nothing to fetch
    doc = Parsed(text)
    assert not [a for tag, a in doc.elements if tag in ("script", "link", "img", "iframe")]
    for chart, (title, xlabel, ylabel) in TITLES.items():
        texts = doc.svg_text[chart]
        assert ("chart-title", title) in texts, chart
        assert ("axis-label x", xlabel) in texts and ("axis-label y", ylabel) in texts, chart
        assert any(c.startswith("tick") for c, _ in texts), chart
    assert "Figures: learned metric vs plain cosine" in text
    assert 'id="roc-missing"' not in text
    # Each table is titled by the rows it scores (this model held validation rows out).
    assert re.findall(r"<caption>(.*?)</caption>", text) == ["validation pairs",
                                                             "training pairs"]


def test_plotted_data_match_the_model(trained, page):
    model = load_model(trained)
    history = model.history
    series = Parsed(page.read_text(encoding="utf-8")).series()

    def xy(key: str) -> tuple[list, list]:
        s = series[key]
        x, y = json.loads(s["data-x"]), json.loads(s["data-y"])
        assert int(s["data-n"]) == len(x) == len(y) == len(s["points"].split())
        return x, y

    assert len(history) == 11  # steps 0..10
    # Passes over the data beside the steps: the last record's count, in the summary line.
    passes = history[-1]["passes"]
    assert passes >= 11 and f'<span id="passes">{round(passes, 2):g}</span>' in page.read_text(
        encoding="utf-8")
    assert xy("loss") == ([h["step"] for h in history], [h["loss"] for h in history])
    assert xy("val_loss") == ([h["step"] for h in history], [h["val_loss"] for h in history])
    assert xy("val_auc") == ([h["step"] for h in history], [h["val_auc"] for h in history])
    for name in ("learned", "plain"):
        assert xy(name) == (model.attrs["roc"][name]["fpr"], model.attrs["roc"][name]["tpr"])
    eig = np.sort(np.linalg.eigvalsh(model.A))[::-1]
    x, y = xy("eigenvalues")
    assert x == list(range(1, 17))
    np.testing.assert_allclose(y, np.maximum(eig, eig[0] * 1e-12), rtol=0, atol=0)
    assert y == sorted(y, reverse=True)

    text = page.read_text(encoding="utf-8")
    mark = re.search(r'class="mark" data-key="effective_rank" data-x="([^"]+)"', text)
    assert float(mark.group(1)) == pytest.approx(effective_rank(eig))
    assert 1.0 <= float(mark.group(1)) <= 16.0
    # The figures table holds the model's numbers; the settings its stop reason.
    cells = re.findall(r'<tr data-metric="(\w+)">(.*?)</tr>', text)
    val = model.attrs["validation_figures"]
    first = dict(re.findall(r'data-key="(\w+)" data-value="([^"]*)"', cells[1][1]))
    assert cells[1][0] == "learned" and json.loads(first["auc"]) == val["learned"]["auc"]
    assert f'<b id="stop-reason">{model.attrs["stop_reason"]}</b>' in text
    assert "AUC " + format(val["learned"]["auc"], ".4f") in text


def test_effective_rank():
    assert effective_rank(np.array([5.0, 0.0, -1e-17])) == pytest.approx(1.0)
    assert effective_rank(np.full(7, 3.0)) == pytest.approx(7.0)
    assert effective_rank(np.zeros(3)) == 0.0


# ---------------------------------------------------------- models without a ROC curve


def derived_model(trained: Path, out: Path, **changes) -> Path:
    """The trained model with some attrs changed (None drops the key)."""
    model = load_model(trained)
    attrs = {**model.attrs, **changes}
    save_model(out, Model(A=model.A, M=model.M,
                          attrs={k: v for k, v in attrs.items() if v is not None}),
               overwrite=False)
    return out


def test_graded_or_unvalidated_models_say_why_there_is_no_roc(trained, tmp_path):
    graded = derived_model(trained, tmp_path / "graded", targets="graded", roc=None)
    page = write_report(graded, tmp_path / "graded.html")
    text = page.read_text(encoding="utf-8")
    assert "trained on graded targets; a ROC curve needs binary" in text
    assert 'class="chart missing"' in text and "Loss per step" in text

    settings = {**load_model(trained).attrs["settings"], "validation": 0.0}
    plain = derived_model(trained, tmp_path / "noval", settings=settings, roc=None,
                          validation_figures=None)
    text = write_report(plain, tmp_path / "noval.html").read_text(encoding="utf-8")
    assert "held out no validation rows (validation=0)" in text
    assert "No figures on the validation pairs." in text
    # Without validation rows the training rows are every pair, and the caption says so.
    assert "<caption>training pairs (all pairs: no validation rows)</caption>" in text


def test_full_form_model_with_zero_eigenvalues_and_no_history(tmp_path):
    A = np.diag([4.0, 1.0, 0.0, 0.0])
    save_model(tmp_path / "m", Model(A=A, attrs={"targets": "binary", "complete": False}),
               overwrite=False)
    text = write_report(tmp_path / "m", tmp_path / "r.html").read_text(encoding="utf-8")
    assert "2 eigenvalue(s) at or near zero are drawn at" in text
    assert "no steps recorded" in text and "training has not finished" in text
    y = json.loads(Parsed(text).series()["eigenvalues"]["data-y"])
    assert y == [4.0, 1.0, 4e-12, 4e-12]


# ----------------------------------------------------------------------------- bad input


def test_not_a_model_is_a_one_line_error(tmp_path):
    (tmp_path / "plain_dir").mkdir()
    for bad in (tmp_path / "plain_dir", tmp_path / "missing"):
        result = cosim("report", bad, "--out", tmp_path / "r.html", expect=2)
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")
        assert not (tmp_path / "r.html").exists()
    with pytest.raises(ModelError, match="is not a cosim model"):
        write_report(tmp_path / "plain_dir", tmp_path / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain_dir"]  # no stray files


def test_existing_out_needs_overwrite_and_is_untouched(trained, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old report")
    result = cosim("report", trained, "--out", out, expect=2)
    assert result.output == f"error: report {str(out)!r} already exists; pass --overwrite " \
                            "to replace it\n"
    assert out.read_text() == "old report"
    assert not (tmp_path / "report-figures").exists()
    # --overwrite replaces only a report cosim wrote, never another file.
    result = cosim("report", trained, "--out", out, "--overwrite", expect=2)
    assert "refusing to replace" in result.output and "not a report" in result.output
    assert out.read_text() == "old report"
    out.unlink()
    cosim("report", trained, "--out", out)
    cosim("report", trained, "--out", out, "--overwrite")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_failure_while_writing_leaves_the_old_page(trained, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    write_report(trained, out)
    old = out.read_bytes()

    def boom(*args, **kwargs):
        raise CosimError("drawing failed")

    monkeypatch.setattr(report_mod, "render_page", boom)
    with pytest.raises(CosimError, match="drawing failed"):
        write_report(trained, out, overwrite=True)
    assert out.read_bytes() == old
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


# ----------------------------------------------------------------------------- in a browser


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert data[-8:-4] == b"IEND", path
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_chromium(browser, trained, page, tmp_path):
    tab = browser.new_page(viewport={"width": 1250, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    tab.on("request", lambda r: requests.append(r.url))
    tab.goto(page.resolve().as_uri())
    for chart, (title, xlabel, ylabel) in TITLES.items():
        svg = tab.locator(f"svg#chart-{chart}")
        assert svg.is_visible(), chart
        box = svg.bounding_box()
        assert box["width"] > 300 and box["height"] > 150, (chart, box)
        for cls, expected in (("chart-title", title), ("axis-label.x", xlabel),
                              ("axis-label.y", ylabel)):
            text = svg.locator(f"text.{cls}")  # SVG text: text_content, not inner_text
            assert text.is_visible() and text.text_content() == expected, (chart, cls)
    # Every series was drawn with an extent inside its chart.
    n_steps = len(load_model(trained).history)
    for key in ("loss", "val_loss", "val_auc", "learned", "plain", "eigenvalues"):
        line = tab.locator(f'polyline.series[data-key="{key}"]')
        box = line.bounding_box()
        assert box is not None and box["width"] > 50, (key, box)
    assert tab.locator('polyline.series[data-key="loss"]').get_attribute("data-n") == str(n_steps)
    assert tab.locator("#chart-spectrum line.mark").count() == 1
    assert "learned metric" in tab.locator("table.figures").first.inner_text()
    shot = tmp_path / "report.png"
    tab.screenshot(path=str(shot), full_page=True)
    tab.close()
    assert not problems, problems
    assert requests == [page.resolve().as_uri()]  # the page loaded nothing else
    assert png_size(shot)[1] > 1000 and shot.stat().st_size > 20_000
