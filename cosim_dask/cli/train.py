"""`cosim train` and `cosim evaluate`: learn a metric from a pair store on a Dask cluster,
and measure it. Thin: parse, call cosim_dask.fit inside run(), render progress and figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from distributed import Client
from rich.console import Console
from rich.table import Table

from cosim_dask.cli.options import (
    CLUSTER,
    CacheMode,
    DashboardAddress,
    Json,
    Loss,
    MemoryLimit,
    Model,
    Parameterisation,
    Quiet,
    Scheduler,
    Security,
    Solver,
    Split,
    Threads,
    Workers,
    cluster_config,
    connected,
    on_off,
    overwrite_option,
    swapped,
)
from cosim_dask.cli.output import cli_text, echo, fmt, is_quiet, print_json, run, say
from cosim_dask.cli.progress import Tracker, progress
from cosim_dask.dashboard.publisher import dashboard_url
from cosim_dask.data.store import open_store
from cosim_dask.errors import ClusterError, ModelError
from cosim_dask.fit.config import LIVE_VALIDATION, TrainConfig
from cosim_dask.fit.evaluate import (
    DEFAULT_CANDIDATES,
    evaluate_model,
    retrieval_model,
    split_title,
)
from cosim_dask.fit.model import load_model
from cosim_dask.fit.train import RunOptions, check_request, finished_message, train_store

#: The defaults of `cosim train` are the library's own (one truth for the CLI and the API).
DEFAULTS = TrainConfig()
RUN_DEFAULTS = RunOptions()
OverwriteModel = overwrite_option("an existing --out")


def _dashboard_link(client: Client) -> str:
    try:
        return dashboard_url(client)
    except ClusterError as exc:
        return f"none ({cli_text(exc)})"


def train(
    ctx: typer.Context,
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="The pair store to learn from (folder or URL).")],
    out: Annotated[str, typer.Option(
        "--out", "-o", help="Where to write the model (folder or URL, e.g. s3://bucket/m.zarr).")],
    loss: Annotated[Loss, typer.Option(help="Loss on the similarities.")] = Loss(DEFAULTS.loss),
    negative_target: Annotated[float | None, typer.Option(
        help="mse on binary labels: the target for label −1 (default 0: unrelated; "
             "−1: opposite).")] = None,
    negatives: Annotated[int, typer.Option(
        min=0, help="Negatives per positive pair, made inside each chunk by pairing x with "
        "the y of other pairs (needed by stores of positive pairs only; 0: none).")
        ] = DEFAULTS.negatives,
    param: Annotated[Parameterisation, typer.Option(
        help="factor: learn M (k × d) with A = MᵀM; full: learn A itself, projected onto "
             "the PSD cone after each step.")] = Parameterisation(DEFAULTS.param),
    rank: Annotated[int | None, typer.Option(
        min=1, help="Rank k of M (factor form; default d, full rank).")] = None,
    solver: Annotated[Solver, typer.Option(
        help="Optimiser: stream+lbfgs (a streaming pass of mini-batch runs, averaged, then "
             "L-BFGS until the validation figures stop improving), lbfgs, gd or adam.")
    ] = Solver(DEFAULTS.solver),
    steps: Annotated[int, typer.Option(min=0, help="Maximum solver steps.")] = DEFAULTS.steps,
    lr: Annotated[float | None, typer.Option(help="Step size (solver default if omitted).")
                  ] = None,
    regularization: Annotated[float, typer.Option(
        min=0.0, help="λ of λ‖A − I‖²_F.")] = DEFAULTS.regularization,
    validation: Annotated[float, typer.Option(
        min=0.0, max=0.99, help="Share of rows held out for the live validation curves "
        "(0: every pair trains, as the estimator does).")] = LIVE_VALIDATION,
    patience: Annotated[int | None, typer.Option(
        min=1, help="Stop after this many steps without a better validation score.")] = None,
    batch_chunks: Annotated[int | None, typer.Option(
        min=1, help="adam: chunks per mini-batch.")] = None,
    tol: Annotated[float, typer.Option(
        min=0.0, help="Relative loss-change tolerance; 0 runs every step.")] = DEFAULTS.tol,
    seed: Annotated[int, typer.Option(
        help="Seed for the split, sampling and start.")] = DEFAULTS.seed,
    checkpoint_every: Annotated[int, typer.Option(
        min=1, help="Write a checkpoint every N steps.")] = RUN_DEFAULTS.checkpoint_every,
    resume: Annotated[bool, on_off(
        "--resume", help="Continue the run checkpointed in --out.")] = False,
    overwrite: OverwriteModel = False,
    split_every: Annotated[int | None, typer.Option(
        min=2, help="Fan-in of the tree reduction.")] = None,
    cache: Annotated[CacheMode, typer.Option(
        help="memory: keep the data in cluster memory; stream: read it each step; auto: "
             "memory when it fits in half the cluster.")] = CacheMode(RUN_DEFAULTS.cache),
    skip_invalid: Annotated[bool, on_off(
        "--skip-invalid",
        help="Skip (and count) pairs with zero/NaN vectors instead of stopping.")] = False,
    run_id: Annotated[str | None, typer.Option(
        help="Name of this run on the live dashboard (default: date-time-random).")] = None,
    linger: Annotated[float, typer.Option(
        min=0.0, metavar="SECONDS",
        help="Keep the local cluster, and so the live page with the run's final state, up "
             "this many seconds after training (Ctrl-C ends the wait). A page on a running "
             "cluster (--scheduler) stays up without it.")] = 0.0,
    scheduler: Scheduler = None,
    workers: Workers = CLUSTER.workers,
    threads_per_worker: Threads = CLUSTER.threads_per_worker,
    memory_limit: MemoryLimit = CLUSTER.memory_limit,
    dashboard_address: DashboardAddress = CLUSTER.dashboard_address,
    security: Security = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Learn a cosine metric from a pair store on a Dask cluster."""
    config = TrainConfig(
        loss=loss.value, negative_target=negative_target, param=param.value, rank=rank,
        solver=solver.value, lr=lr, steps=steps, tol=tol, regularization=regularization,
        validation=validation, patience=patience, batch_chunks=batch_chunks, seed=seed,
        negatives=negatives)
    options = RunOptions(cache=cache.value, split_every=split_every,
                         checkpoint_every=checkpoint_every,
                         on_invalid="skip" if skip_invalid else "raise")
    cluster = cluster_config(ctx)
    _, checkpoint = run(lambda: check_request(store, str(out), config, options,
                                              overwrite=overwrite, resume=resume))
    done = finished_message(checkpoint, config) if resume else None
    if done:
        _nothing_to_resume(done, checkpoint.model.attrs, out, as_json)
        return
    console = Console(stderr=True)
    with connected(cluster) as client:
        say(console, f"Dask dashboard: {_dashboard_link(client)}")
        # Steps are counted against the step limit, a bound: the run may stop earlier.
        live: dict = {}
        with progress("train", steps, "steps", bound=True, rate_from_first=True, every=0,
                      keep=True, console=console) as tracker:
            result = run(lambda: train_store(
                store, str(out), config, client=client, options=options, overwrite=overwrite,
                resume=resume, checkpoint=checkpoint, on_step=_on_step(tracker),
                on_start=_on_start(console, tracker, live), run_id=run_id))
        if result.resumed_complete:
            _nothing_to_resume(finished_message(checkpoint, config), result.model.attrs, out,
                               as_json)
            return
        attrs = result.model.attrs
        if as_json:
            print_json(run_summary(out, attrs, trained=True, seconds=result.seconds))
        else:
            say(console, f"stopped: {result.state.stop_reason} after {result.state.step} "
                         f"steps in {result.seconds:.1f} s")
            held_out = attrs.get("validation_figures")
            _print_figures(held_out or attrs.get("train_figures"),
                           split_title("validation" if held_out else "train",
                                       (attrs.get("settings") or {}).get("validation")
                                       or 0.0))
            if live.get("positive_only"):
                # Those figures are of each pair against its in-chunk negatives; retrieval
                # ranks it among many.
                echo(f"{store} holds positive pairs only (the figures count their in-chunk "
                     f"negatives): rank them with `cosim evaluate {out} {store} --retrieval`")
            echo(f"model written to {out}")
        # The results are out first; then the page stays up as long as asked.
        if linger > 0 and scheduler is None and live.get("url"):
            _linger(console, linger, live["url"])


