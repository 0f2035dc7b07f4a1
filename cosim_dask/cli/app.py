"""The `cosim` command line: parse, call the library, render. No math here.

Every command runs its body through :func:`run`, which turns a :class:`CosimError` (and a
few well-understood OS errors) into one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cosim_dask import __version__
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

T = TypeVar("T")
#: The click typer parses with: recent typer vendors its own copy as ``typer._click``.
_click = getattr(typer.core, "_click", None) or __import__("click")


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (unknown option, value out of range, missing argument) as one line
    ``error: ...`` and exit 2, like every other error, instead of click's boxed usage text."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _click.exceptions.NoArgsIsHelpError:
        raise
    except _click.exceptions.UsageError as exc:
        if _state["debug"]:
            raise
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        message = " ".join(exc.format_message().split())
        _echo(f"error: {message}{where}", err=True)
        raise typer.Exit(code=2) from None


class _Command(typer.core.TyperCommand):
    """Positionals in the usage line as their metavar, ``cosim info [OPTIONS] STORE``, the
    way click writes them (recent typer writes a required one in braces, ``{STORE}``)."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not isinstance(param, typer.core.TyperArgument):
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or param.name.upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name if param.nargs == 1 else f"{name}...")
        return pieces


app = typer.Typer(
    name="cosim",
    help="Learn a cosine-similarity metric from labelled pairs of vectors, at any scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineUsageErrors,
)

_state = {"debug": False}

