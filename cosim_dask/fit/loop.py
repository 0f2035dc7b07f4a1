"""The driver loop: solver steps, stopping rules, validation, checkpoints and resume.

It sees the data only through an :class:`~cosim_dask.core.objective.Objective` and a
``partial_sum`` that may expose ``last_validation`` (ScoreStats of the last full pass) and
``last_pairs``; the same loop drives in-process and distributed training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cosim_dask.core.forms import Parameterisation
from cosim_dask.core.objective import Objective
from cosim_dask.core.solvers import Solver
from cosim_dask.errors import ANY, DivergedError
from cosim_dask.fit.config import TrainConfig

#: Mean eigenvalue of A (trace / d) outside [1/MAX_SCALE, MAX_SCALE] means the solver has
#: diverged: the similarity ignores the scale of A and every start has a mean eigenvalue
#: of at most 1, while float32 products xᵀAx overflow not far beyond it.
MAX_SCALE = 1e12


@dataclass
class TrainState:
    """Everything the loop needs to continue: saved in checkpoints."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    since_best: int = 0
    stop_reason: str | None = None
    #: Training passes over the data so far (pairs read / pairs; mini-batches count their share).
    passes: float = 0.0


StepCallback = Callable[[dict[str, Any]], None]
CheckpointCallback = Callable[[Solver, TrainState], None]


def validation_score(stats, targets_binary: bool) -> tuple[float, float]:
    """(val_loss, score to maximise): AUC for binary targets, −loss otherwise."""
    if stats is None or stats.count == 0:
        return math.nan, math.nan
    auc = stats.auc()
    return stats.mean_loss, (auc if targets_binary and math.isfinite(auc) else -stats.mean_loss)


def run_solver(
    objective: Objective,
    solver: Solver,
    params0: np.ndarray,
    config: TrainConfig,
    *,
    state: TrainState | None = None,
    on_step: StepCallback | None = None,
    checkpoint: CheckpointCallback | None = None,
    checkpoint_every: int | None = None,
    targets_binary: bool = True,
) -> TrainState:
    """Take solver steps until a stopping rule fires; returns the final state.

    With ``state`` given (a resumed run), ``solver`` must already hold its restored state
    and ``params0`` is ignored.
    """
    form = objective.parameterisation
    source = objective.partial_sum
    resumed = state is not None
    state = state or TrainState()
    # Every pass goes through the guard: parameters that have run off are reported as a
    # diverging solver, so an invalid-pairs error from the kernel only ever means the data.
    guarded = _Guarded(objective, config)
    # Passes before this call (a resumed run's) plus those the source counts from now on.
    offset = state.passes - getattr(source, "passes", 0.0)

    def count_passes() -> None:
        if hasattr(source, "passes"):
            state.passes = offset + source.passes

    if not resumed:
        started = time.perf_counter()
        info = solver.start(params0, guarded)
        count_passes()
        _record(state, source, info.loss, info.grad_norm, 0.0, info.evaluations,
                time.perf_counter() - started, targets_binary, on_step)
    while state.step < config.steps and state.stop_reason is None:
        started = time.perf_counter()
        guarded.step = state.step + 1
        settled = solver.settle(guarded)
        before = solver.loss
        info = solver.step(guarded, form.project)
        info = replace(info, evaluations=info.evaluations + settled)
        if not math.isfinite(info.loss) or not np.isfinite(solver.params).all():
            what = "parameters" if math.isfinite(info.loss) else "loss"
            raise diverged(config, state.step + 1, f"the {what} became inf/nan")
        state.step += 1
        count_passes()
        record = _record(state, source, info.loss, info.grad_norm, info.step_size,
                         info.evaluations, time.perf_counter() - started, targets_binary,
                         on_step)
        state.stop_reason = _stop_reason(config, solver, state, before, info, record)
        if checkpoint and checkpoint_every and state.step % checkpoint_every == 0:
            checkpoint(solver, state)
    if state.stop_reason is None:
        state.stop_reason = "max steps"
    if solver.settle(guarded):  # no step taken: the saved solver state needs its start
        count_passes()
    return state


def diverged(config: TrainConfig, step: int, what: str) -> DivergedError:
    """The one-line report of a diverging solver at ``step``, naming the step size to lower."""
    lr = config.lr if config.lr is not None else getattr(config.make_solver(), "lr", None)
    now = f"now {lr:g}" if lr is not None else "now the solver's default"
    return DivergedError(
        f"the solver diverged at step {step} ({what}); lower the step size ({{lr}}; {now}), "
        "add regularization ({regularization}), or use the lbfgs solver",
        params={"lr": ANY, "regularization": ANY})


def check_parameters(form: Parameterisation, params: np.ndarray) -> str | None:
    """Why ``params`` cannot be evaluated (None when they can): non-finite, or a metric A
    whose scale has run off (mean eigenvalue outside [1/MAX_SCALE, MAX_SCALE]) so that
    xᵀAx overflows, underflows or is zero for every pair."""
    params = np.asarray(params)
    if not np.isfinite(params).all():
        return "the parameters became inf/nan"
    with np.errstate(over="ignore", invalid="ignore"):
        # trace(MᵀM) = ‖M‖²_F: O(kd) per pass rather than the O(kd²) of forming A.
        trace = np.sum(params * params) if form.name == "factor" else np.trace(params)
        scale = float(trace) / params.shape[-1]
    if not math.isfinite(scale):
        return "the metric A became inf/nan"
    if not 1.0 / MAX_SCALE <= scale <= MAX_SCALE:
        return f"the metric A became degenerate: mean eigenvalue {scale:.3g}"
    return None