def _linger(console: Console, seconds: float, url: str) -> None:
    """Wait ``seconds`` (or until Ctrl-C) with the local cluster, and its live page, up."""
    say(console, f"live page {url} stays up for {seconds:g} s; Ctrl-C closes it sooner")
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:  # the run is done and written: ending the wait is no error
        say(console, "closing the live page")


def _on_start(console: Console, tracker: Tracker, live: dict) -> Callable[[dict], None]:
    """What train prints when the run starts (the live page's URL, and whether the store
    holds positive pairs only, also go into ``live``);
    the clock starts there (after the cluster and the data are ready), at the step a resumed
    run continues from."""

    def on_start(info: dict) -> None:
        live["url"] = info.get("live_url")
        if info.get("live_url"):
            say(console, f"Live training page: {info['live_url']}")
        if info.get("live_hint"):
            say(console, info["live_hint"])
        s = info["store"]
        live["positive_only"] = s.positive_only
        resumed = info["resumed_at"]
        say(console,
            f"{s.n:,} pairs × {s.d} dims in {info['chunks']} chunks; data "
            f"{'in cluster memory' if info['cache'] == 'memory' else 'streamed from the store'}"
            + (f"; resuming at step {resumed}" if resumed is not None else ""))
        tracker.start_at(resumed or 0)

    return on_start


