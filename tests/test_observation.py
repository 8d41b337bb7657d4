"""The detection model: measured (sparse) expression from the smooth expression a principal-axes
model generates. Known answers on a synthetic hurdle, then the model-level wiring on Kang."""
import contextlib

import numpy as np
import pytest
import torch

import scidiff
from scidiff.models import ScIDiffModel
from scidiff.models.observation import DetectionModel
from scidiff.training import load_model, save_model


def hurdle(smooth: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gene j is detected with probability sigmoid(2 s), at level 1 + 0.5 s + j/2 + 0.1 noise."""
    detect = torch.rand(smooth.shape, generator=gen) < torch.sigmoid(2 * smooth)
    level = 1 + 0.5 * smooth + torch.arange(smooth.shape[1]) / 2 + 0.1 * torch.randn(smooth.shape, generator=gen)
    return torch.where(detect, level, torch.zeros_like(level))


def test_detection_model_recovers_a_known_hurdle():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(20_000, 3, generator=gen)
    train = hurdle(smooth, gen)
    det = DetectionModel(3, bins=16, quantiles=32).fit(smooth, train)
    # each bin's detection rate is the analytic probability at the bin's centre
    centres = (det.edges[:, 1:] + det.edges[:, :-1]) / 2
    inner = slice(1, -1)  # the two open-ended bins have no centre
    assert torch.allclose(det.detection[:, inner], torch.sigmoid(2 * centres[:, inner]), atol=0.05)
    # measurements of new cells: detection rate and detected level by quartile of s; detected
    # levels stay within the range seen in training
    fresh = torch.randn(20_000, 3, generator=gen)
    measured = det.sample(fresh, torch.Generator().manual_seed(1))
    assert measured.shape == fresh.shape
    for j in range(3):
        seen, got = train[train[:, j] != 0, j], measured[measured[:, j] != 0, j]
        assert float(got.min()) >= float(seen.min()) and float(got.max()) <= float(seen.max())
    truth = hurdle(fresh, gen)
    for j in range(3):
        q = torch.quantile(fresh[:, j], torch.tensor([0.25, 0.5, 0.75]))
        group = torch.bucketize(fresh[:, j].contiguous(), q)
        for k in range(4):
            rows = group == k
            got, want = measured[rows, j], truth[rows, j]
            assert abs(float((got > 0).float().mean() - (want > 0).float().mean())) < 0.03
            assert abs(float(got[got > 0].mean() - want[want > 0].mean())) < 0.05


def test_tables_read_between_bin_centres_follow_a_smooth_detection_rate():
    """The rate read between the two flanking bin centres (a frequency polygon) is nearer the
    true sigmoid(2 s) than the bin's own rate read as a step, on values across the range; and the
    rates at the centres are solved so that, over each bin's own training cells, the interpolated
    rate averages to the rate the bin measured."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(20_000, 3, generator=gen)
    train = hurdle(smooth, gen)
    det = DetectionModel(3, bins=8).fit(smooth, train)
    s = torch.linspace(-1.5, 1.5, 301).unsqueeze(1).expand(-1, 3).contiguous()
    truth = torch.sigmoid(2 * s[:, 0])
    bins = det._bin(smooth)                                       # [G, N]
    measured = torch.stack([torch.stack([(train[bins[j] == m, j] > 0).float().mean() for m in range(det.bins)])
                            for j in range(3)])                   # [G, bins]: what each bin measured
    step = measured[0, torch.searchsorted(det.edges[0, 1:-1].contiguous(), s[:, 0].contiguous(), right=True)]
    between = det._gene_tables(s, 0)[0]
    assert float((between - truth).abs().mean()) < 0.5 * float((step - truth).abs().mean())
    k, k1, w = det._between(smooth, det.centres)
    rate = det.detection.T
    read = rate.gather(0, k) + w * (rate.gather(0, k1) - rate.gather(0, k))  # [N, G]
    means = torch.stack([torch.stack([read[bins[j] == m, j].mean() for m in range(det.bins)]) for j in range(3)])
    torch.testing.assert_close(means, measured, rtol=0, atol=1e-5)


def test_cells_that_tie_on_a_smooth_value_measure_at_their_own_rate():
    """A gene whose smooth value is the same in every cell (one never detected has one), or in
    half of them: the tied cells are shared between the bins their ranks span and read at their
    pooled rate, not at an empty bin's 0 (gene 1: 0 before) nor at the one bin that held them all
    (gene 2: 0.20 where the measured rate was 0.385)."""
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    smooth = torch.randn(n, 3, generator=gen)
    smooth[:, 1] = 0.7
    smooth[: n // 2, 2] = 0.0
    rate = torch.tensor([0.4, 0.3, 0.6])
    detect = torch.rand(n, 3, generator=gen) < rate
    measured = torch.where(detect, 1 + torch.rand(n, 3, generator=gen), torch.zeros(n, 3))
    det = DetectionModel(3, bins=8).fit(smooth, measured)
    tied = (measured[:, 1] > 0).float().mean()
    torch.testing.assert_close(det.detection[1], tied.expand(det.bins), rtol=0, atol=1e-6)
    for j in range(3):
        read = det._gene_tables(smooth, j)[0].mean()
        assert abs(float(read - (measured[:, j] > 0).float().mean())) < 0.01, j
    drawn = (det.sample(smooth, torch.Generator().manual_seed(1)) > 0).float().mean(0)
    torch.testing.assert_close(drawn, rate, rtol=0, atol=0.015)


def test_measurement_conditioned_on_an_interval_is_the_free_one_restricted_to_it():
    """Conditioned draws land in the interval and match free draws that happened to land there
    (zero share and detected-level quartiles); the region probability is the free draws' hit
    rate, for a lower bound, an upper bound that admits zero, and a two-sided interval."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(20_000, 3, generator=gen)
    det = DetectionModel(3).fit(smooth, hurdle(smooth, gen))
    cell = torch.tensor([[0.3, -0.2, 0.8]]).expand(60_000, 3)
    free = det.sample(cell, torch.Generator().manual_seed(1))
    for gene, (lo, hi) in {0: (1.2, float("inf")), 1: (-float("inf"), 1.5), 2: (2.0, 2.6)}.items():
        inside = (free[:, gene] >= lo) & (free[:, gene] <= hi)
        prob = det.region_probability(cell[:1], {gene: (lo, hi)})
        assert abs(float(prob) - float(inside.float().mean())) < 0.01
        got = det.sample(cell, torch.Generator().manual_seed(2), within={gene: (lo, hi)})[:, gene]
        want = free[inside, gene]
        assert bool(((got >= lo - 1e-6) & (got <= hi + 1e-6)).all())
        assert abs(float((got == 0).float().mean() - (want == 0).float().mean())) < 0.01
        q = torch.tensor([0.25, 0.5, 0.75])
        torch.testing.assert_close(torch.quantile(got[got > 0], q), torch.quantile(want[want > 0], q), atol=0.02,
                                   rtol=0)
        other = [j for j in range(3) if j != gene]  # the other genes keep their free draws
        rest = det.sample(cell, torch.Generator().manual_seed(2), within={gene: (lo, hi)})[:, other]
        torch.testing.assert_close((rest > 0).float().mean(0), (free[:, other] > 0).float().mean(0), atol=0.01,
                                   rtol=0)
    # two genes at once: independent given the smooth state
    both = {0: (1.2, float("inf")), 1: (-float("inf"), 1.5)}
    expected = det.region_probability(cell[:1], {0: both[0]}) * det.region_probability(cell[:1], {1: both[1]})
    torch.testing.assert_close(det.region_probability(cell[:1], both), expected)


def test_sample_is_measure_on_uniforms_drawn_gene_major():
    """``sample`` draws the detection uniforms, then the level uniforms, each ``[G, N]``, and
    applies the deterministic map ``measure``; with a capture factor the detection uniforms come
    through its copula (a normal per cell, then one per value)."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(5_000, 3, generator=gen)
    det = DetectionModel(3).fit(smooth, hurdle(smooth, gen))
    fresh = torch.randn(400, 3, generator=gen) * 1.5
    det.capture.zero_()
    draws = torch.Generator().manual_seed(4)
    detect_u, level_u = torch.rand(3, 400, generator=draws), torch.rand(3, 400, generator=draws)
    torch.testing.assert_close(det.sample(fresh, torch.Generator().manual_seed(4)),
                               det.measure(fresh, detect_u.T, level_u.T), rtol=0, atol=0)
    det.capture.fill_(0.3)
    rho = float(det.capture)  # 0.3 in float32
    draws = torch.Generator().manual_seed(4)
    shared, own = torch.randn(400, generator=draws), torch.randn(3, 400, generator=draws)
    detect_u = torch.special.ndtr(rho ** 0.5 * shared + (1 - rho) ** 0.5 * own)
    level_u = torch.rand(3, 400, generator=draws)
    torch.testing.assert_close(det.sample(fresh, torch.Generator().manual_seed(4)),
                               det.measure(fresh, detect_u.T, level_u.T), rtol=0, atol=0)
    # the torch reference a few cells at a time (bounded temporaries) is the same map
    torch.testing.assert_close(det.measure_reference(fresh, detect_u.T, level_u.T, entries=50),
                               det.measure_reference(fresh, detect_u.T, level_u.T), rtol=0, atol=0)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_the_capture_factor_is_recovered_and_keeps_every_genes_rate(rho):
    """Cells whose genes share a capture factor (a one-factor Gaussian copula of correlation
    ``rho`` on the detection draws, 300 genes, detection ``sigmoid(s - 2)``): the fit recovers
    ``rho``, and measurements of new cells spread the number of genes detected as the truth does
    while each gene keeps its detection rate; without a shared factor the fit finds none."""
    gen = torch.Generator().manual_seed(1)

    def truth(smooth):
        u = torch.special.ndtr(rho ** 0.5 * torch.randn(len(smooth), 1, generator=gen)
                               + (1 - rho) ** 0.5 * torch.randn(smooth.shape, generator=gen))
        return torch.where(u < torch.sigmoid(smooth - 2), 1 + smooth.abs(), torch.zeros_like(smooth))

    smooth = torch.randn(4_000, 300, generator=gen)
    det = DetectionModel(300).fit(smooth, truth(smooth))
    assert abs(float(det.capture) - rho) < 0.01
    fresh = torch.randn(4_000, 300, generator=gen)
    want, got = truth(fresh) > 0, det.sample(fresh, torch.Generator().manual_seed(2)) > 0
    assert abs(float(got.sum(1).float().std() / want.sum(1).float().std()) - 1) < 0.1
    assert (got.float().mean(0) - want.float().mean(0)).abs().max() < 0.04
    assert abs(float(got.float().mean() - want.float().mean())) < 0.005


def test_numpy_measure_equals_the_torch_map_on_the_same_uniforms():
    """The ONNX runtime's measurement (numpy, no torch) is DetectionModel.measure: same tables,
    same uniforms, same cells to 1e-6, for smooth values inside, outside and on the bin edges."""
    from scidiff.export.onnx import detection_arrays
    from scidiff.export.runtime import measure

    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(5_000, 4, generator=gen)
    det = DetectionModel(4).fit(smooth, hurdle(smooth, gen))
    fresh = torch.cat([torch.randn(2_000, 4, generator=gen) * 2, det.edges.T, det.centres.T])  # ties
    detect_u, level_u = torch.rand(fresh.shape, generator=gen), torch.rand(fresh.shape, generator=gen)
    expected = det.measure(fresh, detect_u, level_u).numpy()
    got = measure(detection_arrays(det), fresh.numpy(), detect_u.numpy(), level_u.numpy())
    assert got.dtype == np.float32 and 0.2 < float((got == 0).mean()) < 0.8
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got == 0, expected == 0)
    # an export written before the centres were kept reads between the midpoints of the edges,
    # as a checkpoint of that age loads
    old = {k: v for k, v in detection_arrays(det).items() if k != "detection_centres"}
    state = {k: v for k, v in det.state_dict().items() if k != "centres"}
    aged = DetectionModel(4)
    aged.load_state_dict(state)
    torch.testing.assert_close(aged.centres, (det.edges[:, :-1] + det.edges[:, 1:]) * 0.5)
    np.testing.assert_allclose(measure(old, fresh.numpy(), detect_u.numpy(), level_u.numpy()),
                               aged.measure(fresh, detect_u, level_u).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cells,genes,threads", [(1, 1, 1), (257, 37, 1), (300, 17, 2), (1000, 16, 3)])
def test_the_compiled_measurement_equals_the_torch_reference_bit_for_bit(cells, genes, threads, monkeypatch):
    """``scidiff.models._measure`` (tiles of 16 genes x 256 cells, several threads) is
    ``DetectionModel.measure_reference`` exactly, for values inside, outside and on the bin edges
    (ties), infinities and NaN, with contiguous or gene-major (as ``sample`` draws) uniforms; and
    ``SCIDIFF_KERNELS=torch`` runs the reference."""
    from scidiff.models import observation

    if observation._native is None:
        pytest.skip("scidiff.models._measure is not built (installed without a C++ compiler)")
    gen = torch.Generator().manual_seed(cells + genes)
    smooth = torch.randn(4_000, genes, generator=gen)
    det = DetectionModel(genes).fit(smooth, hurdle(smooth, gen))
    fresh = torch.randn(cells, genes, generator=gen) * 2
    rows = min(cells, det.edges.shape[1])
    fresh[:rows] = det.edges.T[:rows]
    at_centres = max(0, min(det.bins, cells - rows))
    fresh[rows:rows + at_centres] = det.centres.T[:at_centres]
    fresh[0, 0] = float("nan")
    if cells > 2:
        fresh[1, :] = float("inf")
        fresh[2, :] = -float("inf")
    detect_u, level_u = torch.rand(genes, cells, generator=gen).T, torch.rand(genes, cells, generator=gen).T
    calls = []
    monkeypatch.setattr(observation._native, "measure",
                        lambda *a, _f=observation._native.measure: calls.append(a[-1]) or _f(*a), raising=True)
    torch.set_num_threads(threads)
    try:
        native = det.measure(fresh, detect_u, level_u)
        again = det.measure(fresh, detect_u.contiguous(), level_u.contiguous())
    finally:
        torch.set_num_threads(1)
    assert calls == [threads, threads]
    reference = det.measure_reference(fresh, detect_u, level_u)
    assert torch.equal(native, reference) and torch.equal(again, reference)
    if cells * genes > 100:  # enough values to see both outcomes
        assert 0.1 < float((reference == 0).float().mean()) < 0.9
    monkeypatch.setenv("SCIDIFF_KERNELS", "torch")
    det.measure(fresh, detect_u, level_u)
    assert len(calls) == 2
    arrays = [a.numpy() for a in (fresh, detect_u.contiguous(), level_u.T.contiguous(), det.centres, det.detection,
                                  det.levels)]  # the uniforms cell-major: refused, not misread
    with pytest.raises(ValueError, match="gene-major") if cells != genes else contextlib.nullcontext():
        observation._native.measure(*arrays, np.empty((cells, genes), np.float32), 1)


def test_detection_model_errors():
    det = DetectionModel(4)
    with pytest.raises(RuntimeError, match="fit_detection"):
        det.sample(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[cells, 4\]"):
        det.fit(torch.zeros(30, 3), torch.zeros(30, 3))
    with pytest.raises(ValueError, match="at least 16 cells"):
        det.fit(torch.zeros(5, 4), torch.zeros(5, 4))


def test_observed_samples_have_the_data_sparsity_and_old_checkpoints_load(tmp_path, kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=200, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, latent_dim=16, hidden_dim=32, num_layers=1, num_timesteps=100)
    real_zeros = float((data.log_expression() == 0).mean())
    smooth = model.sample(300, steps=5, seed=0, observed=False)
    observed = model.sample(300, steps=5, seed=0, observed=True)
    assert float((smooth == 0).float().mean()) < real_zeros - 0.3  # the smooth state is dense
    assert abs(float((observed == 0).float().mean()) - real_zeros) < 0.05
    torch.testing.assert_close(observed, model.sample(300, steps=5, seed=0, observed=True))
    # a checkpoint written before the detection model: loads, and says how to fit it
    path = save_model(model, tmp_path / "run")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("detection.")}
    from scidiff.training.checkpoint import atomic_torch_save, payload_digest

    payload["digest"] = payload_digest({k: v for k, v in payload.items() if k != "digest"})
    atomic_torch_save(payload, path)
    old = load_model(tmp_path / "run")
    with pytest.raises(RuntimeError, match="fit_detection"):
        old.sample(2, steps=2, seed=0, observed=True)
    with pytest.raises(ValueError, match="fitted detection model"):
        scidiff.InverseDesigner(old, observed=True)
    # the design CLI fits it on --data's cells instead, and says so in the report
    from scidiff.tasks.design import run_design

    gene = data.spec.gene_names[0]
    with pytest.raises(ValueError, match="give --data"):
        run_design(tmp_path / "run", f"{gene}>=0.5", tmp_path / "d.h5ad", observed=True, n=4, steps=2)
    report = run_design(tmp_path / "run", f"{gene}>=0.5", tmp_path / "d.h5ad", data=kang_small, observed=True, n=4,
                        steps=2, screen=False, attribution=False, progress=False)
    assert report["detection_model"] == f"fitted on the {kang_small.n_obs} cells of --data (the checkpoint had none)"
    old.fit_detection(data)  # the cells, as the errors advise (it took only their .x)
    torch.testing.assert_close(old.sample(300, steps=5, seed=0, observed=True), observed)


def test_gene_space_models_have_no_detection_model(kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=30)
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=50)
    assert model.detection is None
    with pytest.raises(ValueError, match="principal-axes"):
        model.sample(2, steps=2, observed=True)
    with pytest.raises(ValueError, match="fitted detection model"):
        scidiff.InverseDesigner(model, observed=True)


def test_observed_design_checks_targets_on_the_measured_cells(kang_small):
    """Retries and the result's hits use the same measurement that is returned."""
    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, latent_dim=16, hidden_dim=32, num_layers=1, num_timesteps=100)
    gene = data.spec.gene_names[int(np.argmax((data.log_expression() > 0).mean(0)))]  # the most detected gene
    target = scidiff.PhenotypeTarget(marker_genes={gene: 0.5})
    designer = scidiff.InverseDesigner(model, observed=True)
    res = designer.design(target, 64, steps=5, seed=0, retries=3, resample=False, condition_measurement=False)
    recomputed = designer.hits(res.expression, target)
    np.testing.assert_array_equal(res.met[f"{gene}>=0.5"], recomputed[f"{gene}>=0.5"])
    assert float((res.expression == 0).mean()) > 0.5  # measured cells are sparse
    assert res.settings["measurement"] == "free"


