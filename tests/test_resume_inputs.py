"""Interrupting and resuming training as a first-time user does: Ctrl-C then ``scidiff.train(...,
resume=True)``; resuming with other data, fewer epochs, other hyper-parameters or on another device;
the messages a resumed run prints; a refused resume leaves the run's files as they were."""
import errno
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.config import load_config
from scidiff.training import ScIDiffTrainer, read_checkpoint, read_training_checkpoint
from scidiff.training import checkpoint as checkpoint_module
from scidiff.training import rng as rng_module
from scidiff.training.checkpoint import atomic_torch_save, payload_digest
from training_helpers import TRAIN_KW, synthetic_cells, tiny_model


def _trained(run, epochs=2, **kw):
    data = synthetic_cells()
    trainer = ScIDiffTrainer(tiny_model(data), data.loader(16, seed=0), checkpoint_dir=run, checkpoint_every=1,
                             **{**TRAIN_KW, **kw})
    trainer.train(epochs)
    return trainer


def _fresh(run, data=None, **kw):
    data = data or synthetic_cells()
    return ScIDiffTrainer(tiny_model(data), data.loader(16, seed=0), checkpoint_dir=run, **{**TRAIN_KW, **kw})


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _adata(n=80, genes=24, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["a", "b"], n))}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(rng.poisson(2, size=(n, genes)).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


def _config(**training):
    return load_config(overrides={"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 50,
                                            "conditioning_dim": 16, "latent_dim": 8},
                                  "training": {"num_epochs": 3, "batch_size": 16, "warmup_steps": 2,
                                               "checkpoint_every": 1, "checkpoint_every_steps": 3, **training}})


