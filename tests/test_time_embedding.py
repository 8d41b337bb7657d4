"""Numeric covariates (time) embedded piecewise-linearly between the values training measured:
the hat-function basis in closed form, the knots kept in the data spec, the condition at an
unmeasured day as the straight mix of its neighbours', checkpoints saved before the knots, and a
time course with a known linear truth predicted between its measured days."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.data.spec import MAX_KNOTS, DataSpec, knots_of
from scidiff.models.conditioning import PiecewiseLinearEmbedding
from scidiff.tasks.perturb import perturb
from scidiff.training.checkpoint import load_model, save_model

G = 12


def test_the_hat_basis_is_each_knot_at_its_value_and_the_straight_mix_between():
    emb = PiecewiseLinearEmbedding([7.0, 0.0, 2.0, 2.0], dim=3)  # unsorted, a repeat
    np.testing.assert_array_equal(emb.knots.numpy(), [0.0, 2.0, 7.0])
    v = torch.tensor([-3.0, 0.0, 1.0, 2.0, 4.0, 7.0, 10.0])
    expected = torch.tensor([[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.6, 0.4], [0, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(emb.basis(v), expected)
    torch.testing.assert_close(emb(v), expected @ emb.table)
    one = PiecewiseLinearEmbedding([5.0], dim=2)
    torch.testing.assert_close(one(torch.tensor([1.0, 5.0, 9.0])), one.table.expand(3, 2))


def test_knots_are_the_distinct_measured_values_or_quantiles_of_many():
    assert knots_of([2.0, 0.0, 7.0, 2.0, np.nan, 0.0]) == [0.0, 2.0, 7.0]
    many = np.random.default_rng(0).uniform(0, 10, 5000)
    k = knots_of(many)
    assert len(k) == MAX_KNOTS and k[0] == many.min() and k[-1] == many.max()
    np.testing.assert_allclose(k, np.quantile(many, np.linspace(0, 1, MAX_KNOTS)))


def _time_course(seed=0, n=150, days=(0.0, 2.0, 7.0)):
    """Cells whose first half of genes rise linearly in time (0.25 a day) around a fixed profile."""
    rng = np.random.default_rng(seed)
    slope = np.where(np.arange(G) < G // 2, 0.25, 0.0)
    x = np.vstack([2.0 + slope * d + 0.15 * rng.normal(size=(n, G)) for d in days]).astype(np.float32)
    obs = pd.DataFrame({"day_num": np.repeat(days, n)}, index=[f"c{i}" for i in range(len(x))])
    adata = ad.AnnData(X=np.maximum(x, 0), obs=obs)
    adata.var_names = [f"g{i}" for i in range(G)]
    return adata, slope


def test_an_unmeasured_day_is_conditioned_on_the_straight_mix_of_its_neighbours():
    adata, _ = _time_course()
    data = scidiff.setup_anndata(adata, n_top_genes=None, continuous_keys=["day_num"], scaling="none")
    assert data.spec.continuous_knots == {"day_num": [0.0, 2.0, 7.0]}
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=20)
    enc = model.condition_encoder

    def at(day):
        return enc({"day_num": torch.tensor([day])}, 1, "cpu")

    torch.testing.assert_close(at(4.0), 0.6 * at(2.0) + 0.4 * at(7.0))
    torch.testing.assert_close(at(9.0), at(7.0))  # beyond the last measured day: its embedding


def test_a_checkpoint_saved_before_the_knots_keeps_its_network_of_time(tmp_path):
    adata, _ = _time_course()
    data = scidiff.setup_anndata(adata, n_top_genes=None, continuous_keys=["day_num"], scaling="none")
    old = data.spec.to_dict()
    old.pop("continuous_knots")  # what an older checkpoint's spec holds
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel(G, hidden_dim=16, num_layers=1, num_timesteps=20, data_spec=DataSpec.from_dict(old))
    assert isinstance(model.condition_encoder.numeric["day_num"], torch.nn.Sequential)
    path = save_model(model, tmp_path / "old.pt")
    back = load_model(path)
    assert isinstance(back.condition_encoder.numeric["day_num"], torch.nn.Sequential)
    cond = {"day_num": torch.tensor([0.0, 3.0, 7.0])}
    torch.testing.assert_close(back.condition_encoder(cond, 3, "cpu"), model.condition_encoder(cond, 3, "cpu"))
    fresh = scidiff.ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=20)
    again = load_model(save_model(fresh, tmp_path / "new.pt"))
    torch.testing.assert_close(again.condition_encoder(cond, 3, "cpu"), fresh.condition_encoder(cond, 3, "cpu"))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_day_between_measured_days_is_predicted_between_them(seed):
    """Genes rising 0.25 a day, measured at days 0, 2 and 7: day 4 asked of the day-2 cells moves
    them along the measured direction, nearer the linear truth (0.5 above day 2) than either
    neighbour, and further at day 5 than at day 3."""
    adata, slope = _time_course(seed)
    torch.manual_seed(seed)
    data = scidiff.setup_anndata(adata, n_top_genes=None, continuous_keys=["day_num"], scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=100)
    scidiff.ScIDiffTrainer(model, data.loader(128, seed=seed), device="cpu", progress=False, seed=seed,
                           early_stopping_patience=None, learning_rate=2e-3, warmup_steps=20).train(60)
    day2 = adata[adata.obs["day_num"] == 2.0].copy()
    change = {d: perturb(model, day2, {"day_num": d}, steps=20, progress=False).X.mean(0) - day2.X.mean(0)
              for d in (3.0, 4.0, 5.0)}
    truth = slope * 2.0  # day 4's mean minus day 2's
    err = np.sqrt(np.mean((change[4.0] - truth) ** 2))
    assert err < 0.5 * np.sqrt(np.mean(truth ** 2))  # day 2 is 0.5 away (RMSE 0.35), day 7 0.75
    along = {d: float(c @ slope / (slope @ slope)) for d, c in change.items()}
    assert along[3.0] < along[4.0] < along[5.0]


def test_the_command_line_trains_on_a_time_course_and_predicts_an_unmeasured_day(tmp_path, capsys):
    """``scidiff train --continuous-keys day_num`` names the days it embeds between and records them
    in training.json; ``scidiff predict --target day_num=4`` writes day 4 into the cells' obs."""
    import json

    from scidiff.cli import main

    adata, _ = _time_course(n=60)
    data = tmp_path / "course.h5ad"
    adata.write_h5ad(data)
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  hidden_dim: 16\n  num_layers: 1\n  num_timesteps: 20\n  latent_dim: 4\n"
                      "training:\n  batch_size: 64\n  warmup_steps: 2\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--continuous-keys", "day_num", "--out", str(run),
                 "--config", str(config), "--epochs", "1"]) == 0
    assert "day_num: embedded piecewise linearly between 3 training values (0, 2, 7)" in capsys.readouterr().out
    assert json.loads((run / "training.json").read_text())["numeric_covariate_knots"] == {"day_num": [0.0, 2.0, 7.0]}
    day2 = tmp_path / "day2.h5ad"
    adata[adata.obs["day_num"] == 2.0].copy().write_h5ad(day2)
    out = tmp_path / "day4.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(day2), "--target", "day_num=4", "--steps", "5",
                 "--out", str(out)]) == 0
    pred = ad.read_h5ad(out)
    assert pred.n_obs == 60 and (pred.obs["day_num"] == 4.0).all()
    assert main(["train", "--data", str(data), "--continuous-keys", "nothing", "--out", str(tmp_path / "r2"),
                 "--config", str(config), "--epochs", "1"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_a_time_written_as_text_is_refused_naming_its_values_and_the_numeric_twin(tmp_path):
    """Klein's file holds the day twice: ``day`` as text (d0, d2, d7) and ``day_num`` as numbers."""
    adata, _ = _time_course(n=20)
    adata.obs["day"] = pd.Categorical([f"d{d:g}" for d in adata.obs["day_num"]])
    adata.obs["n_genes"] = np.arange(adata.n_obs)  # numeric, but not the same grouping
    with pytest.raises(ValueError, match=r"obs\['day'\] of the AnnData must be numeric and finite: 60 cells hold "
                                         r"\['d0', 'd2', 'd7'\]; obs\['day_num'\] holds the same groups as numbers"):
        scidiff.setup_anndata(adata, n_top_genes=None, continuous_keys=["day"])
    adata.write_h5ad(tmp_path / "course.h5ad")  # streamed alike
    with pytest.raises(ValueError, match=r"obs\['day'\] of '.*course\.h5ad' must be numeric and finite: 60 cells"):
        scidiff.data.setup_streaming(str(tmp_path / "course.h5ad"), n_top_genes=None, continuous_keys=["day"])
    del adata.obs["day_num"]
    with pytest.raises(ValueError, match=r"\['d0', 'd2', 'd7'\]; write its values as numbers"):
        scidiff.setup_anndata(adata, n_top_genes=None, continuous_keys=["day"])
