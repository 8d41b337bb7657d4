"""A measured cell carried to another smooth state (scidiff.models.measured_change): closed forms on a
synthetic hurdle (the coupling's probabilities, the quantile map against the detection model's own
inverse), then perturb's measured predictions against the truth of a sparse screen."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import scidiff
from scidiff.models.cell_draws import cell_normals, cell_uniforms
from scidiff.models.measured_change import Carried, fit_mean_keeping
from scidiff.models.observation import DetectionModel
from scidiff.tasks.perturb import perturb


def hurdle(smooth: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gene j is detected with probability sigmoid(2 s), at level 1 + 0.5 s + j/2 + 0.1 noise."""
    detect = torch.rand(smooth.shape, generator=gen) < torch.sigmoid(2 * smooth)
    level = 1 + 0.5 * smooth + torch.arange(smooth.shape[1]) / 2 + 0.1 * torch.randn(smooth.shape, generator=gen)
    return torch.where(detect, level, torch.zeros_like(level))


@pytest.fixture(scope="module")
def fitted():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(20_000, 3, generator=gen)
    det = DetectionModel(3, bins=16, quantiles=32).fit(smooth, hurdle(smooth, gen))
    cells = torch.randn(4_000, 3, generator=gen)
    return det, cells, det.sample(cells, torch.Generator().manual_seed(1))


def test_cell_uniforms_are_uniform_and_keyed_by_row_not_batch():
    rows = torch.arange(50_000)
    u = cell_uniforms(7, rows, 4, stream=0)
    assert u.shape == (50_000, 4) and float(u.min()) >= 0 and float(u.max()) < 1
    for j in range(4):
        assert stats.kstest(u[:, j].numpy(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1, 0].numpy(), u[1:, 0].numpy())[0, 1]) < 0.02  # neighbouring rows
    assert abs(np.corrcoef(u[:, 0].numpy(), u[:, 1].numpy())[0, 1]) < 0.02  # neighbouring genes
    assert torch.equal(cell_uniforms(7, rows[1234:1240], 4, stream=0), u[1234:1240])  # any batch
    assert not torch.equal(cell_uniforms(7, rows[:100], 4, stream=1), u[:100])
    assert not torch.equal(cell_uniforms(8, rows[:100], 4, stream=0), u[:100])


def test_cell_normals_are_standard_normal_and_keyed_by_row_not_batch():
    rows = torch.arange(40_000)
    z = cell_normals(3, rows, 3, stream=7)
    for j in range(3):
        assert stats.kstest(z[:, j].numpy(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[:, 0].numpy(), z[:, 1].numpy())[0, 1]) < 0.02
    assert float(z.abs().max()) < 5.8  # 24-bit uniforms
    assert torch.equal(cell_normals(3, rows[777:790], 3, stream=7), z[777:790])
    assert not torch.equal(cell_normals(3, rows[:50], 3, stream=9), z[:50])


def test_a_cell_carried_nowhere_comes_back_exactly(fitted):
    det, cells, measured = fitted
    measured = measured.clone()
    measured[0, 2] = 40.0  # beyond every level the tables hold: carried as it is
    back = Carried(det, measured, cells, cells, cell_uniforms(0, torch.arange(len(cells)), 3, 1)).carry()
    torch.testing.assert_close(back, measured, atol=2e-5, rtol=0)


def _reading(det, cells, measured, moved):
    """Per value: the detection probabilities before and after, and the detected value's quantile
    ``F_s(x)`` (the detection model's own reading, one gene at a time)."""
    p = det._rate(*det._between(cells, det.centres))
    p2 = det._rate(*det._between(moved, det.centres))
    u = torch.zeros_like(measured)
    for gene in range(measured.shape[1]):
        _, levels = det._gene_tables(cells, gene)
        u[:, gene] = torch.stack([det._level_cdf(levels[i:i + 1], float(x))[0]
                                  for i, x in enumerate(measured[:, gene].tolist())])
    return p, p2, u