def _on_step(tracker: Tracker) -> Callable[[dict], None]:
    """Each step's figures on the progress line, the most useful first."""

    def on_step(r: dict) -> None:
        # A figure the step did not compute is left out (step 0 of the default solver has
        # the validation figures of the first pass, not yet its training loss and gradient).
        status = [f"loss {fmt(r['loss'])}"] if r.get("loss") is not None else []
        if r.get("val_auc") is not None:
            status.append(f"val AUC {r['val_auc']:.4f}")
        elif r.get("val_loss") is not None:
            status.append(f"val loss {fmt(r['val_loss'])}")
        if r.get("grad_norm") is not None:
            status.append(f"|grad| {fmt(r['grad_norm'], '.2e')}")
        status.append(f"{fmt(r['pairs_per_s'], ',.0f')} pairs/s")
        tracker.update(r["step"], status)

    return on_step


def _nothing_to_resume(message: object, attrs: dict, out: Path, as_json: bool) -> None:
    if as_json:
        print_json({**run_summary(out, attrs, trained=False), "message": cli_text(message)})
    else:
        echo(f"nothing to resume: {cli_text(message)}")


def run_summary(out: Path, attrs: dict, *, trained: bool,
                seconds: float | None = None) -> dict:
    """What `cosim train --json` prints: the model path, steps, passes over the data (every
    loss evaluation of every step, line-search trials included, counted from the model's
    history), why it stopped, the final loss, and the figures on the validation rows (or on
    the training rows when none were held out). ``trained``: whether this run trained (a
    resume of a complete model trains nothing)."""
    history = attrs.get("history") or []
    return {
        "model": str(out),
        "store": attrs.get("store_path"),
        "run_id": attrs.get("run_id"),
        "trained": trained,
        "complete": attrs.get("complete"),
        "steps": attrs.get("steps"),
        "passes": sum(int(h.get("evaluations") or 0) for h in history),
        "stop_reason": attrs.get("stop_reason"),
        "seconds": seconds if seconds is not None else attrs.get("train_seconds"),
        "final_loss": history[-1].get("loss") if history else attrs.get("train_loss"),
        "val_loss": attrs.get("val_loss"),
        "val_auc": attrs.get("val_auc"),
        "validation_figures": attrs.get("validation_figures"),
        "train_figures": attrs.get("train_figures"),
    }


