"""Every default of a training run, in one place: :class:`TrainConfig` (what shapes the
learned metric) and :class:`RunOptions` (how a run executes, never what it learns).

The CLI (``cosim train``), the estimator (:class:`~cosim_dask.estimator.CosineMetricLearner`)
and the pipelines all start from these defaults, so that ``CosineMetricLearner().fit(pairs, y)``
and ``cosim train STORE --validation 0`` on the same pairs learn the same A (to the float32
precision a pair store keeps). The choices, and the evidence for them (the digits sweep of
``pipelines/digits.py --sweep`` and the synthetic pairs of ``cosim generate``):

- ``loss="mse"``: contrastive is level on digits (test AUC 0.9813 vs 0.9803) but needs margins
  and reads graded targets by sign only; mse fits graded targets as given.
- ``negative_target=None``, which means :data:`DEFAULT_NEGATIVE_TARGET` = 0.0 for mse on
  binary labels: a label −1 asks for "unrelated" (orthogonal), not "opposite". Digits: test
  AUC 0.9803 vs 0.9781 for −1 (full form 0.930 vs 0.902); synthetic sign-of-similarity pairs
  favour −1 slightly (0.966 vs 0.963), but real "different" pairs are mostly unrelated. Graded
  targets are never remapped.
- ``param="factor"`` (A = MᵀM), ``rank=None`` (k = d): with the full form L-BFGS stalled
  after 5–12 steps on digits (AUC 0.93) once the PSD projection became active; on synthetic
  data L-BFGS on M needed 31 passes where L-BFGS on A needed more than 300.
- ``solver="stream+lbfgs"`` (:class:`~cosim_dask.core.solvers.StreamLBFGS`): one streaming
  pass in which runs of chunks (about a million rows each, a number fixed by the data) take
  mini-batch Adam steps from the start and their metrics are averaged, then full-batch L-BFGS
  from the average, stopping once a step gains at most 3e-4 in both validation AUC and
  relative validation loss (training loss without validation rows). Plain L-BFGS from the
  identity needed 6 passes to get within 0.001 held-out AUC of the best on the demo's
  synthetic pairs (200,000 × d = 64) and ran 14–17; the first pass's average alone was within
  it there (0.9642 against 0.9648: step 0 reports it after that one pass), 0.0036
  short on a ``cosim generate`` store of the same kind (0.9604 against 0.9640; 0.9633 after
  two L-BFGS steps), 0.0016 at d = 128 (400,000 pairs). Runs ended after 5–8 passes.
  ``scripts/bench_converge.py`` compares it with the
  PyTorch recipe. ``solver="lbfgs"`` is the previous default.
- ``steps=50``: 100 steps bought 0.0005 test AUC on digits for twice the time.
- ``tol=1e-5``: on digits no tolerance down to 1e-5 stops before 50 steps (1e-4 stops at 36
  with AUC 0.9799 vs 0.9803); on the demo's synthetic pairs (200,000 × d = 64, rank 8, noise
  0.3) 1e-5 stopped after 17–19 steps and 1e-7 after 29 with the same held-out AUC (within
  1e-4, binary and graded), so 1e-7 only spent passes.
- ``regularization=0.0``: λ = 1e-3 toward I cost AUC on digits (0.9769); the similarity is
  scale-invariant, so the penalty only pulls A toward plain cosine.
- ``validation=0.0``: every pair trains, as scikit-learn's ``fit`` does. The one default that
  differs by entry point is :data:`LIVE_VALIDATION`, the share ``cosim train`` holds out
  unless told otherwise so that its live page and report have validation curves; it decides
  which rows train, not how they are fitted.
- ``negatives=0``: every pair is used as stored. With K > 0, each positive training pair
  gets K negatives made inside its chunk (:mod:`cosim_dask.core.negatives`), for stores of
  positive pairs only; the loss is the mean over all augmented pairs (see
  :data:`NEGATIVES_BALANCED`).
- ``seed=0``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from cosim_dask.core.forms import Parameterisation, get_parameterisation
from cosim_dask.core.local import first_pass_fit
from cosim_dask.core.losses import Loss, get_loss
from cosim_dask.core.solvers import Solver, StreamLBFGS, get_solver
from cosim_dask.dist.tree import resolve_split_every
from cosim_dask.errors import ANY, CosimError, Message

#: mse target for label −1 on binary pairs when ``negative_target`` is None (see above).
DEFAULT_NEGATIVE_TARGET = 0.0
#: The share of rows ``cosim train`` holds out by default, for its live validation curves.
LIVE_VALIDATION = 0.1
#: Most solver steps a run may ask for: far beyond any real run (each step is at least one
#: pass over the data), small enough that a typo (1e20) is caught before start-up.
MAX_STEPS = 10_000_000
#: Seeds feed NumPy's generators, which take integers in [0, 2**32 - 1] here.
MAX_SEED = 2**32 - 1
#: Most negatives per positive a run may ask for: each adds about half a stored pair's work,
#: and a chunk task holds K partner indices per pair (8·K bytes).
MAX_NEGATIVES = 64
#: With negatives, do positives and negatives weigh half each (True: every stored pair counts
#: K times) or is the loss the mean over all augmented pairs (False)? Measured on the digits
#: halves of ``pipelines/retrieval.py`` (seeds 0-2, K = 4 and 16, 500 candidates): the mean
#: over all pairs gave held-out MRR 0.133 and hit@1 0.047 on average, half-and-half 0.128 and
#: 0.042 (better on one seed of three).
NEGATIVES_BALANCED = False
#: How a run may keep its training data: in cluster memory, streamed, or chosen by size.
CACHE_MODES = ("auto", "memory", "stream")


def _real(value: object, name: str) -> float:
    """``value`` as a finite float, or a CosimError naming it (``{name}``: the parameter
    in Python, its flag in the CLI)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _bad(name, value, "must be a number")
    if not math.isfinite(value):
        raise _bad(name, value, "must be a finite number")
    return float(value)