def _train(adata, out, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scidiff.train(adata, str(out), config, progress=False, condition_keys="cell_type", **kw)


def test_ctrl_c_mid_epoch_then_train_resume_writes_the_model_of_an_uninterrupted_run(tmp_path, monkeypatch):
    adata = _adata()
    _train(adata, tmp_path / "reference", _config())
    step = ScIDiffTrainer._optimizer_step

    def interrupted(self):
        step(self)
        if self.step == 7:  # mid-epoch 2 (5 steps an epoch), one step after the checkpoint of step 6
            raise KeyboardInterrupt

    monkeypatch.setattr(ScIDiffTrainer, "_optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(adata, tmp_path / "run", _config())
    monkeypatch.setattr(ScIDiffTrainer, "_optimizer_step", step)
    assert read_training_checkpoint(tmp_path / "run")["step"] == 6
    _train(adata, tmp_path / "run", _config(), resume=True)
    a, b = read_checkpoint(tmp_path / "reference" / "model.pt"), read_checkpoint(tmp_path / "run" / "model.pt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_resuming_with_other_genes_is_refused_before_loading(tmp_path):
    """Twelve other genes (same number, same labels): the checkpoint's weights were loaded and its
    model.pt written with the new genes' names."""
    _trained(tmp_path / "run")
    other = synthetic_cells()
    other.spec.gene_names = [f"other{i}" for i in range(other.spec.n_genes)]
    fresh = _fresh(tmp_path / "new", other)
    before = _weights(fresh)
    with pytest.raises(ValueError, match=r"checkpoint.pt' was built for a different gene set.*other0"):
        fresh.resume(tmp_path / "run")
    assert fresh.step == 0 and all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


def test_resuming_on_other_cells_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    """Other cells of the same genes and labels: their normalisation differs, and the run went on
    with the checkpoint's weights under the new cells' scaling."""
    _train(_adata(), tmp_path / "run", _config(num_epochs=2))
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    model = (tmp_path / "run" / "model.pt").read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint.pt' was trained on other data: its gene_offset, gene_scale"):
        _train(_adata(seed=1), tmp_path / "run", _config(num_epochs=4), resume=True)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config
    assert (tmp_path / "run" / "model.pt").read_bytes() == model


def test_a_resume_refused_when_training_plans_its_steps_leaves_the_config_as_it_was(tmp_path):
    """Another batch size is refused once training plans its steps: config.yaml had been replaced
    by the refused run's before."""
    _train(_adata(), tmp_path / "run", _config(num_epochs=2))
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="the run planned 10 steps but the loader now gives 18"):
        _train(_adata(), tmp_path / "run", _config(num_epochs=2, batch_size=8), resume=True)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config
    # an accepted resume writes the config it ran with
    _train(_adata(), tmp_path / "run", _config(num_epochs=3, learning_rate=5e-4), resume=True)
    assert load_config(tmp_path / "run" / "config.yaml").training.learning_rate == 5e-4


def test_fewer_epochs_than_already_trained_is_refused_naming_the_checkpoint(tmp_path):
    """It warned that the schedule was 'stretched' to 1 epoch, trained nothing and rewrote model.pt."""
    _trained(tmp_path / "run", epochs=3)
    model = (tmp_path / "run" / "model.pt").read_bytes()
    fresh = _fresh(tmp_path / "run")
    fresh.resume(tmp_path / "run")
    with pytest.raises(ValueError, match=r"checkpoint.pt' has trained 3 epochs .* more than the 1 asked for: "
                                         r"give the number of epochs the interrupted run was given \(3\)"):
        fresh.train(1)
    assert (tmp_path / "run" / "model.pt").read_bytes() == model


def test_a_resumed_run_says_how_many_epochs_are_done_and_left(tmp_path, capsys):
    _trained(tmp_path / "run", epochs=2)
    fresh = _fresh(tmp_path / "run", progress=True, checkpoint_every=1)
    fresh.resume(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the schedule stretched to 3 epochs
        fresh.train(3)
    assert "checkpoint.pt: 2 of 3 epochs done (step 8 of 12), 1 epoch(s) left" in capsys.readouterr().out
    done = _fresh(tmp_path / "run", progress=True)
    done.resume(tmp_path / "run")
    history = [dict(r) for r in done.history]
    done.train(3)
    assert "checkpoint.pt: 3 of 3 epochs done (step 12 of 12), all trained already: nothing left to train" in \
        capsys.readouterr().out
    assert done.step == 12 and done.history == history


def test_a_finished_run_ends_on_a_checkpoint_that_a_resume_reads(tmp_path):
    """A run checkpointing every 5 steps ended at step 12 with its newest checkpoint at step 10:
    resuming the finished run retrained steps 11-12, and resuming it with fewer epochs was
    accepted ('nothing left to train') and wrote model.pt back to the older weights."""
    data = synthetic_cells()
    run = tmp_path / "run"
    trainer = ScIDiffTrainer(tiny_model(data), data.loader(16, seed=0), checkpoint_dir=run, checkpoint_every=0,
                             checkpoint_every_steps=5, **TRAIN_KW)
    trainer.train(3)
    assert trainer.step == 12 and read_training_checkpoint(run)["step"] == 12
    done = _fresh(run, checkpoint_every=0, checkpoint_every_steps=5)
    done.resume(run)
    history = [dict(r) for r in done.history]
    done.train(3)
    assert done.step == 12 and done.history == history
    model = (run / "model.pt").read_bytes()
    fewer = _fresh(run, checkpoint_every=0, checkpoint_every_steps=5)
    fewer.resume(run)
    with pytest.raises(ValueError, match=r"has trained 3 epochs .* more than the 2 asked for"):
        fewer.train(2)
    assert (run / "model.pt").read_bytes() == model
    unsaved = ScIDiffTrainer(tiny_model(data), data.loader(16, seed=0), checkpoint_dir=tmp_path / "off",
                             checkpoint_every=0, **TRAIN_KW)
    unsaved.train(1)  # checkpointing off: none written at the end either
    assert not (tmp_path / "off" / "checkpoint.pt").exists()


def test_hyper_parameters_given_to_the_resuming_trainer_apply(tmp_path):
    """The learning rate given applied, the weight decay and EMA decay given were replaced by the
    checkpoint's without a word."""
    _trained(tmp_path / "run")
    fresh = _fresh(tmp_path / "new", weight_decay=0.25, ema_decay=0.5, learning_rate=3e-3)
    fresh.resume(tmp_path / "run")
    assert [g["weight_decay"] for g in fresh.optimizer.param_groups] == [0.25] * len(fresh.optimizer.param_groups)
    assert fresh.ema.decay == 0.5 and fresh.learning_rate == 3e-3
    assert fresh.ema.num_updates == 8  # the rest of the EMA state is the checkpoint's


def _written_on_cuda(src, dst):
    """``src`` as a CUDA run writes it: its noise generators' states are CUDA ones (16 bytes)."""
    payload = read_training_checkpoint(src)
    payload.pop("path")
    for rank in payload["trainer"]["ranks"]:
        rank["rng"]["generators"] = [torch.arange(16, dtype=torch.uint8)]
    payload["digest"] = payload_digest(payload)
    atomic_torch_save(payload, dst)
    return payload


def test_a_checkpoint_from_another_device_resumes_with_fresh_noise_streams(tmp_path):
    """A GPU run resumed on the CPU: a RuntimeError from torch ('CPUGeneratorImplState of size
    5056') after the weights, optimizer and step had been loaded."""
    _trained(tmp_path / "run")
    payload = _written_on_cuda(tmp_path / "run" / "checkpoint.pt", tmp_path / "gpu.pt")
    fresh = _fresh(tmp_path / "new")
    with pytest.warns(UserWarning, match=r"gpu.pt' was written on another kind of device than cpu.*restart from "
                                         r"the seed"):
        assert fresh.resume(tmp_path / "gpu.pt") == 8
    for k, v in payload["live_state_dict"].items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    assert torch.equal(fresh.generator.get_state(), torch.Generator().manual_seed(TRAIN_KW["seed"]).get_state())
    fresh.train(3)
    assert fresh.epoch == 3


def test_cuda_states_of_more_devices_than_this_machine_has(monkeypatch):
    """A checkpoint of a 2-GPU machine on one with 1 GPU: torch's set_rng_state_all asked for
    device 1."""
    restored = {}

    def set_rng_state(state, device="cuda"):
        if device not in (0, "cuda"):
            raise RuntimeError(f"invalid device ordinal {device}")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    state = rng_module.capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    rng_module.restore_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    """It failed at the first checkpoint, after an epoch of training."""
    notes = tmp_path / "run.pt"
    notes.write_bytes(b"my notes\n")
    with pytest.raises(NotADirectoryError, match="run.pt' is a file, not a folder"):
        _fresh(notes)
    assert notes.read_bytes() == b"my notes\n"


def test_a_disk_full_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer = _trained(tmp_path / "run")
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".tmp-")]


def test_resuming_with_another_seed_is_refused(tmp_path):
    """The seed chose the validation cells: another one put cells the run had trained on among
    them, and the run went on without a word."""
    _train(_adata(), tmp_path / "run", _config(num_epochs=2))
    with pytest.raises(ValueError, match=r"checkpoint.pt' was trained with seed 0, this trainer has seed 1"):
        _train(_adata(), tmp_path / "run", _config(num_epochs=3, seed=1), resume=True)
    assert read_training_checkpoint(tmp_path / "run")["epoch"] == 2


@pytest.mark.parametrize("resume", [1, 2.5, ["run"]])
def test_resume_that_is_no_flag_or_path_is_refused_by_name(tmp_path, resume):
    """``resume=1`` failed in os.fspath (a TypeError naming no argument) after the data was set up."""
    with pytest.raises(TypeError, match="resume must be True, False or the path of a checkpoint"):
        _train(_adata(), tmp_path / "run", _config(num_epochs=1), resume=resume)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("epochs", [2.5, 0, -1, "3", True])
def test_a_number_of_epochs_that_is_no_whole_number_is_refused(tmp_path, epochs):
    """2.5 trained 3 epochs on a schedule of 2.5; 0 and -1 wrote an untrained model.pt (over a
    finished run's); '3' was a TypeError about str and int."""
    with pytest.raises(ValueError, match=r"number of epochs must be a whole number >= 1, got"):
        _fresh(tmp_path / "run").train(epochs)
    assert not (tmp_path / "run" / "model.pt").exists()
    with pytest.raises(ValueError, match=r"number of epochs must be a whole number >= 1, got"):
        _train(_adata(), tmp_path / "verb", _config(), epochs=epochs)
    assert not (tmp_path / "verb").exists()


def test_load_model_of_an_unfinished_run_names_its_training_checkpoint(tmp_path):
    """'no checkpoint at run/model.pt', though the interrupted run's checkpoint.pt loads."""
    _trained(tmp_path / "run")
    os.remove(tmp_path / "run" / "model.pt")  # what an interrupted run's folder holds
    with pytest.raises(FileNotFoundError, match=r"model.pt'.*has not finished; its latest training checkpoint is "
                                                r".*checkpoint.pt'"):
        scidiff.load_model(tmp_path / "run")
    assert scidiff.load_model(tmp_path / "run" / "checkpoint.pt").data_spec.n_genes == 12