class _Guarded:
    """The objective, behind a check of the parameters before every pass (line-search
    trials included); ``step`` is the step being taken, for the report."""

    def __init__(self, objective: Objective, config: TrainConfig) -> None:
        self.objective = objective
        self.config = config
        self.step = 0
        if not hasattr(objective.partial_sum, "local_fit"):
            self.local_average = None  # solvers fall back to their full-batch start

    def __call__(self, params: np.ndarray, batch: int | None = None):
        self._check(params)
        return self.objective(params, batch)

    def _check(self, params: np.ndarray) -> None:
        problem = check_parameters(self.objective.parameterisation, params)
        if problem:
            raise diverged(self.config, self.step, problem)

    def local_average(self, params: np.ndarray, fit) -> np.ndarray:
        """The objective's local-fit pass (:meth:`Objective.local_average`), checked on
        both sides: a local fit that ran off is a diverging solver too."""
        self._check(params)
        averaged = self.objective.local_average(params, fit)
        self._check(averaged)
        return averaged

    def validate_ahead(self, params: np.ndarray) -> bool:
        """The objective's :meth:`Objective.validate_ahead`: True when the validation
        figures at ``params`` are in (``last_validation``) before a full pass there."""
        self._check(params)
        return self.objective.validate_ahead(params)


def _record(state, source, loss, grad_norm, step_size, evaluations, seconds, binary, on_step):
    stats = getattr(source, "last_validation", None)
    val_loss, score = validation_score(stats, binary)
    pairs = getattr(source, "last_pairs", 0) * max(evaluations, 1)
    record = {
        "step": state.step,
        # NaN: not computed at this step (step 0 of a start whose full pass comes later).
        "loss": loss if math.isfinite(loss) else None,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        "step_size": step_size,
        "evaluations": evaluations,
        "passes": round(state.passes, 6),
        "step_seconds": seconds,
        "pairs_per_s": pairs / seconds if seconds > 0 and pairs else None,
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "val_auc": (stats.auc() if stats is not None and binary else None),
    }
    if record["val_auc"] is not None and not math.isfinite(record["val_auc"]):
        record["val_auc"] = None
    if math.isfinite(score):
        if score > state.best_score + 1e-12:
            state.best_score, state.since_best = score, 0
        else:
            state.since_best += 1
    state.history.append(record)
    if on_step:
        on_step(record)
    return record


def _stop_reason(config, solver, state, before, info, record) -> str | None:
    if info.step_size == 0.0 and not solver.stochastic:
        return "line search made no progress (converged to roundoff)"
    if info.grad_norm <= config.gtol:
        return f"gradient norm {info.grad_norm:.2e} <= gtol {config.gtol:g}"
    if not solver.stochastic and abs(before - info.loss) <= config.tol * max(abs(info.loss), 1e-12):
        return f"relative loss change below tol {config.tol:g}"
    if config.patience is not None and state.since_best >= config.patience:
        return f"no better validation score in {config.patience} steps"
    # tol = 0 asks for every step: no tolerance stops the run, the solver's own neither.
    tol = getattr(solver, "val_tol", None) if config.tol > 0 else None
    gain = validation_gain(state.history[-2], record) if len(state.history) >= 2 else None
    if tol is not None and gain is not None and 0.0 <= gain[0] <= tol:
        return f"{gain[1]} gained {gain[0]:.2g} <= {tol:g} in one step"
    return None


def validation_gain(before: dict[str, Any], after: dict[str, Any]
                    ) -> tuple[float, str] | None:
    """How much a step improved the figures its full pass computed, and which: the smaller
    of the validation AUC's gain (binary targets) and the validation loss's relative
    decrease (both must have stopped improving), or (no validation rows) the training
    loss's relative decrease; None without figures."""
    gains = []
    if before.get("val_auc") is not None and after.get("val_auc") is not None:
        gains.append((after["val_auc"] - before["val_auc"], "validation AUC"))
    key, what = (("val_loss", "validation loss") if before.get("val_loss") is not None
                 else ("loss", "training loss"))
    if before.get(key) is not None and after.get(key) is not None:
        gains.append(((before[key] - after[key]) / max(abs(before[key]), 1e-12),
                      f"{what} (relative)"))
    return max(gains) if gains else None


def state_to_attrs(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "history": state.history, "best_score": state.best_score,
            "since_best": state.since_best, "stop_reason": state.stop_reason,
            "passes": state.passes}


def state_from_attrs(attrs: dict[str, Any]) -> TrainState:
    """The loop state a checkpoint saved. A stopping rule that fired stays fired (a checkpoint
    written at the step where the loss converged must not take one more step on resume); only
    the step limit is looked at again, since a resumed run may raise it."""
    best = attrs.get("best_score")
    reason = attrs.get("stop_reason")
    return TrainState(step=int(attrs["step"]), history=list(attrs.get("history", [])),
                      best_score=-math.inf if best is None else float(best),
                      since_best=int(attrs.get("since_best", 0)),
                      passes=float(attrs.get("passes", 0.0)),
                      stop_reason=None if reason == "max steps" else reason)