def _print_figures(figures: dict | None, title: str) -> None:
    """The figures of the learned metric beside plain cosine, titled by the rows scored."""
    if not figures or is_quiet():
        return
    table = Table(title=title)
    table.add_column("metric")
    keys = [k for k in ("pairs", "loss", "mse", "auc", "accuracy", "threshold", "spearman")
            if k in figures["learned"]]
    for key in keys:
        table.add_column(key, justify="right")
    for name, label in (("plain", "plain cosine"), ("learned", "learned A")):
        row = figures[name]
        table.add_row(label, *(f"{row[k]:,}" if k == "pairs" else fmt(row[k], ".4f")
                               for k in keys))
    Console().print(table)


def evaluate(
    ctx: typer.Context,
    model: Model,
    store: Annotated[str, typer.Argument(metavar="STORE", help="A pair store to evaluate on.")],
    split: Annotated[Split, typer.Option(
        help="Rows to use: auto = the validation rows when STORE is the training store, "
             "else all rows.")] = Split("auto"),
    retrieval: Annotated[bool, on_off(
        "--retrieval", help="Instead: rank each positive pair's y among the y of --candidates "
        "pairs of its chunk (seeded blocks): hit rate@1, recall@10, MRR.")] = False,
    candidates: Annotated[int, typer.Option(
        min=2, help="--retrieval: candidates per query.")] = DEFAULT_CANDIDATES,
    seed: Annotated[int, typer.Option(
        min=0, max=2**32 - 1, help="--retrieval: seed of the candidate blocks.")] = 0,
    as_json: Json = False,
    quiet: Quiet = False,
    scheduler: Scheduler = None,
    workers: Workers = CLUSTER.workers,
    threads_per_worker: Threads = CLUSTER.threads_per_worker,
    memory_limit: MemoryLimit = CLUSTER.memory_limit,
    dashboard_address: DashboardAddress = CLUSTER.dashboard_address,
    security: Security = None,
) -> None:
    """Loss, ROC AUC, accuracy and Spearman of a model on a store, beside plain cosine
    (with --retrieval: hit rate@1, recall@10 and MRR of positive pairs)."""
    cluster = cluster_config(ctx)
    # Bad paths fail before start-up; the model is read once.
    loaded, opened = run(lambda: (_load_model(model, store), open_store(store)))
    # One pass that tells nothing until it ends: the time going by, then the count.
    with connected(cluster) as client, \
            progress("evaluate", opened.n_chunks, "chunks", counted=False) as tracker:
        if retrieval:
            report = run(lambda: retrieval_model(loaded, store, client=client,
                                                 split=split.value, candidates=candidates,
                                                 seed=seed))
        else:
            report = run(lambda: evaluate_model(loaded, store, client=client,
                                                split=split.value))
        tracker.update(opened.n_chunks)
    report["model"] = str(model)  # the library cannot know the path of a loaded model
    if as_json:
        print_json(report)
        return
    if retrieval:
        _print_retrieval(report, store)
        return
    negatives = (f" (positive pairs, each with {report['negatives']} in-chunk negatives)"
                 if report.get("negatives") else "")
    echo(f"{report['split']} rows of {store}: {report['learned']['pairs']:,} pairs{negatives}")
    fraction = (loaded.attrs.get("settings") or {}).get("validation") or 0.0
    _print_figures(report, split_title(report["split"], fraction))


def _print_retrieval(report: dict, store: str) -> None:
    learned = report["learned"]
    echo(f"{report['split']} rows of {store}: {learned['queries']:,} positive pairs as queries, "
         f"{fmt(learned['candidates'], ',.0f')} candidates each (at least "
         f"{learned['min_candidates']:,}; ties count against the query)")
    table = Table(title="retrieval of the true partner")
    table.add_column("metric")
    keys = ("hit_at_1", "recall_at_10", "mrr", "mean_rank")
    for label in ("hit@1", "recall@10", "MRR", "mean rank"):
        table.add_column(label, justify="right")
    for name, label in (("plain", "plain cosine"), ("learned", "learned A")):
        table.add_row(label, *(fmt(report[name][k], ".4f" if k != "mean_rank" else ".2f")
                               for k in keys))
    Console().print(table)


def _load_model(model: Path, store: str):
    """The model; when MODEL is not one, a hint if MODEL and STORE were swapped."""
    try:
        return load_model(model)
    except ModelError:
        swapped(model, store, "cosim evaluate MODEL STORE")
        raise
