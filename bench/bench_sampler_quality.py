"""Sample quality against the number of network evaluations, per sampler, on Kang PBMCs.

The protocol of ``bench/bench_generation.py`` (20% of each cell_type x condition group held out;
per group, RBF-MMD, energy distance and a cross-validated real-vs-generated random-forest AUC in
30 PCs fitted on the real training cells; means over the 14 groups with a bootstrap interval over
groups), with one model trained once for a fixed number of epochs and saved (``--model``, reused
when it exists), then sampled many ways: DDPM, DDIM, DPM-Solver++(2M), Heun (probability-flow
ODE) and Euler-Maruyama (reverse SDE) at several step counts, each group with the same seed (so
the deterministic samplers start from the same ``x_T``). Sampling runs through the fp32
:class:`~scidiff.engine.SamplingEngine`, which gives the plain samplers' cells (tests/test_engine.py);
one bf16 row shows what the engine's bf16 network does to quality.

The distilled rows: the model is distilled once (progressive distillation, Salimans & Ho 2022:
64 -> 32 -> 16 -> 8 -> 4 DDIM steps, then on to 2 and 1, ``--distil-iterations`` per round, on the
training cells; saved beside the model as ``<model>.students.pt`` and reused), and each student
samples through the engine (``"distilled"``) at its own 4, 2 or 1 network evaluations. The
distillation's CPU seconds are in ``setup.distillation``; ``ddim:4`` is the teacher's own 4 steps.

Results are appended per configuration to the JSON (``--out``), so an interrupted run resumes;
``--configs`` picks a subset (``sampler:steps[:bf16]`` comma-separated).

    python bench/bench_sampler_quality.py [--epochs 300] [--model /tmp/scidiff_quality/model.pt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generation import DATA, score_group, split_groups  # noqa: E402

DEFAULT_CONFIGS = ("ddpm:1000,ddpm:250,ddpm:100,ddpm:50,ddpm:25,ddim:10,ddim:25,ddim:50,ddim:100,"
                   "dpmpp_2m:5,dpmpp_2m:10,dpmpp_2m:15,dpmpp_2m:25,dpmpp_2m:50,heun:5,heun:10,heun:13,heun:25,"
                   "euler_maruyama:50,euler_maruyama:250,euler_maruyama:1000,dpmpp_2m:25:bf16,"
                   "ddim:4,distilled:4,distilled:2,distilled:1")
METRICS = ("mmd", "energy_distance", "classifier_auc")
REFERENCE = "ddpm:1000"  # the anchors' sampler


def train_or_load(args, data):
    import scidiff

    if os.path.exists(args.model):
        return scidiff.load_model(args.model), None
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=512, num_layers=6, latent_dim=64)
    trainer = scidiff.ScIDiffTrainer(model, data.loader(batch_size=256, seed=args.seed), device="cpu",
                                     learning_rate=1e-3, early_stopping_patience=None, seed=args.seed, progress=False)
    t0 = time.perf_counter()
    trainer.train(args.epochs)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.model)), exist_ok=True)
    scidiff.save_model(model, args.model)
    return scidiff.load_model(args.model), seconds


def distil_or_load(args, model, data) -> tuple[dict, dict | None]:
    """Students of 4, 2 and 1 steps (each round halving the previous student), and the report."""
    from scidiff.diffusion.distillation import Student
    from scidiff.training.distillation import distil

    path = os.path.splitext(args.model)[0] + ".students.pt"
    if os.path.exists(path):
        states = torch.load(path, weights_only=True)
        return {int(k): Student.from_state(v) for k, v in states.items()}, None
    students, seconds, previous = {}, {}, None
    for steps in (4, 2, 1):
        t0 = time.perf_counter()
        previous = students[steps] = distil(model, data, steps=steps, start_steps=64, initial=previous,
                                            iterations_per_round=args.distil_iterations, seed=args.seed, progress=False)
        seconds[steps] = round(time.perf_counter() - t0, 1)
        print(f"distilled to {steps} step(s) in {seconds[steps]:.0f} s", flush=True)
    torch.save({str(k): v.to_state() for k, v in students.items()}, path)
    report = {"method": "progressive distillation (Salimans & Ho 2022), 64 -> 4 -> 2 -> 1 DDIM steps",
              "iterations_per_round": args.distil_iterations, "batch_size": 256, "threads": args.threads,
              "seconds_to_reach": {str(k): round(sum(seconds[j] for j in seconds if j >= k), 1) for k in seconds},
              "rounds": students[1].rounds}
    return students, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--model", default="/tmp/scidiff_quality/model.pt")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--distil-iterations", type=int, default=1000, help="distillation iterations per round")
    p.add_argument("--auc-repeats", type=int, default=1,
                   help="classifier repeats per group for the AUC (bench_generation.py uses 10; the committed "
                        "sampler_quality.json used 1)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sampler_quality.json"))
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"missing {args.data}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import scidiff
    from scidiff.evaluation import fit_pca
    from scidiff.diffusion.plans import sampler_plan
    from scidiff.engine import SamplingEngine

    adata = scidiff.data.read_h5ad(args.data)
    groups = (adata.obs["cell_type"].astype(str) + " | " + adata.obs["condition"].astype(str)).to_numpy()
    train_mask, test_mask = split_groups(groups, 0.2, args.seed)
    data = scidiff.setup_anndata(adata[train_mask].copy(), condition_keys=["cell_type", "condition"], n_top_genes=2000)
    model, train_seconds = train_or_load(args, data)
    real_all = scidiff.transform_like(data.spec, adata).log_expression()
    project = fit_pca(real_all[train_mask], 30, args.seed)
    pcs = project(real_all)

    results = {"configs": {}}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
    results.setdefault("setup", {}).update({
        "data": os.path.basename(args.data), "model": args.model, "epochs": args.epochs, "seed": args.seed,
        "auc_repeats": args.auc_repeats, "threads": args.threads, "torch": torch.__version__, "groups": len(np.unique(groups)),
        "genes": model.gene_dim, "latent_dim": model.latent_dim, "hidden_dim": model.hidden_dim,
        "num_layers": model.num_layers})
    if train_seconds is not None:
        results["setup"]["train_seconds"] = round(train_seconds, 1)
    students, distillation = distil_or_load(args, model, data)
    if distillation is not None:
        results["setup"]["distillation"] = distillation

    names = list(np.unique(groups))
    rng = np.random.default_rng(args.seed)
    boot_groups = [rng.integers(0, len(names), len(names)) for _ in range(2000)]
    for spec in args.configs.split(","):
        parts = spec.split(":")
        sampler, steps, bf16 = parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "bf16"
        if spec in results["configs"]:
            continue
        if sampler == "distilled":
            model.student = students[steps]
        engine = SamplingEngine(model, sampler, steps, dtype=torch.bfloat16 if bf16 else torch.float32)
        nfe = len(sampler_plan(sampler, model.scheduler, steps))
        per_group, t_sample = {}, 0.0
        for gi, g in enumerate(names):
            ct, cond = g.split(" | ")
            tr, te = train_mask & (groups == g), test_mask & (groups == g)
            t0 = time.perf_counter()
            gen = engine.sample(int(tr.sum()), {"cell_type": ct, "condition": cond}, seed=args.seed + gi).numpy()
            t_sample += time.perf_counter() - t0
            per_group[g] = score_group(pcs[te], project(gen), args.seed, repeats=args.auc_repeats)
        summary = {}
        for k in METRICS:
            vals = np.array([per_group[g][k] for g in names])
            boots = [vals[i].mean() for i in boot_groups]
            summary[k] = {"mean": float(vals.mean()),
                          "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
        results["configs"][spec] = {"sampler": sampler, "steps": steps, "network_evaluations": nfe,
                                    "network": "bf16" if bf16 else "fp32", "sample_seconds": round(t_sample, 1),
                                    "summary": summary,
                                    "groups": {g: {k: per_group[g][k] for k in METRICS} for g in names}}
        print(f"{spec:22s} NFE {nfe:5d}  " + "  ".join(f"{k} {summary[k]['mean']:.4f}" for k in METRICS)
              + f"  ({t_sample:.0f} s)", flush=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    for spec in results["configs"]:
        results["configs"][spec]["paired_difference_vs_" + REFERENCE] = paired_difference(results, spec)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(markdown(results))
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(markdown(results))


def paired_difference(results: dict, spec: str, reference: str = REFERENCE, seed: int = 0) -> dict | None:
    """Per metric, the mean over groups of (config - reference) with a bootstrap interval over
    groups: a paired comparison, free of the between-group spread that dominates the raw means."""
    configs = results["configs"]
    if spec == reference or reference not in configs:
        return None
    names = sorted(configs[spec]["groups"])
    rng = np.random.default_rng(seed)
    boot = [rng.integers(0, len(names), len(names)) for _ in range(2000)]
    out = {}
    for k in METRICS:
        d = np.array([configs[spec]["groups"][g][k] - configs[reference]["groups"][g][k] for g in names])
        means = [d[i].mean() for i in boot]
        out[k] = {"mean": float(d.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
    return out


def markdown(results: dict) -> str:
    rows = sorted(results["configs"].items(),
                  key=lambda kv: (kv[1]["sampler"], kv[1]["network"], kv[1]["network_evaluations"]))
    ref = REFERENCE.replace(":", " ")
    lines = ["| sampler | steps | network evaluations | MMD | energy distance | classifier AUC "
             f"| MMD - {ref} (paired, 95% CI) | AUC - {ref} (paired, 95% CI) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, r in rows:
        s = r["summary"]
        cells = [f"{s[k]['mean']:.4f}" for k in METRICS]
        d = paired_difference(results, spec)
        deltas = [(f"{d[k]['mean']:+.4f} [{d[k]['ci95'][0]:+.4f}, {d[k]['ci95'][1]:+.4f}]" if d else
                   "reference" if spec == REFERENCE else "-") for k in ("mmd", "classifier_auc")]
        name = ("distilled student" if r["sampler"] == "distilled" else r["sampler"]) + \
            (" (bf16 engine)" if r["network"] == "bf16" else "")
        lines.append(f"| {name} | {r['steps']} | {r['network_evaluations']} | " + " | ".join(cells + deltas) + " |")
    default = "dpmpp_2m:25"  # the students against the default sampler they replace
    few = [spec for spec, r in rows if r["sampler"] == "distilled" or spec == "ddim:4"]
    if default in results["configs"] and few:
        lines += ["", "Against the default sampler, DPM-Solver++(2M) with 25 steps (paired, 95% CI):", "",
                  "| sampler | network evaluations | MMD difference | energy distance difference | AUC difference |",
                  "|---|---:|---:|---:|---:|"]
        for spec in few:
            r, d = results["configs"][spec], paired_difference(results, spec, default)
            name = "distilled student" if r["sampler"] == "distilled" else f"{r['sampler']} (teacher)"
            lines.append(f"| {name} | {r['network_evaluations']} | " + " | ".join(
                f"{d[k]['mean']:+.4f} [{d[k]['ci95'][0]:+.4f}, {d[k]['ci95'][1]:+.4f}]" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
