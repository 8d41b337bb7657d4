"""Small synthetic cells, a tiny model and the worker functions that the distributed and
fault-tolerance tests run in other processes (spawned or started as subprocesses)."""
from __future__ import annotations

import os
import sys
import time

import pandas as pd
import torch

from scidiff.data import CellData
from scidiff.data.dataset import InMemoryLoader
from scidiff.data.spec import DataSpec
from scidiff.models import ScIDiffModel
from scidiff.training import ScIDiffTrainer

TRAIN_KW = dict(device="cpu", learning_rate=1e-2, warmup_steps=2, ema_decay=0.9, early_stopping_patience=None,
                progress=False, seed=5)


def synthetic_cells(n: int = 64, genes: int = 12, seed: int = 0) -> CellData:
    """``n`` cells of three types (a Gaussian blob each); ``x[:, 0]`` is unique per cell, so a
    batch's cells can be identified."""
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 3, (n,), generator=g)
    centers = 2 * torch.randn(3, genes, generator=g)
    x = centers[types] + 0.3 * torch.randn(n, genes, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32) / n
    labels = ["a", "b", "c"]
    spec = DataSpec(gene_names=[f"g{i}" for i in range(genes)], categorical={"cell_type": labels})
    obs = pd.DataFrame({"cell_type": [labels[int(t)] for t in types]}, index=[f"c{i}" for i in range(n)])
    return CellData(x.float(), {"cell_type": types}, spec, obs)


def tiny_model(data: CellData, hidden: int = 32) -> ScIDiffModel:
    torch.manual_seed(0)
    return ScIDiffModel.from_data(data, hidden_dim=hidden, num_layers=2, num_timesteps=100, conditioning_dim=16)


def drug_knockout_model(n: int, genes: int, raised: int, epochs: int) -> ScIDiffModel:
    """A tiny model of a screen of two drugs (no effect) crossed with a knockout ``K1`` that raises
    the first ``raised`` of ``genes`` (Poisson counts, 2 -> 8), trained ``epochs`` epochs."""
    import anndata as ad
    import numpy as np

    import scidiff

    rng = np.random.default_rng(0)
    drug, ko = rng.choice(["control", "D1", "D2"], n), rng.choice(["control", "K1"], n)
    x = rng.poisson(np.where((ko == "K1")[:, None] & (np.arange(genes) < raised), 8.0, 2.0),
                    (n, genes)).astype(np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"drug": drug, "ko": ko}, index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))
    data = scidiff.setup_anndata(adata, n_top_genes=None, perturbation_keys=["drug", "ko"])
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=1, num_timesteps=20)
    ScIDiffTrainer(model, data.loader(120), device="cpu", progress=False, early_stopping_patience=None,
                   seed=0).train(epochs)
    return model.eval()


def cell_ids(batch) -> list[int]:
    n = 64
    return [int(round(float(v) * n)) for v in batch["x"][:, 0]]


class SlowLoader(InMemoryLoader):
    """An in-memory loader that waits ``delay`` seconds before each batch (so a test can kill
    the process while it is in the middle of an epoch)."""

    def __init__(self, *args, delay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


def state_of(trainer: ScIDiffTrainer) -> dict:
    """Final EMA weights (in the model), live weights and history of a finished run."""
    return {"ema": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "live": {k: v.clone() for k, v in trainer._raw_state.items()},
            "history": [dict(r) for r in trainer.history], "step": trainer.step}


# -- DDP worker (torch.multiprocessing.spawn) ------------------------------------------------------
def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, epochs: int) -> None:
    """Phase 1: train with DDP, checkpointing every 2 steps (kept), and save rank 0's result.
    Phase 2: a fresh trainer resumes from the mid-epoch checkpoint of step 2 and finishes."""
    import shutil

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = synthetic_cells()
        train, val = data.subset(range(48)), data.subset(range(48, 64))
        run = os.path.join(out_dir, "run")

        def make():
            model = tiny_model(data)
            return ScIDiffTrainer(model, train.loader(8, seed=3, rank=rank, world_size=world),
                                  val.loader(8, shuffle=False, rank=rank, world_size=world), use_ddp=True,
                                  checkpoint_dir=run, checkpoint_every=100, checkpoint_every_steps=2,
                                  keep_checkpoints=100, **TRAIN_KW)

        trainer = make()
        trainer.train(epochs)
        if rank == 0:
            torch.save(state_of(trainer), os.path.join(out_dir, f"ddp{world}.pt"))
            os.makedirs(os.path.join(out_dir, "resume"), exist_ok=True)
            shutil.copy(os.path.join(run, "checkpoints", "step-000000002.pt"),
                        os.path.join(out_dir, "resume", "checkpoint.pt"))
        dist.barrier()
        again = make()
        again.checkpoint_dir = os.path.join(out_dir, "resume")
        again.resume(os.path.join(out_dir, "resume", "checkpoint.pt"))
        again.train(epochs)
        if rank == 0:
            torch.save(state_of(again), os.path.join(out_dir, f"ddp{world}-resumed.pt"))
    finally:
        dist.destroy_process_group()


# -- the process a fault-tolerance test kills -------------------------------------------------------
def make_resumable_trainer(run_dir: str, delay: float = 0.0) -> ScIDiffTrainer:
    data = synthetic_cells()
    train, val = data.subset(range(48)), data.subset(range(48, 64))
    model = tiny_model(data)
    return ScIDiffTrainer(model, SlowLoader(train, 6, seed=3, delay=delay), val.loader(16, shuffle=False),
                          checkpoint_dir=run_dir, checkpoint_every=1, checkpoint_every_steps=3, keep_checkpoints=2,
                          log_every_steps=2, **TRAIN_KW)


KILL_EPOCHS = 3


def kill_target(run_dir: str) -> None:
    """Train slowly (so that the parent can SIGKILL it mid-epoch)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    make_resumable_trainer(run_dir, delay=0.1).train(KILL_EPOCHS)


if __name__ == "__main__":
    if sys.argv[1] == "kill-target":
        kill_target(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
