"""Training throughput (cells/s) of ScIDiffTrainer: eager vs torch.compile vs bf16 autocast (and
gradient checkpointing), on the CPU and, when one is present, on the GPU; with several GPUs also
DDP scaling (one process per GPU, NCCL).

Each variant runs whole optimizer steps (forward, backward, clip, AdamW, EMA) of the same model
on the same cached batches; the first steps (compilation included) are timed apart and left out.
Ratios are against eager fp32 on the same device in the same run.

    python bench/bench_training.py                   # both models, all variants, 1 CPU thread
    python bench/bench_training.py --models latent --steps 10

Writes bench/results/training.json and bench/results/training.md (the README table).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import machine_info  # bench/machine_info.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODELS = {  # the default config's model (diffusion in 64 principal axes) and gene-space diffusion
    "latent": {"hidden_dim": 512, "num_layers": 6, "latent_dim": 64},
    "genes": {"hidden_dim": 512, "num_layers": 6, "latent_dim": None},
}
VARIANTS = {
    "eager fp32": {},
    "eager bf16 autocast": {"mixed_precision": "bf16"},
    "compiled fp32": {"compile": True},
    "compiled bf16 autocast": {"compile": True, "mixed_precision": "bf16"},
    "eager fp32 + gradient checkpointing": {"gradient_checkpointing": True},
}


def machine() -> dict:
    info = machine_info.machine(torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def synthetic_cells(n: int, genes: int, seed: int = 0):
    """Log-normal-ish cells from a low-rank model with 4 cell types (throughput does not depend
    on the values, but the latent fit needs structure)."""
    import numpy as np
    import pandas as pd

    from scidiff.data import CellData
    from scidiff.data.spec import DataSpec

    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 4, (n,), generator=g)
    factors = torch.randn(4, 16, generator=g)
    loadings = torch.randn(16, genes, generator=g) / 4
    x = (factors[types] @ loadings + 0.5 * torch.randn(n, genes, generator=g)).float()
    labels = ["t0", "t1", "t2", "t3"]
    spec = DataSpec(gene_names=[f"g{i}" for i in range(genes)], categorical={"cell_type": labels})
    obs = pd.DataFrame({"cell_type": np.asarray(labels)[types.numpy()]}, index=[f"c{i}" for i in range(n)])
    return CellData(x, {"cell_type": types}, spec, obs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(data, model_kw: dict, variant: dict, device: str, batch: int, steps: int, warmup: int,
            repeats: int) -> dict:
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, **model_kw)
    loader = data.loader(batch, seed=0, drop_last=True)
    batches = [b for _, b in zip(range(8), loader)]
    trainer = ScIDiffTrainer(model, loader, device=device, progress=False, early_stopping_patience=None,
                             warmup_steps=10, **{"mixed_precision": "no", **variant})
    dev = trainer.device
    total = warmup + repeats * steps
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for s in range(warmup):
        trainer.training_step(batches[s % len(batches)], total)
    _sync(dev)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(steps):
            loss = trainer.training_step(batches[s % len(batches)], total)["loss"]
        _sync(dev)
        rates.append(steps * batch / (time.perf_counter() - t0))
    out = {"cells_per_s": statistics.median(rates), "cells_per_s_all": rates, "warmup_seconds": first,
           "final_loss": float(loss), "device": str(dev)}
    if dev.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    torch._dynamo.reset()
    return out


def _ddp_worker(rank: int, world: int, port: int, args, model_kw, queue) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    try:
        from scidiff.models import ScIDiffModel
        from scidiff.training import ScIDiffTrainer

        data = synthetic_cells(args.cells, args.genes)
        torch.manual_seed(0)
        model = ScIDiffModel.from_data(data, **model_kw)
        loader = data.loader(args.batch, seed=0, drop_last=True, rank=rank, world_size=world)
        batches = [b for _, b in zip(range(8), loader)]
        trainer = ScIDiffTrainer(model, loader, device="cuda", use_ddp=True, progress=False,
                                 early_stopping_patience=None, warmup_steps=10, mixed_precision="bf16")
        total = args.warmup + args.steps
        for s in range(args.warmup):
            trainer.training_step(batches[s % len(batches)], total)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(args.steps):
            trainer.training_step(batches[s % len(batches)], total)
        torch.cuda.synchronize()
        seconds = max(dist_all_gather_float(time.perf_counter() - t0))  # the slowest rank sets the pace
        if rank == 0:
            queue.put(world * args.steps * args.batch / seconds)
    finally:
        dist.destroy_process_group()


def dist_all_gather_float(value: float) -> list[float]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, float(value))
    return out


def ddp_scaling(args, model_kw) -> list[dict]:
    """Cells/s of DDP on 1, 2, 4, ... GPUs (bf16 autocast, per-GPU batch ``--batch``)."""
    import socket

    import torch.multiprocessing as mp

    rows, world = [], 1
    while world <= torch.cuda.device_count():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_ddp_worker, args=(world, port, args, model_kw, queue), nprocs=world, join=True,
                           start_method="spawn")
        rows.append({"gpus": world, "cells_per_s": queue.get()})
        world *= 2
    for r in rows:
        r["speedup"] = r["cells_per_s"] / rows[0]["cells_per_s"]
        r["efficiency"] = r["speedup"] / r["gpus"]
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    s = result["settings"]
    where = f"{m['cpu']}, {m['cores']} cores, {s['threads']} torch thread(s), torch {m['torch']}"
    if m.get("gpus"):
        where += f"; GPU: {', '.join(sorted(set(m['gpus'])))}"
    lines = [f"Machine: {where}. Batch {s['batch']}, {s['genes']} genes, median of {s['repeats']} x {s['steps']} "
             f"steps after {s['warmup']} warm-up steps.", "",
             "| model | device | variant | cells/s | vs eager fp32 | warm-up s |", "|---|---|---|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['model']} | {r['device']} | {r['variant']} | {r['cells_per_s']:,.0f} | "
                     f"{r['ratio_vs_eager']:.2f}x | {r['warmup_seconds']:.1f} |")
    if result.get("ddp"):
        lines += ["", "| GPUs (DDP, bf16) | cells/s | speed-up | efficiency |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['gpus']} | {r['cells_per_s']:,.0f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} |"
                  for r in result["ddp"]]
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: str) -> None:
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--cells", type=int, default=4096)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped where absent")
    p.add_argument("--out", default=os.path.join(HERE, "results", "training.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown model(s)/variant(s) {unknown}; models {list(MODELS)}, variants {list(VARIANTS)}")
    if set(args.devices.split(",")) - {"cpu", "cuda"}:
        p.error(f"--devices takes cpu and/or cuda, got {args.devices!r}")
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    data = synthetic_cells(args.cells, args.genes)
    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    for device in devices:
        for name in models:
            eager = None
            for variant in variants:
                r = measure(data, MODELS[name], VARIANTS[variant], device, args.batch, args.steps, args.warmup,
                            args.repeats)
                eager = eager or (r["cells_per_s"] if variant == "eager fp32" else None)
                r.update({"model": name, "variant": variant, "device": device,
                          "ratio_vs_eager": r["cells_per_s"] / eager if eager else float("nan")})
                result["results"].append(r)
                print(f"{device:5s} {name:7s} {variant:38s} {r['cells_per_s']:9.0f} cells/s "
                      f"({r['ratio_vs_eager']:.2f}x, warm-up {r['warmup_seconds']:.1f} s)", flush=True)
                write_json(result, args.out)  # after every row: a run cut short keeps what it measured
    if "cuda" in devices and torch.cuda.device_count() > 1:
        result["ddp"] = ddp_scaling(args, MODELS[models[0]])
    write_json(result, args.out)
    table = markdown(result)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
