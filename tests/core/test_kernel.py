"""The vectorised kernel against the seed's per-element formulas and finite differences."""

import numpy as np
import pytest
from helpers import random_pairs, random_spd
from hypothesis import given, settings
from hypothesis import strategies as st

from cosim_dask import (
    chunk_partial,
    factor_chunk_partial,
    loss_and_gradient,
    pair_similarity,
    tied_gradient,
)
from cosim_dask.core.kernel import Partial, as_pair_arrays
from cosim_dask.errors import InvalidPairsError, ShapeError


def seed_dsim_dA(x, y, A):
    """The seed's per-element derivatives, by a plain loop: (untied ∂s/∂A_ij, tied total)."""
    n, m, l = x @ A @ x, y @ A @ y, x @ A @ y  # noqa: E741 - the seed's names
    d = len(x)
    untied = np.empty((d, d))
    tied = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            untied[i, j] = (2 * y[i] * x[j] * n * m - l * m * x[i] * x[j] - l * n * y[i] * y[j]) / (
                2 * (n * m) ** 1.5
            )
            if i < j:
                tied[i, j] = ((y[i] * x[j] + y[j] * x[i]) * n * m - l * m * x[i] * x[j]
                              - l * n * y[i] * y[j]) / (n * m) ** 1.5
            elif i == j:
                tied[i, i] = untied[i, i]
    return untied, tied


def seed_dsim_dM(x, y, M):
    """The seed's first derivation: ∂s/∂M_ij with v = Mx, w = My, by a plain loop."""
    v, w = M @ x, M @ y
    vv, ww, vw = v @ v, w @ w, v @ w
    k, d = M.shape
    out = np.empty((k, d))
    for i in range(k):
        for j in range(d):
            out[i, j] = ((x[j] * w[i] + v[i] * y[j]) * vv * ww
                         - vw * (x[j] * v[i] * ww + vv * y[j] * w[i])) / (vv * ww) ** 1.5
    return out


def identity_loss_partial(x, y, A):
    """With loss = s (mse of s against t expands; use d loss/ds = 1 via a custom loss)."""
    from cosim_dask.core.losses import Loss

    class Linear(Loss):
        name = "linear"

        def pointwise(self, s, t):
            return s, np.ones_like(s)

    return chunk_partial(x[None], y[None], np.zeros(1), A, Linear())


def test_similarity_matches_definition(rng):
    d = 7
    x, y, _ = random_pairs(rng, 20, d)
    A = random_spd(rng, d)
    expected = [xi @ A @ yi / np.sqrt((xi @ A @ xi) * (yi @ A @ yi))
                for xi, yi in zip(x, y, strict=True)]
    np.testing.assert_allclose(pair_similarity(x, y, A), expected, rtol=1e-12)
    plain = [xi @ yi / np.linalg.norm(xi) / np.linalg.norm(yi) for xi, yi in zip(x, y, strict=True)]
    np.testing.assert_allclose(pair_similarity(x, y), plain, rtol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 6])
def test_gradient_matches_seed_per_element_formula(rng, d):
    A = random_spd(rng, d)
    for _ in range(5):
        x, y = rng.standard_normal(d), rng.standard_normal(d)
        grad = identity_loss_partial(x, y, A).grad
        untied, tied = seed_dsim_dA(x, y, A)
        # The symmetric gradient is the symmetrised untied one ...
        np.testing.assert_allclose(grad, 0.5 * (untied + untied.T), rtol=1e-10, atol=1e-12)
        # ... and the free-parameter gradient is the seed's tied total gradient.
        np.testing.assert_allclose(tied_gradient(grad), tied, rtol=1e-10, atol=1e-12)


# k < 7d/8 takes the direct M form, larger k the chain rule through the SYRK form.
@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_factor_gradient_matches_seed_M_derivation(rng, k):
    d = 6
    M = rng.standard_normal((k, d))
    from cosim_dask.core.losses import Loss

    class Linear(Loss):
        name = "linear"

        def pointwise(self, s, t):
            return s, np.ones_like(s)

    for _ in range(5):
        x, y = rng.standard_normal(d), rng.standard_normal(d)
        got = factor_chunk_partial(x[None], y[None], np.zeros(1), M, Linear()).grad
        np.testing.assert_allclose(got, seed_dsim_dM(x, y, M), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5, 9])
