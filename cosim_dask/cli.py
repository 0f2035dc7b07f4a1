"""The `cosim` command line: parse, call the library, render. No math here.

Every command runs its body through :func:`run`, which turns a :class:`CosimError` (and a
few well-understood OS errors) into one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import CosimError
from .ingest import (
    IngestReport,
    array_rows,
    generate_store,
    ingest_arrays,
    ingest_pairs,
    pair_list_rows,
)
from .store import store_info

T = TypeVar("T")

app = typer.Typer(
    name="cosim",
    help="Learn a cosine-similarity metric from labelled pairs of vectors, at any scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def run(body: Callable[[], T]) -> T:
    """Call ``body``; a CosimError becomes a one-line message and exit code 2."""
    try:
        return body()
    except (CosimError, FileNotFoundError, PermissionError, OSError) as exc:
        if _state["debug"]:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """Learn a cosine-similarity metric from labelled pairs of vectors, at any scale."""
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print the installed cosim-dask version."""
    typer.echo(__version__)


# ---------------------------------------------------------------------------------------
# Pair stores: generate, ingest, info (issue 3). Thin: parse, call cosim_dask.ingest /
# cosim_dask.store inside run(), render.


class TargetKind(StrEnum):
    binary = "binary"
    graded = "graded"


class Codec(StrEnum):
    none = "none"
    lz4 = "lz4"
    zstd1 = "zstd1"
    zstd3 = "zstd3"
    blosc_zstd = "blosc-zstd"


_ChunkPairs = Annotated[
    int | None,
    typer.Option("--chunk-pairs", help="Pairs per chunk (default: ~16 MiB of x per chunk, "
                 "32,768 at d=128, evened out over the pairs)."),
]
_CodecOpt = Annotated[Codec, typer.Option(help="Chunk codec (see README, Store format).")]
_Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing STORE.")]


@contextmanager
def _progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields the ``progress(rows)`` callback."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("pairs"), TimeElapsedColumn(), TimeRemainingColumn()]
    console = Console(stderr=True)
    # Off when stderr is not a terminal: logs and pipes get the summary line only.
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda rows: bar.advance(task, rows)


def _report_line(report: IngestReport, verb: str) -> str:
    line = (f"{verb} {report.n:,} pairs x {report.d} to {report.path} "
            f"({report.targets} targets, {report.seconds:.1f} s)")
    if report.dropped:
        detail = ", ".join(f"{k} {v:,}" for k, v in report.dropped.items())
        line += f"; dropped {report.n_dropped:,} invalid pairs ({detail})"
    return line


@app.command()
def generate(
    store: Annotated[str, typer.Argument(help="Pair store to create (directory or URL).")],
    pairs: Annotated[int, typer.Option("--pairs", help="Number of pairs.")],
    dim: Annotated[int, typer.Option("--dim", help="Vector dimension d.")],
    rank: Annotated[int | None, typer.Option(help="Rank of the hidden metric A* "
                                             "(default d).")] = None,
    noise: Annotated[float, typer.Option(help="Std of the noise added to sim(x, y; A*).")
                     ] = 0.05,
    targets: Annotated[TargetKind, typer.Option(help="Graded (clipped similarity) or "
                                                "binary (its sign).")] = TargetKind.graded,
    seed: Annotated[int, typer.Option(help="Seed of A* and of every chunk.")] = 0,
    chunk_pairs: _ChunkPairs = None,
    codec: _CodecOpt = Codec.none,
    overwrite: _Overwrite = False,
) -> None:
    """Write synthetic pairs whose targets come from a hidden PSD metric A* (kept in the
    store), streaming chunk by chunk."""
    with _progress_bar("generate", pairs) as progress:
        report = run(lambda: generate_store(
            store, pairs=pairs, dim=dim, rank=rank, noise=noise, targets=targets.value,
            seed=seed, chunk_rows=chunk_pairs, codec=codec.value, overwrite=overwrite,
            progress=progress))
    typer.echo(_report_line(report, "generated"))


