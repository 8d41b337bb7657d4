"""``scidiff train --seed S --deterministic`` is reproducible: two runs (separate processes, real
Kang cells, a tiny config) write bit-identical weights; another seed writes other weights."""
import csv
import os
import subprocess
import sys

import pytest
import torch

# dropout on (and condition dropout, on by default): the global generators matter, not only the trainer's
TINY = """\
model: {gene_dim: 100, hidden_dim: 64, num_layers: 2, num_timesteps: 100, conditioning_dim: 16, latent_dim: 16,
        dropout: 0.1}
training: {batch_size: 64, warmup_steps: 2, checkpoint_every: 0, early_stopping_patience: null}
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, kang_small):
    root = tmp_path_factory.mktemp("reproducible")
    kang_small.write_h5ad(root / "kang300.h5ad")
    (root / "tiny.yaml").write_text(TINY)
    return root


def _train(root, name: str, seed: int) -> tuple[dict, list]:
    """Train in a child process; the saved weights and the per-epoch losses."""
    out = root / name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "scidiff", "train", "--data", str(root / "kang300.h5ad"),
                             "--condition-keys", "cell_type,condition", "--config", str(root / "tiny.yaml"),
                             "--out", str(out), "--epochs", "2", "--seed", str(seed), "--deterministic"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    with open(out / "history.csv") as fh:
        losses = [(r["train_loss"], r["val_loss"]) for r in csv.DictReader(fh)]
    return weights, losses


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(inputs):
    first, first_losses = _train(inputs, "first", seed=0)
    again, again_losses = _train(inputs, "again", seed=0)
    assert list(first) == list(again) and len(first) > 10
    for name, tensor in first.items():
        assert tensor.dtype == again[name].dtype and torch.equal(tensor, again[name]), name
    assert first_losses == again_losses and len(first_losses) == 2
    other, _ = _train(inputs, "other", seed=1)
    network = [k for k in first if k.startswith("score.") and first[k].is_floating_point()]
    assert network and max(float((first[k] - other[k]).abs().max()) for k in network) > 1e-3
