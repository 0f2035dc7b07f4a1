"""Training on a pair store on a Dask cluster: the wiring of store, step, driver and model.

``train_store`` opens the store, decides whether the training set stays in cluster memory or
streams from the store each step, runs the driver loop with checkpoints into the model file,
and ends with an evaluation pass (thresholds on the training rows, ROC on the validation rows,
each beside plain cosine) whose figures go into the model's attributes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distributed import Client

import cosim_dask.objectstore as objectstore
from cosim_dask.core.objective import Objective
from cosim_dask.dashboard.publisher import MetricsPublisher, new_run_id
from cosim_dask.data.store import PairStore, open_store
from cosim_dask.dist.cluster import cluster_memory
from cosim_dask.dist.passes import (
    DaskPairs,
    Pieces,
    persisted_store_pieces,
    scheduler_lost,
    store_pieces,
)
from cosim_dask.dist.tasks import chunks_per_task
from cosim_dask.dist.tree import DEFAULT_SPLIT_EVERY, resolve_split_every
from cosim_dask.errors import ANY, ClusterError, CosimError, Message, ModelError, TrainingError
from cosim_dask.fit.config import RunOptions, TrainConfig
from cosim_dask.fit.evaluate import roc_points, score_pieces, summarize
from cosim_dask.fit.loop import StepCallback, TrainState, run_solver, state_from_attrs
from cosim_dask.fit.model import Model, build_model, load_model, write_model
from cosim_dask.outputs import MODEL, check_output, claim_output, exists, is_url, reading, recover

logger = logging.getLogger(__name__)

#: Persist only when the training data takes at most this share of the cluster's memory.
MEMORY_SHARE = 0.5

@dataclass
class TrainResult:
    model: Model
    state: TrainState
    cache: str
    seconds: float
    #: ``resume`` of a model that was already complete: nothing was trained or written.
    resumed_complete: bool = False


def choose_cache(mode: str, data_bytes: int, memory_bytes: int) -> str:
    """``memory`` when asked, or when the data fits in MEMORY_SHARE of the cluster memory."""
    if mode != "auto":
        return mode
    return "memory" if memory_bytes and data_bytes <= MEMORY_SHARE * memory_bytes else "stream"


def store_bytes(store: PairStore) -> int:
    return store.n * (2 * store.d + 1) * 4


def make_pieces(client: Client, store: PairStore, cache: str,
                split_every: int | None = None) -> Pieces:
    if cache == "memory":
        # Tiny chunks are persisted in groups, one key per task of a pass.
        group = chunks_per_task(store.n_chunks, store.chunk_rows * (2 * store.d + 1) * 4,
                                resolve_split_every(split_every))
        return persisted_store_pieces(client, store.source, store.chunk_slices(), group,
                                      identity=store.fingerprint)
    return store_pieces(store.source, store.chunk_slices(), identity=store.fingerprint)


@dataclass(frozen=True)
class Checkpoint:
    """A model file read to resume from, and the identity of the directory it was read from.

    The model writer renames a new directory into place, so a checkpoint rewritten since it
    was read (by another run, between the early checks and the output lock) has another
    identity and is read again.
    """

    model: Model
    identity: tuple
    path: str = ""

    @classmethod
    def read(cls, out: str) -> Checkpoint:
        identity = _identity(out)  # before reading: a rewrite meanwhile reads as a change
        return cls(load_model(out, with_solver=True), identity, out)

    def is_current(self, out: str) -> bool:
        return exists(out) and _identity(out) == self.identity


def _identity(path: str) -> tuple:
    """A local folder's (device, inode, mtime); a URL's published version (each write is a
    new one)."""
    if is_url(path):
        return (objectstore.current(path)[0],)
    st = Path(path).stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns


def train_store(
    store_path: str,
    out: str,
    config: TrainConfig,
    *,
    client: Client,
    options: RunOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint: Checkpoint | None = None,
    on_step: StepCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    dashboard: bool = True,
    run_id: str | None = None,
) -> TrainResult:
    """Learn a metric from the pair store at ``store_path``; write the model to ``out``.

    With ``resume``, continue the run checkpointed in ``out`` (same settings required; the
    number of steps may grow) and reach the same result as an uninterrupted run.
    ``checkpoint``, the one :func:`check_request` read, is used instead of reading ``out``
    again, unless ``out`` has been rewritten since.

    ``out`` is claimed through the output policy (:func:`claim_output`) for the whole run: a
    second run writing it is refused, it may not be the store, and every checkpoint and the
    final model replace it in one step. The store is held with a shared lock
    (:func:`reading`), so no command replaces it while the run reads it.

    Resuming a model that is already complete changes nothing and returns it (``resumed_complete``
    on the result): see :func:`finished_message`.
    """
    with claim_output(out, MODEL, overwrite=overwrite or resume, inputs=[store_path]) as target, \
            reading(store_path):
        return _train_store(store_path, target, config, client=client, options=options,
                            overwrite=overwrite, resume=resume, checkpoint=checkpoint,
                            on_step=on_step, on_start=on_start, dashboard=dashboard,
                            run_id=run_id)


def _train_store(store_path, target, config, *, client, options, overwrite, resume, checkpoint,
                 on_step, on_start, dashboard, run_id) -> TrainResult:
    out = target.shown
    options = options or RunOptions()
    # Checked again under the lock: another run may have written ``out`` meanwhile.
    store, checkpoint = check_request(store_path, out, config, options, overwrite=overwrite,
                                      resume=resume, checkpoint=checkpoint)
    if resume and finished_message(checkpoint, config) is not None:
        state = state_from_attrs({**checkpoint.model.attrs["train_state"],
                                  "history": checkpoint.model.attrs["history"]})
        return TrainResult(checkpoint.model, state, "none", 0.0, resumed_complete=True)
    split_every = resolve_split_every(options.split_every)
    form = config.make_parameterisation()
    binary = store.targets == "binary"
    solver = config.make_solver(binary)
    state = _restore(checkpoint.model, solver, out) if resume else None

    cache = choose_cache(options.cache, store_bytes(store), cluster_memory(client))
    pieces = make_pieces(client, store, cache, options.split_every)
    pairs = DaskPairs(
        client, pieces, form, config.make_loss(binary), validation=config.validation,
        seed=config.seed, batch_chunks=config.batch_chunks if solver.stochastic else None,
        split_every=options.split_every, on_invalid=options.on_invalid,
        negatives=config.negatives, positive_weight=config.positive_weight,
    )
    objective = Objective(form, pairs, config.regularization)
    known = {"store_fingerprint": store.fingerprint, "store_path": str(store_path),
             "targets": store.targets, "split_every": split_every}
    publisher = None
    if dashboard:
        publisher = MetricsPublisher(client, run_id or new_run_id(),
                                     settings={**asdict(config), "store": str(store_path),
                                               "out": str(out), "cache": cache},
                                     info={"total_steps": config.steps, "pairs": store.n,
                                           "model": _where(out),
                                           "resumed_at": state.step if state else None})
        known["run_id"] = publisher.run_id
    if on_start:
        on_start({"store": store, "cache": cache, "chunks": len(pieces.items),
                  "resumed_at": state.step if state else None,
                  "live_url": publisher.url if publisher else None,
                  "live_hint": publisher.hint if publisher else None})

    progress = {"step": state.step if state else None,
                "checkpoint": state.step if state else None}

    def step_done(record: dict[str, Any]) -> None:
        progress["step"] = record["step"]
        if publisher:
            publisher.publish(record)
        if on_step:
            on_step(record)

    def checkpoint(solver_, state_: TrainState) -> None:
        write_model(target, build_model(form, solver_.params, config, state_, complete=False,
                                        solver_state=solver_.state(), **known))
        progress["checkpoint"] = state_.step

    started = time.perf_counter()
    # How the run ended, for the live page: a failed or interrupted run must not show as
    # finished (the page cannot tell a driver that died from one that ended).
    outcome: tuple[str, str | None] = ("failed", "training stopped")
    try:
        state = run_solver(
            objective, solver, form.initial(store.d, seed=config.seed), config, state=state,
            on_step=step_done, checkpoint=checkpoint,
            checkpoint_every=options.checkpoint_every, targets_binary=binary,
        )
        seconds = time.perf_counter() - started
        model = build_model(form, solver.params, config, state, complete=True,
                            solver_state=solver.state(), **known)
        model.attrs.update(_final_figures(client, pieces, model.A, config, binary, split_every))
        model.attrs["train_seconds"] = seconds
        write_model(target, model)
        outcome = ("finished", state.stop_reason)
    except KeyboardInterrupt as exc:
        # The CLI raises SIGTERM as a KeyboardInterrupt subclass named Terminated.
        outcome = ("interrupted", "SIGTERM" if type(exc).__name__ == "Terminated"
                   else "SIGINT (Ctrl-C)")
        raise
    except Exception as exc:
        outcome = ("failed", str(exc) if isinstance(exc, CosimError)
                   else f"{type(exc).__name__}: {exc}")
        if isinstance(exc, ClusterError | OSError | CancelledError) and scheduler_lost(client):
            raise _scheduler_lost(exc, store_path, out, progress, overwrite) from None
        raise
    finally:
        if publisher and not scheduler_lost(client):
            _close_publisher(publisher, *outcome, model=_where(out))
    return TrainResult(model, state, cache, seconds)


def _where(out: str) -> str:
    """``out`` as the page shows it: absolute, unless it is a URL."""
    return str(out) if "://" in str(out) else os.path.abspath(out)


def _close_publisher(publisher: MetricsPublisher, status: str, reason: str | None,
                     model: str) -> None:
    """Publish how the run ended; on a failed run, a failure to say so never hides the
    run's own error."""
    try:
        publisher.close(status, reason, info={"model": model} if status == "finished" else None)
    except Exception:
        if status == "finished":
            raise
        logger.debug("could not publish the end of the run", exc_info=True)


