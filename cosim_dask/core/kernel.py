"""The math core: similarities and a chunk's partial loss and gradient, in NumPy only.

Notation: for a pair (x, y) and a symmetric A, ``n = xᵀAx``, ``m = yᵀAy``, ``l = xᵀAy`` and
``s = l / sqrt(n m)``. Differentiating s element by element (A_ij and A_ji taken as separate
variables) gives

    ∂s/∂A_ij = y_i x_j / sqrt(nm) − (s/2) (x_i x_j / n + y_i y_j / m).

Symmetrised, with the A-normalised vectors x̂ = x/√n, ŷ = y/√m, it is a rank-two matrix

    ∇_A s = (1 − s)/4 · u uᵀ − (1 + s)/4 · v vᵀ,   u = x̂ + ŷ,  v = x̂ − ŷ,

and since |s| ≤ 1 both weights have the sign of dloss/ds (or its opposite). So the gradient of
a chunk is ``PᵀP − NᵀN`` with one row per pair in P and one in N: two symmetric rank-k updates
(SYRK, half the FLOPs of a GEMM) on top of the forward product. The work runs over row blocks
small enough to stay in cache, and each block's d × d result is added in float64.

Convention: ``grad`` is the symmetric matrix G with dL = ⟨G, dA⟩_F for every symmetric dA.
The gradient with respect to the d(d+1)/2 free parameters (the seed's "total gradient" of a
tied off-diagonal A_ij = A_ji, whose two elements move together) is G_ii on the diagonal and
2 G_ij off it: see
:func:`tied_gradient`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from cosim_dask.core.losses import Loss, get_loss
from cosim_dask.errors import InvalidPairsError, Message, ShapeError

#: Rows per block. Measured (d = 32 … 512, float32, one thread): 1,024–4,096 rows are equally
#: fast (within noise); 512 loses to per-block Python overhead and to SYRK's d × d output per
#: block, 8,192 to cache misses. Smaller blocks also keep the float32 SYRK sums accurate.
DEFAULT_BLOCK_ROWS = 2048
#: At small d a block's ~65 NumPy calls, not its arithmetic, set the pace, so the default block
#: holds at least this many values (rows × d): d = 8 → 16,384 rows, d = 16 → 8,192 (both
#: +10–12% pairs/s over 2,048), d = 32 → 4,096 (+5–9%); d ≥ 64 keeps 2,048 (4,096 measured
#: no faster at d = 64).
MIN_BLOCK_VALUES = 2**17


def default_block_rows(d: int) -> int:
    """Rows per block for vectors of dimension ``d`` (see MIN_BLOCK_VALUES)."""
    return max(DEFAULT_BLOCK_ROWS, MIN_BLOCK_VALUES // max(d, 1))

#: Per-thread work buffers of the block loops (see :func:`work_buffers`).
_scratch = threading.local()


@dataclass
class Partial:
    """Sums over a set of pairs that add across chunks; only the final combination divides.

    ``grad`` is the summed gradient with respect to the parameters (A for the full form,
    M for the factor form), float64.
    """

    loss: float
    grad: np.ndarray
    count: int
    skipped: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Partial) -> Partial:
        extra = dict(self.extra)
        for key, value in other.extra.items():
            extra[key] = extra.get(key, 0.0) + value
        return Partial(
            loss=self.loss + other.loss,
            grad=self.grad + other.grad,
            count=self.count + other.count,
            skipped=self.skipped + other.skipped,
            extra=extra,
        )


def as_pair_arrays(
    x: np.ndarray, y: np.ndarray, target: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate shapes and dtypes of a chunk of pairs; return aligned, contiguous arrays.

    float32 stays float32 (the GEMMs run in single precision, sums in double); any other
    real dtype becomes float64. Arrays that arrive over the network may be misaligned, which
    pushes NumPy's matmul off BLAS, so those are copied.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ShapeError(f"x and y must be 2-D (pairs × dim); got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ShapeError(f"x and y must have the same shape; got {x.shape} and {y.shape}")
    for name, a in (("x", x), ("y", y)):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ShapeError(f"{name} must hold real numbers; got dtype {a.dtype}")
    dtype = np.float32 if x.dtype == np.float32 and y.dtype == np.float32 else np.float64
    x, y = _aligned(x, dtype), _aligned(y, dtype)
    if target is not None:
        target = np.asarray(target, dtype=np.float64).reshape(-1)
        if target.shape[0] != x.shape[0]:
            raise ShapeError(
                f"target has {target.shape[0]} entries but there are {x.shape[0]} pairs"
            )
    return x, y, target


def _aligned(a: np.ndarray, dtype: type) -> np.ndarray:
    # NumPy's matmul needs item-size alignment (``flags.aligned``) to call BLAS; a buffer
    # cut out of a network frame may lack even that. A stricter cache-line (64-byte) test
    # copied nearly every input, since malloc hands out 16-byte aligned blocks: two extra
    # passes over the chunk (~10% of a d = 128 partial) for no BLAS speed-up.
    #
    # Rows need not be adjacent: a row-strided view (``pairs[:, 0, :]`` of an (n, 2, d)
    # array) goes to BLAS as it is, with a leading dimension of 2d, and gives the same bits
    # as a contiguous copy. Copying it would double an in-process fit's memory.
    if a.dtype == dtype and a.flags.aligned and _blas_rows(a):
        return a
    out = np.empty(a.shape, dtype=dtype)  # NumPy's allocator aligns large buffers
    out[...] = a
    return out


def _blas_rows(a: np.ndarray) -> bool:
    """True when each row of ``a`` is contiguous and rows do not overlap (what BLAS takes)."""
    if a.ndim != 2 or a.flags.c_contiguous:
        return a.flags.c_contiguous
    rows, cols = a.shape
    return (a.strides[1] == a.itemsize or cols <= 1) and (
        rows <= 1 or a.strides[0] >= cols * a.itemsize)


def _check_metric(A: np.ndarray, d: int) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.shape != (d, d):
        raise ShapeError(f"A must be {d} × {d} to match the vectors; got shape {A.shape}")
    return A


def invalid_message(n_bad: int, first: int, chunk_id: object) -> Message:
    where = f" in chunk {chunk_id}" if chunk_id is not None else ""
    return Message(
        f"{n_bad} pair(s){where} have a zero, NaN/Inf or non-positive xᵀAx / yᵀAy vector, "
        f"or a non-finite target (first at row {first}); clean the data (e.g. "
        "{drop_invalid} when ingesting) or skip them ({on_invalid})",
        {"drop_invalid": True, "on_invalid": "skip"})


def _similarity_terms(
    xb: np.ndarray, yb: np.ndarray, xa: np.ndarray, ya: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n, m, l for a block given x·A (or x·Mᵀ) products, in float64."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf rows are reported later
        return _terms(xb, yb, xa, ya)


def _terms(xb, yb, xa, ya):
    n = np.einsum("ij,ij->i", xb, xa).astype(np.float64)
    m = np.einsum("ij,ij->i", yb, ya).astype(np.float64)
    cross = np.einsum("ij,ij->i", xb, ya).astype(np.float64)
    return n, m, cross


def _check_include(include: np.ndarray | None, rows: int) -> np.ndarray | None:
    if include is None:
        return None
    include = np.asarray(include, dtype=bool).reshape(-1)
    if include.shape[0] != rows:
        raise ShapeError(f"include has {include.shape[0]} entries but there are {rows} pairs")
    return include


def apply_include(ok: np.ndarray, include: np.ndarray | None, lo: int, rows: int):
    """Restrict ``ok`` to the included rows; return it and the count of included bad rows."""
    if include is None:
        return ok, int(rows - np.count_nonzero(ok))
    inc = include[lo : lo + rows]
    bad = int(np.count_nonzero(inc & ~ok))
    return ok & inc, bad


def first_bad(ok: np.ndarray, include: np.ndarray | None, lo: int) -> int:
    bad = ~ok if include is None else (~ok & include[lo : lo + len(ok)])
    return int(np.argmax(bad))


def _products(
    xb: np.ndarray, yb: np.ndarray, B: np.ndarray, out_x: np.ndarray, out_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x·B and y·B into preallocated block buffers (no page faults, the block stays in cache)."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf rows are reported later
        return np.matmul(xb, B, out=out_x), np.matmul(yb, B, out=out_y)


def work_buffers(n_rows: int, block_rows: int, shapes: list[tuple[int, int]], dtype,
                 key: str = "rows"):
    """C-contiguous work buffers of (factor · rows, cols) for each (factor, cols); a block of
    r rows uses the first factor · r rows of each (still contiguous, so BLAS and SYRK apply to
    the short last block too).

    The buffers are kept per thread and reused from call to call. A fresh buffer comes from
    mmap, so it is page-faulted in and zeroed on every call: at d = 128 that is about a
    thousand faults per 32k-pair chunk, and Dask's workers (MALLOC_TRIM_THRESHOLD_ set by
    the nanny, which fixes glibc's mmap threshold at 128 kB) fault on every block-sized
    temporary as well. Measured: 1,090–1,500 faults and 5–25% of a chunk's time.
    """
    rows = max(1, min(block_rows, n_rows))
    return [scratch_array((key, len(shapes), slot), (factor * rows, cols), dtype,
                           reserve=factor * max(rows, block_rows))
            for slot, (factor, cols) in enumerate(shapes)]


def take_rows(a: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a[rows]`` written into ``out`` (C-contiguous, ``(len(rows), a.shape[1])``).

    ``np.take`` with ``mode="clip"`` writes straight into ``out`` (the default mode buffers
    it); the indices must be in range. It first makes a C-contiguous copy of a whole
    non-contiguous input, though: a row-strided view (the x of an (n, 2, d) array) is
    gathered by fancy indexing instead.
    """
    if a.flags.c_contiguous:
        return np.take(a, rows, axis=0, out=out, mode="clip")
    out[...] = a[rows]
    return out


