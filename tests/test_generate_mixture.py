"""Generation without a condition from a model trained on covariates: cells like the training
data, its groups (combinations of covariate values) in their training proportions and labelled,
the same from ``generate``, ``generate_to_file`` and the sharded writer; the groups are counted
alike in memory and streamed."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scidiff.data.spec as spec_module
from scidiff.data import setup_anndata, setup_streaming
from scidiff.models import ScIDiffModel
from scidiff.tasks import generate as generation

SIZES = {("a", "ctrl"): 30, ("a", "stim"): 12, ("b", "ctrl"): 9, ("b", "stim"): 21, ("c", "stim"): 10}


def _cells() -> ad.AnnData:
    rng = np.random.default_rng(0)
    labels = [key for key, n in SIZES.items() for _ in range(n)]
    counts = rng.poisson(3.0, (len(labels), 20)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": [t for t, _ in labels], "condition": [c for _, c in labels]},
                       index=[f"cell{i}" for i in range(len(labels))])
    obs["dose"] = np.where(obs["condition"] == "stim", 1.0, 0.0)
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))


@pytest.fixture(scope="module")
def model():
    data = setup_anndata(_cells(), condition_keys=["cell_type", "condition"])
    torch.manual_seed(0)
    return ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=50).eval()


def _group_counts(obs: pd.DataFrame) -> dict:
    return {k: int(v) for k, v in obs.groupby(["cell_type", "condition"], observed=True).size().items()}


def test_the_training_groups_are_counted_with_their_cells(model, tmp_path):
    groups = model.data_spec.training_groups
    assert groups["keys"] == ["cell_type", "condition"]
    assert dict(zip(map(tuple, groups["values"]), groups["cells"])) == SIZES
    path = tmp_path / "cells.h5ad"
    _cells().write_h5ad(path)
    streamed = setup_streaming(str(path), condition_keys=["cell_type", "condition"], batch_size=16)
    assert streamed.spec.training_groups == groups
    with_numbers = setup_anndata(_cells(), condition_keys=["condition"], perturbation_keys=["condition"],
                                 control_labels=["ctrl"], continuous_keys=["dose"])
    assert with_numbers.spec.training_groups == {"keys": ["condition", "dose"], "values": [["ctrl", 0.0],
                                                                                           ["stim", 1.0]],
                                                 "cells": [39, 43]}


def test_too_many_groups_are_not_groups(monkeypatch):
    monkeypatch.setattr(spec_module, "MAX_GROUPS", 4)  # 5 combinations here
    assert setup_anndata(_cells(), condition_keys=["cell_type", "condition"]).spec.training_groups == {}


@pytest.mark.parametrize("n", [1, 7, 80, 1001])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mixture_shares_n_cells_by_the_training_proportions(model, n, seed):
    mixture = model.data_spec.training_mixture(n, seed=seed)
    cells = {tuple(c.values()): k for c, k in mixture}
    assert sum(cells.values()) == n and all(k > 0 for k in cells.values())
    total = sum(SIZES.values())
    for group in SIZES:  # the floor or the ceiling of each share (a group without cells: share < 1)
        assert abs(cells.get(group, 0) - n * SIZES[group] / total) < 1
    assert model.data_spec.training_mixture(n, seed=seed) == mixture


def test_fewer_cells_than_groups_follow_the_proportions_over_seeds():
    """Systematic rounding is right in expectation: 3 cells over shares 5:3:1:1 give 1.5, 0.9,
    0.3 and 0.3 cells on average over seeds (largest remainders would give 2, 1, 0, 0 every time)."""
    from scidiff.groups import share_out

    draws = np.stack([share_out(3, [5, 3, 1, 1], seed) for seed in range(4000)])
    assert (draws.sum(1) == 3).all() and set(np.unique(draws[:, 0])) == {1, 2}
    np.testing.assert_allclose(draws.mean(0), [1.5, 0.9, 0.3, 0.3], atol=0.03)
    np.testing.assert_array_equal(share_out(60, [2, 1, 3]), [20, 10, 30])  # whole shares: exact


def test_generate_without_a_condition_draws_each_training_group_labelled(model):
    out = generation.generate(model, 80, steps=3, seed=4, progress=False)
    shares = model.data_spec.training_mixture(80, seed=4)
    assert out.shape == (80, 20) and _group_counts(out.obs) == {tuple(c.values()): k for c, k in shares}
    # one stream: the cells model.sample draws under each cell's own labels, groups in turn
    labels = {key: [c[key] for c, k in shares for _ in range(k)] for key in ("cell_type", "condition")}
    np.testing.assert_array_equal(out.X, model.sample(80, labels, steps=3, seed=4).numpy())
    assert [list(out.obs[k]) for k in labels] == list(labels.values())
    # in chunks, from one generator, as the engine draws them
    chunked = generation.generate(model, 80, steps=3, seed=4, chunk_size=7, progress=False)
    gen = torch.Generator().manual_seed(4)
    (mixture,) = generation.plan_groups(model, 80, seed=4)
    np.testing.assert_array_equal(chunked.X, np.concatenate(
        [model.sample(min(7, 80 - a), mixture.labels(a, min(a + 7, 80)), steps=3, generator=gen).numpy()
         for a in range(0, 80, 7)]))
    # the condition-free distribution stays model.sample's
    assert model.sample(5, {}, steps=3, seed=0).shape == (5, 20)


def test_a_mixture_is_cut_into_parts_with_their_labels():
    mixture = generation.Mixture([{"t": "a"}, {"t": "b"}, {"t": "c"}], [2, 3, 1])
    assert len(mixture) == 6 and mixture.labels(1, 5) == {"t": ["a", "b", "b", "b"]}
    part = mixture.part(4, 6)
    assert part.conditions == [{"t": "b"}, {"t": "c"}] and part.cells.tolist() == [1, 1]
    assert len(mixture.part(2, 2)) == 0


def test_a_partial_condition_draws_the_other_keys_among_the_groups_that_carry_it(model):
    stim = {g: k for g, k in SIZES.items() if g[1] == "stim"}  # 12, 21, 10 cells of a, b, c
    partial = generation.generate(model, 43, {"condition": "stim"}, steps=3, seed=4, progress=False)
    assert _group_counts(partial.obs) == stim
    control_b = generation.generate(model, 5, {"cell_type": "b", "condition": "ctrl"}, steps=3, seed=4,
                                    progress=False)  # every key given: that one group
    assert _group_counts(control_b.obs) == {("b", "ctrl"): 5}
    one, two = generation.plan_groups(model, 10, [{"cell_type": "c"}, {"condition": "ctrl"}])
    assert (len(one), len(two)) == (10, 10) and list(zip(one.conditions, one.cells.tolist())) == [
        ({"cell_type": "c", "condition": "stim"}, 10)]
    assert [tuple(c.values()) for c in two.conditions] == [("a", "ctrl"), ("b", "ctrl")]
    assert two.cells.tolist() in ([8, 2], [7, 3])  # 10 x 30/39 = 7.7 and 10 x 9/39 = 2.3
    # group i's shares are rounded from seed + i, as its cells are drawn (a one-group run with that seed)
    groups = generation.plan_groups(model, 10, [{"condition": "ctrl"}] * 3, seed=1)
    assert [g.cells.tolist() for g in groups] == [
        generation.plan_groups(model, 10, [{"condition": "ctrl"}], seed=s)[0].cells.tolist() for s in (1, 2, 3)]
    assert [g.cells.tolist() for g in groups] == [[8, 2], [7, 3], [7, 3]]
    # every key given: drawn as asked, even a combination never trained on
    assert model.data_spec.training_mixture(4, {"cell_type": "c", "condition": "ctrl"}) == []


def test_a_label_per_cell_draws_what_model_sample_draws(model):
    """One label per cell, as ``model.sample`` takes them: the cells model.sample draws, each
    labelled in ``obs``; a list of the wrong length, or an unknown label, is refused by name."""
    types = ["a", "b", "b", "c", "a"]
    labels = {"cell_type": types, "condition": "ctrl"}
    out = generation.generate(model, 5, labels, steps=3, seed=2, progress=False)
    np.testing.assert_array_equal(out.X, model.sample(5, labels, steps=3, seed=2).numpy())
    assert list(out.obs["cell_type"]) == types and set(out.obs["condition"]) == {"ctrl"}
    (runs,) = generation.plan_groups(model, 5, [labels])
    assert runs.cells.tolist() == [1, 2, 1, 1]
    with pytest.raises(ValueError, match="'cell_type' has 4 values for a batch of 5"):
        generation.generate(model, 5, {"cell_type": types[:4]}, steps=3, progress=False)
    with pytest.raises(ValueError, match="unknown value 'z' for condition 'cell_type'"):
        generation.generate(model, 5, {"cell_type": types[:4] + ["z"]}, steps=3, progress=False)


def test_the_file_writers_hold_the_same_cells(model, tmp_path):
    ref = generation.generate(model, 80, steps=3, seed=4, chunk_size=7, progress=False)
    generation.generate_to_file(model, 80, tmp_path / "one.h5ad", steps=3, seed=4, chunk_size=7, progress=False)
    one = ad.read_h5ad(tmp_path / "one.h5ad")
    np.testing.assert_array_equal(one.X, ref.X)
    assert list(one.obs_names) == list(ref.obs_names) and ref.obs_names.is_unique
    assert _group_counts(one.obs) == _group_counts(ref.obs)
    for rank in (1, 0):  # no process group: rank 0 last, as the barrier would order it
        manifest = generation.generate_sharded(model, 80, tmp_path / "shards", rank=rank, world_size=2, steps=3,
                                               seed=4, progress=False, merge=rank == 0)
    merged = ad.read_h5ad(tmp_path / "shards" / "generated.h5ad")
    assert manifest["cells"] == 80 and sum(s["cells"] for s in manifest["shards"]) == 80
    assert manifest["cells_per_group"] == 80 and sum(manifest["group_cells"]) == 80 and len(manifest["groups"]) == 5
    assert merged.obs_names.is_unique and _group_counts(merged.obs) == _group_counts(ref.obs)


def test_the_engine_draws_a_mixture_as_its_own_stream(model, tmp_path):
    from scidiff.engine import SamplingEngine

    engine = SamplingEngine(model, "ddim", 3, chunk_size=16)
    (mixture,) = generation.plan_groups(model, 40, seed=2)
    generation.generate_to_file(engine, 40, tmp_path / "e.h5ad", seed=2, progress=False)
    out = ad.read_h5ad(tmp_path / "e.h5ad")
    assert out.obs["cell_type"].tolist() == mixture.labels(0, 40)["cell_type"]
    # chunk by chunk from one generator is the engine's own stream over every cell's labels
    np.testing.assert_array_equal(out.X, engine.sample(40, mixture.labels(0, 40), seed=2).numpy())