def _scheduler_lost(exc, store_path, out, progress, overwrite) -> TrainingError:
    """One line: where training stopped, what is on disk, and the command that resumes."""
    step, saved = progress["step"], progress["checkpoint"]
    reached = "before step 0" if step is None else f"after step {step}"
    if saved is not None:
        kept = (f"the last checkpoint (step {saved}) in {str(out)!r} is intact; resume with "
                "{train_store} and the same options" + (" (without {overwrite})" if overwrite
                                                         else ""))
    else:
        kept = (f"no checkpoint was written yet; {str(out)!r} is "
                + ("unchanged" if exists(out) else "not written")
                + "; run the same command again")
    if isinstance(exc, ClusterError):  # its own parameters too, for the CLI to name
        detail, params = exc.message.template, exc.message.params
    else:
        detail, params = f"{type(exc).__name__}: {exc}", {}
    return TrainingError(
        f"training stopped {reached}: {detail.splitlines()[0]}; {kept}",
        params={**params, "overwrite": True,
                "train_store": {"store": store_path, "out": str(out), "resume": True}})


def check_request(
    store_path: str,
    out: str,
    config: TrainConfig,
    options: RunOptions,
    *,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint: Checkpoint | None = None,
) -> tuple[PairStore, Checkpoint | None]:
    """Every check that needs no cluster, so bad input fails in a second, before start-up.

    Returns the opened store and, with ``resume``, the checkpoint read from ``out`` and
    checked against ``config`` and the store (``checkpoint`` if given and ``out`` has not
    been rewritten since it was read); pass it on to :func:`train_store`.
    """
    config.check()
    options.check()
    if resume and overwrite:
        raise CosimError("{resume} and {overwrite} contradict each other; pass one",
                         params={"resume": True, "overwrite": True})
    if resume:
        recover(out)  # a swap a killed run left half done
        if not exists(out):
            raise TrainingError(f"nothing to resume: {out!r} does not exist; drop {{resume}}",
                                params={"resume": True})
    check_output(out, MODEL, overwrite=overwrite or resume, inputs=[store_path])
    store = open_store(store_path)
    if config.rank is not None and config.rank > store.d:
        raise CosimError(f"rank={config.rank} must be between 1 and the dimension d={store.d}")
    if config.negative_target is not None and store.targets != "binary":
        # MSELoss maps every target of exactly −1 to it: on graded targets that would
        # silently move the pairs clipped at −1.
        raise CosimError(
            f"{{negative_target}} applies to binary targets; {store_path!r} has graded "
            "targets", params={"negative_target": ANY})
    if config.negatives and store.targets != "binary":
        raise CosimError(
            f"{{negatives}} needs positive pairs (a binary or positive-only store); "
            f"{store_path!r} has graded targets", params={"negatives": ANY})
    if store.negative_only:
        raise CosimError(
            f"{store_path!r} holds negative pairs only (every target -1), which say nothing "
            "of what a match looks like; add pairs labelled +1 (cosim ingest)")
    if store.positive_only and not config.negatives:
        # Fitted alone, positive pairs pull every similarity to 1: a useless metric.
        raise CosimError(
            f"{store_path!r} holds positive pairs only (every target +1), which say nothing "
            "of what a non-match looks like; pass {negatives} K (e.g. 4) to pair each x with "
            "the y of K other pairs of its chunk", params={"negatives": ANY})
    if not resume:
        return store, None
    if checkpoint is None or not checkpoint.is_current(out):
        checkpoint = Checkpoint.read(out)
    _check_checkpoint(checkpoint.model, out, config, store, options)
    _restore(checkpoint.model, config.make_solver(store.targets == "binary"), out)  # must load
    return store, checkpoint


