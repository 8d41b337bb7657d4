import pytest
import torch

import scidiff
from scidiff.models import ScIDiffModel
from scidiff.training import (EMA, BiologicalConstraints, EarlyBestWarning, ScIDiffTrainer, denoising_loss,
                              nonnegativity_loss, pathway_consistency_loss, read_checkpoint, sparsity_loss)


def test_nonnegativity_loss_closed_form():
    x = torch.tensor([[-1.0, 2.0], [0.5, -3.0]])
    assert float(nonnegativity_loss(x)) == pytest.approx((1 + 9) / 4)
    assert float(nonnegativity_loss(x.clamp_min(0))) == 0.0


def test_sparsity_loss_only_counts_observed_zeros():
    pred = torch.tensor([[0.5, 2.0], [-0.25, 1.0]])
    obs = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    assert float(sparsity_loss(pred, obs)) == pytest.approx((0.5 + 0.25) / 2)


def test_pathway_consistency_closed_form():
    pred = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 5.0]])
    obs = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 1.0]])
    sets = [torch.tensor([0, 1]), torch.tensor([2])]
    # set 1: cell means (2 vs 1, 2 vs 2) -> ((1)^2 + 0)/2 = 0.5 ; set 2: (0, 16) -> 8
    assert float(pathway_consistency_loss(pred, obs, sets)) == pytest.approx((0.5 + 8) / 2)


def test_constraints_are_off_by_default_and_resolve_gene_names():
    c = BiologicalConstraints()
    assert not c.active and c(torch.zeros(2, 3), torch.zeros(2, 3), []) == {}
    c = BiologicalConstraints(pathway=1.0, gene_sets={"ifn": ["ISG15", "IFI6"]})
    idx = c.resolve(["CD3D", "IFI6", "ISG15"], "cpu")
    assert idx[0].tolist() == [2, 1]
    with pytest.raises(KeyError, match="gene 'MX1' of gene set 'ifn'"):
        BiologicalConstraints(pathway=1.0, gene_sets={"ifn": ["MX1"]}).resolve(["CD3D"], "cpu")


def test_denoising_loss_of_the_initial_model_is_closed_form():
    """At init the model is the optimal linear denoiser for N(0, sd^2) data; for data of that
    distribution the EDM-weighted loss is 1 in expectation at every timestep."""
    torch.manual_seed(0)
    model = ScIDiffModel(gene_dim=64, hidden_dim=16, num_layers=1, sigma_data=0.8)
    x0 = 0.8 * torch.randn(4096, 64)
    loss, x0_hat = denoising_loss(model, x0, None, torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(1.0, rel=0.02)
    assert x0_hat.shape == x0.shape


def test_ema_closed_form():
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(lin.weight, 0.0)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # warm-up decay min(0.5, 2/11) = 2/11
    assert float(ema.shadow["weight"]) == pytest.approx(1 - 2 / 11)
    ema.update(lin)  # min(0.5, 3/12) = 0.25
    assert float(ema.shadow["weight"]) == pytest.approx(1 - (2 / 11) * 0.25)


def test_trainer_learns_real_data_and_writes_checkpoints(tmp_path, kang_small):
    torch.manual_seed(0)
    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type", "condition"])
    train, val = data.split(0.2, seed=0)
    model = ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=200, latent_dim=16)
    trainer = ScIDiffTrainer(model, train.loader(64), val.loader(64, shuffle=False), device="cpu",
                             learning_rate=2e-3, warmup_steps=10, checkpoint_dir=tmp_path, checkpoint_every=5,
                             early_stopping_patience=None, progress=False)
    before = trainer.validation_loss()
    history = trainer.train(40)
    assert len(history) == 40 and history[-1]["epoch"] == 40
    assert trainer.best_val < 0.93 * before
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "model.pt").exists()
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")
    # without early stopping the model holds the last EMA weights, and the saved model is that model
    again = scidiff.load_model(tmp_path)
    torch.testing.assert_close(again.sample(4, {"cell_type": "B"}, steps=5, seed=0),
                               model.sample(4, {"cell_type": "B"}, steps=5, seed=0))