def test_observed_design_conditions_the_target_genes_measurement(kang_small):
    """By default the target genes are measured within their intervals: every cell whose smooth
    state allows it meets the target, the other genes stay sparse; with reweighting, the batch is
    resampled by the detection model's region probabilities."""
    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, latent_dim=16, hidden_dim=32, num_layers=1, num_timesteps=100)
    detected = (data.log_expression() > 0).mean(0)
    up, down = (data.spec.gene_names[int(i)] for i in np.argsort(-detected)[:2])
    target = scidiff.PhenotypeTarget(marker_genes={up: 0.5}, suppressed_genes={down: 0.0})
    designer = scidiff.InverseDesigner(model, observed=True)
    assert designer.measurement_region(target) == {designer.gene_to_idx[up]: (0.4, float("inf")),
                                                   designer.gene_to_idx[down]: (-float("inf"), 0.1)}
    z = torch.randn(300, model.diffusion_dim, generator=torch.Generator().manual_seed(0))
    region = designer.measurement_region(target)
    feasible = model.detection.region_probability(model.data_spec.to_expression(model.decode(z), clip=False), region)
    expr = designer.designed_expression(z, generator=torch.Generator().manual_seed(1), within=region)
    met = designer._met_all(expr, target).numpy()
    assert int((feasible > 0).sum()) > 0 and met[(feasible > 0).numpy()].all()
    # a gene's interval no cell can reach (above every level it was measured at): the free draws stay
    j = designer.gene_to_idx[up]
    beyond = {j: (float(model.detection.levels[j].max()) + 1.0, float("inf"))}
    assert float(model.detection.region_probability(model.data_spec.to_expression(model.decode(z), clip=False),
                                                    beyond).max()) == 0.0
    free = designer.designed_expression(z, generator=torch.Generator().manual_seed(1))
    kept = designer.designed_expression(z, generator=torch.Generator().manual_seed(1), within=beyond)
    torch.testing.assert_close(kept, free, rtol=0, atol=0)
    res = designer.design(target, 64, steps=5, seed=0, resample=False)
    assert res.settings["measurement"] == "conditioned on the target genes' intervals"
    others = [j for j, g in enumerate(res.gene_names) if g not in (up, down)]
    assert float((res.expression[:, others] == 0).mean()) > 0.5
    reweighted = designer.design(target, 64, steps=5, seed=0, resample=False, reweight_measurement=True)
    assert reweighted.all_met.all() and reweighted.settings["measurement"].endswith("reweighted by its probability")
    assert 0 < reweighted.settings["measurement_effective_sample_size"] <= 1


