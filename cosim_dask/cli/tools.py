"""`cosim transform` and `cosim report`: use a trained model. Thin: parse, call
cosim_dask.transform / cosim_dask.report inside run(), render."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cosim_dask.cli.options import Json, Model, Quiet, overwrite_option, swapped
from cosim_dask.cli.output import echo, print_json, run
from cosim_dask.errors import ModelError
from cosim_dask.fit.model import load_model
from cosim_dask.report.page import write_report
from cosim_dask.transform import DEFAULT_BLOCK_ROWS, transform_file

OverwriteOut = overwrite_option("OUT if it exists")
OverwriteReport = overwrite_option("an existing --out report")


def transform(
    model: Model,
    src: Annotated[Path, typer.Argument(
        metavar="IN", help="A .npy array (n, d) of vectors, or a pair store.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT",
        help="The .npy file (n, k) to write L·x to, or a new pair store for a store IN.")],
    overwrite: OverwriteOut = False,
    block_rows: Annotated[
        int, typer.Option("--block-rows", min=1, help="Vectors per block (bounds memory).")
    ] = DEFAULT_BLOCK_ROWS,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write L·x (A = LᵀL) for every vector of IN, so plain cosine similarity downstream
    equals the learned similarity."""

    def body() -> None:
        try:
            loaded = load_model(model)
        except ModelError:
            swapped(model, src, "cosim transform MODEL IN OUT")
            raise
        report = transform_file(loaded, src, out, overwrite=overwrite,
                                block_rows=block_rows, inputs=[model])
        what = "pairs" if src.is_dir() else "vectors"
        if as_json:
            print_json({**asdict(report), "model": str(model), "input": str(src),
                        "kind": what})
            return
        echo(f"wrote {report.rows:,} {what} of {report.out_dim} ({report.dtype}) "
             f"to {report.path}")

    run(body)


def report(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")
                   ] = Path("report.html"),
    overwrite: OverwriteReport = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write a self-contained HTML training report: curves, validation ROC, spectrum of A,
    figures and settings, drawn as inline SVG (a browser saves any chart as an image)."""
    page = run(lambda: write_report(model, out, overwrite=overwrite))
    if as_json:
        print_json({"model": str(model), "report": str(page)})
    else:
        echo(f"report written to {page}")
