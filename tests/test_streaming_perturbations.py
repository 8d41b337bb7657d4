"""Perturbation screens trained from a file that is streamed (``scidiff train --streaming
--perturbation-keys``): the set-up (effects, combination term, seen groups, latent with the
effects' directions, detection model, reference control cells, the perturbation prior) equals the
in-memory one on the same cells, up to the axes' signs and float rounding; then training and
prediction through the command line."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scidiff.data import setup_anndata, setup_streaming
from scidiff.models import ScIDiffModel
from scidiff.models.perturbation_prior import PerturbationPrior

N, G, P = 1500, 40, 10
GENES = [f"G{i}" for i in range(G)]
SETUP = dict(n_top_genes=None, condition_keys=["pert", "line"], perturbation_keys=["pert"], control_labels=["ctrl"])
MODEL = dict(latent_dim=8, hidden_dim=16, num_layers=1, num_timesteps=50)


def _screen() -> ad.AnnData:
    """Counts of N cells in 3 lines: controls, P knockouts of the file's own genes (each lowers its
    gene and moves two others) and 3 seen doubles."""
    rng = np.random.default_rng(3)
    labels = ["ctrl"] * 5 + GENES[:P] + [f"{GENES[i]}+{GENES[i + 1]}" for i in range(0, 6, 2)]
    pert = np.array(labels)[rng.choice(len(labels), N)]
    dose = np.where(pert == "ctrl", 0.0, rng.choice([1.0, 10.0], N))
    rate = rng.gamma(2.0, 1.0, (N, G))
    for i, lab in enumerate(pert):
        for gene in lab.split("+"):
            if gene != "ctrl":
                j = GENES.index(gene)
                rate[i, j] *= 0.2 if dose[i] > 1 else 0.5
                rate[i, (j + 7) % G] *= 2.0
    obs = pd.DataFrame({"pert": pert, "line": rng.choice(["a", "b", "c"], N), "dose": dose,
                        "day": rng.choice([0.0, 2.0, 4.0], N)}, index=[f"c{i}" for i in range(N)])
    return ad.AnnData(X=sp.csr_matrix(rng.poisson(rate).astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    adata = _screen()
    adata.write_h5ad(root / "screen.h5ad")
    adata[adata.obs["pert"] == "ctrl"][:40].copy().write_h5ad(root / "control.h5ad")
    return root, adata


def _aligned(ref: torch.Tensor, got: torch.Tensor, sign: torch.Tensor, axis: int) -> torch.Tensor:
    return got * (sign[:, None] if axis == 0 else sign[None, :]) - ref


@pytest.mark.parametrize("axis_sigma_data,dose", [(False, False), (True, False), (False, True)])
def test_a_streamed_screen_is_set_up_as_in_memory(screen, axis_sigma_data, dose):
    root, adata = screen
    setup = {**SETUP, "dose_key": "dose"} if dose else SETUP
    ref = ScIDiffModel.from_data(setup_anndata(adata, **setup), axis_sigma_data=axis_sigma_data, **MODEL)
    cells = setup_streaming(str(root / "screen.h5ad"), hvg_cells=10**9, **setup)
    got = ScIDiffModel.from_streamed(cells, axis_sigma_data=axis_sigma_data, **MODEL)
    if dose:  # each single's effect at its highest dose, every (group, dose) seen
        assert set(got.effects.of("pert").seen_dose.tolist()) == {1.0, 10.0}
        assert set(got.effects.of("pert").reference_dose.tolist()) == {10.0}
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b) and ref.latent_dim == got.latent_dim > MODEL["latent_dim"]  # the effects' axes added
    for name in [k for k in a if k.startswith("effects.per_key")]:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    sign = torch.sign((a["latent_basis"] * b["latent_basis"]).sum(1))  # each axis up to its sign
    assert _aligned(a["latent_basis"], b["latent_basis"], sign, 0).abs().max() < 1e-5
    responses = "condition_encoder.responses.pert"
    assert _aligned(a[responses], b[responses], sign, 1).abs().max() < 1e-5
    assert _aligned(a["effects.reference_latent"], b["effects.reference_latent"], sign, 1).abs().max() < 1e-4
    torch.testing.assert_close(b["effects.reference_context"], a["effects.reference_context"])
    torch.testing.assert_close(b["effects.control_quantiles"], a["effects.control_quantiles"], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["detection.detection"], a["detection.detection"], rtol=0, atol=1e-6)
    if axis_sigma_data:
        torch.testing.assert_close(b["sigma_data_axes"], a["sigma_data_axes"], rtol=1e-5, atol=0)
    report_a, report_b = ref.effects_report["pert"], got.effects_report["pert"]
    assert report_a["combination"] == report_b["combination"]
    assert report_a["seen_combinations"] == 9 * (1 + dose)  # 3 doubles x 3 lines (x 2 doses)
    for cand, err in report_a["cv_mse"].items():
        assert report_b["cv_mse"][cand] == pytest.approx(err, rel=1e-5)


@pytest.mark.parametrize("dose", [False, True])
def test_the_streamed_prior_equals_the_in_memory_one(screen, dose):
    root, adata = screen
    setup = {**SETUP, "dose_key": "dose"} if dose else SETUP  # doses pooled, in memory as streamed
    cells = setup_anndata(adata, **setup)
    ref = PerturbationPrior.from_cells(cells, adata)
    streamed = setup_streaming(str(root / "screen.h5ad"), hvg_cells=10**9, **setup)
    got = PerturbationPrior.from_streamed(streamed)
    ra, rb = ref.report()["pert"], got.report()["pert"]
    assert ra["n_seen"] == rb["n_seen"] == P and ra["self"]["kind"] == rb["self"]["kind"]
    assert rb["cv_sse"] == pytest.approx(ra["cv_sse"], rel=1e-5)
    assert ra["dose"]["kind"] == rb["dose"]["kind"] == ("shared" if dose else "flat")
    if dose:  # each knockout's effects at doses 1 and 10, read in the same pass
        assert rb["dose"]["cv_sse_curve"] == pytest.approx(ra["dose"]["cv_sse_curve"], rel=1e-5)
        np.testing.assert_allclose(got.dose_scale("pert", [1.0, 10.0]), ref.dose_scale("pert", [1.0, 10.0]),
                                   rtol=1e-5)
    for label in ("G25", "G3"):  # unseen (from the features) and seen (measured)
        (ea, ca), (eb, cb) = ref.effect("pert", label), got.effect("pert", label)
        np.testing.assert_allclose(np.asarray(eb), np.asarray(ea), rtol=0, atol=1e-6)
        assert cb == pytest.approx(ca, abs=1e-6)


def test_read_x_returns_the_rows_asked_for_in_their_order(screen):
    root, adata = screen
    streamed = setup_streaming(str(root / "screen.h5ad"), hvg_cells=10**9, **SETUP)
    in_memory = setup_anndata(adata, **SETUP).x
    rows = np.array([1400, 3, 77, 3, 0, 1499])
    torch.testing.assert_close(streamed.read_x(rows), in_memory[torch.as_tensor(rows)], rtol=0, atol=1e-5)
    assert streamed.read_x([]).shape == (0, G)


def _train_streaming(root, tmp_path, *flags):
    from scidiff.cli import main

    config = tmp_path / "small.yaml"
    config.write_text("model: {hidden_dim: 16, num_layers: 1, latent_dim: 8, num_timesteps: 50}\n"
                      "training: {batch_size: 128, warmup_steps: 2}\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root / "screen.h5ad"), "--streaming", "--condition-keys", "line",
                 "--perturbation-keys", "pert", "--control-labels", "ctrl", "--config", str(config), *flags,
                 "--out", str(run)]) == 0
    return run


def test_train_streaming_with_perturbations_and_predict(screen, tmp_path):
    from scidiff.cli import main

    root, _ = screen
    run = _train_streaming(root, tmp_path, "--epochs", "2")
    report = json.load(open(run / "training.json"))
    assert report["perturbation_effects"]["pert"]["singles_seen"] == P
    assert report["perturbation_prior"]["fitted"] is True
    routes = {}
    for target in ("G1", "G0+G2", "G30"):  # seen, an unseen double of seen singles, unseen (the prior)
        out = tmp_path / f"{target.replace('+', '_')}.h5ad"
        assert main(["predict", "--model", str(run), "--data", str(root / "control.h5ad"), "--target",
                     f"pert={target}", "--steps", "3", "--out", str(out)]) == 0
        pred = ad.read_h5ad(out)
        assert pred.shape == (40, G) and np.isfinite(pred.X).all()
        routes[target] = set(pred.obs["scidiff_route"])
        assert np.isfinite(pred.obs["scidiff_confidence"]).all()
    assert routes["G1"] == {"seen"} and routes["G30"] == {"prior"}


def test_train_streaming_with_a_dose_and_time(screen, tmp_path):
    from scidiff.cli import main
    from scidiff.training.checkpoint import load_model

    root, adata = screen
    run = _train_streaming(root, tmp_path, "--epochs", "1", "--dose-key", "dose", "--continuous-keys", "day")
    model = load_model(run)
    ref = setup_anndata(adata, **SETUP, dose_key="dose", continuous_keys=["day"]).spec
    assert model.data_spec.dose_key == "dose" and model.data_spec.continuous_knots == ref.continuous_knots
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(root / "control.h5ad"), "--target",
                 "pert=G1,dose=10,day=2", "--steps", "3", "--out", str(out)]) == 0
    assert np.isfinite(ad.read_h5ad(out).X).all()


def test_papalexi_streamed_is_set_up_as_in_memory():
    """The real CRISPR screen (Papalexi et al. 2021, 20,729 cells, 25 knockouts, 2 replicates):
    the streamed effects and prior equal the in-memory ones."""
    from shared_data import shared_file

    path = shared_file("papalexi21_thp1_sceptre_lowmoi.h5ad")
    setup = dict(n_top_genes=None, condition_keys=["perturbation", "bio_rep"], perturbation_keys=["perturbation"],
                 control_labels=["control"])
    adata = ad.read_h5ad(path)
    cells = setup_anndata(adata, **setup)
    ref = ScIDiffModel.from_data(cells, **MODEL)
    streamed = setup_streaming(path, **setup)
    got = ScIDiffModel.from_streamed(streamed, **MODEL)
    for name in ("single", "seen", "seen_counts", "seen_change"):
        torch.testing.assert_close(getattr(got.effects.of("perturbation"), name),
                                   getattr(ref.effects.of("perturbation"), name), rtol=0, atol=1e-6)
    assert got.effects_report["perturbation"]["singles_seen"] == 25
    prior_ref, prior_got = PerturbationPrior.from_cells(cells, adata), PerturbationPrior.from_streamed(streamed)
    assert prior_got.report()["perturbation"]["cv_sse"] == pytest.approx(prior_ref.report()["perturbation"]["cv_sse"],
                                                                         rel=1e-6)
    unseen = next(g for g in cells.spec.gene_names if g not in cells.spec.categorical["perturbation"])
    (ea, ca), (eb, cb) = prior_ref.effect("perturbation", unseen), prior_got.effect("perturbation", unseen)
    np.testing.assert_allclose(np.asarray(eb), np.asarray(ea), rtol=0, atol=1e-6)
    assert cb == pytest.approx(ca, abs=1e-6)


def test_hvg_cells_sets_the_cells_the_streamed_genes_are_chosen_on(screen):
    """``data.hvg_cells`` (``--hvg-cells``): on all the file's cells the streamed set-up keeps the
    in-memory genes; a value below 1 is refused by the config."""
    from scidiff.config import load_config
    from scidiff.tasks.train import _streamed_model

    root, adata = screen
    config = load_config(None, {"model": {"gene_dim": 15, "hidden_dim": 16, "num_layers": 1, "latent_dim": 4},
                                "data": {"hvg_cells": N, "perturbation_keys": ["pert"], "control_labels": ["ctrl"]}})
    cells, _ = _streamed_model(str(root / "screen.h5ad"), config, ["pert", "line"], progress=False)
    ref = setup_anndata(adata, **{**SETUP, "n_top_genes": 15})
    assert list(cells.spec.gene_names) == list(ref.spec.gene_names)
    with pytest.raises(ValueError, match="hvg_cells must be >= 1"):
        load_config(None, {"data": {"hvg_cells": 0}})