def test_constraint_terms_are_added_when_on(kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=50)
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1)
    gene_sets = {"first": data.spec.gene_names[:5]}
    trainer = ScIDiffTrainer(model, data.loader(100), device="cpu", progress=False,
                             constraints=BiologicalConstraints(nonnegativity=1.0, sparsity=0.5, pathway=2.0,
                                                               gene_sets=gene_sets))
    terms = trainer.training_step(next(iter(data.loader(100))), 10)
    assert set(terms) == {"denoising", "nonnegativity", "sparsity", "pathway", "loss"}
    total = sum(float(terms[k]) for k in ("denoising", "nonnegativity", "sparsity", "pathway"))
    assert float(terms["loss"]) == pytest.approx(total, rel=1e-5)
    plain = ScIDiffTrainer(model, data.loader(100), device="cpu", progress=False)
    assert set(plain.training_step(next(iter(data.loader(100))), 10)) == {"denoising", "loss"}


def test_early_stopping_restores_best_weights(kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=30)
    train, val = data.split(0.3)
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1)
    # a learning rate this large makes validation worse after the first epochs
    trainer = ScIDiffTrainer(model, train.loader(32), val.loader(64, shuffle=False), device="cpu", learning_rate=3.0,
                             warmup_steps=1, early_stopping_patience=2, progress=False, ema_decay=0.0)
    history = trainer.train(30)
    assert len(history) < 30
    best = min(h["val_loss"] for h in history)
    assert trainer.best_val == best
    assert trainer.validation_loss(state_dict=model.state_dict()) == pytest.approx(best, rel=1e-5)


def _small_data_run(kang_small, tmp_path, patience):
    """The tiny CLI run's setting (270 training cells, 14 labels): validation loss rises from
    epoch 1 on. Returns the trainer after 6 epochs (fewer with early stopping)."""
    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type", "condition"])
    train, val = data.split(0.1, seed=0)
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=100, conditioning_dim=16,
                                   latent_dim=16)
    trainer = ScIDiffTrainer(model, train.loader(64), val.loader(64, shuffle=False), device="cpu", warmup_steps=2,
                             early_stopping_patience=patience, checkpoint_dir=tmp_path, checkpoint_every=0,
                             progress=False)
    trainer.train(6)
    return trainer


def test_without_early_stopping_the_last_ema_weights_are_kept(kang_small, tmp_path):
    import json
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", EarlyBestWarning)  # nothing to warn about: no best weights restored
        trainer = _small_data_run(kang_small, tmp_path, patience=None)
    vals = [h["val_loss"] for h in trainer.history]
    assert len(vals) == 6 and min(vals) == vals[0] < vals[-1]  # the case where best and last differ
    last = trainer.ema.state_dict_for(trainer.model)
    held, saved = trainer.model.state_dict(), scidiff.load_model(tmp_path).state_dict()
    assert any(not torch.equal(trainer.best_state[k], last[k]) for k in last)
    for k in last:
        assert torch.equal(held[k], last[k]) and torch.equal(saved[k], last[k]), k
    kept = json.loads((tmp_path / "training.json").read_text())
    assert kept["weights"] == "last" and kept["epoch"] == 6 and kept["best_epoch"] == 1 and "warning" not in kept
    assert read_checkpoint(tmp_path)["training"] == kept


def test_early_stopping_keeps_the_best_weights_and_says_when_they_are_early(kang_small, tmp_path):
    import json

    with pytest.warns(EarlyBestWarning, match=r"lowest at epoch 1 of 3 \(1\.3\d+; 1\.3\d+ at epoch 3\)") as caught:
        trainer = _small_data_run(kang_small, tmp_path, patience=2)
    assert len(caught) == 1
    assert [h["epoch"] for h in trainer.history] == [1, 2, 3]
    saved = scidiff.load_model(tmp_path).state_dict()
    for k, v in trainer.best_state.items():
        assert torch.equal(trainer.model.state_dict()[k], v) and torch.equal(saved[k], v), k
    kept = json.loads((tmp_path / "training.json").read_text())
    assert (kept["weights"], kept["epoch"], kept["epochs_trained"]) == ("best", 1, 3)
    assert kept["warning"] == str(caught[0].message) and "epoch 1" in kept["warning"]