def _check_checkpoint(model: Model, out: str, config: TrainConfig, store: PairStore,
                      options: RunOptions) -> None:
    if model.solver_state is None:
        raise TrainingError(f"{out!r} holds no solver state to resume from")
    if model.attrs.get("settings_key") != config.key():
        saved = model.attrs.get("settings", {})
        now = asdict(config)
        diff = [k for k in now if k not in ("steps", "patience") and saved.get(k) != now[k]]
        raise TrainingError(
            f"cannot resume {out!r}: it was trained with different settings "
            f"({', '.join(f'{k}={saved.get(k)!r} now {now[k]!r}' for k in diff) or 'unknown'})"
            "; use the same options, or start afresh with {overwrite}",
            params={"overwrite": True})
    if model.attrs.get("store_fingerprint") != store.fingerprint:
        raise TrainingError(
            f"cannot resume {out!r}: it was trained on another store "
            f"({model.attrs.get('store_path')!r}); use that store or {{overwrite}}",
            params={"overwrite": True})
    # Models written before the fan-in was recorded used the default.
    saved = model.attrs.get("split_every", DEFAULT_SPLIT_EVERY)
    now = resolve_split_every(options.split_every)
    if saved != now:
        raise TrainingError(
            f"cannot resume {out!r}: it was trained with {{split_every}}, now {now}; the "
            "fan-in fixes the order of the sums and so the result: pass {split_every}, or "
            "start afresh with {overwrite}", params={"split_every": saved, "overwrite": True})


