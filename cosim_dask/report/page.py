"""The training report: one self-contained HTML page drawn from a model file.

Everything comes from the model: the per-step ``history``, the final figures, the validation
ROC points, the settings and A itself. The page has no script and loads nothing: styles and
charts (SVG drawn here, the one renderer) are inline, so it can be mailed or archived as one
file; a browser saves any chart as an image.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from cosim_dask import __version__
from cosim_dask.fit.evaluate import split_title
from cosim_dask.fit.model import Model, load_model
from cosim_dask.outputs import HTML_REPORT, check_output, claim_output
from cosim_dask.report.svg import Chart, Series, VMark, placeholder, render

FIGURE_KEYS = ("pairs", "loss", "mse", "auc", "accuracy", "threshold", "spearman")


def effective_rank(eigenvalues: np.ndarray) -> float:
    """exp of the Shannon entropy of the normalised spectrum (Roy & Vetterli, 2007).

    ``eigenvalues``: (d,) of a PSD matrix (negative round-off counts as 0). Between 1 (one
    direction) and d (all equal); scale-free, as cosine similarity is.
    """
    w = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def report_data(model: Model) -> dict[str, Any]:
    """What the report shows, as plain lists and dicts (the charts are drawn from this)."""
    attrs = model.attrs
    history = model.history

    def column(key: str) -> tuple[list[int], list[float]]:
        rows = [(h["step"], h[key]) for h in history
                if h.get(key) is not None and math.isfinite(h[key])]
        return [r[0] for r in rows], [float(r[1]) for r in rows]

    eig = np.sort(np.linalg.eigvalsh(model.A))[::-1]
    floor = max(float(eig[0]), 1e-300) * 1e-12  # zero (or round-off) eigenvalues, for log scale
    roc = attrs.get("roc")
    if roc:
        roc_missing = None
    elif attrs.get("targets") != "binary":
        roc_missing = (f"No ROC curve: the model was trained on {attrs.get('targets', 'unknown')}"
                       " targets; a ROC curve needs binary (±1) targets.")
    elif not (attrs.get("settings") or {}).get("validation"):
        roc_missing = "No ROC curve: training held out no validation rows (validation=0)."
    else:
        roc_missing = "No ROC curve: the model holds no ROC points (a checkpoint, not finished)."
    return {
        "loss": column("loss"),
        "val_loss": column("val_loss"),
        "val_auc": column("val_auc"),
        "eigenvalues": eig.tolist(),
        "eigenvalues_plotted": np.maximum(eig, floor).tolist(),
        "n_floored": int((eig < floor).sum()),
        "effective_rank": effective_rank(eig),
        "roc": roc,
        "roc_missing": roc_missing,
        "figures": {"validation rows": attrs.get("validation_figures"),
                    "training rows": attrs.get("train_figures")},
    }


def write_report(
    model_path: str | os.PathLike,
    out_html: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the training report of the model at ``model_path`` to ``out_html`` through the
    output policy (never over the model, only over a report, old or new at every instant).

    Raises :class:`~cosim_dask.errors.CosimError` (one line) for an existing output or a path
    that is not a model. Returns the page's path.
    """
    inputs = [model_path]
    check_output(out_html, HTML_REPORT, overwrite=overwrite, inputs=inputs)  # before drawing
    model = load_model(model_path)
    page = render_page(model, report_data(model), model_path=str(model_path))
    with claim_output(out_html, HTML_REPORT, overwrite=overwrite, inputs=inputs) as target, \
            target.staged() as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(out_html)


# ----------------------------------------------------------------------------- the charts