#: C0 and C1 control characters, DEL, and the Unicode controls that reorder text (bidi):
#: in a store attribute or a path they could clear the screen, set the terminal's title or
#: hide what is printed.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character shown as an escape (ESC as ``\\x1b``): safe
    to print to a terminal whatever a file or an argument held."""
    return _UNPRINTABLE.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _echo(text: object, err: bool = False) -> None:
    """Every human-readable line the CLI prints goes through here (JSON is escaped by
    json.dumps): one place where text from files and arguments is made printable."""
    typer.echo(printable(text), err=err)


def _say(console: Console, text: object) -> None:
    """:func:`_echo` for a rich console: escaped, and not read as rich markup."""
    console.print(printable(text), markup=False)


def run(body: Callable[[], T]) -> T:
    """Call ``body``; a CosimError becomes a one-line message and exit code 2."""
    try:
        return body()
    # MemoryError: a size typed with a few zeros too many ("Unable to allocate 71 PiB ...").
    except (CosimError, FileNotFoundError, PermissionError, OSError, MemoryError) as exc:
        if _state["debug"]:
            raise
        message = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt as exc:
        # SIGTERM arrives as Terminated (see _root): the same clean-up, its own exit code.
        terminated = isinstance(exc, Terminated)
        typer.echo("terminated" if terminated else "interrupted", err=True)
        raise typer.Exit(code=143 if terminated else 130) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` runs: outputs remove their
    temporary versions and release their locks, clusters are closed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """Learn a cosine-similarity metric from labelled pairs of vectors, at any scale."""
    _state["debug"] = debug
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@app.command(cls=_Command)
def version() -> None:
    """Print the installed cosim-dask version."""
    typer.echo(__version__)


#: Every positional has an upper-case metavar (MODEL, STORE, IN, OUT), the name its help
#: text and the other options' help refer to.
_Model = Annotated[Path, typer.Argument(metavar="MODEL", help="A model written by `cosim train`.")]


@app.command(cls=_Command)
def transform(
    model: _Model,
    src: Annotated[Path, typer.Argument(
        metavar="IN", help="A .npy array (n, d) of vectors, or a pair store.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT",
        help="The .npy file (n, k) to write L·x to, or a new pair store for a store IN.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
    ] = False,
    block_rows: Annotated[
        int, typer.Option("--block-rows", min=1, help="Vectors per block (bounds memory).")
    ] = 65536,
) -> None:
    """Write L·x (A = LᵀL) for every vector of IN, so plain cosine similarity downstream
    equals the learned similarity."""

    def body() -> None:
        from cosim_dask.fit.model import load_model
        from cosim_dask.transform import transform_file

        report = transform_file(load_model(model), src, out, overwrite=overwrite,
                                block_rows=block_rows, inputs=[model])
        what = "pairs" if src.is_dir() else "vectors"
        _echo(f"wrote {report.rows:,} {what} of {report.out_dim} ({report.dtype}) "
                   f"to {report.path}")

    run(body)

# ---------------------------------------------------------------------------------------
# Pair stores: generate, ingest, info (issue 3). Thin: parse, call cosim_dask.data.ingest /
# cosim_dask.data.store inside run(), render.


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
#: Seeds feed NumPy's generators, which take [0, 2**32 - 1] here (train checks its own
#: seed in TrainConfig.check).
_MAX_SEED = 2**32 - 1
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


@app.command(cls=_Command)
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
                                                "binary (its sign).")] = TargetKind.graded,
    seed: Annotated[int, typer.Option(min=0, max=_MAX_SEED,
                                      help="Seed of A* and of every chunk.")] = 0,
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
    _echo(_report_line(report, "generated"))


@app.command(cls=_Command)
def ingest(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="Pair store to create (directory or URL).")],
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

    _echo(_report_line(run(body), "ingested"))


@app.command(cls=_Command)
def info(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Pair store (directory or URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    validation: Annotated[float | None, typer.Option(
        help="Also show the train/validation split this fraction gives.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=_MAX_SEED, help="Seed of that split.")] = 0,
) -> None:
    """Describe a pair store: shape, chunks, codec, sizes, targets, provenance."""
    data = run(lambda: store_info(store, validation=validation, seed=seed))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for line in _format_info(data):
        _echo(line)


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

# End of the pair-store commands.
# ---------------------------------------------------------------------------------------
# --- training, evaluation -------------------------------------------------------------


class LossName(StrEnum):
    mse = "mse"
    contrastive = "contrastive"


class ParamName(StrEnum):
    full = "full"
    factor = "factor"


class SolverName(StrEnum):
    lbfgs = "lbfgs"
    gd = "gd"
    adam = "adam"


class CacheMode(StrEnum):
    auto = "auto"
    memory = "memory"
    stream = "stream"


Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", envvar="DASK_SCHEDULER_ADDRESS",
    help="Address of an existing Dask scheduler (tcp://host:8786, tls://...). Default: start a "
         "LocalCluster.", rich_help_panel="Cluster")]
Workers = Annotated[int, typer.Option(
    min=1, help="LocalCluster worker processes.", rich_help_panel="Cluster")]
Threads = Annotated[int, typer.Option(
    "--threads-per-worker", min=1, help="Threads per LocalCluster worker.",
    rich_help_panel="Cluster")]
MemoryLimit = Annotated[str, typer.Option(
    "--memory-limit", help="Memory limit per LocalCluster worker ('4GiB', 'auto').",
    rich_help_panel="Cluster")]
DashboardAddress = Annotated[str, typer.Option(
    "--dashboard-address", help="Where the LocalCluster dashboard listens (loopback by "
    "default; e.g. 0.0.0.0:8787 opens it to the network on purpose).",
    rich_help_panel="Cluster")]
SecurityOpt = Annotated[Path | None, typer.Option(
    "--security", help="A Dask TLS config (YAML with distributed.comm.tls keys) for tls:// "
    "schedulers.", rich_help_panel="Cluster")]


def _cluster_config(scheduler, workers, threads, memory_limit, dashboard_address, security):
    """The cluster options, checked (one line and exit 2 if bad) before anything starts."""
    from cosim_dask.dist.cluster import ClusterConfig

    config = ClusterConfig(scheduler=scheduler, workers=workers, threads_per_worker=threads,
                           memory_limit=memory_limit, dashboard_address=dashboard_address,
                           security=security)
    run(config.check)
    return config


@contextmanager
def _cluster(config):
    from cosim_dask.dist.cluster import close, connect

    if not _state["debug"]:
        # When the scheduler goes away, distributed's client logs each failed reconnect with
        # a traceback; our own one-line error says what happened and how to resume.
        logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    client, cluster = run(lambda: connect(config))
    try:
        yield client
    finally:
        close(client, cluster)


def _dashboard_link(client) -> str:
    from cosim_dask.dashboard.publisher import dashboard_url
    from cosim_dask.errors import ClusterError

    try:
        return dashboard_url(client)
    except ClusterError as exc:
        return f"none ({exc})"


def _fmt(value, spec: str = ".5g") -> str:
    return "—" if value is None else format(value, spec)


@app.command(cls=_Command)
def train(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="The pair store to learn from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the model.")],
    loss: Annotated[LossName, typer.Option(help="Loss on the similarities.")] = LossName.mse,
    negative_target: Annotated[float | None, typer.Option(
        help="mse on binary labels: the target for label −1 (default 0: unrelated; "
             "−1: opposite).")] = None,
    param: Annotated[ParamName, typer.Option(
        help="factor: learn M (k × d) with A = MᵀM; full: learn A itself, projected onto "
             "the PSD cone after each step.")] = ParamName.factor,
    rank: Annotated[int | None, typer.Option(
        min=1, help="Rank k of M (factor form; default d, full rank).")] = None,
    solver: Annotated[SolverName, typer.Option(help="Optimiser.")] = SolverName.lbfgs,
    steps: Annotated[int, typer.Option(min=0, help="Maximum solver steps.")] = 50,
    lr: Annotated[float | None, typer.Option(help="Step size (solver default if omitted).")
                  ] = None,
    regularization: Annotated[float, typer.Option(
        min=0.0, help="λ of λ‖A − I‖²_F.")] = 0.0,
    validation: Annotated[float, typer.Option(
        min=0.0, max=0.99, help="Share of rows held out for validation.")] = 0.1,
    patience: Annotated[int | None, typer.Option(
        min=1, help="Stop after this many steps without a better validation score.")] = None,
    batch_chunks: Annotated[int | None, typer.Option(
        min=1, help="adam: chunks per mini-batch.")] = None,
    tol: Annotated[float, typer.Option(min=0.0, help="Relative loss-change tolerance.")
                   ] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed for the split, sampling and start.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(
        min=1, help="Write a checkpoint every N steps.")] = 10,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run checkpointed in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing --out.")] = False,
    split_every: Annotated[int | None, typer.Option(
        min=2, help="Fan-in of the tree reduction.")] = None,
    cache: Annotated[CacheMode, typer.Option(
        help="memory: keep the data in cluster memory; stream: read it each step; auto: "
             "memory when it fits in half the cluster.")] = CacheMode.auto,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid",
        help="Skip (and count) pairs with zero/NaN vectors instead of stopping.")] = False,
    run_id: Annotated[str | None, typer.Option(
        help="Name of this run on the live dashboard (default: date-time-random).")] = None,
    scheduler: Scheduler = None,
    workers: Workers = 2,
    threads_per_worker: Threads = 1,
    memory_limit: MemoryLimit = "auto",
    dashboard_address: DashboardAddress = "127.0.0.1:0",
    security: SecurityOpt = None,
) -> None:
    """Learn a cosine metric from a pair store on a Dask cluster."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cosim_dask.fit.loop import TrainConfig
    from cosim_dask.fit.train import RunOptions, check_request, finished_message, train_store

    config = TrainConfig(
        loss=loss.value, negative_target=negative_target, param=param.value, rank=rank,
        solver=solver.value, lr=lr, steps=steps, tol=tol, regularization=regularization,
        validation=validation, patience=patience, batch_chunks=batch_chunks, seed=seed)
    options = RunOptions(cache=cache.value, split_every=split_every,
                         checkpoint_every=checkpoint_every,
                         on_invalid="skip" if skip_invalid else "raise")
    cluster = _cluster_config(scheduler, workers, threads_per_worker, memory_limit,
                              dashboard_address, security)
    _, checkpoint = run(lambda: check_request(store, str(out), config, options,
                                              overwrite=overwrite, resume=resume))
    done = finished_message(checkpoint, config) if resume else None
    if done:
        _echo(f"nothing to resume: {done}")
        return
    console = Console(stderr=True)
    with _cluster(cluster) as client:
        _say(console, f"Dask dashboard: {_dashboard_link(client)}")
        progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), console=console,
                            transient=False)
        task = progress.add_task("train", total=steps, status="")

        def on_start(info) -> None:
            if info.get("live_url"):
                _say(console, f"Live training page: {info['live_url']}")
            if info.get("live_hint"):
                _say(console, info["live_hint"])
            s = info["store"]
            resumed = info["resumed_at"]
            _say(
                console,
                f"{s.n:,} pairs × {s.d} dims in {info['chunks']} chunks; data "
                f"{'in cluster memory' if info['cache'] == 'memory' else 'streamed from the store'}"
                + (f"; resuming at step {resumed}" if resumed is not None else ""))
            if resumed:
                progress.update(task, completed=resumed)

        def on_step(r) -> None:
            status = (f"loss {_fmt(r['loss'])}  |grad| {_fmt(r['grad_norm'], '.2e')}  "
                      f"{_fmt(r['pairs_per_s'], ',.0f')} pairs/s")
            if r.get("val_auc") is not None:
                status += f"  val AUC {r['val_auc']:.4f}"
            elif r.get("val_loss") is not None:
                status += f"  val loss {_fmt(r['val_loss'])}"
            progress.update(task, completed=r["step"], status=status)

        with progress:
            result = run(lambda: train_store(
                store, str(out), config, client=client, options=options, overwrite=overwrite,
                resume=resume, checkpoint=checkpoint, on_step=on_step, on_start=on_start,
                run_id=run_id))
    if result.resumed_complete:
        _echo(f"nothing to resume: {finished_message(checkpoint, config)}")
        return
    attrs = result.model.attrs
    _say(console, f"stopped: {result.state.stop_reason} after {result.state.step} steps in "
                  f"{result.seconds:.1f} s")
    _print_figures(attrs.get("validation_figures") or attrs.get("train_figures"))
    _echo(f"model written to {out}")