def test_late_best_weights_raise_no_warning():
    trainer = ScIDiffTrainer(ScIDiffModel(gene_dim=4, hidden_dim=8, num_layers=1), [torch.zeros(2, 4)],
                             early_stopping_patience=3, progress=False)
    trainer.best_state, trainer.epoch = {}, 10
    trainer.history = [{"epoch": e, "val_loss": 1.0 / e} for e in range(1, 8)] + [
        {"epoch": e, "val_loss": 1.0} for e in (8, 9, 10)]
    kept = trainer._weights_to_keep()
    assert (kept["weights"], kept["epoch"]) == ("best", 7) and "warning" not in kept
    trainer.history = [{"epoch": e, "val_loss": 1.0 / e if e <= 5 else 1.0} for e in range(1, 11)]
    with pytest.warns(EarlyBestWarning, match="epoch 5 of 10"):
        assert trainer._weights_to_keep()["epoch"] == 5  # half way: reported


def test_cuda_request_falls_back_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    model = ScIDiffModel(gene_dim=4, hidden_dim=8, num_layers=1)
    with pytest.warns(UserWarning, match="CUDA was requested"):
        trainer = ScIDiffTrainer(model, [torch.zeros(2, 4)], device="cuda", progress=False)
    assert trainer.device.type == "cpu"


def test_default_epochs_follow_the_number_of_cells():
    """Without --epochs or training.num_epochs, scvi-tools' rule: min(400, round(20000 / cells x 400))."""
    from scidiff.config import load_config
    from scidiff.tasks.train import default_epochs

    assert load_config().training.num_epochs is None
    assert [default_epochs(n) for n in (1, 1_580, 20_000, 40_000, 1_000_000, 10**10)] == [400, 400, 400, 200, 8, 1]


def _training_payload(step: int) -> dict:
    from scidiff.training.checkpoint import FORMAT, FORMAT_VERSION

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "trainer": {}, "live_state_dict": {},
            "optimizer": {}, "ema": {}, "step": step, "epoch": 0}


@pytest.mark.parametrize("keep", [1, 3])
def test_a_new_run_in_an_old_run_folder_resumes_from_its_own_checkpoint(tmp_path, keep):
    """A run trained into the folder of an earlier one (with kept step files of later steps):
    its own checkpoints are neither pruned as the oldest nor shadowed on resume by the old run's."""
    from scidiff.training.checkpoint import list_checkpoints, read_training_checkpoint, write_training_checkpoint

    for step in (18, 27, 36):  # the earlier run, --keep-checkpoints 3
        write_training_checkpoint(_training_payload(step), tmp_path, step, keep=3)
    for step in (9, 12):  # the new run
        write_training_checkpoint(_training_payload(step), tmp_path, step, keep=keep)
    assert read_training_checkpoint(tmp_path)["step"] == 12
    assert [s for s, _ in list_checkpoints(tmp_path)] == ([9, 12] if keep == 3 else [])
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 12


def test_a_diverged_training_stops_with_its_last_finite_checkpoint(tmp_path, kang_small):
    """A learning rate that sends the weights out of the finite range: training stops at the
    epoch whose loss is NaN with an error that says so, history.csv shows that epoch, and the
    checkpoint and model.pt hold the weights of the last finite epoch (it trained on to the end
    and saved a model of NaNs)."""
    from scidiff.training.checkpoint import read_training_checkpoint
    from scidiff.training.trainer import DivergedError

    torch.manual_seed(0)
    data = scidiff.setup_anndata(kang_small, n_top_genes=50, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=50, latent_dim=None)
    trainer = ScIDiffTrainer(model, data.loader(64), device="cpu", learning_rate=2e-3, warmup_steps=0,
                             checkpoint_dir=tmp_path, checkpoint_every=1, early_stopping_patience=None,
                             progress=False, gradient_clip_val=0)
    trainer.train(1)
    good = read_training_checkpoint(tmp_path)["step"]
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")
    trainer.learning_rate = float("inf")
    with pytest.raises(DivergedError, match="training diverged: the training loss is nan at epoch 2"):
        trainer.train(3)
    assert (tmp_path / "history.csv").read_text().splitlines()[-1].startswith("2,")
    assert read_training_checkpoint(tmp_path)["step"] == good
    assert all(bool(torch.isfinite(p).all()) for p in scidiff.load_model(tmp_path).parameters())  # epoch 1's
