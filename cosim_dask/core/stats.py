"""Out-of-core evaluation statistics that add across chunks (pure NumPy).

Scores in [−1, 1] are binned finely (8,192 bins, width 2.4e-4), per class for binary
targets: from the per-class histograms follow the ROC curve and AUC (exact up to ties inside a
bin), the accuracy-maximising threshold and the accuracy at any threshold. For graded targets a
joint (score, target) histogram gives Spearman's rank correlation on binned ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosim_dask.errors import CosimError

SCORE_BINS = 8192
SPEARMAN_BINS = 512


def _bin(s: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(((s + 1.0) * 0.5 * bins).astype(np.int64), 0, bins - 1)


@dataclass
class ScoreStats:
    """Sums over a set of pairs: loss, count and score histograms."""

    loss: float
    count: int
    pos_hist: np.ndarray  # (SCORE_BINS,) scores of pairs with target > 0
    neg_hist: np.ndarray  # (SCORE_BINS,) scores of pairs with target ≤ 0
    sq_error: float = 0.0  # Σ (s − t)², the MSE whatever loss trained the model
    # (SPEARMAN_BINS, SPEARMAN_BINS) (score, target) counts for ranks; 2 MB, so only kept
    # when asked for (evaluation), not on every training step.
    joint_hist: np.ndarray | None = None

    @classmethod
    def of(
        cls, s: np.ndarray, t: np.ndarray, loss_values: np.ndarray, *, joint: bool = False
    ) -> ScoreStats:
        """Statistics of similarities ``s`` (b,) against targets ``t`` (b,)."""
        b = _bin(s, SCORE_BINS)
        pos = t > 0
        joint_hist = None
        if joint:
            flat = _bin(s, SPEARMAN_BINS) * SPEARMAN_BINS + _bin(t, SPEARMAN_BINS)
            joint_hist = np.bincount(flat, minlength=SPEARMAN_BINS**2).astype(np.float64)
            joint_hist = joint_hist.reshape(SPEARMAN_BINS, SPEARMAN_BINS)
        return cls(
            loss=float(np.sum(loss_values)),
            count=int(len(s)),
            pos_hist=np.bincount(b[pos], minlength=SCORE_BINS).astype(np.float64),
            neg_hist=np.bincount(b[~pos], minlength=SCORE_BINS).astype(np.float64),
            sq_error=float(np.sum((s - t) ** 2)),
            joint_hist=joint_hist,
        )

    def __add__(self, other: ScoreStats) -> ScoreStats:
        joint = None
        if self.joint_hist is not None and other.joint_hist is not None:
            joint = self.joint_hist + other.joint_hist
        return ScoreStats(self.loss + other.loss, self.count + other.count,
                          self.pos_hist + other.pos_hist, self.neg_hist + other.neg_hist,
                          self.sq_error + other.sq_error, joint)

    @property
    def mean_loss(self) -> float:
        return self.loss / self.count if self.count else float("nan")

    @property
    def mse(self) -> float:
        return self.sq_error / self.count if self.count else float("nan")

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) at every bin edge, from the highest threshold down."""
        tp = np.concatenate([[0.0], np.cumsum(self.pos_hist[::-1])])
        fp = np.concatenate([[0.0], np.cumsum(self.neg_hist[::-1])])
        return fp / max(fp[-1], 1.0), tp / max(tp[-1], 1.0)

    def auc(self) -> float:
        """ROC AUC; ties within a bin count one half. NaN with a single class."""
        n_pos, n_neg = self.pos_hist.sum(), self.neg_hist.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg_hist) - self.neg_hist
        wins = np.sum(self.pos_hist * (neg_below + 0.5 * self.neg_hist))
        return float(wins / (n_pos * n_neg))

    def best_threshold(self) -> float:
        """The threshold on s (a bin edge) that maximises accuracy of ``s ≥ threshold``."""
        edges = np.linspace(-1.0, 1.0, SCORE_BINS + 1)
        # Predict positive for bins ≥ k: correct = positives in bins ≥ k + negatives below k.
        pos_at_or_above = np.concatenate([np.cumsum(self.pos_hist[::-1])[::-1], [0.0]])
        neg_below = np.concatenate([[0.0], np.cumsum(self.neg_hist)])
        return float(edges[int(np.argmax(pos_at_or_above + neg_below))])

    def accuracy(self, threshold: float) -> float:
        k = int(np.clip(np.round((threshold + 1.0) * 0.5 * SCORE_BINS), 0, SCORE_BINS))
        total = self.pos_hist.sum() + self.neg_hist.sum()
        if total == 0:
            return float("nan")
        return float((self.pos_hist[k:].sum() + self.neg_hist[:k].sum()) / total)

    def spearman(self) -> float:
        """Spearman's rho on binned (midrank) scores and targets."""
        h = self.joint_hist
        if h is None:
            raise ValueError("Spearman needs the joint histogram: build with joint=True")
        n = h.sum()
        if n < 2:
            return float("nan")

        def midranks(counts: np.ndarray) -> np.ndarray:
            return np.cumsum(counts) - 0.5 * (counts - 1.0) - 1.0

        ra, rb = midranks(h.sum(axis=1)), midranks(h.sum(axis=0))
        ma, mb = np.sum(h.sum(axis=1) * ra) / n, np.sum(h.sum(axis=0) * rb) / n
        cov = np.sum(h * np.outer(ra - ma, rb - mb))
        va = np.sum(h.sum(axis=1) * (ra - ma) ** 2)
        vb = np.sum(h.sum(axis=0) * (rb - mb) ** 2)
        return float(cov / np.sqrt(va * vb)) if va > 0 and vb > 0 else float("nan")