def _whole(value: object, name: str, low: int, high: int | None) -> int:
    """``value`` as an int in [low, high], or a CosimError naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _bad(name, value, "must be a whole number")
    if value < low or (high is not None and value > high):
        where = f"between {low:,} and {high:,}" if high is not None else f">= {low}"
        raise _bad(name, value, f"must be {where}")
    return int(value)


def _bad(name: str, value: object, complaint: str) -> CosimError:
    """``lr=0.0 must be > 0`` in Python, ``--lr 0.0 must be > 0`` in the CLI. Every name
    passed here is one of :data:`CHECKED`, which a test holds to the CLI's flags."""
    assert name in CHECKED, name
    if isinstance(value, np.generic):  # lr=0.0, not lr=np.float64(0.0)
        value = value.item()
    return CosimError(Message("{" + name + "} " + complaint, {name: value}))


#: The settings :meth:`TrainConfig.check` names in its errors.
CHECKED = ("steps", "seed", "lr", "tol", "gtol", "regularization", "negative_target",
           "pos_margin", "neg_margin", "validation", "negatives", "rank", "patience",
           "batch_chunks")


@dataclass
class TrainConfig:
    """Every setting that shapes the result of a run (and so must match on resume), with the
    defaults every entry point shares (the module docstring says why each)."""

    loss: str = "mse"
    negative_target: float | None = None  # mse on binary labels: target of −1 (None: 0.0)
    pos_margin: float | None = None  # contrastive
    neg_margin: float | None = None  # contrastive
    param: str = "factor"
    rank: int | None = None
    solver: str = "stream+lbfgs"
    lr: float | None = None
    steps: int = 50
    tol: float = 1e-5  # stop when the relative loss change is below this (0: never; also
    # turns off the default solver's stop on stalled validation figures)
    gtol: float = 1e-7  # stop when the gradient norm is below this
    regularization: float = 0.0
    validation: float = 0.0
    patience: int | None = None  # stop after this many steps without a better validation score
    batch_chunks: int | None = None  # stochastic solvers: chunks per mini-batch
    seed: int = 0
    negatives: int = 0  # in-chunk negatives per positive pair (positive-only stores)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainConfig:
        """The config a model's ``settings`` attribute records (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in known})

    def check(self) -> None:
        """Every number checked before anything starts: a :class:`CosimError` naming the
        value and the range it must be in."""
        _whole(self.steps, "steps", 0, MAX_STEPS)
        _whole(self.seed, "seed", 0, MAX_SEED)
        if self.lr is not None and not _real(self.lr, "lr") > 0:
            raise _bad("lr", self.lr, "must be > 0 (omit it for the solver's default)")
        for name in ("tol", "gtol", "regularization"):
            if not _real(getattr(self, name), name) >= 0:
                raise _bad(name, getattr(self, name), "must be >= 0")
        for name in ("negative_target", "pos_margin", "neg_margin"):
            if getattr(self, name) is not None:
                _real(getattr(self, name), name)
        if not 0.0 <= _real(self.validation, "validation") < 1.0:
            raise _bad("validation", self.validation, "must be in [0, 1)")
        _whole(self.negatives, "negatives", 0, MAX_NEGATIVES)
        for name in ("rank", "patience", "batch_chunks"):
            if getattr(self, name) is not None:
                _whole(getattr(self, name), name, 1, None)
        if self.patience is not None and self.validation == 0:
            raise CosimError("patience needs validation rows: pass {validation} > 0",
                             params={"validation": ANY})
        self.make_loss()
        self.make_parameterisation()
        self.make_solver()

    def make_loss(self, binary: bool = False) -> Loss:
        """The loss; for mse on binary labels, label −1 means ``negative_target`` (None:
        :data:`DEFAULT_NEGATIVE_TARGET`, "unrelated" rather than "opposite")."""
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

    def make_solver(self, binary: bool = True) -> Solver:
        """The solver; ``binary``: whether the targets are binary labels, which chooses the
        streaming first pass's fit (:func:`~cosim_dask.core.local.first_pass_fit`)."""
        if self.solver == StreamLBFGS.name:
            return get_solver(self.solver, lr=self.lr, fit=first_pass_fit(binary))
        return get_solver(self.solver, lr=self.lr)

    @property
    def positive_weight(self) -> int:
        """The weight of a stored pair against a negative's 1 (:data:`NEGATIVES_BALANCED`)."""
        return max(self.negatives, 1) if NEGATIVES_BALANCED else 1

    @property
    def stochastic(self) -> bool:
        return self.make_solver().stochastic

    def key(self) -> str:
        """A digest of the settings that must match for a resume (``steps`` may grow)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("steps", "patience")}
        if not settings["negatives"]:  # the digest of runs made before negatives existed
            del settings["negatives"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunOptions:
    """Settings that change how a run executes but not its result."""

    cache: str = "auto"
    split_every: int | None = None
    checkpoint_every: int | None = 10
    on_invalid: str = "raise"

    def check(self) -> None:
        if self.cache not in CACHE_MODES:
            raise CosimError(f"cache={self.cache!r} must be one of {', '.join(CACHE_MODES)}")
        resolve_split_every(self.split_every)
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise CosimError(f"checkpoint_every={self.checkpoint_every} must be >= 1")
        if self.on_invalid not in ("raise", "skip"):
            raise CosimError(f"on_invalid={self.on_invalid!r} must be 'raise' or 'skip'")
