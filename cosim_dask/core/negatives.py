"""Negatives made inside a chunk from positive pairs: the partners, and the chunk's partial.

Positive-only data (a query and the document that answered it, a question and its
duplicate) has no "different" pairs. Each positive pair (x_i, y_i) of a chunk is given K
negatives (x_i, y_j) whose y belongs to other positive pairs of the same chunk:
:func:`negative_partners` draws one seeded random order of the chunk's eligible rows and K
distinct cyclic shifts of it, so partner ``j = order[(a + shift_k) mod e]`` of row
``order[a]`` is never the row itself (each shift is a derangement) and a row's K partners
are distinct. Nothing is stored: the partners are drawn again, the same, every pass.

The negatives take the loss's target for a label −1 (for mse on binary labels
``DEFAULT_NEGATIVE_TARGET``, "unrelated"). How they weigh against the positives is chosen
by ``positive_weight`` (the loss is ``(w·Σ_pos + Σ_neg) / (w·n_pos + n_neg)``): 1 makes it
the mean over all augmented pairs, K gives positives and negatives half the weight each.

:func:`augmented_partial` sums the loss and the seed's symmetric gradient over the
augmented pairs. Per pair, with c = g/sqrt(nm), g = dloss/ds, the gradient with respect to
A is ½(x (c y − gs/n x)ᵀ + y (c x − gs/m y)ᵀ), and with respect to M (A = MᵀM, v = Mx,
w = My) it is v (c y − gs/n x)ᵀ + w (c x − gs/m y)ᵀ. The x side of a row collects all of
its K + 1 pairs, so a block of r rows sums to ONE product ``Lᵀ R`` with (K + 2)·r rows:
``L = [X; Y; Y_1 … Y_K]`` (or the forward products ``[V; W; W_1 … W_K]``) and
``R = [Σ_pairs c·y − Σ gs/n·x ; c₀x − gs₀/m·y ; c_k x − gs_k/m·y_k …]``. The forward
products y·A (or My) and yᵀAy are computed once per chunk and gathered for the partners,
so a negative costs no new forward product: per augmented pair about
(4 + 2(K + 2))/(K + 1)·d·k FLOP (k = d: 5·d² at K = 1, 3.2·d² at K = 4, against 6·d² for
a plain positive pair).
"""

from __future__ import annotations

import numpy as np

from cosim_dask.core.kernel import (
    Partial,
    apply_include,
    cosine,
    default_block_rows,
    first_bad,
    invalid_message,
    scratch_array,
    valid_mask,
    work_buffers,
)
from cosim_dask.core.losses import Loss
from cosim_dask.errors import CosimError, InvalidPairsError

#: Target given to the negatives: the label −1 of binary pairs, which the loss reads as its
#: own negative target (mse: ``negative_target``; contrastive: below ``neg_margin``).
NEGATIVE_LABEL = -1.0
#: Salt of the negatives' random stream, so it never coincides with other seeded draws
#: (the validation split, mini-batches) of the same (seed, chunk).
_STREAM = 0x6E6567


def negative_partners(eligible: np.ndarray, k: int, seed: int, chunk: int, epoch: int = 0
                      ) -> np.ndarray:
    """Partner rows of the K negatives of every row of a chunk.

    Parameters
    ----------
    eligible : (b,) bool, the rows that are positive training pairs: only they get
        negatives, and only their y are partners.
    k : negatives per positive.
    seed, chunk, epoch : the draw is a function of these alone (not of the worker, the
        task grouping or the block size).

    Returns
    -------
    (k', b) int64 with k' = min(k, e − 1) for e eligible rows (0 when e < 2): row ``i``'s
    partners ``out[:, i]``, all different from ``i`` and from each other; −1 for rows that
    are not eligible.
    """
    eligible = np.asarray(eligible, dtype=bool)
    rows = np.flatnonzero(eligible)
    e = len(rows)
    kk = max(0, min(int(k), e - 1))
    out = np.full((kk, len(eligible)), -1, dtype=np.int64)
    if kk == 0:
        return out
    rng = np.random.default_rng([int(seed), int(chunk), int(epoch), _STREAM])
    order = rows[rng.permutation(e)]
    shifts = rng.choice(e - 1, size=kk, replace=False) + 1
    for j, shift in enumerate(shifts):
        out[j, order] = np.roll(order, -int(shift))
    return out


