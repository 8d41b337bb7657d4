"""How well the detection model predicts the measurement of cells it was not fitted on.

The detection model (:mod:`scidiff.models.observation`) turns a cell's smooth expression (its
projection on the model's principal axes) into a measured profile: per gene, a detection
probability and a distribution of detected levels, tabulated in bins of the smooth value. Here
it is fitted on the training cells of ``bench_generation.py``'s split (80% of every group) and
scored on the held-out 20%, whose smooth expression and measurement are both known, with proper
scoring rules: the Bernoulli log-loss and the Brier score of detection, and the CRPS of the
detected level (the mean pinball loss over the table's quantiles, times 2), lower better; beside
them the predicted over the observed number of detections, and the spread (sd) of detected
genes per cell in one draw of the measurement over that of the real cells. Readings of the
same fitted tables: ``step`` (each bin's rate and levels for every value in the bin, the
measurement before the tables were interpolated), ``interpolated`` (linear between the two bin
centres that flank the value), ``interpolated, matched`` (the rates at the centres solved so
that each bin's cells average to its measured rate), and the last with the
detections drawn through the capture factor's copula (``interpolated, matched, capture factor``:
the package's measurement, whose draws share one factor per cell), which changes no gene's rate
and so only the per-cell columns: the sd of genes detected and the CRPS of that number, its
predictive distribution from 100 draws of the measurement. No network is trained: only the
principal axes and the tables are read.

    python bench/bench_detection.py
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
KANG = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the held-out split (bench_generation.py's --seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "detection.json"))
    args = p.parse_args(argv)

    import torch

    import machine_info
    import scidiff

    torch.set_num_threads(args.threads)
    result = {"seed": args.seed, "datasets": {}, "machine": machine_info.machine(scidiff=scidiff.__version__)}
    for name in ("kang", "pbmc68k_reduced"):
        if name == "kang" and not os.path.exists(KANG):
            print(f"kang: skipped, {KANG} is missing (../shared/data beside the project)")
            continue
        result["datasets"][name] = scores = _dataset(name, args.seed)
        ms = scores["measure_1024_cells_one_thread_ms"]
        print(f"{name} ({scores['bins']} bins, {scores['held_out_cells']} held-out cells; one measurement of 1,024 "
              f"cells on one thread: " + ", ".join(f"{k} {v}" for k, v in ms.items()) + ")")
        print("| reading | detection log-loss | Brier | level CRPS | predicted / observed detections | "
              "detected genes per cell, sd vs real | CRPS of genes per cell |\n|---|---|---|---|---|---|---|")
        for reading, s in scores["readings"].items():
            print(f"| {reading} | {s['log_loss']:.5f} | {s['brier']:.5f} | {s['level_crps']:.4f} | "
                  f"{s['detections_ratio']:.3f} | {s['genes_per_cell_sd_ratio']:.2f} | "
                  f"{s['genes_per_cell_crps']:.2f} |")
    machine_info.write_json(args.out, result)
    print(f"-> {args.out}")


def _dataset(name: str, seed: int) -> dict:
    import numpy as np
    import torch

    import scidiff
    from bench_generation import held_out_split

    if name == "kang":
        adata, keys, n_top = scidiff.data.read_h5ad(KANG), ["cell_type", "condition"], 2000
    else:
        import scanpy as sc

        adata, keys, n_top = sc.datasets.pbmc68k_reduced().raw.to_adata(), ["bulk_labels"], None
    _, train, test = held_out_split(adata, keys, seed)
    data = scidiff.setup_anndata(adata[train].copy(), condition_keys=keys, n_top_genes=n_top)
    torch.manual_seed(seed)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=1, latent_dim=64)
    cells = scidiff.transform_like(data.spec, adata)
    det = model.detection
    s_train, m_train = _pairs(model, cells.x[torch.as_tensor(np.flatnonzero(train))])
    smooth, measured = _pairs(model, cells.x[torch.as_tensor(np.flatnonzero(test))])
    step_rates, matched = _bin_rates(det, s_train, m_train), det.detection.clone()
    readings = {}
    for reading in ("step", "interpolated", "interpolated, matched", "interpolated, matched, capture factor"):
        if reading == "step":  # lower and upper bin the value's own, no weight on the upper
            k = k1 = det._bin(smooth).T                               # [N, G]
            w = torch.zeros(smooth.shape)
            rates = step_rates
        else:
            k, k1, w = det._between(smooth, det.centres)
            rates = step_rates if reading == "interpolated" else matched
        r = rates.T
        rate = r.gather(0, k) + w * (r.gather(0, k1) - r.gather(0, k))
        rho = float(det.capture) if reading.endswith("capture factor") else 0.0
        readings[reading] = _score(det, rate, (k, k1, w), smooth, measured, seed, rho=rho)
    return {"bins": det.bins, "capture": float(det.capture), "genes": int(smooth.shape[1]),
            "held_out_cells": int(smooth.shape[0]),
            "readings": readings, "measure_1024_cells_one_thread_ms": _timing(det, smooth)}


def _timing(det, smooth, cells: int = 1024, repeats: int = 5) -> dict:
    """Best of ``repeats`` wall-clock ms of one measurement of ``cells`` cells on one thread: the
    compiled pass (where built) and the torch reference it equals bit for bit."""
    import time

    import torch

    from scidiff.models import observation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = smooth[torch.arange(cells) % len(smooth)].contiguous()
    detect_u, level_u = torch.rand(x.shape[1], cells).T, torch.rand(x.shape[1], cells).T
    out = {}
    runs = {"torch_reference": det.measure_reference}
    if observation._native is not None:
        runs["compiled"] = det.measure
    for name, run in runs.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x, detect_u, level_u)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(best * 1e3, 2)
    torch.set_num_threads(threads)
    if "compiled" in out:
        out["speedup"] = round(out["torch_reference"] / out["compiled"], 2)
    return out


def _pairs(model, x):
    """Cells ``x`` (model space) -> (smooth expression through the principal axes, measured)."""
    import torch

    with torch.no_grad():
        measured = model.data_spec.to_expression(x.float())
        measured = torch.where(measured < 1e-5, torch.zeros_like(measured), measured)
        smooth = model.data_spec.to_expression(model.decode(model.encode(x.float())), clip=False)
    return smooth, measured


def _bin_rates(det, smooth, measured):
    """Each bin's measured detection rate ``[G, bins]`` (the tables before the rates are matched)."""
    import torch

    g = smooth.shape[1]
    group = (torch.arange(g).unsqueeze(1) * det.bins + det._bin(smooth)).reshape(-1)
    cells = torch.bincount(group, minlength=g * det.bins).float()
    hits = torch.bincount(group[(measured.T > 0).reshape(-1)], minlength=g * det.bins).float()
    return (hits / cells.clamp_min(1)).reshape(g, det.bins)