def test_detection_follows_the_quantile_map_of_the_measured_distribution(fitted):
    """Lowered: a detected value stays detected exactly where ``p (1 - F_s(x)) <= p'`` (the cells
    lowest in their level distribution switch off first), so the share kept is ``p'/p`` on
    average, and no zero is lifted; raised: no detected value is lost and a zero is detected with
    probability ``(p' - p) / (1 - p)``."""
    det, cells, measured = fitted
    cells, measured = cells[:1500], measured[:1500]
    rows = torch.arange(len(cells))
    on = measured > 0
    for d in (-0.8, 0.8):
        moved = cells + d
        p, p2, u = _reading(det, cells, measured, moved)
        out = Carried(det, measured, cells, moved, cell_uniforms(3, rows, 3, 1)).carry()
        if d < 0:
            assert not (out[~on] > 0).any()
            kept = p * (1 - u) <= p2
            assert torch.equal((out > 0)[on], kept[on])
            want, got = (p2 / p).clamp_max(1)[on], (out[on] > 0).float()
        else:
            assert (out[on] > 0).all()
            want, got = ((p2 - p) / (1 - p)).clamp_min(0)[~on], (out[~on] > 0).float()
        se = float(torch.sqrt((want * (1 - want)).sum())) / len(want)
        assert abs(float(got.mean() - want.mean())) < 4 * se + 0.01


def test_a_detected_level_moves_by_the_quantile_map(fitted):
    """A value detected before and after: ``F_s'^-1(1 - p (1 - F_s(x)) / p')``, with the detection
    model's own reading of one gene's tables (``_gene_tables``, ``_level_cdf``, ``_level_at``) as
    the reference."""
    det, cells, measured = fitted
    moved = cells + 0.5
    out = Carried(det, measured, cells, moved, cell_uniforms(0, torch.arange(len(cells)), 3, 1)).carry()
    p = det._rate(*det._between(cells, det.centres))
    p2 = det._rate(*det._between(moved, det.centres))
    for gene in range(3):
        on = torch.nonzero(measured[:, gene] > 0).flatten()[:40]
        _, before = det._gene_tables(cells[on], gene)
        _, after = det._gene_tables(moved[on], gene)
        for i, cell in enumerate(on.tolist()):
            x = float(measured[cell, gene])
            u = det._level_cdf(before[i:i + 1], x)
            u2 = (1 - p[cell, gene] * (1 - u) / p2[cell, gene]).clamp(0, 1)
            want = det._level_at(after[i:i + 1], u2) + (x - det._level_at(before[i:i + 1], u))
            assert abs(float(out[cell, gene]) - float(want)) < 1e-4


