"""The perturbation set-up at screen scale gives what its direct forms give: distinct rows by
hashing equal ``np.unique(axis=0)``, the rows' EM side by side equals ashr's per-row loop, group
moments by sparse sums equal the per-group means and variances, the dose columns equal their
definition, and principal axes from the covariance equal the SVD's."""
import numpy as np
import pytest
import torch

import scidiff.models.diffusion_model as diffusion_model
from scidiff.data.rows import unique_rows
from scidiff.models.diffusion_model import axis_variance, principal_axes
from scidiff.models.effects import _dose_columns, group_changes
from scidiff.models.shrinkage import adaptive_shrinkage, adaptive_shrinkage_per_row


def _multi_hot(rng, n, width, per_row=2):
    rows = np.zeros((n, width), np.float32)
    for i in range(n):
        rows[i, rng.choice(width, rng.integers(0, per_row + 1), replace=False)] = rng.choice([1.0, 0.5])
    return rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_unique_rows_equals_numpy_unique(dtype):
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 3, (500, 2))
    rows = (_multi_hot(rng, 500, 7) * 2).astype(dtype)
    (got_ctx, got_rows), inverse, counts = unique_rows(ctx, rows)
    want, want_inverse, want_counts = np.unique(np.hstack([ctx.astype(np.float64), rows.astype(np.float64)]),
                                                axis=0, return_inverse=True, return_counts=True)
    np.testing.assert_array_equal(np.hstack([got_ctx, got_rows]).astype(np.float64), want)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
    np.testing.assert_array_equal(counts, want_counts)
    assert got_ctx.dtype == ctx.dtype and got_rows.dtype == rows.dtype
    np.testing.assert_array_equal(np.hstack([got_ctx, got_rows])[inverse], np.hstack([ctx, rows]))


def test_unique_rows_falls_back_to_numpy_on_a_hash_collision():
    w = np.random.default_rng(0).uniform(1.0, 2.0, 2)  # the projection unique_rows hashes with
    table = np.array([[w[1], 0.0], [0.0, w[0]], [w[1], 0.0], [0.0, 0.0]])  # rows 0 and 1 share a hash
    assert table[0] @ w == table[1] @ w
    (rows,), inverse, counts = unique_rows(table)
    want, want_inverse, want_counts = np.unique(table, axis=0, return_inverse=True, return_counts=True)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
    np.testing.assert_array_equal(counts, want_counts)


def test_unique_rows_of_no_rows_and_no_columns():
    (rows,), inverse, counts = unique_rows(np.zeros((0, 3)))
    assert rows.shape == (0, 3) and len(inverse) == 0 and len(counts) == 0
    (rows,), inverse, counts = unique_rows(np.zeros((4, 0)))
    assert rows.shape == (1, 0) and inverse.tolist() == [0, 0, 0, 0] and counts.tolist() == [4]


@pytest.mark.parametrize("iterations,tol", [(100, 1e-6), (1000, 1e-4)])
def test_adaptive_shrinkage_side_by_side_equals_the_per_row_em(iterations, tol):
    rng = np.random.default_rng(3)
    s2 = rng.uniform(0.005, 0.2, (25, 300)) * rng.uniform(0.2, 5, (25, 1))  # grids of different lengths
    truth = rng.normal(0, 0.5, (25, 300)) * (rng.random((25, 300)) < rng.uniform(0, 0.4, (25, 1)))
    d = truth + rng.normal(0, np.sqrt(s2))
    d[4] = 0.0  # a row without change stays zero
    want = adaptive_shrinkage_per_row(d, s2, iterations, tol)
    for max_entries in (1 << 24, 300 * 40 * 3):  # one block of rows, and blocks of a few rows
        got = adaptive_shrinkage(d, s2, iterations=iterations, tol=tol, max_entries=max_entries)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(adaptive_shrinkage(d[7], s2[7], iterations=iterations, tol=tol), want[7],
                               rtol=1e-9, atol=1e-12)


def test_group_changes_are_the_groups_means_and_variances():
    rng = np.random.default_rng(4)
    n = 700
    x = rng.gamma(2.0, 1.0, (n, 9)).astype(np.float32)
    ctx = rng.integers(0, 2, (n, 1))
    rows = _multi_hot(rng, n, 4, per_row=1)
    rows[5] = [1, 1, 1, 0]  # a group of one cell: it takes the variance of all cells
    g_ctx, design, changes, counts, se2 = group_changes(x, rows, ctx)
    xd = x.astype(np.float64)
    for c, hot, change, count, var in zip(g_ctx, design, changes, counts, se2):
        mine = (ctx[:, 0] == c[0]) & (rows == hot).all(1)
        base = (ctx[:, 0] == c[0]) & (rows == 0).all(1)
        assert mine.sum() == count
        np.testing.assert_allclose(change, xd[mine].mean(0) - xd[base].mean(0), rtol=1e-10, atol=1e-12)
        spread = xd[mine].var(0, ddof=1) if count > 1 else xd.var(0, ddof=1)
        np.testing.assert_allclose(var, spread / count + xd[base].var(0, ddof=1) / base.sum(), rtol=1e-8)
    assert 1 in counts


def test_dose_columns_are_one_column_per_single_and_dose():
    rows = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]], np.float32)
    dose = np.array([0.0, 10.0, 1.0, 5.0, 1.0])
    columns, single_of, column_dose = _dose_columns(rows, dose)
    pairs = sorted({(p, dose[i]) for i in range(len(rows)) for p in np.flatnonzero(rows[i])})
    assert list(zip(single_of.tolist(), column_dose.tolist())) == [(int(p), float(d)) for p, d in pairs]
    want = np.zeros((len(rows), len(pairs)))
    for i in range(len(rows)):
        for p in np.flatnonzero(rows[i]):
            want[i, pairs.index((p, dose[i]))] = 1.0
    np.testing.assert_array_equal(columns, want)


def test_principal_axes_from_the_covariance_equal_the_svd(monkeypatch):
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.normal(size=(3000, 40)) @ rng.normal(size=(40, 40)) * rng.uniform(0.1, 3, 40),
                        dtype=torch.float32)
    mean, axes, scale = principal_axes(x, 6)
    monkeypatch.setattr(diffusion_model, "SVD_MAX_CELLS", 100)
    monkeypatch.setattr(diffusion_model, "CHUNK", 700)  # several chunks, the last one short
    mean_c, axes_c, scale_c = principal_axes(x, 6)
    np.testing.assert_allclose(mean_c.numpy(), mean.numpy(), rtol=1e-10, atol=1e-10)
    signs = torch.sign((axes * axes_c).sum(1, keepdim=True))
    np.testing.assert_allclose((axes_c * signs).numpy(), axes.numpy(), atol=1e-7)
    assert scale_c == pytest.approx(scale, rel=1e-9)
    np.testing.assert_allclose(axis_variance(x, mean_c, axes_c, scale_c).numpy(),
                               axis_variance(x, mean, axes, scale).numpy(), rtol=1e-8)


def test_principal_axes_keep_the_svd_for_many_genes(monkeypatch):
    x = torch.as_tensor(np.random.default_rng(6).normal(size=(300, 12)), dtype=torch.float32)
    mean, axes, scale = principal_axes(x, 3)
    monkeypatch.setattr(diffusion_model, "SVD_MAX_CELLS", 100)
    monkeypatch.setattr(diffusion_model, "COVARIANCE_MAX_GENES", 10)  # 12 genes: more than the covariance takes
    mean_s, axes_s, scale_s = principal_axes(x, 3)
    assert torch.equal(axes_s, axes) and torch.equal(mean_s, mean) and scale_s == scale
