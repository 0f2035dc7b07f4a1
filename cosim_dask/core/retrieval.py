"""Retrieval figures of positive pairs: is a query's true partner ranked first among many?

For held-out positive pairs (x_i, y_i) the query is x_i and the candidates are the y of a
block of pairs that contains i. The blocks are cut from one chunk at a time: its query rows
in a seeded random order, in consecutive blocks of ``size`` (:func:`candidate_blocks`), so
that every query has exactly ``size`` candidates when its chunk holds at least that many
query rows (else all of them), and memory stays at one size × size score matrix.

Rank of the true partner: 1 + the number of other candidates whose similarity is at least
its own. Ties count against the query (a candidate that scores level with the true partner
ranks ahead of it), so a metric that cannot tell two candidates apart gets no credit for
them. Candidates with an undefined similarity (zero or non-finite vectors) never rank ahead;
a query whose own pair is undefined is left out and counted in ``skipped``.

:class:`RetrievalStats` are sums that add across chunks: hit rate@1 (share of queries with
rank 1), recall@10 (rank ≤ 10), MRR (mean of 1/rank) and the mean rank follow at the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Salt of the candidate blocks' random stream (apart from the validation split's).
_STREAM = 0x726574


@dataclass
class RetrievalStats:
    """Sums over queries that add across chunks; :meth:`summary` divides."""

    queries: int = 0
    hits_at_1: int = 0
    hits_at_10: int = 0
    reciprocal_rank: float = 0.0
    rank: float = 0.0
    candidates: int = 0  # Σ candidates per query
    min_candidates: int = 0  # fewest candidates any query had (0: no query yet)
    skipped: int = 0

    def __add__(self, other: RetrievalStats) -> RetrievalStats:
        lows = [v for v in (self.min_candidates, other.min_candidates) if v]
        return RetrievalStats(
            self.queries + other.queries, self.hits_at_1 + other.hits_at_1,
            self.hits_at_10 + other.hits_at_10, self.reciprocal_rank + other.reciprocal_rank,
            self.rank + other.rank, self.candidates + other.candidates,
            min(lows) if lows else 0, self.skipped + other.skipped)

    @classmethod
    def of(cls, ranks: np.ndarray, n_candidates: int, skipped: int = 0) -> RetrievalStats:
        """Statistics of the 1-based ``ranks`` of queries that had ``n_candidates`` each."""
        ranks = np.asarray(ranks, dtype=np.int64)
        return cls(int(len(ranks)), int(np.count_nonzero(ranks == 1)),
                   int(np.count_nonzero(ranks <= 10)), float(np.sum(1.0 / ranks)),
                   float(np.sum(ranks)), int(len(ranks)) * n_candidates,
                   n_candidates if len(ranks) else 0, skipped)

    def summary(self) -> dict[str, float | int]:
        """hit@1, recall@10, MRR, mean rank, queries, mean and fewest candidates, skipped."""
        q = self.queries
        nan = float("nan")
        return {"queries": q, "hit_at_1": self.hits_at_1 / q if q else nan,
                "recall_at_10": self.hits_at_10 / q if q else nan,
                "mrr": self.reciprocal_rank / q if q else nan,
                "mean_rank": self.rank / q if q else nan,
                "candidates": self.candidates / q if q else nan,
                "min_candidates": self.min_candidates, "skipped": self.skipped}


def candidate_blocks(n_queries: int, size: int, seed: int, chunk: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(queries, candidates)`` positions (into the chunk's query rows) of each block.

    The query rows in a seeded order (from ``seed`` and ``chunk`` alone) are cut into
    blocks of ``size``; the queries left over (fewer than ``size``) take the last ``size``
    rows of the order as candidates, which include them. Every query is in exactly one
    block and among its own candidates.
    """
    if size < 2:
        raise ValueError(f"size={size} must be at least 2")
    if n_queries == 0:
        return []
    order = np.random.default_rng([int(seed), int(chunk), _STREAM]).permutation(n_queries)
    if n_queries <= size:
        return [(order, order)]
    full = n_queries // size
    blocks = [(order[j * size : (j + 1) * size],) * 2 for j in range(full)]
    if n_queries % size:
        blocks.append((order[full * size :], order[n_queries - size :]))
    return blocks


def similarity_matrix(x: np.ndarray, y: np.ndarray, A: np.ndarray | None) -> np.ndarray:
    """(q, c) similarities of every x row with every y row under ``A`` (None: plain
    cosine), float64; NaN where a vector has an undefined norm."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xa = x if A is None else x @ A
    ya = y if A is None else y @ A
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = np.einsum("ij,ij->i", x, xa)
        m = np.einsum("ij,ij->i", y, ya)
        inv_n = np.where(np.isfinite(n) & (n > 0), 1.0 / np.sqrt(n), np.nan)
        inv_m = np.where(np.isfinite(m) & (m > 0), 1.0 / np.sqrt(m), np.nan)
        return (xa @ y.T) * inv_n[:, None] * inv_m[None, :]


def block_ranks(x: np.ndarray, y: np.ndarray, A: np.ndarray | None, queries: np.ndarray,
                candidates: np.ndarray) -> np.ndarray:
    """Rank of each query's true partner among ``candidates`` (rows of ``y``); NaN-scored
    queries get rank 0 (to be left out)."""
    S = similarity_matrix(x[queries], y[candidates], A)
    where = {int(c): j for j, c in enumerate(candidates)}
    pos = np.array([where[int(q)] for q in queries])
    true = S[np.arange(len(queries)), pos]
    with np.errstate(invalid="ignore"):
        ranks = np.count_nonzero(true[:, None] <= S, axis=1)  # the true partner counts itself
    return np.where(np.isfinite(true), ranks, 0)


def retrieval_stats(x: np.ndarray, y: np.ndarray, A: np.ndarray | None,
                    blocks: list[tuple[np.ndarray, np.ndarray]]) -> RetrievalStats:
    """:class:`RetrievalStats` of the query rows ``x``/``y`` (query i's partner is y_i) over
    ``blocks`` from :func:`candidate_blocks`."""
    total = RetrievalStats()
    for queries, candidates in blocks:
        ranks = block_ranks(x, y, A, queries, candidates)
        good = ranks > 0
        total = total + RetrievalStats.of(ranks[good], len(candidates),
                                          skipped=int(np.count_nonzero(~good)))
    return total
