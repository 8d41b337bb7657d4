"""Checkpoints that survive faults: SIGKILL mid-epoch then resume equals an uninterrupted run;
truncated, corrupt and foreign checkpoints are refused before anything is loaded; the newest N
are kept; ``scidiff train --resume``."""
import csv
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from scidiff.training import ScIDiffTrainer, read_checkpoint, read_training_checkpoint, save_model
from test_data import _dead_pid
from training_helpers import (KILL_EPOCHS, TRAIN_KW, make_resumable_trainer, state_of, synthetic_cells,
                              tiny_model)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def deterministic_one_thread():
    """The killed subprocess runs with 1 thread and deterministic kernels; so does this process."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def _assert_same_run(a: dict, b: dict):
    assert a["step"] == b["step"]
    for which in ("live", "ema"):
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), f"{which} {k}"
    keys = ("epoch", "step", "train_loss", "val_loss", "lr")
    assert [[r[k] for k in keys] for r in a["history"]] == [[r[k] for k in keys] for r in b["history"]]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, deterministic_one_thread):
    reference = make_resumable_trainer(str(tmp_path / "reference"))
    reference.train(KILL_EPOCHS)
    expected = state_of(reference)

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "training_helpers.py"), "kill-target", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists():  # the first checkpoint: step 3 of the 8 in epoch 1
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the training process wrote no checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    saved = read_training_checkpoint(run)
    assert saved["epoch"] == 0 and 0 < saved["trainer"]["batch_in_epoch"] < 8  # killed mid-epoch
    trainer = make_resumable_trainer(str(run))
    assert trainer.resume(run) == saved["step"]
    trainer.train(KILL_EPOCHS)
    _assert_same_run(state_of(trainer), expected)
    # the step log holds each logged step once, the killed run's later rows dropped
    with open(run / "steps.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == list(range(2, expected["step"] + 1, 2))
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000000021.pt", "step-000000024.pt"]


def _trained(tmp_path, **kw):
    data = synthetic_cells()
    trainer = ScIDiffTrainer(tiny_model(data), data.loader(16, seed=0), checkpoint_dir=tmp_path, checkpoint_every=1,
                             **{**TRAIN_KW, **kw})
    trainer.train(2)
    return trainer


def _fresh_trainer(tmp_path, hidden=32):
    data = synthetic_cells()
    return ScIDiffTrainer(tiny_model(data, hidden), data.loader(16, seed=0), checkpoint_dir=tmp_path, **TRAIN_KW)


def _unchanged(trainer, before):
    assert trainer.step == 0 and trainer.epoch == 0 and trainer.history == []
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_truncated_corrupt_and_foreign_checkpoints_are_refused_before_loading(tmp_path):
    _trained(tmp_path / "run")
    good = tmp_path / "run" / "checkpoint.pt"
    raw = good.read_bytes()
    fresh = _fresh_trainer(tmp_path / "other")
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.pt.*not a readable scidiff checkpoint"):
        fresh.resume(truncated)

    # flip one byte inside a tensor's stored bytes: the file still unzips, the digest catches it
    with zipfile.ZipFile(good) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(good, "rb") as fh:
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    flipped = bytearray(raw)
    flipped[offset] ^= 0xFF
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        fresh.resume(corrupt)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a scidiff checkpoint"):
        fresh.resume(foreign)
    with pytest.raises(ValueError, match="holds no training state"):
        fresh.resume(save_model(tiny_model(synthetic_cells()), tmp_path / "model.pt"))
    other_model = _fresh_trainer(tmp_path / "wide", hidden=16)
    with pytest.raises(ValueError, match=r"written for another model: config differs in \['hidden_dim'\]"):
        other_model.resume(good)
    _unchanged(fresh, before)
    # the intact file resumes
    assert fresh.resume(good) == 2 * 4 and fresh.epoch == 2
    assert read_checkpoint(good)["digest"]


TORCH_ADVICE = ("two options", "Re-running", "trust the source", "WeightsUnpickler", "In PyTorch", "allowlist",
                "safe_globals")


def test_a_pickled_foreign_file_is_refused_with_scidiffs_advice_not_torchs(tmp_path):
    """torch's refusal suggests ``weights_only=False``; scidiff's says never to do that for an
    untrusted file, names it, and carries none of torch's text (not even in its chain)."""
    foreign = tmp_path / "downloaded.pt"
    torch.save(torch.nn.Linear(2, 2), foreign)  # a pickled module: only a full unpickle could load it
    with pytest.raises(ValueError) as caught:
        read_checkpoint(foreign)
    message = str(caught.value)
    assert "downloaded.pt" in message and "never load a checkpoint you do not trust" in message
    assert "weights_only=False" in message.split("never load", 1)[1]  # named only as what not to do
    assert not [phrase for phrase in TORCH_ADVICE if phrase in message]
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all\n")
    with pytest.raises(ValueError, match="garbage.pt.*not a readable scidiff checkpoint") as caught:
        read_checkpoint(garbage)
    assert caught.value.__context__ is None and "weights_only" not in str(caught.value)