@pytest.mark.parametrize("loss", ["mse", "contrastive"])
def test_factor_gradient_equals_chain_rule(rng, loss, k):
    d = 9
    x, y, t = random_pairs(rng, 300, d)
    M = rng.standard_normal((k, d))
    pm = factor_chunk_partial(x, y, t, M, loss, block_rows=64)
    pa = chunk_partial(x, y, t, M.T @ M, loss)
    assert pm.loss == pytest.approx(pa.loss, rel=1e-12)
    np.testing.assert_allclose(pm.grad, 2 * M @ pa.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("loss", ["mse", "contrastive"])
def test_gradient_against_central_differences(rng, loss):
    d = 8
    x, y, t = random_pairs(rng, 400, d)
    t = np.where(rng.random(400) < 0.5, 1.0, -1.0) if loss == "contrastive" else t
    A = random_spd(rng, d)
    _, grad = loss_and_gradient(x, y, t, A, loss)
    for _ in range(4):
        D = rng.standard_normal((d, d))
        D = D + D.T
        h = 1e-6
        f_plus, _ = loss_and_gradient(x, y, t, A + h * D, loss)
        f_minus, _ = loss_and_gradient(x, y, t, A - h * D, loss)
        fd = (f_plus - f_minus) / (2 * h)
        assert np.sum(grad * D) == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("k", [3, 5, 7])  # k = 7 = d: the SYRK route
def test_factor_gradient_against_central_differences(rng, k):
    d = 7
    x, y, t = random_pairs(rng, 200, d)
    M = rng.standard_normal((k, d))
    grad = factor_chunk_partial(x, y, t, M).grad
    for _ in range(4):
        D = rng.standard_normal((k, d))
        h = 1e-6
        fd = (factor_chunk_partial(x, y, t, M + h * D).loss
              - factor_chunk_partial(x, y, t, M - h * D).loss) / (2 * h)
        assert np.sum(grad * D) == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("d", [8, 32, 64])  # default blocks of 16,384, 4,096, 2,048 rows
def test_float32_partial_close_to_float64(rng, d):
    x, y, t = random_pairs(rng, 40000, d)
    A = random_spd(rng, d)
    p64 = chunk_partial(x, y, t, A)
    p32 = chunk_partial(x.astype(np.float32), y.astype(np.float32), t, A)
    assert p32.grad.dtype == np.float64
    assert p32.loss == pytest.approx(p64.loss, rel=1e-4)
    err = np.linalg.norm(p32.grad - p64.grad) / np.linalg.norm(p64.grad)
    assert err < 1e-4


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 60),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    loss=st.sampled_from(["mse", "contrastive"]),
    cut=st.floats(0, 1),
)
def test_invariants(b, d, seed, loss, cut):
    rng = np.random.default_rng(seed)
    x, y, t = random_pairs(rng, b, d)
    A = random_spd(rng, d)
    p = chunk_partial(x, y, t, A, loss, block_rows=7)
    # Symmetric.
    np.testing.assert_array_equal(p.grad, p.grad.T)
    # Scale invariance sim(cA) = sim(A) gives ⟨∇, A⟩_F = 0.
    # Each pair's term ⟨uuᵀ, A⟩ is O(1) (x̂, ŷ have unit A-norm), so roundoff is O(b·ε).
    scale = np.linalg.norm(p.grad) * np.linalg.norm(A)
    assert abs(np.sum(p.grad * A)) <= 1e-9 * scale + 1e-12 * b
    # Normalising x and y first changes nothing.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(pair_similarity(xn, yn, A), pair_similarity(x, y, A), atol=1e-12)
    # Partials of any split add up to the partial of the whole.
    k = int(round(cut * b))
    left = chunk_partial(x[:k], y[:k], t[:k], A, loss)
    right = chunk_partial(x[k:], y[k:], t[k:], A, loss)
    total = left + right
    assert total.count == p.count == b
    assert total.loss == pytest.approx(p.loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(total.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_partial_accumulates_in_float64():
    x = np.ones((3, 2), np.float32)
    p = chunk_partial(x, x * 2, np.ones(3), np.eye(2))
    assert p.grad.dtype == np.float64 and isinstance(p.loss, float)


@pytest.mark.parametrize(
    "bad_x",
    [
        lambda x: x.__setitem__((3, slice(None)), 0.0),
        lambda x: x.__setitem__((3, 0), np.nan),
        lambda x: x.__setitem__((3, 1), np.inf),
    ],
)
def test_invalid_rows_raise_with_count_and_chunk(rng, bad_x):
    x, y, t = random_pairs(rng, 10, 4)
    bad_x(x)
    with pytest.raises(InvalidPairsError, match=r"1 pair\(s\) in chunk 7 .*row 3"):
        chunk_partial(x, y, t, np.eye(4), chunk_id=7)
    with pytest.raises(InvalidPairsError):
        pair_similarity(x, y)


def test_invalid_rows_skipped_by_policy(rng):
    x, y, t = random_pairs(rng, 10, 4)
    x[[2, 5]] = 0.0
    p = chunk_partial(x, y, t, np.eye(4), on_invalid="skip")
    keep = np.ones(10, bool)
    keep[[2, 5]] = False
    q = chunk_partial(x[keep], y[keep], t[keep], np.eye(4))
    assert (p.count, p.skipped) == (8, 2)
    assert p.loss == pytest.approx(q.loss)
    np.testing.assert_allclose(p.grad, q.grad)
    s = pair_similarity(x, y, on_invalid="nan")
    assert np.isnan(s[[2, 5]]).all() and np.isfinite(s[keep]).all()


def test_non_psd_metric_is_an_error_not_nan(rng):
    x, y, t = random_pairs(rng, 10, 3)
    with pytest.raises(InvalidPairsError, match="non-positive"):
        chunk_partial(x, y, t, -np.eye(3))


def test_shape_errors(rng):
    x, y, t = random_pairs(rng, 10, 3)
    with pytest.raises(ShapeError, match="same shape"):
        chunk_partial(x, y[:5], t, np.eye(3))
    with pytest.raises(ShapeError, match="target has 4"):
        chunk_partial(x, y, t[:4], np.eye(3))
    with pytest.raises(ShapeError, match="A must be 3 × 3"):
        chunk_partial(x, y, t, np.eye(4))
    with pytest.raises(ShapeError, match="real numbers"):
        pair_similarity(x.astype(complex), y)


def test_misaligned_input_gives_same_result(rng):
    x, y, t = random_pairs(rng, 100, 16, np.float32)
    buf = np.empty(x.size * 4 + 1, np.uint8)[1:].view(np.float32)  # forced misalignment
    buf_x = buf.reshape(x.shape)
    buf_x[...] = x
    assert buf_x.ctypes.data % 64 != 0
    A = np.eye(16)
    a, b = chunk_partial(buf_x, y, t, A), chunk_partial(x, y, t, A)
    np.testing.assert_array_equal(a.grad, b.grad)


def test_partial_addition_keeps_extras():
    g = np.zeros((1, 1))
    total = Partial(1.0, g, 2, 0, {"a": 1.0}) + Partial(2.0, g, 3, 1, {"a": 2.0, "b": 1.0})
    assert (total.loss, total.count, total.skipped) == (3.0, 5, 1)
    assert total.extra == {"a": 3.0, "b": 1.0}


@pytest.mark.parametrize("rank", [None, 2, 5])  # full A; M by the direct and the SYRK route
def test_include_mask_equals_the_subset(rng, rank):
    x, y, t = random_pairs(rng, 300, 5)
    keep = rng.random(300) < 0.7
    x[np.flatnonzero(~keep)[0]] = 0.0  # an invalid row outside the mask is ignored
    fn = factor_chunk_partial if rank else chunk_partial
    A = rng.standard_normal((rank, 5)) if rank else random_spd(rng, 5)
    masked = fn(x, y, t, A, block_rows=64, include=keep)
    subset = fn(x[keep], y[keep], t[keep], A)
    assert masked.count == keep.sum() and masked.skipped == 0
    assert masked.loss == pytest.approx(subset.loss, rel=1e-12)
    np.testing.assert_allclose(masked.grad, subset.grad, rtol=1e-10, atol=1e-13)
    x[np.flatnonzero(keep)[5]] = 0.0  # an invalid row inside the mask is reported
    with pytest.raises(InvalidPairsError, match=rf"row {np.flatnonzero(keep)[5]}\b"):
        fn(x, y, t, A, block_rows=64, include=keep)


def test_reused_work_buffers_never_leak_between_calls_or_threads(rng):
    """The block loops keep their work buffers per thread: calls of other shapes, short
    chunks and concurrent threads in between must not change any result."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for rows, d in ((5000, 16), (37, 16), (3000, 32), (5000, 16), (1, 32)):
        x, y, t = random_pairs(rng, rows, d, np.float32)
        cases.append((x, y, t, random_spd(rng, d)))

    def run(case):
        x, y, t, A = case
        M = np.linalg.cholesky(A).T
        full = chunk_partial(x, y, t, A, block_rows=512)
        factor = factor_chunk_partial(x, y, t, M, block_rows=512)  # the SYRK route
        low = factor_chunk_partial(x, y, t, M[: len(M) // 4], block_rows=512)  # direct
        return (full.grad, factor.grad, low.grad,
                pair_similarity(x, y, A, block_rows=512))

    serial = [run(case) for case in cases]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, cases * 4))
    for got, want in zip(threaded, serial * 4, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    # And each equals a first call in a fresh thread (no buffer history at all).
    for case, want in zip(cases, serial, strict=True):
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(run, case).result()
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_chunk_partial_does_not_page_fault_per_call_in_a_dask_worker_env(tmp_path):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which makes every fresh block-sized buffer
    an mmap that is faulted in and zeroed on each call. Counted, not timed: a 32k × 128 chunk
    faulted ~1,500 pages per call when its work buffers were allocated per call."""
    import os
    import subprocess
    import sys

    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, numpy as np\n"
        "from threadpoolctl import threadpool_limits\n"
        "from cosim_dask.core.kernel import chunk_partial, factor_chunk_partial\n"
        "rng = np.random.default_rng(0); n, d = 32768, 128\n"
        "x = rng.standard_normal((n, d), dtype=np.float32)\n"
        "y = rng.standard_normal((n, d), dtype=np.float32)\n"
        "t = np.sign(rng.standard_normal(n)); A = np.eye(d) + 0.01\n"
        "M = np.linalg.cholesky(A).T\n"
        "for fn, p in ((chunk_partial, A), (factor_chunk_partial, M)):\n"
        "    with threadpool_limits(1):\n"
        "        fn(x, y, t, p)\n"
        "        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "        for _ in range(3):\n"
        "            fn(x, y, t, p)\n"
        "        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3)\n"
    )
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    full, factor = (float(v) for v in out)
    # One 4 MiB set of work buffers is 1,024 pages; what remains are small per-block
    # temporaries of the elementwise steps.
    assert full < 700 and factor < 700, (full, factor)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_strided_views_are_used_as_they_are_with_the_same_bits(dtype):
    # x = pairs[:, 0, :] of an (n, 2, d) array: rows 2d apart. The kernel takes the view
    # without a copy (an in-process fit would hold the pairs twice) and gets the bits of a
    # contiguous copy.
    rng = np.random.default_rng(5)
    pairs = rng.standard_normal((3000, 2, 16)).astype(dtype)
    t = np.where(rng.random(3000) < 0.5, 1.0, -1.0)
    xv, yv = pairs[:, 0, :], pairs[:, 1, :]
    assert np.shares_memory(as_pair_arrays(xv, yv)[0], pairs)
    assert not np.shares_memory(as_pair_arrays(xv[:, ::2], yv[:, ::2])[0], pairs)
    xc, yc = np.ascontiguousarray(xv), np.ascontiguousarray(yv)
    M = rng.standard_normal((16, 16))
    for k in (16, 3):  # the SYRK route and the direct one
        a, b = factor_chunk_partial(xv, yv, t, M[:k]), factor_chunk_partial(xc, yc, t, M[:k])
        assert a.loss == b.loss and np.array_equal(a.grad, b.grad)
    A = M.T @ M
    a, b = chunk_partial(xv, yv, t, A), chunk_partial(xc, yc, t, A)
    assert a.loss == b.loss and np.array_equal(a.grad, b.grad)
    assert np.array_equal(pair_similarity(xv, yv, A), pair_similarity(xc, yc, A))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("learned", [True, False])
def test_similarity_of_chosen_rows_has_the_bits_of_the_copied_rows(rng, dtype, learned):
    """``rows=`` gathers each block into a reused buffer: the same bits as scoring
    ``x[rows], y[rows]``, in the rows' order, across block edges and after calls of other
    sizes (buffer reuse)."""
    x, y, _ = random_pairs(rng, 3000, 24, dtype)
    A = random_spd(rng, 24) if learned else None
    x[17] = 0.0  # an invalid pair, chosen and not
    for rows in (np.flatnonzero(rng.random(3000) < 0.6), rng.permutation(3000)[:700],
                 np.array([17, 5, 2999]), np.array([], dtype=np.intp), np.arange(3000)):
        got = pair_similarity(x, y, A, on_invalid="nan", block_rows=256, rows=rows)
        want = pair_similarity(x[rows], y[rows], A, on_invalid="nan", block_rows=256)
        assert got.shape == (len(rows),)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ShapeError, match="rows must index the 3000 pairs"):
        pair_similarity(x, y, A, rows=np.array([0, 3000]))
    # A boolean mask selects what it marks (not rows 0 and 1); floats are refused, not cut.
    mask = rng.random(3000) < 0.3
    np.testing.assert_array_equal(
        pair_similarity(x, y, A, on_invalid="nan", block_rows=256, rows=mask),
        pair_similarity(x[mask], y[mask], A, on_invalid="nan", block_rows=256))
    with pytest.raises(ShapeError, match="one entry per pair"):
        pair_similarity(x, y, A, rows=mask[:10])
    with pytest.raises(ShapeError, match="pair indices"):
        pair_similarity(x, y, A, rows=np.array([0.5, 2.0]))
    np.testing.assert_array_equal(  # negative indices count from the end, as x[rows] does
        pair_similarity(x, y, A, on_invalid="nan", rows=np.array([-1, 5])),
        pair_similarity(x[[-1, 5]], y[[-1, 5]], A, on_invalid="nan"))


