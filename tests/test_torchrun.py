"""``torchrun --nproc_per_node 2 -m scidiff train|sample`` on CPU (gloo), and the sharded
generation layout (one shard per rank + manifest, optional merged file)."""
import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

from scidiff.tasks import generate as generation
from scidiff.training import load_model, read_training_checkpoint
from training_helpers import synthetic_cells, tiny_model


def test_sharded_generation_matches_one_process_and_merges(tmp_path):
    model = tiny_model(synthetic_cells()).eval()
    groups = [{"cell_type": "a"}, {"cell_type": "c"}]
    for rank in (2, 1, 0):  # no process group here: rank 0 last, as the barrier would order it
        manifest = generation.generate_sharded(model, 10, tmp_path, groups, rank=rank, world_size=3, steps=3, seed=7,
                                             progress=False, merge=rank == 0)
    assert [s["cells"] for s in manifest["shards"]] == [6, 6, 8] and manifest["cells"] == 20
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    merged = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert merged.shape == (20, 12) and merged.obs_names.is_unique
    assert merged.obs["cell_type"].value_counts().to_dict() == {"a": 10, "c": 10}
    assert sorted(merged.obs_names) == sorted([f"generated_{i}-{g}" for i in range(10) for g in (0, 1)])
    np.testing.assert_array_equal(generation.read_generated(tmp_path).X, merged.X)
    # shard 0 is what one process makes of its 3 cells per group with the same seed; the others
    # come from other seed streams
    one = tmp_path / "one.h5ad"
    generation.generate_to_file(model, 3, one, groups, steps=3, seed=7, progress=False)
    shards = [ad.read_h5ad(tmp_path / generation.shard_name(r, 3)) for r in range(3)]
    np.testing.assert_array_equal(shards[0].X, ad.read_h5ad(one).X)
    assert not np.allclose(shards[1].X[:3], shards[0].X[:3])
    with pytest.raises(FileNotFoundError, match="shard .*00001-of-00002.h5ad' of rank 1 is missing"):
        generation.generate_sharded(model, 4, tmp_path / "partial", groups, rank=0, world_size=2, steps=2,
                                  progress=False)


def _torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "scidiff", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_trains_with_ddp_and_samples_one_shard_per_rank(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(1, 40)), size=(160, 40)).astype(np.float32)
    adata = ad.AnnData(counts)
    adata.obs["cell_type"] = rng.choice(["a", "b"], 160)
    adata.var_names = [f"g{i}" for i in range(40)]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "small.yaml").write_text(
        "model: {gene_dim: 40, hidden_dim: 16, num_layers: 1, num_timesteps: 50, latent_dim: 8}\n"
        "training: {batch_size: 16, warmup_steps: 2, checkpoint_every: 1, val_fraction: 0.1}\n")
    out = _torchrun(["train", "--data", "cells.h5ad", "--out", "run", "--config", "small.yaml",
                     "--condition-keys", "cell_type", "--epochs", "2", "--checkpoint-every-steps", "3"], tmp_path)
    assert out.count("model written to run") == 1  # rank 0 only
    ckpt = read_training_checkpoint(tmp_path / "run")
    t = ckpt["trainer"]
    # 144 training cells, 16 per rank and step: 4 or 5 batches per rank, 4 steps per epoch on both
    assert t["world_size"] == 2 and len(t["ranks"]) == 2 and ckpt["step"] == 8 and ckpt["epoch"] == 2
    assert [int(r["epoch"]) for r in t["history"]] == [1, 2]
    model = load_model(tmp_path / "run")

    out = _torchrun(["sample", "--model", "run", "-n", "25", "--condition", "cell_type=a", "--condition",
                     "cell_type=b", "--steps", "4", "--seed", "3", "--out", "generated", "--merge"], tmp_path)
    assert "wrote 50 cells x 40 genes to generated (2 shard(s)" in out
    manifest = json.loads((tmp_path / "generated" / "manifest.json").read_text())
    assert [(s["rank"], s["cells"]) for s in manifest["shards"]] == [(0, 24), (1, 26)]
    merged = ad.read_h5ad(tmp_path / "generated" / "generated.h5ad")
    assert merged.shape == (50, 40) and merged.obs_names.is_unique
    assert merged.obs["cell_type"].value_counts().to_dict() == {"a": 25, "b": 25}
    # rank 0's shard: the first 12 cells of each condition from seed 3, as one process makes them
    torch.set_num_threads(1)
    generation.generate_to_file(model, 12, tmp_path / "one.h5ad", [{"cell_type": "a"}, {"cell_type": "b"}], steps=4,
                              seed=3, progress=False)
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "generated" / generation.shard_name(0, 2)).X,
                               ad.read_h5ad(tmp_path / "one.h5ad").X, rtol=1e-5, atol=1e-6)