def _draws(rate, rho: float, gen):
    """One measurement's detections ``[N, G]`` at ``rate``: independent, or through the capture
    factor's copula (``DetectionModel.sample``)."""
    import torch

    if rho > 0:
        u = torch.special.ndtr(rho ** 0.5 * torch.randn(rate.shape[0], 1, generator=gen)
                               + (1 - rho) ** 0.5 * torch.randn(rate.shape, generator=gen))
    else:
        u = torch.rand(rate.shape, generator=gen)
    return u < rate


def _count_crps(rate, y, rho: float, seed: int, draws: int = 100) -> float:
    """Mean over cells of the CRPS of the number of genes a cell detects, its predictive
    distribution from ``draws`` measurements (``E|X - y| - E|X - X'| / 2``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = torch.stack([_draws(rate, rho, gen).sum(1).float() for _ in range(draws)], 1)  # [N, draws]
    observed = y.sum(1, keepdim=True)
    spread = (n[:, :, None] - n[:, None, :]).abs().mean((1, 2))
    return float(((n - observed).abs().mean(1) - spread / 2).mean())


def _score(det, rate, between, smooth, measured, seed: int, max_levels: int = 200_000, rho: float = 0.0) -> dict:
    import torch

    y = (measured > 0).float()
    p = rate.clamp(1e-4, 1 - 1e-4)
    log_loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    brier = ((rate - y) ** 2).mean()
    hit = torch.nonzero(y > 0)
    hit = hit[torch.randperm(len(hit), generator=torch.Generator().manual_seed(seed))[:max_levels]]
    i, j = hit[:, 0], hit[:, 1]
    k, k1, w = (a[i, j] for a in between)
    table = det.levels[j, k] + w[:, None] * (det.levels[j, k1] - det.levels[j, k])  # [M, Q] quantiles
    q = torch.linspace(0, 1, table.shape[1])
    diff = measured[i, j, None] - table
    crps = 2 * torch.maximum(q * diff, (q - 1) * diff).mean(1).mean()
    draw = _draws(rate, rho, torch.Generator().manual_seed(seed))
    return {"log_loss": float(log_loss), "brier": float(brier), "level_crps": float(crps),
            "detections_ratio": float(rate.sum() / y.sum()),
            "genes_per_cell_sd_ratio": float(draw.float().sum(1).std() / y.sum(1).std()),
            "genes_per_cell_crps": _count_crps(rate, y, rho, seed)}


if __name__ == "__main__":
    main()