def test_engine_and_cli_write_the_same_measured_cells(tmp_path, kang_small):
    """The engine (fp32) draws the measurement from the same generator right after the same
    sampling, so it returns model.sample's measured cells; `scidiff sample --observed` writes
    measured cells and says so in uns."""
    import anndata as ad

    from scidiff.cli import main
    from scidiff.engine import SamplingEngine

    data = scidiff.setup_anndata(kang_small, n_top_genes=80, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, latent_dim=12, hidden_dim=32, num_layers=1, num_timesteps=100)
    with torch.no_grad():
        for p in model.score.parameters():
            p.normal_(0, 0.1)
    ref = model.sample(40, {"cell_type": "NK"}, sampler="ddim", steps=6, seed=3, observed=True)
    out = SamplingEngine(model, "ddim", 6, dtype=torch.float32).sample(40, {"cell_type": "NK"}, seed=3, observed=True)
    torch.testing.assert_close(out, ref)
    scidiff.save_model(model, tmp_path / "model.pt")
    path = tmp_path / "measured.h5ad"
    assert main(["sample", "--model", str(tmp_path / "model.pt"), "-n", "50", "--condition", "cell_type=B",
                 "--steps", "5", "--observed", "--out", str(path)]) == 0
    written = ad.read_h5ad(path)
    assert written.uns["scidiff"]["observed"] and "detection model" in written.uns["scidiff"]["expression"]
    zeros = float((np.asarray(written.X) == 0).mean())
    assert abs(zeros - float((data.log_expression() == 0).mean())) < 0.1