def charts(data: dict[str, Any]) -> dict[str, str]:
    """The four charts as SVG strings, by id: loss, val_auc, roc, spectrum."""
    steps, loss = data["loss"]
    vsteps, vloss = data["val_loss"]
    loss_series = [Series("loss", "training loss", steps, loss, "blue")]
    if vsteps:
        loss_series.append(Series("val_loss", "validation loss", vsteps, vloss, "orange",
                                  markers=len(vsteps) < len(steps)))
    out = {"loss": render(Chart("loss", "Loss per step", "step", "loss", loss_series,
                                  integer_x=True))
           if steps else placeholder("loss", "Loss per step", "no steps recorded")}
    asteps, auc = data["val_auc"]
    out["val_auc"] = (
        render(Chart("val_auc", "Validation ROC AUC per step", "step", "ROC AUC",
                     [Series("val_auc", "learned metric", asteps, auc, "orange",
                             markers=len(asteps) < 30)], integer_x=True))
        if asteps else placeholder("val_auc", "Validation ROC AUC per step",
                                   "no validation AUC (graded targets or no validation)"))
    roc = data["roc"]
    if roc:
        labels = _roc_labels(data)
        series = [Series("learned", labels["learned"], roc["learned"]["fpr"],
                         roc["learned"]["tpr"], "blue"),
                  Series("plain", labels["plain"], roc["plain"]["fpr"], roc["plain"]["tpr"],
                         "green"),
                  Series("chance", "chance", [0.0, 1.0], [0.0, 1.0], "grey", dashed=True)]
        out["roc"] = render(Chart("roc", "ROC on the validation split", "false positive rate",
                                  "true positive rate", series, x_range=(0.0, 1.0),
                                  y_range=(0.0, 1.0)))
    else:
        out["roc"] = placeholder("roc", "ROC on the validation split",
                                 "no ROC curve (see the note below)")
    eig = data["eigenvalues_plotted"]
    erank = data["effective_rank"]
    out["spectrum"] = render(Chart(
        "spectrum", "Eigenvalue spectrum of A", "index (largest first)",
        "eigenvalue (log scale)",
        [Series("eigenvalues", "eigenvalues of A", list(range(1, len(eig) + 1)), eig, "blue",
                markers=True)],
        log_y=True, x_range=(0.5, len(eig) + 0.5),
        marks=[VMark("effective_rank", erank, f"effective rank {erank:.2f}")]))
    return out


def _roc_labels(data: dict[str, Any]) -> dict[str, str]:
    """Legend labels with the validation AUC, when the model holds it."""
    figures = data["figures"]["validation rows"] or {}
    labels = {}
    for name, label in (("learned", "learned metric"), ("plain", "plain cosine")):
        auc = (figures.get(name) or {}).get("auc")
        labels[name] = label if auc is None else f"{label} (AUC {auc:.4f})"
    return labels


