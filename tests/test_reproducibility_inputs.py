""""My results don't reproduce": a first-time user re-runs yesterday's call with the seed written
the way their code holds it (a numpy integer from ``np.arange``, a loop variable) or a seed no
generator can take (negative, ``None``, text), and expects the same cells or an error naming the
seed, from ``model.sample``, the sampling engine, ``scidiff.generate(..., engine=True)`` and
``scidiff.design``."""
import copy

import anndata as ad
import numpy as np
import pytest
import torch

import scidiff
from scidiff.data import setup_anndata
from scidiff.engine import SamplingEngine
from scidiff.models import ScIDiffModel
from test_generate_mixture import _cells  # the same five groups
from test_predict_screen import single_thread

CONDITION = {"cell_type": "a", "condition": "stim"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model():
    cells = setup_anndata(_cells(), condition_keys=["cell_type", "condition"])
    torch.manual_seed(0)
    return ScIDiffModel.from_data(cells, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=50).eval()


def _x(adata) -> np.ndarray:
    return adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)


def test_a_numpy_seed_gives_the_cells_of_the_same_int_seed(model):
    # torch's manual_seed refused np.int64 ("an integer is required"), so a loop over np.arange failed
    for seed in np.arange(2, 4):
        want = model.sample(6, CONDITION, seed=int(seed), steps=3)
        torch.testing.assert_close(model.sample(6, CONDITION, seed=seed, steps=3), want, rtol=0, atol=0)
        engine = SamplingEngine(model, "dpmpp_2m", 3)
        torch.testing.assert_close(engine.sample(6, CONDITION, seed=seed), engine.sample(6, CONDITION, seed=int(seed)),
                                   rtol=0, atol=0)
        kw = dict(steps=3, progress=False, engine=True)
        np.testing.assert_array_equal(_x(scidiff.generate(model, 6, CONDITION, seed=seed, **kw)),
                                      _x(scidiff.generate(model, 6, CONDITION, seed=int(seed), **kw)))


@pytest.mark.parametrize("seed", [-1, "3", True, 2.5, 2**64])
def test_a_seed_no_generator_takes_is_refused_by_name(model, seed):
    # -1 was taken and wrapped to 2**64 - 1 (the cells of seed 2**32 - 1 on the CPU); text and bools
    # failed inside torch ("manual_seed expected a long, but got str")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got"):
        model.sample(4, CONDITION, seed=seed, steps=3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got"):
        SamplingEngine(model, "dpmpp_2m", 3).sample(4, CONDITION, seed=seed)


def test_design_refuses_a_seed_outside_what_its_generators_take_by_name(model):
    # -1 failed in numpy ("expected non-negative integer"), None in int(); 2**32 + 1 drew torch's
    # noise of seed 1 but numpy's of 2**32 + 1 (scidiff design --seed refuses it)
    for seed in (-1, None, "1", 2**32 + 1):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got"):
            scidiff.design(model, "g0>=1", 4, steps=3, seed=seed, retries=0)
    a = scidiff.design(model, "g0>=1", 4, steps=3, seed=np.int64(1), retries=0)
    b = scidiff.design(model, "g0>=1", 4, steps=3, seed=1, retries=0)
    np.testing.assert_array_equal(_x(a), _x(b))
    assert a.uns["scidiff_design"]["settings"]["seed"] == 1


def test_a_fresh_seed_replays_from_the_cli_and_generate_refuses_the_seeds_that_alias(model, tmp_path):
    """generate(seed=None) recorded a 63-bit seed (7396878550318969210) that scidiff sample --seed
    refuses; generate(seed=2**32 + 3) gave seed 3's cells recorded as 4294967299, and seed=-1 those
    of 2**32 - 1 recorded as -1. Now a fresh seed lies in [0, 2**32) and replays from the CLI, and
    generate, generate_to_file and generate_sharded refuse the others by name."""
    from scidiff.cli import main
    from scidiff.tasks.generate import generate_to_file
    from scidiff.training import save_model

    fresh = scidiff.generate(model, 6, CONDITION, seed=None, steps=3, progress=False)
    seed = fresh.uns["scidiff"]["seed"]
    assert 0 <= seed < 2**32
    run, out = tmp_path / "run", tmp_path / "again.h5ad"
    save_model(model, run)
    assert main(["sample", "--model", str(run), "-n", "6", "--condition", "cell_type=a,condition=stim",
                 "--steps", "3", "--seed", str(seed), "--out", str(out)]) == 0
    np.testing.assert_array_equal(_x(ad.read_h5ad(out)), _x(fresh))
    for bad in (-1, 2**32 + 3):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got"):
            scidiff.generate(model, 6, CONDITION, seed=bad, steps=3, progress=False)
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got"):
            generate_to_file(model, 6, tmp_path / "no.h5ad", [CONDITION], seed=bad, steps=3, progress=False)


def test_a_store_shared_with_another_model_is_not_read(model):
    # the store kept the first model's inversions keyed by the cells alone: the same call with a
    # model trained further (its weights changed in place) returned predictions built on them
    control = _cells()
    control = control[control.obs["condition"].to_numpy() == "ctrl"].copy()
    kw = dict(steps=3, progress=False, observed=False)
    other = copy.deepcopy(model)
    store = {}
    scidiff.perturb(model, control, {"condition": "stim"}, store=store, **kw)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    want = scidiff.perturb(other, control, {"condition": "stim"}, **kw).X
    np.testing.assert_array_equal(scidiff.perturb(other, control, {"condition": "stim"}, store=store, **kw).X, want)
    assert len(store) == 2  # one inversion per model
    np.testing.assert_array_equal(scidiff.perturb(other, control, {"condition": "stim"}, store=store, **kw).X, want)
    assert len(store) == 2  # the second model's read back


def test_the_training_record_says_the_seed(tmp_path):
    """training.json (and the checkpoint's record of it) did not say the seed a run was trained
    with; config.yaml did, for runs of scidiff train only."""
    import json

    from scidiff.training import ScIDiffTrainer
    from scidiff.training.checkpoint import read_checkpoint

    cells = setup_anndata(_cells(), condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(cells, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=20)
    ScIDiffTrainer(model, cells.loader(64, seed=5), device="cpu", progress=False, early_stopping_patience=None,
                   seed=5, checkpoint_dir=str(tmp_path)).train(1)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["seed"] == 5 and read_checkpoint(tmp_path)["training"]["seed"] == 5