def test_detection_fit_subsamples_large_data(kang_small, monkeypatch):
    data = scidiff.setup_anndata(kang_small, n_top_genes=50)
    model = ScIDiffModel.from_data(data, latent_dim=8, hidden_dim=16, num_layers=1, num_timesteps=50)
    rows = []
    fit = model.detection.fit
    monkeypatch.setattr(model.detection, "fit", lambda smooth, measured: rows.append(len(smooth)) or fit(smooth, measured))
    model.fit_detection(data.x, max_cells=120)
    model.fit_detection(data.x)  # 300 cells: all of them
    assert rows == [120, len(data)]


def test_the_tables_are_sized_to_the_training_cells_and_load_at_their_size(tmp_path):
    """About 100 training cells a bin, 4 to 16 bins (pbmc68k_reduced's 560 cells: 6; Kang's
    1,580: 16); a model fitted on few cells saves and loads its smaller tables, measuring alike."""
    assert [DetectionModel.bins_for(n) for n in (50, 560, 1580, 20_000)] == [4, 6, 16, 16]
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(560, 3, generator=gen)
    det = DetectionModel(3).fit(smooth, hurdle(smooth, gen))
    assert det.bins == 6 and det.edges.shape == (3, 7) and det.levels.shape == (3, 6, 32)
    fresh = DetectionModel(3)
    fresh.load_state_dict(det.state_dict())
    assert fresh.bins == 6 and bool(fresh.fitted)
    u = torch.rand(2, 50, 3, generator=gen)
    x = torch.randn(50, 3, generator=gen)
    assert torch.equal(fresh.measure(x, u[0], u[1]), det.measure(x, u[0], u[1]))
    many = torch.randn(4_000, 3, generator=gen)
    assert DetectionModel(3).fit(many, hurdle(many, gen)).bins == 16