def _zero_nonfinite(v: np.ndarray, vB: np.ndarray, norms: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``v`` whose squared norm ``norms`` is not finite (skipped pairs, validation
    rows) become zero rows, in ``v`` (a copy), ``vB`` and ``norms`` (in place): 0 · NaN is
    NaN, and their pairs are invalid anyway, so zero coefficients must clear them. Returns
    ``v`` and the mask of finite rows."""
    finite = np.isfinite(norms)
    if not finite.all():
        v = np.where(finite[:, None], v, 0).astype(v.dtype)
        vB[~finite] = 0
        norms[~finite] = 0.0
    return v, finite


def augmented_partial(x: np.ndarray, y: np.ndarray, t: np.ndarray, B: np.ndarray,
                      loss_fn: Loss, partners: np.ndarray, *, via_factor: bool,
                      positive_weight: int = 1, on_invalid: str = "raise",
                      chunk_id: object = None, block_rows: int | None = None,
                      include: np.ndarray | None = None) -> Partial:
    """Summed loss and gradient over a chunk's pairs and their in-chunk negatives.

    Parameters
    ----------
    x, y : (b, d) aligned float32/float64 rows (:func:`~cosim_dask.core.kernel.as_pair_arrays`)
    t : (b,) targets of the stored pairs
    B : A (d, d) when ``via_factor`` is False, else Mᵀ (d, k) for A = MᵀM
    partners : (K, b) from :func:`negative_partners`; −1 where a row has no negative
    positive_weight : the weight w of every stored pair (see the module docstring)

    Returns
    -------
    Partial: ``loss`` and ``grad`` (A's symmetric gradient, or M's) summed with the weights,
    ``count`` = w·(valid stored pairs) + valid negatives; ``extra["negatives"]`` counts the
    negatives. Stored pairs that are invalid raise or are skipped as in
    :func:`~cosim_dask.core.kernel.chunk_partial`; negatives whose x or y is invalid are
    dropped (not counted).
    """
    if positive_weight < 1:
        raise CosimError(f"positive_weight={positive_weight} must be >= 1")
    n_rows, d = x.shape
    K = partners.shape[0]
    cols = B.shape[1]
    block_rows = block_rows or default_block_rows(d)
    # A block's work buffers hold (K + 2) × rows: fewer rows for many negatives keep them
    # at most 8 plain blocks (K ≤ 6 keeps the full block).
    block_rows = min(block_rows, max(64, 8 * block_rows // (K + 2)))
    B_c = B.astype(x.dtype)
    # The y side once for the whole chunk, so that partners anywhere in it reuse it.
    yB = scratch_array(("neg-yB",), (n_rows, cols), x.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n_rows, block_rows):
            np.matmul(y[lo : lo + block_rows], B_c, out=yB[lo : lo + block_rows])
        m_all = np.einsum("ij,ij->i", yB if via_factor else y, yB).astype(np.float64)
    y, y_fin = _zero_nonfinite(y, yB, m_all)
    y_ok = m_all > 0
    m_safe = np.where(y_ok, m_all, 1.0)
    left_y = yB if via_factor else y

    parts = K + 2
    lbuf, rbuf, xb_buf, tmp_buf, gy_buf = work_buffers(
        n_rows, block_rows, [(parts, cols), (parts, d), (1, cols), (1, d), (1, cols)], x.dtype)
    gram = scratch_array(("neg-gram",), (cols, d), x.dtype)
    grad = np.zeros((cols, d), dtype=np.float64)
    total, count, negatives, skipped = 0.0, 0, 0, 0
    w_pos = float(positive_weight)
    for lo in range(0, n_rows, block_rows):
        hi = min(lo + block_rows, n_rows)
        r = hi - lo
        xb, yb, tb = x[lo:hi], y[lo:hi], t[lo:hi]
        L, R, tmp, xB = lbuf[: parts * r], rbuf[: parts * r], tmp_buf[:r], xb_buf[:r]
        with np.errstate(invalid="ignore", over="ignore"):
            np.matmul(xb, B_c, out=xB)
            n = np.einsum("ij,ij->i", xB if via_factor else xb, xB).astype(np.float64)
        xb, x_fin = _zero_nonfinite(xb, xB, n)
        left_x = xB if via_factor else xb
        with np.errstate(invalid="ignore", over="ignore"):
            cross = np.einsum("ij,ij->i", left_x, yB[lo:hi]).astype(np.float64)
        ok = valid_mask(n, m_all[lo:hi], cross, tb) & x_fin & y_fin[lo:hi]
        ok, bad = apply_include(ok, include, lo, r)
        if bad:
            if on_invalid == "raise":
                raise InvalidPairsError(invalid_message(bad, lo + first_bad(ok, include, lo),
                                                         chunk_id))
            skipped += bad
        x_ok = n > 0
        n_safe = np.where(x_ok, n, 1.0)
        root_n = np.sqrt(n_safe)
        # Coefficients of every pair of the block: row 0 the stored pairs, 1..K negatives.
        c, gs_n, gs_m = np.zeros((3, K + 1, r))
        s = cosine(n, m_all[lo:hi], cross, ok)
        values, dloss = loss_fn.pointwise(s, np.where(ok, tb, 0.0))
        g = np.where(ok, dloss, 0.0) * w_pos
        total += w_pos * float(values[ok].sum())
        count += positive_weight * int(ok.sum())
        c[0] = g / (root_n * np.sqrt(m_safe[lo:hi]))
        gs_n[0] = g * s / n_safe
        gs_m[0] = g * s / m_safe[lo:hi]
        L[:r] = left_x
        L[r : 2 * r] = left_y[lo:hi]
        has = partners[:, lo:hi] >= 0
        idx_all = np.where(has, partners[:, lo:hi], np.arange(lo, hi))
        for k in range(K):
            idx = idx_all[k]
            part = slice((k + 2) * r, (k + 3) * r)
            if via_factor:
                np.take(yB, idx, axis=0, out=L[part])  # W_k on the left
                np.take(y, idx, axis=0, out=R[part])  # y_k, turned into its R rows below
                gathered = L[part]
            else:
                np.take(y, idx, axis=0, out=L[part])  # y_k on the left
                gathered = np.take(yB, idx, axis=0, out=gy_buf[:r])
            with np.errstate(invalid="ignore", over="ignore"):
                cross_k = np.einsum("ij,ij->i", left_x, gathered).astype(np.float64)
            ok_k = has[k] & x_ok & y_ok[idx] & np.isfinite(cross_k)
            if include is not None:
                ok_k &= include[lo:hi]
            s_k = cosine(n, m_all[idx], cross_k, ok_k)
            values_k, dloss_k = loss_fn.pointwise(s_k, np.full(r, NEGATIVE_LABEL))
            g_k = np.where(ok_k, dloss_k, 0.0)
            total += float(values_k[ok_k].sum())
            negatives += int(ok_k.sum())
            c[k + 1] = g_k / (root_n * np.sqrt(m_safe[idx]))
            gs_n[k + 1] = g_k * s_k / n_safe
            gs_m[k + 1] = g_k * s_k / m_safe[idx]
        cc, gm = (a.astype(x.dtype)[:, :, None] for a in (c, gs_m))
        rx, ry0 = R[:r], R[r : 2 * r]
        # x side: Σ_pairs c·y − (Σ_pairs gs/n)·x; y sides: c·x − gs/m·y, all in place.
        np.multiply(xb, -gs_n.sum(axis=0).astype(x.dtype)[:, None], out=rx)
        rx += np.multiply(yb, cc[0], out=tmp)
        np.multiply(yb, -gm[0], out=ry0)
        ry0 += np.multiply(xb, cc[0], out=tmp)
        for k in range(K):
            part = slice((k + 2) * r, (k + 3) * r)
            yk = R[part] if via_factor else L[part]
            rx += np.multiply(yk, cc[k + 1], out=tmp)
            np.multiply(yk, -gm[k + 1], out=R[part])
            R[part] += np.multiply(xb, cc[k + 1], out=tmp)
        grad += np.matmul(L.T, R, out=gram)
    if not via_factor:
        grad = 0.25 * (grad + grad.T)  # ½ of the sum, symmetrised (roundoff)
    return Partial(loss=total, grad=grad, count=count + negatives, skipped=skipped,
                   extra={"negatives": float(negatives)})