# Exact (per-pair, in-memory) counterparts for the estimator's NumPy scores.

THRESHOLD_STRATEGIES = ("accuracy", "f_beta", "max_tpr", "max_tnr")


def calibrated_threshold(scores: np.ndarray, y: np.ndarray, strategy: str = "accuracy",
                         *, min_rate: float | None = None, beta: float = 1.0) -> float:
    """The threshold on similarity for ``predict = +1 if score >= threshold``.

    Candidates are midpoints between consecutive distinct scores (and one below the lowest,
    one above the highest). ``y > 0`` is the positive class. Strategies as in metric-learn:
    ``accuracy``; ``f_beta`` (with ``beta``); ``max_tpr`` (highest true-positive rate with a
    true-negative rate ≥ ``min_rate``); ``max_tnr`` (the converse).

    Parameters
    ----------
    scores : (n,) similarities
    y : (n,) targets; > 0 positive
    """
    if strategy not in THRESHOLD_STRATEGIES:
        raise CosimError(f"unknown strategy {strategy!r}; choose one of: "
                         f"{', '.join(THRESHOLD_STRATEGIES)}")
    if strategy in ("max_tpr", "max_tnr") and (min_rate is None or not 0 <= min_rate <= 1):
        raise CosimError(f"strategy {strategy!r} needs min_rate in [0, 1]; got {min_rate!r}")
    if strategy == "f_beta" and not beta > 0:
        raise CosimError(f"beta={beta!r} must be > 0")
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], (y[order] > 0)
    # Cut k predicts the first k (highest) scores positive; cuts only between distinct scores.
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(~pos)])
    n_pos, n_neg = tp[-1], fp[-1]
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(s) != 0) + 1, [len(s)]])
    tp, fp = tp[cuts], fp[cuts]
    tn, fn = n_neg - fp, n_pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos else np.ones_like(tp)
        tnr = tn / n_neg if n_neg else np.ones_like(tn)
        if strategy == "accuracy":
            value = tp + tn
        elif strategy == "f_beta":
            b2 = beta * beta
            value = np.nan_to_num((1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp))
        elif strategy == "max_tpr":
            value = np.where(tnr >= min_rate, tpr + 1e-12 * tnr, -np.inf)
        else:
            value = np.where(tpr >= min_rate, tnr + 1e-12 * tpr, -np.inf)
    k = cuts[int(np.argmax(value))]
    above = s[k - 1] if k > 0 else s[0] + 1.0
    below = s[k] if k < len(s) else s[-1] - 1.0
    return float(0.5 * (above + below))


def roc_auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half) of ``scores`` for the classes ``y > 0`` vs rest."""
    from scipy.stats import rankdata

    pos = y > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise CosimError("ROC AUC needs both classes: y has only "
                         f"{'positive' if n_neg == 0 else 'negative'} targets")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
