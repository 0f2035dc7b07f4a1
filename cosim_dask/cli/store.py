"""`cosim generate`, `cosim ingest`, `cosim info`: pair stores. Thin: parse, call
cosim_dask.data.ingest / cosim_dask.data.store inside run(), render."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cosim_dask.cli.options import (
    MAX_SEED,
    ChunkPairs,
    Codec,
    CodecOption,
    Json,
    OverwriteStore,
    Quiet,
    TargetKind,
    on_off,
)
from cosim_dask.cli.output import echo, print_json, run
from cosim_dask.cli.progress import progress
from cosim_dask.data.ingest import (
    IngestReport,
    array_rows,
    generate_store,
    ingest_arrays,
    ingest_pairs,
    pair_list_rows,
)
from cosim_dask.data.store import store_info
from cosim_dask.errors import CosimError


def _report_line(report: IngestReport, verb: str) -> str:
    line = (f"{verb} {report.n:,} pairs x {report.d} to {report.path} "
            f"({report.targets} targets, {report.seconds:.1f} s)")
    if report.dropped:
        detail = ", ".join(f"{k} {v:,}" for k, v in report.dropped.items())
        line += f"; dropped {report.n_dropped:,} invalid pairs ({detail})"
    return line


def generate(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="Pair store to create (directory or URL).")],
    pairs: Annotated[int, typer.Option("--pairs", help="Number of pairs.")],
    dim: Annotated[int, typer.Option("--dim", help="Vector dimension d.")],
    rank: Annotated[int | None, typer.Option(help="Rank of the hidden metric A* "
                                             "(default d).")] = None,
    noise: Annotated[float, typer.Option(help="Std of the noise added to sim(x, y; A*).")
                     ] = 0.05,
    targets: Annotated[TargetKind, typer.Option(help="Graded (clipped similarity) or "
                                                "binary (its sign).")] = TargetKind("graded"),
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED,
                                      help="Seed of A* and of every chunk.")] = 0,
    chunk_pairs: ChunkPairs = None,
    codec: CodecOption = Codec("none"),
    overwrite: OverwriteStore = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write synthetic pairs whose targets come from a hidden PSD metric A* (kept in the
    store), streaming chunk by chunk."""
    with progress("generate", pairs, "pairs") as tracker:
        report = run(lambda: generate_store(
            store, pairs=pairs, dim=dim, rank=rank, noise=noise, targets=targets.value,
            seed=seed, chunk_rows=chunk_pairs, codec=codec.value, overwrite=overwrite,
            progress=tracker.advance))
    _print_report(report, "generated", as_json)


def ingest(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="Pair store to create (directory or URL).")],
    x: Annotated[Path | None, typer.Option("--x", help="x vectors, (n, d) .npy.")] = None,
    y: Annotated[Path | None, typer.Option("--y", help="y vectors, (n, d) .npy.")] = None,
    target: Annotated[Path | None, typer.Option(
        "--target", help="Targets, (n,) .npy; without it every pair is positive (+1), for "
        "`cosim train --negatives`.")] = None,
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
    zero_is_negative: Annotated[bool, on_off(
        "--zero-is-negative", help="Read 0/1 labels as binary, 0 -> -1.")] = False,
    normalize: Annotated[bool, on_off(
        "--normalize", help="L2-normalise the vectors (no similarity changes).")] = False,
    drop_invalid: Annotated[bool, on_off(
        "--drop-invalid", help="Skip pairs with NaN/Inf, zero vectors or bad targets "
        "(counted) instead of failing.")] = False,
    chunk_pairs: ChunkPairs = None,
    codec: CodecOption = Codec("none"),
    overwrite: OverwriteStore = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Convert aligned .npy arrays (--x/--y/--target) or an embedding table plus a pair list
    (--embeddings/--pairs) into a pair store, streaming in bounded memory.

    Input rules. Vectors must be floating point (stored as float32): integer or bool
    vectors are an error, they nearly always mean the wrong file (ids, counts).

    Targets may be integer, bool or float; --targets says how to read them (default: binary
    when all are ±1, else graded in [-1, 1]); 0/1 labels are read as binary (0 -> -1) only
    with --zero-is-negative.

    Invalid pairs (a NaN/Inf or all-zero vector; a target that is NaN/Inf, outside [-1, 1],
    or not ±1 for binary) are an error naming the count, the reasons and the first row;
    --drop-invalid skips them and reports the count by reason. Pair indices outside the
    embedding table are an error even with --drop-invalid. --normalize divides every vector
    by its L2 norm (no similarity changes).
    """
    aligned, table = (x, y, target), (embeddings, pairs)
    options = {"targets": None if targets is None else targets.value,
               "zero_is_negative": zero_is_negative, "drop_invalid": drop_invalid,
               "normalize": normalize, "chunk_rows": chunk_pairs, "codec": codec.value,
               "overwrite": overwrite}

    def body() -> IngestReport:
        if x is not None and y is not None and all(t is None for t in table):
            total = array_rows(target if target is not None else x)
            with progress("ingest", total, "pairs") as tracker:
                return ingest_arrays(store, x, y, target, progress=tracker.advance,
                                     **options)
        if all(t is not None for t in table) and all(a is None for a in aligned):
            # A CSV is counted here once (a Parquet footer says it); ingest reuses it.
            total = pair_list_rows(pairs)
            with progress("ingest", total, "pairs") as tracker:
                return ingest_pairs(store, embeddings, pairs, i_column=i_column,
                                    j_column=j_column, target_column=target_column,
                                    progress=tracker.advance, n_pairs=total, **options)
        raise CosimError("give either --x and --y (and --target), or --embeddings and --pairs")

    _print_report(run(body), "ingested", as_json)


def _print_report(report: IngestReport, verb: str, as_json: bool) -> None:
    if as_json:
        print_json({**asdict(report), "dropped_total": report.n_dropped})
    else:
        echo(_report_line(report, verb))


def info(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Pair store (directory or URL).")],
    as_json: Json = False,
    validation: Annotated[float | None, typer.Option(
        help="Also show the train/validation split this fraction gives.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of that split.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Describe a pair store: shape, chunks, codec, sizes, targets, provenance."""
    data = run(lambda: store_info(store, validation=validation, seed=seed))
    if as_json:
        print_json(data)
        return
    for line in _format_info(data):
        echo(line)


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
    provenance = info.get("provenance")
    if isinstance(provenance, dict):
        for key, value in provenance.items():
            lines.append(f"  {key}: {json.dumps(value)}")
    elif provenance is not None:  # written by another tool: shown as it is
        lines.append(f"provenance   {json.dumps(provenance)}")
    return lines