def test_mean_keeping_reaches_the_target_by_detection_then_levels(fitted):
    det, cells, measured = fitted
    rows = torch.arange(len(cells))
    carried = Carried(det, measured, cells, cells - 0.3, cell_uniforms(0, rows, 3, 1))
    free = carried.mean()
    span = det.centres.amax(1) - det.centres.amin(1)
    floor, top = carried.mean(-span - 1e-3), carried.mean(span + 1e-3)
    ceiling = torch.maximum(measured, det.levels.amax((1, 2))[None, :])
    for target in (free * 0.6, free * 1.3, floor * 0.3, top * 1.1):
        shift, share, factor = fit_mean_keeping(carried, target)
        out = carried.carry(shift, share, factor)
        torch.testing.assert_close(out.mean(0), target, rtol=2e-3, atol=1e-5)
        below, above = target < floor, target > top
        reachable = ~below & ~above
        assert torch.allclose(factor[reachable], torch.ones_like(factor[reachable]), atol=2e-3)
        assert torch.equal(share[reachable], torch.ones_like(share[reachable]))
        # below the tables' lowest mean the gene is switched off in more cells, its levels as they
        # were (up to the last cell switched off: the mean falls in steps of one cell)
        assert ((factor[below] - 1).abs() < 0.05).all()
        if below.any():
            assert (share[below] < 0.5).all()
            detected = (out > 0).float().mean(0)
            at_floor = (carried.carry(-span - 1e-3) > 0).float().mean(0)
            torch.testing.assert_close(detected[below], 0.3 * at_floor[below], rtol=0.1, atol=0.02)
        # above the highest, more cells detect it before any detected level is raised
        if above.any():
            assert (share[above] > 1).all()
            more = (out > 0).float().mean(0) > (carried.carry(span + 1e-3) > 0).float().mean(0)
            assert more[above].all()
    # beyond what full detection at the tables' top levels gives: every cell detected, and the
    # factor raises levels that lie at most at the larger of the cell's own value and the gene's
    # highest tabled level
    shift, share, factor = fit_mean_keeping(carried, measured.mean(0) * 1e3)
    out = carried.carry(shift, share, factor)
    torch.testing.assert_close(out.mean(0), measured.mean(0) * 1e3, rtol=2e-3, atol=1e-5)
    assert (out > 0).all() and torch.equal(share, torch.full((3,), 2.0))
    assert (out <= ceiling * factor).all() and (carried.carry(shift, share) <= ceiling).all()
    # the mean rises with the shift of the smooth expression (this hurdle's rate and levels rise with it)
    means = torch.stack([carried.mean(torch.full((3,), a)) for a in (-1.0, -0.5, 0.0, 0.5, 1.0)])
    assert (means.diff(dim=0) > 0).all()