def test_first_pass_batches_gathered_into_reused_buffers_are_the_rows(rng):
    from cosim_dask.core.local import gather_rows

    x, y, _ = random_pairs(rng, 4000, 16, np.float32)
    for size in (8192 // 4, 7, 2048, 1):
        rows = np.sort(rng.permutation(4000)[:size])
        gx, gy = gather_rows(x, y, rows)
        np.testing.assert_array_equal(gx, x[rows])
        np.testing.assert_array_equal(gy, y[rows])
        assert gx.flags.c_contiguous and gx.dtype == np.float32


@pytest.mark.parametrize("strided", [False, True])
def test_gathered_rows_never_copy_the_whole_input(rng, strided):
    """``np.take`` copies a non-contiguous input whole before gathering: a row-strided view
    (the x of an (n, 2, d) array, as the estimator holds pairs) must not pay that per batch."""
    import tracemalloc

    from cosim_dask.core.kernel import take_rows

    pairs = rng.standard_normal((200_000, 2, 16)).astype(np.float32)
    x = pairs[:, 0, :] if strided else np.ascontiguousarray(pairs[:, 0, :])
    rows = np.sort(rng.permutation(len(x))[:100])
    out = np.empty((100, 16), np.float32)
    tracemalloc.start()
    try:
        got = take_rows(x, rows, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, x[rows])
    assert got is out
    assert peak < x.nbytes // 100  # about the rows gathered, not the 12.8 MB input


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("learned", [True, False])
def test_indexed_similarity_is_pair_similarity_of_the_gathered_rows(rng, dtype, learned):
    """Many pairs from few rows, as in-chunk negatives make them (repeats, any order,
    more pairs than rows): the similarities of the gathered pairs, NaN where a row is
    zero or NaN, to float roundoff."""
    from cosim_dask.core.kernel import indexed_similarity

    x = rng.standard_normal((300, 12)).astype(dtype)
    y = rng.standard_normal((300, 12)).astype(dtype)
    x[7] = 0.0
    y[11, 3] = np.nan
    A = random_spd(rng, 12) if learned else None
    i = rng.integers(0, 300, 5000)
    j = rng.integers(0, 300, 5000)
    got = indexed_similarity(x, y, A, i, j)
    want = pair_similarity(x[i], y[j], A, on_invalid="nan")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=tol, atol=tol)
