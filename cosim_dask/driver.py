"""The driver loop: solver steps, stopping rules, validation, checkpoints and resume.

It sees the data only through an :class:`~cosim_dask.objective.Objective` and a
``partial_sum`` that may expose ``last_validation`` (ScoreStats of the last full pass) and
``last_pairs``; the same loop drives in-process and distributed training.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import CosimError, TrainingError
from .losses import Loss, get_loss
from .metric import Parameterisation, get_parameterisation
from .objective import Objective
from .solvers import Solver, get_solver

#: mse target for label −1 on binary pairs. Real "different" pairs are mostly unrelated, not
#: opposite: on digits 0.0 gave test AUC 0.980 vs 0.978 for −1 (full form: 0.930 vs 0.902);
#: on our synthetic sign-of-hidden-similarity pairs −1 did better (0.966 vs 0.963).
DEFAULT_NEGATIVE_TARGET = 0.0


@dataclass
class TrainConfig:
    """Every setting that shapes the result of a run (and so must match on resume)."""

    loss: str = "mse"
    negative_target: float | None = None  # mse on binary labels: target of −1 (default 0)
    pos_margin: float | None = None  # contrastive
    neg_margin: float | None = None  # contrastive
    # L-BFGS on M (A = MᵀM) needs ~5× fewer passes than on A, whose PSD projection bends
    # its steps where the optimum is low-rank (scripts/bench_train.py, converge).
    param: str = "factor"
    rank: int | None = None
    solver: str = "lbfgs"
    lr: float | None = None
    steps: int = 50
    tol: float = 1e-7  # stop when the relative loss change is below this
    gtol: float = 1e-7  # stop when the gradient norm is below this
    regularization: float = 0.0
    validation: float = 0.1
    patience: int | None = None  # stop after this many steps without a better validation score
    batch_chunks: int | None = None  # stochastic solvers: chunks per mini-batch
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise CosimError(f"steps={self.steps} must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise CosimError(f"lr={self.lr} must be > 0")
        if self.regularization < 0:
            raise CosimError(f"regularization={self.regularization} must be >= 0")
        if not 0.0 <= self.validation < 1.0:
            raise CosimError(f"validation={self.validation} must be in [0, 1)")
        if self.patience is not None and self.patience < 1:
            raise CosimError(f"patience={self.patience} must be >= 1")
        if self.patience is not None and self.validation == 0:
            raise CosimError("patience needs validation rows: pass --validation > 0")
        if self.batch_chunks is not None and self.batch_chunks < 1:
            raise CosimError(f"batch_chunks={self.batch_chunks} must be >= 1")
        if self.tol < 0 or self.gtol < 0:
            raise CosimError("tol and gtol must be >= 0")
        self.make_loss()
        self.make_parameterisation()
        self.make_solver()

    def make_loss(self, binary: bool = False) -> Loss:
        """The loss; for mse on binary labels, label −1 means ``negative_target`` (default
        :data:`DEFAULT_NEGATIVE_TARGET`: "unrelated" rather than "opposite")."""
        negative_target = self.negative_target
        if negative_target is None and binary and self.loss == "mse":
            negative_target = DEFAULT_NEGATIVE_TARGET
        params = {k: v for k, v in (("negative_target", negative_target),
                                    ("pos_margin", self.pos_margin),
                                    ("neg_margin", self.neg_margin)) if v is not None}
        try:
            return get_loss(self.loss, **params)
        except TypeError:
            raise CosimError(
                f"loss {self.loss!r} does not take {', '.join(params)}"
            ) from None

    def make_parameterisation(self) -> Parameterisation:
        return get_parameterisation(self.param, self.rank)

    def make_solver(self) -> Solver:
        return get_solver(self.solver, lr=self.lr)

    @property
    def stochastic(self) -> bool:
        return self.make_solver().stochastic

    def key(self) -> str:
        """A digest of the settings that must match for a resume (``steps`` may grow)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("steps", "patience")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    """Everything the loop needs to continue: saved in checkpoints."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    since_best: int = 0
    stop_reason: str | None = None


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
    if not resumed:
        started = time.perf_counter()
        info = solver.start(params0, objective)
        _record(state, source, info.loss, info.grad_norm, 0.0, info.evaluations,
                time.perf_counter() - started, targets_binary, on_step)
    while state.step < config.steps and state.stop_reason is None:
        started = time.perf_counter()
        before = solver.loss
        info = solver.step(objective, form.project)
        if not math.isfinite(info.loss) or not np.isfinite(solver.params).all():
            raise TrainingError(
                f"the loss became {info.loss} at step {state.step + 1}; the last checkpoint "
                "is kept. Lower --lr, add --regularization, or check the data"
            )
        state.step += 1
        record = _record(state, source, info.loss, info.grad_norm, info.step_size,
                         info.evaluations, time.perf_counter() - started, targets_binary,
                         on_step)
        state.stop_reason = _stop_reason(config, solver, state, before, info, record)
        if checkpoint and checkpoint_every and state.step % checkpoint_every == 0:
            checkpoint(solver, state)
    if state.stop_reason is None:
        state.stop_reason = "max steps"
    return state


def _record(state, source, loss, grad_norm, step_size, evaluations, seconds, binary, on_step):
    stats = getattr(source, "last_validation", None)
    val_loss, score = validation_score(stats, binary)
    pairs = getattr(source, "last_pairs", 0) * max(evaluations, 1)
    record = {
        "step": state.step,
        "loss": loss,
        "grad_norm": grad_norm,
        "step_size": step_size,
        "evaluations": evaluations,
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
    return None


def state_to_attrs(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "history": state.history, "best_score": state.best_score,
            "since_best": state.since_best, "stop_reason": state.stop_reason}


def state_from_attrs(attrs: dict[str, Any]) -> TrainState:
    """The loop state a checkpoint saved. A stopping rule that fired stays fired (a checkpoint
    written at the step where the loss converged must not take one more step on resume); only
    the step limit is looked at again, since a resumed run may raise it."""
    best = attrs.get("best_score")
    reason = attrs.get("stop_reason")
    return TrainState(step=int(attrs["step"]), history=list(attrs.get("history", [])),
                      best_score=-math.inf if best is None else float(best),
                      since_best=int(attrs.get("since_best", 0)),
                      stop_reason=None if reason == "max steps" else reason)