def _print_figures(figures: dict | None) -> None:
    if not figures:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out pairs" if figures else None)
    table.add_column("metric")
    keys = [k for k in ("pairs", "loss", "mse", "auc", "accuracy", "threshold", "spearman")
            if k in figures["learned"]]
    for key in keys:
        table.add_column(key, justify="right")
    for name, label in (("plain", "plain cosine"), ("learned", "learned A")):
        row = figures[name]
        table.add_row(label, *(f"{row[k]:,}" if k == "pairs" else _fmt(row[k], ".4f")
                               for k in keys))
    Console().print(table)


class Split(StrEnum):
    auto = "auto"
    validation = "validation"
    train = "train"
    all = "all"


@app.command(cls=_Command)
def evaluate(
    model: _Model,
    store: Annotated[str, typer.Argument(metavar="STORE", help="A pair store to evaluate on.")],
    split: Annotated[Split, typer.Option(
        help="Rows to use: auto = the validation rows when STORE is the training store, "
             "else all rows.")] = Split.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    scheduler: Scheduler = None,
    workers: Workers = 2,
    threads_per_worker: Threads = 1,
    memory_limit: MemoryLimit = "auto",
    dashboard_address: DashboardAddress = "127.0.0.1:0",
    security: SecurityOpt = None,
) -> None:
    """Loss, ROC AUC, accuracy and Spearman of a model on a store, beside plain cosine."""
    from cosim_dask.data.store import open_store
    from cosim_dask.fit.evaluate import evaluate_model
    from cosim_dask.fit.model import load_model

    cluster = _cluster_config(scheduler, workers, threads_per_worker, memory_limit,
                              dashboard_address, security)
    # Bad paths fail before start-up; the model is read once.
    loaded, _ = run(lambda: (load_model(model), open_store(store)))
    with _cluster(cluster) as client:
        report = run(lambda: evaluate_model(loaded, store, client=client, split=split.value))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _echo(f"{report['split']} rows of {store}: {report['learned']['pairs']:,} pairs")
    _print_figures(report)


# ---------------------------------------------------------------------------------------
# Training report (issue 5, afterwards). Thin: parse, call cosim_dask.report.page inside run().


@app.command(cls=_Command)
def report(
    model: _Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")
                   ] = Path("report.html"),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing --out (and PNG figures).")] = False,
    png_dir: Annotated[Path | None, typer.Option(
        "--png-dir", help="Folder for the PNG figures (default: <out stem>-figures beside "
                          "--out); needs matplotlib.")] = None,
) -> None:
    """Write a self-contained HTML training report (curves, validation ROC, spectrum of A,
    figures, settings) and PNG figures."""
    from cosim_dask.report.page import (
        NO_MATPLOTLIB,
        default_png_dir,
        matplotlib_available,
        write_report,
    )

    page = run(lambda: write_report(model, out, overwrite=overwrite, png_dir=png_dir))
    _echo(f"report written to {page}")
    if matplotlib_available():
        _echo(f"PNG figures in {png_dir or default_png_dir(out)}")
    else:
        typer.echo(NO_MATPLOTLIB)


def main() -> None:  # pragma: no cover - console entry point
    app()