def test_keeps_the_newest_n_and_falls_back_past_a_truncated_newest(tmp_path):
    run = tmp_path / "run"
    trainer = _trained(run, checkpoint_every_steps=3, keep_checkpoints=2)  # 8 steps, 4 a epoch
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["step-000000006.pt", "step-000000008.pt"]
    assert os.path.samefile(run / "checkpoint.pt", run / "checkpoints" / "step-000000008.pt")
    newest = run / "checkpoints" / "step-000000008.pt"
    data = newest.read_bytes()
    os.remove(run / "checkpoint.pt")
    newest.write_bytes(data[:1000])
    dead = run / f".tmp-{_dead_pid()}-0a1b2c3d.checkpoint.pt"  # what a writer killed mid-write leaves
    live = run / "checkpoints" / f".tmp-{os.getppid()}-0a1b2c3d.step-000000009.pt"  # a live writer's (pytest's parent)
    dead.write_bytes(b"partial")
    live.write_bytes(b"being written")
    fresh = _fresh_trainer(run)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint.*step-000000008.pt"):
        assert fresh.resume(run) == 6
    assert fresh.epoch == 1 and fresh._batch_in_epoch == 2
    assert not dead.exists() and live.read_bytes() == b"being written"  # another process's write is not cut
    live.unlink()
    # and goes on to the same end as the run that was never cut
    fresh.train(2)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training checkpoint in .*empty"):
        _fresh_trainer(tmp_path).resume(tmp_path / "empty")


def test_cli_train_resume_continues_a_run(tmp_path):
    import anndata as ad
    import numpy as np

    from scidiff.cli import main

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(1, 40)), size=(120, 40)).astype(np.float32)
    adata = ad.AnnData(counts)
    adata.obs["cell_type"] = rng.choice(["a", "b"], 120)
    adata.var_names = [f"g{i}" for i in range(40)]
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    config = tmp_path / "small.yaml"
    config.write_text("model: {gene_dim: 40, hidden_dim: 16, num_layers: 1, num_timesteps: 50, latent_dim: 8}\n"
                      "training: {batch_size: 32, warmup_steps: 2, checkpoint_every: 1}\n")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", str(config),
            "--condition-keys", "cell_type", "--checkpoint-every-steps", "2", "--keep-checkpoints", "3"]
    assert main(args + ["--epochs", "2"]) == 0
    first = read_training_checkpoint(tmp_path / "run")
    assert first["epoch"] == 2
    with pytest.warns(UserWarning, match="planned for 2 epochs with 3"):
        assert main(args + ["--epochs", "3", "--resume"]) == 0
    last = read_training_checkpoint(tmp_path / "run")
    assert last["epoch"] == 3 and last["step"] == first["step"] * 3 // 2
    with open(tmp_path / "run" / "history.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    # --resume in an empty folder starts from scratch
    assert main(args[:4] + [str(tmp_path / "new")] + args[5:] + ["--epochs", "1", "--resume"]) == 0
    assert read_training_checkpoint(tmp_path / "new")["epoch"] == 1
