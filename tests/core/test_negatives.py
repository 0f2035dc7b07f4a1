"""In-chunk negatives: the partners, and the augmented chunk's loss and gradient checked against
the same pairs written out explicitly and against finite differences of the seed's loss."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosim_dask.core.kernel import as_pair_arrays, chunk_partial, factor_chunk_partial
from cosim_dask.core.losses import get_loss
from cosim_dask.core.negatives import augmented_partial, negative_partners

MSE = get_loss("mse", negative_target=0.0)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 60), k=st.integers(0, 8), seed=st.integers(0, 2**32 - 1),
       share=st.floats(0.0, 1.0))
def test_partners_are_other_eligible_rows_distinct_and_never_the_pair_itself(b, k, seed, share):
    eligible = np.random.default_rng(seed).random(b) < share
    p = negative_partners(eligible, k, seed, chunk=3, epoch=1)
    e = int(eligible.sum())
    assert p.shape == (max(0, min(k, e - 1)), b)
    rows = np.arange(b)
    assert (p[:, ~eligible] == -1).all()
    for i in rows[eligible]:
        got = p[:, i]
        assert (got != i).all()  # never the pair itself
        assert eligible[got].all()  # only positive training rows are partners
        assert len(set(got.tolist())) == len(got)  # K distinct partners
    # The same (seed, chunk, epoch) gives the same partners; another epoch others.
    np.testing.assert_array_equal(p, negative_partners(eligible, k, seed, chunk=3, epoch=1))


def test_partners_change_with_chunk_and_epoch_but_not_otherwise():
    eligible = np.ones(500, bool)
    base = negative_partners(eligible, 2, 7, chunk=0, epoch=0)
    assert not np.array_equal(base, negative_partners(eligible, 2, 7, chunk=1, epoch=0))
    assert not np.array_equal(base, negative_partners(eligible, 2, 7, chunk=0, epoch=1))
    assert not np.array_equal(base, negative_partners(eligible, 2, 8, chunk=0, epoch=0))


def explicit(x, y, t, partners, weight=1):
    """The augmented pairs written out: the stored pairs ``weight`` times, then the negatives."""
    K = partners.shape[0]
    has = partners >= 0
    xs = [x] * weight + [x[has[k]] for k in range(K)]
    ys = [y] * weight + [y[partners[k][has[k]]] for k in range(K)]
    ts = [t] * weight + [-np.ones(int(has[k].sum())) for k in range(K)]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("weight", [1, 3])
def test_augmented_partial_equals_the_explicit_augmented_pairs(rng, dtype, rtol, K, weight):
    b, d = 301, 9
    x = rng.standard_normal((b, d)).astype(dtype)
    y = (x + 0.7 * rng.standard_normal((b, d))).astype(dtype)
    t = np.ones(b)
    M = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    A = M.T @ M
    partners = negative_partners(np.ones(b, bool), K, 1, 0)
    xa, ya, ta = explicit(x, y, t, partners, weight)
    x, y, t = as_pair_arrays(x, y, t)
    # Small blocks: partners fall in other blocks than their rows.
    got = augmented_partial(x, y, t, A, MSE, partners, via_factor=False, block_rows=64,
                            positive_weight=weight)
    ref = chunk_partial(xa, ya, ta, A, MSE)
    assert got.count == ref.count == (weight + K) * b
    assert got.extra["negatives"] == K * b
    assert got.loss == pytest.approx(ref.loss, rel=rtol)
    np.testing.assert_allclose(got.grad, ref.grad, rtol=rtol, atol=rtol * np.abs(ref.grad).max())
    np.testing.assert_array_equal(got.grad, got.grad.T)
    # The factor form, low rank (direct route) and full rank.
    for k in (4, d):
        Mk = M[:k]
        got = augmented_partial(x, y, t, np.ascontiguousarray(Mk.T), MSE, partners,
                                via_factor=True, block_rows=64, positive_weight=weight)
        ref = factor_chunk_partial(xa, ya, ta, Mk, MSE)
        assert got.loss == pytest.approx(ref.loss, rel=rtol)
        np.testing.assert_allclose(got.grad, ref.grad, rtol=rtol,
                                   atol=rtol * np.abs(ref.grad).max())


def test_augmented_gradient_matches_finite_differences_of_the_seed_loss(rng):
    """The loss written from the seed's formula s = xᵀAy / sqrt(xᵀAx · yᵀAy) on the explicit
    pairs, differentiated numerically along symmetric directions."""
    b, d, K = 40, 5, 2
    x, y = rng.standard_normal((b, d)), rng.standard_normal((b, d))
    t = np.ones(b)
    partners = negative_partners(np.ones(b, bool), K, 4, 2)
    xa, ya, ta = explicit(x, y, t, partners)
    target = np.where(ta > 0, 1.0, 0.0)  # mse, label −1 read as 0

    def loss(A):
        s = np.einsum("ij,jk,ik->i", xa, A, ya) / np.sqrt(
            np.einsum("ij,jk,ik->i", xa, A, xa) * np.einsum("ij,jk,ik->i", ya, A, ya))
        return np.sum((s - target) ** 2)

    A = np.eye(d) + 0.2 * (lambda m: m @ m.T)(rng.standard_normal((d, d)))
    got = augmented_partial(x, y, t, A, MSE, partners, via_factor=False)
    assert got.loss == pytest.approx(loss(A), rel=1e-12)
    h = 1e-6
    for _ in range(5):
        E = rng.standard_normal((d, d))
        E = E + E.T
        numeric = (loss(A + h * E) - loss(A - h * E)) / (2 * h)
        assert np.sum(got.grad * E) == pytest.approx(numeric, rel=1e-6)


def test_invalid_rows_are_skipped_and_their_negatives_dropped(rng):
    b, d = 50, 4
    x, y = rng.standard_normal((b, d)), rng.standard_normal((b, d))
    x[3] = np.nan
    y[7] = 0.0
    t = np.ones(b)
    partners = negative_partners(np.ones(b, bool), 2, 0, 0)
    A = np.eye(d)
    with pytest.raises(Exception, match="2 pair"):
        augmented_partial(x, y, t, A, MSE, partners, via_factor=False)
    got = augmented_partial(x, y, t, A, MSE, partners, via_factor=False, on_invalid="skip")
    xa, ya, ta = explicit(x, y, t, partners)
    ref = chunk_partial(xa, ya, ta, A, MSE, on_invalid="skip")
    assert np.isfinite(got.grad).all()
    assert got.skipped == 2  # the stored pairs; dropped negatives are not data
    assert got.count == ref.count
    assert got.loss == pytest.approx(ref.loss, rel=1e-12)
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_rows_left_out_by_include_neither_train_nor_partner(rng):
    b, d = 80, 4
    x, y = rng.standard_normal((b, d)), rng.standard_normal((b, d))
    t = np.ones(b)
    include = rng.random(b) < 0.7
    partners = negative_partners(include, 2, 0, 0)
    A = np.eye(d)
    got = augmented_partial(x, y, t, A, MSE, partners, via_factor=False, include=include)
    xa, ya, ta = explicit(x[include], y[include], t[include],
                          np.searchsorted(np.flatnonzero(include), partners[:, include]))
    ref = chunk_partial(xa, ya, ta, A, MSE)
    assert got.count == ref.count
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 1])
def test_skipped_nan_rows_leave_the_plain_kernels_finite(rng, rank):
    """Skipping a NaN vector must not turn the gradient into NaN (0 · NaN) in either form."""
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    x[3] = np.nan
    keep = np.arange(30) != 3
    t = np.ones(30)
    if rank is None:
        got = chunk_partial(x, y, t, np.eye(4), MSE, on_invalid="skip").grad
        ref = chunk_partial(x[keep], y[keep], t[keep], np.eye(4), MSE).grad
    else:
        M = rng.standard_normal((rank, 4))
        got = factor_chunk_partial(x, y, t, M, MSE, on_invalid="skip").grad
        ref = factor_chunk_partial(x[keep], y[keep], t[keep], M, MSE).grad
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