# ------------------------------------------------------------------------------- the page

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.sub { color: #666; margin-top: 0; }
.grid2 { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; } figcaption { color: #555; max-width: 560px; font-size: 13px; }
svg.chart { background: #fff; border: 1px solid #ddd; max-width: 100%; height: auto; }
svg .plot-area { fill: #fafafa; stroke: #999; }
svg .grid { stroke: #e6e6e6; }
svg .chart-title { font-size: 15px; font-weight: 600; }
svg .axis-label { font-size: 13px; } svg .tick, svg .legend, svg .mark-label { font-size: 11px; }
svg .missing-note { fill: #777; font-size: 14px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th { background: #f3f3f3; } td.k, th.k { text-align: left; }
figure .note { max-width: 540px; }
.note { color: #7a4b00; background: #fff7e6; border-left: 3px solid #f0a020; padding: 4px 10px; }
"""


def _num(value: Any, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return escape(str(value))
    if key == "pairs" or isinstance(value, int):
        return f"{value:,}"
    if key == "setting":
        return f"{value:g}"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"


def _figures_table(title: str, figures: dict | None) -> str:
    if not figures:
        return f'<p class="note">No figures on the {escape(title)}.</p>'
    keys = [k for k in FIGURE_KEYS if k in figures.get("learned", {})]
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    rows = "".join(
        f'<tr data-metric="{name}"><td class="k">{label}</td>'
        + "".join(f'<td data-key="{k}" data-value="{escape(json.dumps(figures[name].get(k)))}">'
                  f"{_num(figures[name].get(k), k)}</td>" for k in keys) + "</tr>"
        for name, label in (("plain", "plain cosine"), ("learned", "learned metric"))
        if name in figures)
    return (f'<table class="figures" data-split="{escape(title)}"><caption>{escape(title)}'
            f'</caption><tr><th class="k">metric</th>{head}</tr>{rows}</table>')


def _settings_table(model: Model, model_path: str) -> str:
    attrs = model.attrs
    rows: list[tuple[str, Any]] = [
        ("model", model_path), ("stop reason", attrs.get("stop_reason")),
        ("steps", attrs.get("steps")), ("passes over the data", _passes(model)),
        ("complete", attrs.get("complete")),
        ("training time (s)", attrs.get("train_seconds")), ("saved", attrs.get("saved")),
        ("run id", attrs.get("run_id")), ("store", attrs.get("store_path")),
        ("store fingerprint", attrs.get("store_fingerprint")),
        ("targets", attrs.get("targets")), ("d", model.d),
        ("factor M", "none (full A)" if model.M is None else f"{model.M.shape[0]} × {model.d}"),
        ("cosim-dask", attrs.get("cosim_version")),
    ]
    rows += [(f"settings.{k}", v) for k, v in (attrs.get("settings") or {}).items()]
    body = "".join(f'<tr data-key="{escape(k)}"><td class="k">{escape(k)}</td>'
                   f'<td class="k">{_num(v, "setting")}</td></tr>' for k, v in rows)
    return f'<table id="settings">{body}</table>'


def _passes(model: Model) -> float | None:
    """Training passes over the data (reads of every training row), from the last step's
    record; None for models trained before they were counted."""
    passes = model.history[-1].get("passes") if model.history else None
    return round(passes, 2) if passes is not None else None


def render_page(model: Model, data: dict[str, Any], *, model_path: str) -> str:
    """The whole HTML page as a string."""
    svg = charts(data)
    attrs = model.attrs
    eig = data["eigenvalues"]
    spectrum_note = (f"{len(eig)} eigenvalues from {eig[0]:.4g} down to {eig[-1]:.4g}; "
                     f"effective rank {data['effective_rank']:.2f} of {len(eig)} "
                     "(exp of the entropy of the normalised eigenvalues). The scale of A does "
                     "not change cosine similarity: compare shapes, not levels.")
    if data["n_floored"]:
        spectrum_note += (f" {data['n_floored']} eigenvalue(s) at or near zero are drawn at "
                          "10⁻¹² × the largest.")
    roc_note = (f'<p class="note" id="roc-missing">{escape(data["roc_missing"])}</p>'
                if data["roc_missing"] else "")
    checkpoint = ('<p class="note">This model is a checkpoint: training has not finished.</p>'
                  if attrs.get("complete") is False else "")
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    validation = float((attrs.get("settings") or {}).get("validation") or 0.0)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="cosim-dask {__version__}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cosim training report: {escape(Path(model_path).name)}</title>
<style>{CSS}</style>
</head>
<body data-steps="{len(model.history)}" data-d="{model.d}">
<h1>Training report: {escape(model_path)}</h1>
<p class="sub">{escape(str(attrs.get("loss")))} loss, {escape(str(attrs.get("solver")))} solver,
{escape(str(attrs.get("param")))} form; stopped:
<b id="stop-reason">{_num(attrs.get("stop_reason"))}</b> after {_num(attrs.get("steps"))} steps
(<span id="passes">{_num(_passes(model), "setting")}</span> passes over the data).
Generated {generated} by cosim-dask {__version__}.</p>
{checkpoint}
<h2>Training curves</h2>
<div class="grid2">
<figure>{svg["loss"]}<figcaption>Training loss on every step; validation loss where it was
computed.</figcaption></figure>
<figure>{svg["val_auc"]}<figcaption>ROC AUC of the learned metric on the validation
rows.</figcaption></figure>
</div>
<h2>Validation ROC and spectrum</h2>
<div class="grid2">
<figure>{svg["roc"]}<figcaption>The learned metric beside plain cosine similarity on the
validation rows.</figcaption>{roc_note}</figure>
<figure>{svg["spectrum"]}<figcaption id="spectrum-note">{escape(spectrum_note)}</figcaption>
</figure>
</div>
<h2>Figures: learned metric vs plain cosine</h2>
<p class="sub">Accuracy uses thresholds calibrated on the training rows.</p>
{_figures_table(split_title("validation"), data["figures"]["validation rows"])}
{_figures_table(split_title("train", validation), data["figures"]["training rows"])}
<h2>Settings</h2>
{_settings_table(model, model_path)}
</body>
</html>
"""