@app.command()
def ingest(
    store: Annotated[str, typer.Argument(help="Pair store to create (directory or URL).")],
    x: Annotated[Path | None, typer.Option("--x", help="x vectors, (n, d) .npy.")] = None,
    y: Annotated[Path | None, typer.Option("--y", help="y vectors, (n, d) .npy.")] = None,
    target: Annotated[Path | None, typer.Option("--target", help="Targets, (n,) .npy.")
                      ] = None,
    embeddings: Annotated[Path | None, typer.Option(
        "--embeddings", help="Embedding table, (m, d) .npy, indexed by the pair list.")
    ] = None,
    pairs: Annotated[Path | None, typer.Option(
        "--pairs", help="Pair list: .parquet or .csv with two row-index columns and a target.")
    ] = None,
    i_column: Annotated[str, typer.Option(help="Pair-list column of x's row.")] = "i",
    j_column: Annotated[str, typer.Option(help="Pair-list column of y's row.")] = "j",
    target_column: Annotated[str, typer.Option(help="Pair-list target column.")] = "target",
    targets: Annotated[TargetKind | None, typer.Option(
        help="How to read targets (default: binary when all are ±1, else graded).")] = None,
    zero_is_negative: Annotated[bool, typer.Option(
        "--zero-is-negative", help="Read 0/1 labels as binary, 0 -> -1.")] = False,
    normalize: Annotated[bool, typer.Option(
        "--normalize", help="L2-normalise the vectors (no similarity changes).")] = False,
    drop_invalid: Annotated[bool, typer.Option(
        "--drop-invalid", help="Skip pairs with NaN/Inf, zero vectors or bad targets "
        "(counted) instead of failing.")] = False,
    chunk_pairs: _ChunkPairs = None,
    codec: _CodecOpt = Codec.none,
    overwrite: _Overwrite = False,
) -> None:
    """Convert aligned .npy arrays (--x/--y/--target) or an embedding table plus a pair list
    (--embeddings/--pairs) into a pair store, streaming in bounded memory."""
    aligned, table = (x, y, target), (embeddings, pairs)
    options = {"targets": None if targets is None else targets.value,
               "zero_is_negative": zero_is_negative, "drop_invalid": drop_invalid,
               "normalize": normalize, "chunk_rows": chunk_pairs, "codec": codec.value,
               "overwrite": overwrite}

    def body() -> IngestReport:
        if all(a is not None for a in aligned) and all(t is None for t in table):
            total = array_rows(target)
            with _progress_bar("ingest", total) as progress:
                return ingest_arrays(store, x, y, target, progress=progress, **options)
        if all(t is not None for t in table) and all(a is None for a in aligned):
            with _progress_bar("ingest", pair_list_rows(pairs)) as progress:
                return ingest_pairs(store, embeddings, pairs, i_column=i_column,
                                    j_column=j_column, target_column=target_column,
                                    progress=progress, **options)
        raise CosimError("give either --x, --y and --target, or --embeddings and --pairs")

    typer.echo(_report_line(run(body), "ingested"))


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Pair store (directory or URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    validation: Annotated[float | None, typer.Option(
        help="Also show the train/validation split this fraction gives.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
) -> None:
    """Describe a pair store: shape, chunks, codec, sizes, targets, provenance."""
    data = run(lambda: store_info(store, validation=validation, seed=seed))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for line in _format_info(data):
        typer.echo(line)


def _format_info(info: dict) -> list[str]:
    """The human-readable `cosim info` lines."""
    mb = 2**20
    lines = [
        f"store        {info['path']}  ({info['format']}, fingerprint {info['fingerprint']})",
        f"pairs        {info['n']:,} x d={info['d']}  ({info['dtype']})",
        f"chunks       {info['n_chunks']:,} of {info['chunk_rows']:,} pairs, codec "
        f"{info['codec']}",
        f"size         {info['bytes_on_disk'] / mb:,.1f} MiB on disk, "
        f"{info['bytes_in_memory'] / mb:,.1f} MiB in memory",
    ]
    stats = info.get("target_stats") or {}
    if info["targets"] == "binary":
        lines.append(f"targets      binary: +1 {stats.get('count_pos', 0):,}, "
                     f"-1 {stats.get('count_neg', 0):,}")
    else:
        lines.append(f"targets      graded in [-1, 1], mean {stats.get('mean', 0.0):+.4f}")
        edges, counts = stats.get("hist_edges", []), stats.get("hist_counts", [])
        top = max(counts, default=0) or 1
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=False):
            close = "]" if hi == edges[-1] else ")"
            lines.append(f"  [{lo:+.1f}, {hi:+.1f}{close}  {c:>12,}  {'#' * round(30 * c / top)}")
    if "validation" in info:
        v = info["validation"]
        lines.append(f"split        validation {v['fraction']} (seed {v['seed']}): "
                     f"{v['validation_pairs']:,} validation, {v['train_pairs']:,} train pairs")
    if "hidden_metric" in info:
        h = info["hidden_metric"]
        lo, hi = h["eigenvalues_min_max"]
        lines.append(f"hidden A*    rank {h['rank']} (+ small ridge), eigenvalues "
                     f"{lo:.3g}..{hi:.3g}")
    lines.append(f"created      {info['created']} by cosim-dask {info['cosim_version']}")
    for key, value in (info.get("provenance") or {}).items():
        lines.append(f"  {key}: {json.dumps(value)}")
    return lines

# End of the pair-store commands.
# ---------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app()