def _sparse_screen(seed: int = 0, n: int = 600, genes: int = 40):
    """Counts-like log1p cells: every gene detected with probability ``q_j`` at a level near 2,
    and a knockdown ``KD`` that takes the first 8 genes' detection to a quarter of it; the others
    are untouched."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.2, 0.7, genes)

    def cells(m, kd):
        rate = q * np.where(np.arange(genes) < 8, 0.25, 1.0) if kd else q
        on = rng.random((m, genes)) < rate
        return np.where(on, 2.0 + 0.3 * rng.standard_normal((m, genes)), 0.0).astype(np.float32)

    x = np.vstack([cells(n, False), cells(n, True)])
    obs = pd.DataFrame({"perturbation": ["control"] * n + ["KD"] * n})
    adata = ad.AnnData(X=x, obs=obs)
    adata.var_names = [f"g{j}" for j in range(genes)]
    adata.obs_names = [f"c{i}" for i in range(len(x))]
    return adata


@pytest.fixture(scope="module")
def sparse_model():
    torch.manual_seed(0)
    adata = _sparse_screen()
    data = scidiff.setup_anndata(adata, perturbation_keys=["perturbation"], control_labels=["control"],
                                 n_top_genes=None)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=16)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=2e-3, warmup_steps=20).train(5)
    return model, adata


def test_measured_predictions_switch_genes_off_and_keep_the_others_zeros(sparse_model):
    """The knockdown's measured prediction: the 8 knocked-down genes detected in about a quarter as
    many cells as in control (as in the KD cells measured), the other genes' zeros left as zeros
    (a Wilcoxon test against control finds the knocked-down genes, not the rest); the shifted
    prediction lifts zeros instead. The default is measured, and does not depend on batching."""
    import scanpy as sc

    model, adata = sparse_model
    control = adata[(adata.obs["perturbation"] == "control").to_numpy()][:300].copy()
    truth = np.asarray(adata[(adata.obs["perturbation"] == "KD").to_numpy()].X)
    pred = perturb(model, control, {"perturbation": "KD"}, steps=10, progress=False)
    assert pred.uns["scidiff_prediction"]["observed"] is True
    again = perturb(model, control, {"perturbation": "KD"}, steps=10, progress=False, batch_size=37)
    np.testing.assert_allclose(again.X, pred.X, atol=1e-5)
    fresh = [perturb(model, control, {"perturbation": "KD"}, steps=10, progress=False, method="population",
                     batch_size=size).X for size in (4096, 37)]
    np.testing.assert_allclose(fresh[1], fresh[0], atol=1e-5)  # fresh cells drawn keyed by their rows
    shifted = perturb(model, control, {"perturbation": "KD"}, steps=10, progress=False, observed=False)
    assert shifted.uns["scidiff_prediction"]["observed"] is False
    x, c = np.asarray(pred.X), np.asarray(control.X)
    detected = (x > 0).mean(0)
    assert np.abs(detected[:8] - (truth[:, :8] > 0).mean(0)).max() < 0.08
    assert np.abs(detected[8:] - (c[:, 8:] > 0).mean(0)).max() < 0.06
    assert ((x > 0) <= (c > 0)).mean() > 0.99  # a knockdown lifts (almost) no zero
    assert (np.asarray(shifted.X)[:, 8:] > 0).mean() > (c[:, 8:] > 0).mean() + 0.2  # the shift lifts zeros
    # the same mean per gene as the shifted cells, on the cells predicted (the fit is on them)
    np.testing.assert_allclose(x.mean(0), np.asarray(shifted.X).mean(0), rtol=1e-3, atol=1e-4)

    def de_genes(pred_x):
        both = ad.AnnData(np.vstack([pred_x, c]), obs=pd.DataFrame(
            {"g": pd.Categorical(["pred"] * len(pred_x) + ["ctrl"] * len(c))}, index=[str(i) for i in range(600)]))
        both.var_names = control.var_names
        sc.tl.rank_genes_groups(both, "g", groups=["pred"], reference="ctrl", method="wilcoxon")
        frame = sc.get.rank_genes_groups_df(both, "pred")
        return set(frame.loc[frame["pvals_adj"] < 0.05, "names"])

    found = de_genes(x)
    assert {f"g{j}" for j in range(8)} <= found and len(found - {f"g{j}" for j in range(8)}) <= 3
    assert len(de_genes(np.asarray(shifted.X))) > 20


def test_the_control_target_returns_the_cells_and_a_model_without_detection_is_refused(sparse_model, kang_small):
    model, adata = sparse_model
    control = adata[(adata.obs["perturbation"] == "control").to_numpy()][:50].copy()
    same = perturb(model, control, {"perturbation": "control"}, steps=10, progress=False)
    np.testing.assert_allclose(np.asarray(same.X), np.asarray(control.X), atol=1e-4)
    data = scidiff.setup_anndata(kang_small.copy(), condition_keys=["condition"], n_top_genes=None)
    gene_space = scidiff.ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=20, latent_dim=None)
    with pytest.raises(ValueError, match="fitted detection model"):
        perturb(gene_space, kang_small[:5].copy(), {"condition": "stimulated"}, steps=2, progress=False,
                observed=True)


def test_a_fitted_mean_keeping_leaves_no_cell_on_its_detection_threshold(fitted):
    """The mean of few cells rises in steps (one cell detected more), so the fit's bisection ends
    on one cell's threshold; the fit steps past it, so the moved expression changed by float
    rounding (as a network's output changes with the batch size) detects the same values."""
    det, cells, measured = fitted
    gen = torch.Generator().manual_seed(5)
    rows = torch.arange(40)
    flips = 0
    for d in (-0.6, -0.2, 0.3, 0.7):
        moved = cells[:40] + d
        carried = Carried(det, measured[:40], cells[:40], moved, cell_uniforms(0, rows, 3, 1))
        free = carried.mean()
        for target in (free * 0.5, free * 0.9, free * 1.2, free * 2.0):
            keep = fit_mean_keeping(carried, target)
            before = carried.carry(*keep) > 0
            for _ in range(4):
                rounded = moved * (1 + 2e-6 * torch.randn(moved.shape, generator=gen))
                again = Carried(det, measured[:40], cells[:40], rounded, cell_uniforms(0, rows, 3, 1))
                flips += int(((again.carry(*keep) > 0) != before).sum())
    assert flips == 0
