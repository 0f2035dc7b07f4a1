"""`cosim transform` and `cosim report`: use a trained model. Thin: parse, call
cosim_dask.transform / cosim_dask.report inside run(), render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cosim_dask.cli.options import Model, overwrite_option
from cosim_dask.cli.output import echo, run
from cosim_dask.fit.model import load_model
from cosim_dask.report.page import write_report
from cosim_dask.transform import DEFAULT_BLOCK_ROWS, transform_file

OverwriteOut = overwrite_option("OUT if it exists")
OverwriteReport = overwrite_option("an existing --out report")


def transform(
    model: Model,
    src: Annotated[str, typer.Argument(
        metavar="IN", help="A .npy array (n, d) of vectors, or a pair store (folder or URL).")],
    out: Annotated[str, typer.Argument(
        metavar="OUT",
        help="The .npy file (n, k) to write L·x to, or a new pair store for a store IN.")],
    overwrite: OverwriteOut = False,
    block_rows: Annotated[
        int, typer.Option("--block-rows", min=1, help="Vectors per block (bounds memory).")
    ] = DEFAULT_BLOCK_ROWS,
) -> None:
    """Write L·x (A = LᵀL) for every vector of IN, so plain cosine similarity downstream
    equals the learned similarity."""

    def body() -> None:
        report = transform_file(load_model(model), src, out, overwrite=overwrite,
                                block_rows=block_rows, inputs=[model])
        what = "pairs" if report.store else "vectors"
        echo(f"wrote {report.rows:,} {what} of {report.out_dim} ({report.dtype}) "
             f"to {report.path}")

    run(body)


def report(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")
                   ] = Path("report.html"),
    overwrite: OverwriteReport = False,
) -> None:
    """Write a self-contained HTML training report: curves, validation ROC, spectrum of A,
    figures and settings, drawn as inline SVG (a browser saves any chart as an image)."""
    page = run(lambda: write_report(model, out, overwrite=overwrite))
    echo(f"report written to {page}")