def finished_message(checkpoint: Checkpoint | None, config: TrainConfig) -> str | None:
    """Why resuming ``checkpoint`` has nothing to do (None when it has): the model is complete
    and either stopped by itself (converged, patience, ...) or reached ``config.steps``.

    A run that stopped at its step limit goes on when the limit is raised; one that stopped by
    itself would stop at the same step with any limit, so resuming it changes nothing."""
    if checkpoint is None or not checkpoint.model.attrs.get("complete"):
        return None
    attrs = checkpoint.model.attrs
    steps, reason = attrs.get("steps"), attrs.get("stop_reason")
    if reason == "max steps" and config.steps > steps:
        return None
    hint = ("; raise {steps} to train further" if reason == "max steps"
            else "; it stopped by itself, so more steps would change nothing")
    return Message(f"{checkpoint.path!r} is already complete ({steps} steps, stopped: "
                   f"{reason}){hint}", {"steps": ANY})


def _restore(model: Model, solver, out: str = "") -> TrainState:
    """Put a checked checkpoint's solver state into ``solver``; the loop state to go on from.

    :func:`~cosim_dask.fit.model.load_model` checked the arrays and attributes; a solver state
    that lacks a value its solver needs, or holds one of the wrong type, is a damaged model.
    """
    try:
        solver.restore(model.solver_state)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"model {str(out)!r} is damaged: its {solver.name} solver state "
                         f"cannot be restored ({type(exc).__name__}: {exc}); retrain it or "
                         "restore a copy") from None
    return state_from_attrs({**model.attrs["train_state"], "history": model.attrs["history"]})


def _final_figures(client, pieces, A, config: TrainConfig, binary: bool, split_every: int
                   ) -> dict:
    """Thresholds calibrated on the training rows; figures and ROC on the validation rows."""
    splits = ("train", "validation") if config.validation > 0 else ("train",)
    stats = score_pieces(client, pieces, A, loss=config.make_loss(binary),
                         validation=config.validation, seed=config.seed, splits=splits,
                         split_every=split_every, negatives=config.negatives)
    figures: dict[str, Any] = {"train_figures": summarize(stats, "train", binary=binary)}
    if binary:
        figures["threshold"] = figures["train_figures"]["learned"]["threshold"]
        figures["plain_threshold"] = figures["train_figures"]["plain"]["threshold"]
    if config.validation > 0:
        thresholds = {"learned": figures.get("threshold"), "plain": figures.get("plain_threshold")}
        figures["validation_figures"] = summarize(stats, "validation", binary=binary,
                                                  thresholds=thresholds)
        if binary:
            figures["roc"] = {name: roc_points(stats[f"{name}/validation"])
                              for name in ("learned", "plain")}
    return figures