def scratch_array(key: tuple, shape: tuple[int, int], dtype, reserve: int = 0) -> np.ndarray:
    """This thread's buffer for ``key``, at least ``shape`` (rows reserved up to
    ``reserve``), as a C-contiguous view of exactly ``shape``."""
    dtype = np.dtype(dtype)
    cache = _scratch.__dict__.setdefault("buffers", {})
    key = (*key, shape[1], dtype)
    buf = cache.get(key)
    if buf is None or buf.shape[0] < shape[0]:
        buf = cache[key] = np.empty((max(shape[0], reserve), shape[1]), dtype=dtype)
    return buf[: shape[0]]


def valid_mask(n: np.ndarray, m: np.ndarray, cross: np.ndarray, t: np.ndarray | None):
    ok = np.isfinite(n) & np.isfinite(m) & np.isfinite(cross) & (n > 0) & (m > 0)
    if t is not None:
        ok &= np.isfinite(t)
    return ok


def cosine(n: np.ndarray, m: np.ndarray, cross: np.ndarray, ok: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        s = cross / np.sqrt(n * m)
    s = np.where(ok, s, 0.0)
    return np.clip(s, -1.0, 1.0)  # roundoff can leave |s| a hair above 1


def indexed_similarity(x: np.ndarray, y: np.ndarray, A: np.ndarray | None, i: np.ndarray,
                       j: np.ndarray) -> np.ndarray:
    """Similarity of the pairs (x[i[k]], y[j[k]]), NaN where it is undefined.

    For many pairs made of few rows (in-chunk negatives: K pairs per row) each row's
    product with A is computed once, not once per pair as :func:`pair_similarity` of the
    gathered rows would: the GEMMs shrink K-fold and what is left per pair is a dot
    product. The same formula as :func:`pair_similarity` (xᵀAy / sqrt(xᵀAx · yᵀAy), GEMMs
    in the input's precision, sums in float64), to float roundoff.
    """
    x, y, _ = as_pair_arrays(x, y)
    d = x.shape[1]
    x_rows, i_at = np.unique(np.asarray(i, dtype=np.intp), return_inverse=True)
    y_rows, j_at = np.unique(np.asarray(j, dtype=np.intp), return_inverse=True)
    xr, yr = x[x_rows], y[y_rows]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf rows come out as NaN
        if A is None:
            xa, ya = xr, yr
        else:
            A_c = _check_metric(A, d).astype(x.dtype)
            xa, ya = xr @ A_c, yr @ A_c
        n = np.einsum("ij,ij->i", xr, xa).astype(np.float64)[i_at]
        m = np.einsum("ij,ij->i", yr, ya).astype(np.float64)[j_at]
        cross = np.empty(len(i_at), dtype=np.float64)
        block = default_block_rows(d)
        for lo in range(0, len(i_at), block):  # the gathered rows stay a block at a time
            cross[lo: lo + block] = np.einsum("ij,ij->i", xa[i_at[lo: lo + block]],
                                              yr[j_at[lo: lo + block]])
    ok = valid_mask(n, m, cross, None)
    return np.where(ok, cosine(n, m, cross, ok), np.nan)


def _row_indices(rows, n: int) -> np.ndarray:
    """``rows`` as in-range integer indices: a boolean mask of the n pairs is taken as the
    pairs it marks; anything else (floats, out-of-range indices) is an error, never a
    silent cast."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ShapeError(f"a boolean rows mask must have one entry per pair ({n}); got "
                             f"shape {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise ShapeError(f"rows must be a 1-D array of pair indices (or a boolean mask); got "
                         f"dtype {rows.dtype} and shape {rows.shape}")
    rows = rows.astype(np.intp, copy=False)
    if rows.size and (rows.min() < -n or rows.max() >= n):
        raise ShapeError(f"rows must index the {n} pairs; got indices {rows.min()} … "
                         f"{rows.max()}")
    return np.where(rows < 0, rows + n, rows) if rows.size and rows.min() < 0 else rows


def pair_similarity(
    x: np.ndarray,
    y: np.ndarray,
    A: np.ndarray | None = None,
    *,
    on_invalid: str = "raise",
    block_rows: int | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Similarity ``xᵀAy / sqrt(xᵀAx · yᵀAy)`` of every pair.

    Parameters
    ----------
    x, y : (b, d) arrays
    A : (d, d) symmetric PSD array, or None for plain cosine similarity (A = I).
    on_invalid : ``"raise"`` (default) raises :class:`InvalidPairsError` for pairs whose
        similarity is undefined; ``"nan"`` returns NaN for them.
    rows : optional indices of the pairs to score, in order: the same bits as
        ``x[rows], y[rows]`` (each block of them is gathered into a cache-resident buffer;
        no copy of the selected rows is made).

    Returns
    -------
    (b,) float64 array in [−1, 1] (``(len(rows),)`` with ``rows``).
    """
    x, y, _ = as_pair_arrays(x, y)
    d = x.shape[1]
    if rows is not None:
        rows = _row_indices(rows, x.shape[0])
    count = x.shape[0] if rows is None else len(rows)
    block_rows = block_rows or default_block_rows(d)
    # Plain cosine (A = I) needs no products: x·I is x exactly, so skipping the d × d
    # matmul changes no bit and halves an evaluation pass, which scores both metrics.
    A_c = None if A is None else _check_metric(A, d).astype(x.dtype)
    out = np.empty(count, dtype=np.float64)
    bad = np.zeros(count, dtype=bool)
    bufs = work_buffers(count, block_rows, [(1, d)] * 2, x.dtype) if A is not None else ()
    picked = work_buffers(count, block_rows, [(1, d)] * 2, x.dtype, key="picked") if (
        rows is not None) else ()
    for lo in range(0, count, block_rows):
        if rows is None:
            xb, yb = x[lo : lo + block_rows], y[lo : lo + block_rows]
        else:
            take = rows[lo : lo + block_rows]
            xb, yb = (take_rows(a, take, buf[: len(take)])
                      for a, buf in zip((x, y), picked, strict=True))
        if A_c is None:
            n, m, cross = _similarity_terms(xb, yb, xb, yb)
        else:
            xa, ya = (buf[: len(xb)] for buf in bufs)
            n, m, cross = _similarity_terms(xb, yb, *_products(xb, yb, A_c, xa, ya))
        ok = valid_mask(n, m, cross, None)
        out[lo : lo + len(xb)] = cosine(n, m, cross, ok)
        bad[lo : lo + len(xb)] = ~ok
    if bad.any():
        if on_invalid == "raise":
            raise InvalidPairsError(invalid_message(int(bad.sum()), int(np.argmax(bad)), None))
        out[bad] = np.nan
    return out


def chunk_partial(
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray,
    A: np.ndarray,
    loss: str | Loss = "mse",
    *,
    on_invalid: str = "raise",
    chunk_id: object = None,
    block_rows: int | None = None,
    include: np.ndarray | None = None,
) -> Partial:
    """Summed loss and symmetric gradient with respect to A of one chunk of pairs.

    Parameters
    ----------
    x, y : (b, d) float32 or float64
    target : (b,) targets (binary ±1 or graded in [−1, 1])
    A : (d, d) symmetric metric
    loss : a loss name or :class:`~cosim_dask.core.losses.Loss`
    on_invalid : ``"raise"`` or ``"skip"`` (skipped pairs are counted in ``skipped``)
    chunk_id : named in the error message for invalid pairs
    include : optional (b,) bool mask of the rows to use (the others, e.g. validation rows,
        are ignored without copying the chunk)

    Returns
    -------
    Partial with ``grad`` (d, d) float64, symmetric.
    """
    x, y, t = as_pair_arrays(x, y, target)
    include = _check_include(include, x.shape[0])
    d = x.shape[1]
    block_rows = block_rows or default_block_rows(d)
    A = _check_metric(A, d)
    return _syrk_partial(x, y, t, A, get_loss(loss), on_invalid, chunk_id, block_rows, include,
                         via_factor=False)


def _syrk_partial(x, y, t, B, loss_fn: Loss, on_invalid: str, chunk_id, block_rows: int,
                  include, *, via_factor: bool) -> Partial:
    """The symmetric gradient with respect to A as ``PᵀP − NᵀN``, blocked.

    ``B`` is A itself (d × d; the forward products are x·A) or Mᵀ (d × k, for A = MᵀM; the
    forward products are v = Mx and n = |v|²): the rows P, N live in x's space either way.
    """
    d, cols = x.shape[1], B.shape[1]
    B_c = B.astype(x.dtype)
    # Forward products (rows × cols), then the two rows buffers and two scratch (rows × d);
    # when cols == d the forward buffers are dead by the time the rows are built and serve
    # as the scratch.
    shapes = [(1, cols)] * 2 + [(1, d)] * (2 if cols == d else 4)
    bufs = work_buffers(x.shape[0], block_rows, shapes, x.dtype)
    gram = scratch_array(("gram",), (d, d), x.dtype)
    grad = np.zeros((d, d), dtype=np.float64)
    total, count, skipped = 0.0, 0, 0
    for lo in range(0, x.shape[0], block_rows):
        xb, yb, tb = x[lo : lo + block_rows], y[lo : lo + block_rows], t[lo : lo + block_rows]
        blocks = [buf[: len(xb)] for buf in bufs]
        xa, ya, plus, minus = blocks[:4]
        scratch = (xa, ya) if cols == d else tuple(blocks[4:])
        xa, ya = _products(xb, yb, B_c, xa, ya)
        if via_factor:
            n, m, cross = _similarity_terms(xa, ya, xa, ya)  # v = Mx: n = |v|², l = v·w
        else:
            n, m, cross = _similarity_terms(xb, yb, xa, ya)  # n = x·(Ax), l = x·(Ay)
        ok = valid_mask(n, m, cross, tb)
        ok, bad = apply_include(ok, include, lo, len(xb))
        if bad:
            if on_invalid == "raise":
                raise InvalidPairsError(invalid_message(bad, lo + first_bad(ok, include, lo),
                                                         chunk_id))
            skipped += bad
        s = cosine(n, m, cross, ok)
        values, dloss = loss_fn.pointwise(s, np.where(ok, tb, 0.0))
        dloss = np.where(ok, dloss, 0.0)
        total += float(values[ok].sum())
        count += int(ok.sum())
        _rank_two_rows(xb, yb, n, m, s, dloss, ok, plus, minus, scratch=scratch)
        if not ok.all():
            # A zero coefficient times a NaN/Inf vector is NaN: clear the rows left out.
            plus[~ok] = 0
            minus[~ok] = 0
        # `plus.T @ plus` (the same buffer, contiguous rows) is sent by NumPy to SYRK: one
        # triangle, half the FLOPs of a GEMM; `out=` keeps that path and spares a d × d
        # temporary. The block's float32 result is added in float64, which keeps the
        # cancellation between the two sums from eating the precision.
        grad += np.matmul(plus.T, plus, out=gram)
        grad -= np.matmul(minus.T, minus, out=gram)
    return Partial(loss=total, grad=grad, count=count, skipped=skipped)


def _rank_two_rows(xb, yb, n, m, s, dloss, ok, plus, minus, scratch):
    """Write rows P, N with Σ dloss·∇_A s = PᵀP − NᵀN (see the module docstring).

    ``plus``/``minus`` receive the rows; ``scratch`` is two more block-sized buffers. Each row
    is c₁·x + c₂·y: two scalings and one add per matrix, all into preallocated, cache-resident
    buffers (a fresh b × d temporary per operation costs page faults and evicts the block).
    """
    # Invalid rows have dloss = 0; giving them n = m = 1 keeps their coefficients at an exact
    # 0 (rather than 0 · inf = NaN) without a np.where per coefficient.
    n = np.where(ok, n, 1.0)
    m = np.where(ok, m, 1.0)
    inv_sqrt_n = 1.0 / np.sqrt(n)
    inv_sqrt_m = 1.0 / np.sqrt(m)
    h = np.abs(dloss) / 4.0
    cu = np.sqrt(h * (1.0 - s))  # weight of u = x̂ + ŷ
    cv = np.sqrt(h * (1.0 + s))  # weight of v = x̂ − ŷ
    pos = dloss >= 0
    # plus = p1·x + p2·y, minus = q1·x + q2·y, one row per pair each. The four per-pair
    # coefficients are computed in float64 and cast once, as a (4, rows) block.
    coef = np.empty((4, len(s)), dtype=np.float64)
    np.multiply(np.where(pos, cu, cv), inv_sqrt_n, out=coef[0])
    np.multiply(np.where(pos, cu, -cv), inv_sqrt_m, out=coef[1])
    np.multiply(np.where(pos, cv, cu), inv_sqrt_n, out=coef[2])
    np.multiply(np.where(pos, -cv, cu), inv_sqrt_m, out=coef[3])
    p1, p2, q1, q2 = coef.astype(xb.dtype)[:, :, None]
    tmp_plus, tmp_minus = scratch
    np.multiply(xb, p1, out=plus)
    np.multiply(yb, p2, out=tmp_plus)
    plus += tmp_plus
    np.multiply(xb, q1, out=minus)
    np.multiply(yb, q2, out=tmp_minus)
    minus += tmp_minus


def factor_chunk_partial(
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray,
    M: np.ndarray,
    loss: str | Loss = "mse",
    *,
    on_invalid: str = "raise",
    chunk_id: object = None,
    block_rows: int | None = None,
    include: np.ndarray | None = None,
) -> Partial:
    """Summed loss and gradient with respect to M (k × d), where A = MᵀM.

    With v = Mx, w = My (the seed's first derivation), per pair
    ``∂s/∂M = (w xᵀ + v yᵀ)/sqrt(nm) − s (v xᵀ/n + w yᵀ/m)``, summed as two GEMMs per block:
    ``Vᵀ(c·Y − gs/n·X) + Wᵀ(c·X − gs/m·Y)`` with c = g/sqrt(nm), g = dloss/ds: 8·k·d FLOP
    per pair, the form to use when k ≪ d. Near full rank the chain rule ∂L/∂M = 2·M·G,
    with G the symmetric gradient with respect to A summed as ``PᵀP − NᵀN`` (two SYRKs),
    is cheaper: 4·k·d + 2·d² FLOP per pair, 6·d² at full rank (the default) against 8·d².
    """
    x, y, t = as_pair_arrays(x, y, target)
    include = _check_include(include, x.shape[0])
    loss_fn = get_loss(loss)
    d = x.shape[1]
    block_rows = block_rows or default_block_rows(d)
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[1] != d:
        raise ShapeError(f"M must be k × {d} to match the vectors; got shape {M.shape}")
    # FLOPs favour the SYRK route from k > d/2, time only from k ≈ 7d/8 (float32, 1 thread,
    # 32k pairs; direct / SYRK time): d = 128: k = 72 0.92, 96 0.95, 112 1.02, 128 1.18;
    # d = 256: k = 192 1.07, 224 1.14, 256 1.20.
    if 8 * M.shape[0] >= 7 * d:
        p = _syrk_partial(x, y, t, np.ascontiguousarray(M.T), loss_fn, on_invalid, chunk_id,
                          block_rows, include, via_factor=True)
        return Partial(loss=p.loss, grad=2.0 * (M @ p.grad), count=p.count, skipped=p.skipped)
    Mt = np.ascontiguousarray(M.T.astype(x.dtype))
    grad = np.zeros(M.shape, dtype=np.float64)
    total, count, skipped = 0.0, 0, 0
    # [V; W] and [Px; Py] are stacked in one buffer each so that the two gradient products
    # Vᵀ·Px + Wᵀ·Py are a single GEMM over 2·rows (one BLAS call, one float64 add).
    vw_buf, pxy_buf, tmp_buf = work_buffers(
        x.shape[0], block_rows, [(2, M.shape[0]), (2, d), (1, d)], x.dtype
    )
    gram = scratch_array(("gram",), (M.shape[0], d), x.dtype)
    for lo in range(0, x.shape[0], block_rows):
        xb, yb, tb = x[lo : lo + block_rows], y[lo : lo + block_rows], t[lo : lo + block_rows]
        r = len(xb)
        vw, pxy, tmp = vw_buf[: 2 * r], pxy_buf[: 2 * r], tmp_buf[:r]
        v, w = _products(xb, yb, Mt, vw[:r], vw[r:])
        n, m, cross = _similarity_terms(v, w, v, w)
        ok = valid_mask(n, m, cross, tb)
        ok, bad = apply_include(ok, include, lo, len(xb))
        if bad:
            if on_invalid == "raise":
                raise InvalidPairsError(invalid_message(bad, lo + first_bad(ok, include, lo),
                                                         chunk_id))
            skipped += bad
        s = cosine(n, m, cross, ok)
        values, dloss = loss_fn.pointwise(s, np.where(ok, tb, 0.0))
        g = np.where(ok, dloss, 0.0)
        total += float(values[ok].sum())
        count += int(ok.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(ok, g / np.sqrt(n * m), 0.0)
            gs_n = np.where(ok, g * s / n, 0.0)
            gs_m = np.where(ok, g * s / m, 0.0)
        c, gs_n, gs_m = np.stack([c, gs_n, gs_m]).astype(xb.dtype)[:, :, None]
        px, py = pxy[:r], pxy[r:]
        # px = c·y − gs/n·x and py = c·x − gs/m·y, written in place (no temporaries).
        np.multiply(yb, c, out=px)
        px -= np.multiply(xb, gs_n, out=tmp)
        np.multiply(xb, c, out=py)
        py -= np.multiply(yb, gs_m, out=tmp)
        if not ok.all():
            # A zero coefficient times a NaN/Inf vector is NaN: clear the rows left out.
            vw[:r][~ok] = 0
            vw[r:][~ok] = 0
            px[~ok] = 0
            py[~ok] = 0
        grad += np.matmul(vw.T, pxy, out=gram)
    return Partial(loss=total, grad=grad, count=count, skipped=skipped)


def loss_and_gradient(
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray,
    A: np.ndarray,
    loss: str | Loss = "mse",
) -> tuple[float, np.ndarray]:
    """Summed loss over the pairs and its symmetric (d, d) float64 gradient with respect to A.

    For users with their own optimiser; the distributed trainer uses the same core.
    """
    p = chunk_partial(x, y, target, A, loss)
    return p.loss, p.grad


def tied_gradient(grad: np.ndarray) -> np.ndarray:
    """Gradient with respect to the free parameters of a symmetric A (upper triangle).

    Off-diagonal A_ij and A_ji are one parameter, so its derivative is G_ij + G_ji = 2 G_ij;
    the result's entry (i, j), i ≤ j, holds it (the lower triangle is zero).
    """
    return np.triu(2.0 * grad, k=1) + np.diag(np.diag(grad))
