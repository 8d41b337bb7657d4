"""Builders shared by the ONNX export, runtime and server tests (used through conftest's
``kang_onnx`` fixture)."""
import torch

import scidiff
from scidiff.cli import main
from scidiff.models import ScIDiffModel
from scidiff.training import ScIDiffTrainer


def train_and_export_kang(root, kang_small):
    torch.manual_seed(0)
    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=200, latent_dim=16)
    ScIDiffTrainer(model, data.loader(64), device="cpu", learning_rate=2e-3, warmup_steps=10,
                   early_stopping_patience=None, progress=False).train(20)
    scidiff.save_model(model, root / "run")
    out = root / "export" / "model.onnx"
    assert main(["export-onnx", "--model", str(root / "run"), "--out", str(out), "--sampler", "ddim", "--steps", "8"]) == 0
    return scidiff.load_model(root / "run"), out
