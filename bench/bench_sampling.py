"""Generation throughput: cells/s of the eager fp32 reference loop, the sampling engine and the
ONNX runtime, one run, same model, same sampler (DDIM) and steps.

- ``eager``: ``model.sample`` in fp32, the network evaluated per step and per cell exactly as
  written (the way the anchors sample).
- ``engine``: :class:`scidiff.engine.SamplingEngine` with its defaults for the device (CPU:
  bf16 network where the CPU has bf16 units, per-condition modulation caching, fused update,
  1,024-cell chunks; CUDA: bf16, Triton kernels, the loop in a CUDA graph).
- ``engine_fp32``: the engine with an fp32 network (what caching and fusion alone give).
- ``engine_torch_ops`` (CUDA): the engine with the torch reference ops in place of the Triton
  kernels (same bf16, caching and CUDA graph): what the fused kernels add.
- ``engine_to_cpu``: the engine with its cells copied to host memory, as ``generate_to_file`` and
  ``sample`` deliver them (on CPU the same as ``engine``). ``eager``, ``engine`` and
  ``engine_fp32`` leave the cells on the device.
- ``onnx``: :class:`scidiff.export.runtime.OnnxSampler` on the exported model (onnxruntime,
  numpy loop), when ``scidiff.export`` is present.
- ``engine_25``: the engine with the default sampler, DPM-Solver++(2M) in 25 steps (which matches
  DDPM's 1,000 on Kang, ``bench/bench_sampler_quality.py``).
- ``engine_distilled``: the engine with the distilled student (``"distilled"``, 4 steps by
  default: ``--distilled-steps``; the saved model's own student with ``--model``, else the random
  network standing in as its own student). Its quality beside DPM-Solver++ 25 is in
  ``bench/results/sampler_quality.json``; the goal is 5x ``engine_25``'s cells/s.
- ``engine_25_smooth``, ``engine_distilled_smooth``: the same two with smooth output
  (``observed=False``): the sampling alone, without the measurement of each cell.

The model is the default configuration (2,000 highly variable genes of Kang PBMCs, a 64-dim
latent, hidden 512, 6 blocks, 1,000 timesteps) with random weights: throughput does not depend
on the weights. All cells of a batch share one condition (as when generating a group). A
measurement whose projected time (from the previous batch size) exceeds ``--max-seconds`` is
skipped and recorded as such. ``--model`` benchmarks a saved model (a checkpoint or run folder,
yours or one written by ``--save-model``) instead of building one from Kang, so a GPU node
without the data can run it.

    python bench/bench_sampling.py [--batch-sizes 256,1024,4096,16384,65536] [--threads 1]
    python bench/bench_sampling.py --save-model default.pt --methods eager   # build once, here
    python bench/bench_sampling.py --model default.pt --batch-sizes 256,...,262144   # on the GPU node

Timings are the best of ``--repeats`` runs where one run takes under 15 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch

import machine_info  # bench/machine_info.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{machine_info.cpu_name()} ({os.cpu_count()} cores)"


def flops_per_cell_step(model) -> dict:
    """Multiply-adds x 2 of one network evaluation per cell: ``nominal`` as ``model.forward``
    computes it (modulations per cell), ``engine`` with the modulations computed per condition."""
    d, h, c, L = model.diffusion_dim, model.hidden_dim, model.conditioning_dim, model.num_layers
    trunk = 2 * (d * h + L * h * h + h * d)
    per_condition = 2 * (L * c * 3 * h + c * 2 * h + 2 * c * c)
    return {"nominal": trunk + per_condition, "engine": trunk}


def bench_conditioning(model) -> dict:
    """Kang's CD14+ monocytes, stimulated, where the model knows them; else each covariate's
    first label."""
    kang = {"cell_type": "CD14+Mono", "condition": "stimulated"}
    labels = model.data_spec.categorical if model.data_spec is not None else {}
    return {k: kang[k] if kang.get(k) in v else v[0] for k, v in labels.items()}


def build_model(args, device):
    import scidiff
    from scidiff.config import ModelConfig

    if args.model:
        model = scidiff.load_model(args.model)
        return model.to(device), bench_conditioning(model)
    if not os.path.exists(args.data):
        sys.exit(f"missing {args.data}: this benchmark needs ../shared/data beside the project (or --model)")
    adata = scidiff.data.read_h5ad(args.data)
    data = scidiff.setup_anndata(adata, condition_keys=["cell_type", "condition"], n_top_genes=args.genes)
    cfg = ModelConfig(gene_dim=args.genes, latent_dim=args.latent_dim or None)
    model = scidiff.ScIDiffModel.from_data(data, **cfg.model_kwargs())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embeddings" not in name:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    if args.save_model:
        scidiff.save_model(model, args.save_model)
    return model.eval().to(device), bench_conditioning(model)


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--model", default=None, help="benchmark this saved model instead of building one from --data")
    p.add_argument("--save-model", default=None, help="write the model built from --data here")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="256,1024,4096,16384,65536")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--latent-dim", type=int, default=64, help="0 = diffuse in gene space")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=90.0, help="skip a run projected to take longer")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs, for runs under 15 s")
    p.add_argument("--methods", default="eager,engine,engine_fp32,engine_torch_ops,engine_to_cpu,onnx,engine_25,"
                                        "engine_distilled,engine_25_smooth,engine_distilled_smooth")
    p.add_argument("--distilled-steps", type=int, default=4, help="the student's steps when the model has none")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for the fraction-of-peak column")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sampling.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from scidiff.engine import SamplingEngine
    from scidiff.engine import cpu_has_bf16

    model, cond = build_model(args, device)
    flops = flops_per_cell_step(model)
    methods = {}
    wanted = args.methods.split(",")
    if "eager" in wanted:
        methods["eager"] = lambda b, seed: model.sample(b, cond, sampler="ddim", steps=args.steps, seed=seed)
    engine = SamplingEngine(model, "ddim", args.steps, threads=args.threads)
    if "engine" in wanted:
        methods["engine"] = lambda b, seed: engine.sample(b, cond, seed=seed, to_cpu=False)
    if "engine_fp32" in wanted:
        engine32 = SamplingEngine(model, "ddim", args.steps, dtype=torch.float32, cuda_graph=device.type == "cuda")
        methods["engine_fp32"] = lambda b, seed: engine32.sample(b, cond, seed=seed, to_cpu=False)
    if "engine_torch_ops" in wanted and device.type == "cuda":
        engine_torch = SamplingEngine(model, "ddim", args.steps, threads=args.threads)

        def engine_torch_ops(b, seed):  # dispatch happens while the graph is captured (first call per shape)
            with mock.patch.dict(os.environ, {"SCIDIFF_KERNELS": "torch"}):
                return engine_torch.sample(b, cond, seed=seed, to_cpu=False)
        methods["engine_torch_ops"] = engine_torch_ops
    if "engine_to_cpu" in wanted and device.type == "cuda":
        methods["engine_to_cpu"] = lambda b, seed: engine.sample(b, cond, seed=seed)
    evaluations = {name: args.steps for name in methods}
    if "engine_25" in wanted:
        engine25 = SamplingEngine(model, "dpmpp_2m", 25, threads=args.threads)
        methods["engine_25"], evaluations["engine_25"] = (lambda b, seed: engine25.sample(b, cond, seed=seed,
                                                                                          to_cpu=False)), 25
    if "engine_distilled" in wanted:
        if model.student is None:  # throughput does not depend on the weights: the network as its own student
            from scidiff.diffusion.distillation import Student
            model.student = Student(args.distilled_steps, {k: v.detach().clone() for k, v in model.named_parameters()})
        student_engine = SamplingEngine(model, "distilled", threads=args.threads)
        methods["engine_distilled"] = lambda b, seed: student_engine.sample(b, cond, seed=seed, to_cpu=False)
        evaluations["engine_distilled"] = student_engine.steps
    if "engine_25_smooth" in wanted:
        methods["engine_25_smooth"], evaluations["engine_25_smooth"] = (
            lambda b, seed: engine25.sample(b, cond, seed=seed, to_cpu=False, observed=False)), 25
    if "engine_distilled_smooth" in wanted:
        methods["engine_distilled_smooth"] = lambda b, seed: student_engine.sample(b, cond, seed=seed, to_cpu=False,
                                                                                   observed=False)
        evaluations["engine_distilled_smooth"] = student_engine.steps
    onnx_info = None
    tmp = tempfile.TemporaryDirectory()
    if "onnx" in wanted:
        try:
            from scidiff.export import export_onnx
            from scidiff.export.runtime import OnnxSampler
        except ImportError as exc:
            onnx_info = {"skipped": f"scidiff.export unavailable: {exc}"}
        else:
            t0 = time.perf_counter()
            path = os.path.join(tmp.name, "model.onnx")
            res = export_onnx(model, path, sampler="ddim", steps=args.steps)
            onnx = OnnxSampler(path, device="cuda" if device.type == "cuda" else "cpu", threads=args.threads)
            onnx_info = {"export_seconds": round(time.perf_counter() - t0, 1), "providers": onnx.providers,
                         "max_abs_error_vs_torch": res.get("max_abs_error")}
            methods["onnx"] = lambda b, seed: onnx.sample(b, cond, seed=seed, sampler="ddim", steps=args.steps,
                                                          output="arrays")["X"]
            evaluations["onnx"] = args.steps

    # the same cells: engine vs eager at the smallest batch (bf16 rounding only)
    b0 = int(args.batch_sizes.split(",")[0])
    agreement = {}
    ref = np.asarray(methods["eager"](b0, 0).cpu()) if "eager" in methods else None
    for name, fn in methods.items():
        out = fn(b0, 0)  # also the warm-up (CUDA graph capture, Triton compilation, ORT session)
        if ref is not None and name in ("engine", "engine_fp32", "engine_torch_ops", "engine_to_cpu"):
            # (ONNX draws x_T from numpy's generator; engine_25 and engine_distilled sample otherwise)
            out = np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out)
            agreement[name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    rows, last = [], {}
    for b in [int(s) for s in args.batch_sizes.split(",")]:
        row = {"batch": b}
        for name, fn in methods.items():
            if name in last and b / last[name] > args.max_seconds:
                row[name] = {"skipped": f"projected {b / last[name]:.0f} s > --max-seconds {args.max_seconds:g}"}
                print(f"batch {b:6d} {name:12s} skipped (projected {b / last[name]:.0f} s)", flush=True)
                continue
            try:
                seconds, _ = timed(lambda: fn(b, 1), sync)
                for _ in range(args.repeats - 1):  # best of several where a run is short (shared machines)
                    if seconds > 15:
                        break
                    seconds = min(seconds, timed(lambda: fn(b, 1), sync)[0])
            except torch.cuda.OutOfMemoryError:
                row[name] = {"skipped": "out of memory"}
                continue
            cps = b / seconds
            last[name] = cps
            row[name] = {"seconds": round(seconds, 3), "cells_per_s": round(cps, 1),
                         "network_evaluations": evaluations[name],
                         "model_tflops": round(cps * evaluations[name] * flops["nominal"] / 1e12, 4)}
            print(f"batch {b:6d} {name:12s} {seconds:8.2f} s {cps:10.0f} cells/s", flush=True)
        for few, many in (("engine_distilled", "engine_25"), ("engine_distilled_smooth", "engine_25_smooth")):
            if "cells_per_s" in row.get(few, {}) and "cells_per_s" in row.get(many, {}):
                row[few]["speedup_vs_" + many] = round(row[few]["cells_per_s"] / row[many]["cells_per_s"], 2)
        if "eager" in row and "cells_per_s" in row["eager"]:
            for name in methods:
                if name != "eager" and "cells_per_s" in row.get(name, {}):
                    row[name]["speedup_vs_eager"] = round(row[name]["cells_per_s"] / row["eager"]["cells_per_s"], 2)
        rows.append(row)

    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name(device)), None)
    best = {name: max((r[name]["cells_per_s"] for r in rows if "cells_per_s" in r.get(name, {})), default=None)
            for name in methods}
    result = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "threads": args.threads, "cpu_bf16": cpu_has_bf16() if device.type == "cpu" else None,
        "engine": {"dtype": str(engine.dtype), "chunk_size": engine.chunk_size, "cuda_graph": engine.cuda_graph},
        "model": {"source": os.path.basename(args.model) if args.model else "random weights, Kang's 2,000 HVGs",
                  "genes": model.gene_dim, "latent_dim": model.latent_dim, "hidden_dim": model.hidden_dim,
                  "num_layers": model.num_layers, "num_timesteps": model.num_timesteps},
        "sampler": "ddim", "steps": args.steps, "flops_per_cell_step": flops,
        "relative_difference_vs_eager_at_batch_%d" % b0: agreement, "onnx": onnx_info, "rows": rows,
        "best_cells_per_s": best,
    }
    if peak and best.get("engine"):
        result["engine_fraction_of_bf16_peak"] = {
            "peak_tflops": peak,
            "nominal_flops": round(best["engine"] * args.steps * flops["nominal"] / (peak * 1e12), 4),
            "executed_flops": round(best["engine"] * args.steps * flops["engine"] / (peak * 1e12), 4)}
    if device.type == "cpu" and best.get("engine") and best.get("eager"):
        result["goal_cpu_engine_1.5x_eager"] = bool(best["engine"] >= 1.5 * best["eager"])
    if best.get("engine_distilled") and best.get("engine_25"):
        result["distilled_steps"] = evaluations["engine_distilled"]
        ratios = [r["engine_distilled"]["speedup_vs_engine_25"] for r in rows
                  if "speedup_vs_engine_25" in r.get("engine_distilled", {})]
        result["distilled_vs_engine_25"] = {"min": min(ratios), "max": max(ratios)}
        smooth = [r["engine_distilled_smooth"]["speedup_vs_engine_25_smooth"] for r in rows
                  if "speedup_vs_engine_25_smooth" in r.get("engine_distilled_smooth", {})]
        if smooth:
            result["distilled_vs_engine_25_smooth_output"] = {"min": min(smooth), "max": max(smooth)}
        if device.type == "cpu":
            result["goal_cpu_distilled_5x_engine_25"] = bool(min(ratios) >= 5.0)
    if device.type == "cuda" and best.get("engine_distilled"):
        result["goal_gpu_distilled_5M_cells_per_s"] = bool(best["engine_distilled"] >= 5e6)
    if device.type == "cuda" and best.get("engine"):
        result["goal_gpu_1M_cells_per_s"] = bool(best["engine"] >= 1e6)
        if best.get("eager"):
            result["goal_gpu_20x_eager"] = bool(best["engine"] >= 20 * best["eager"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    md = markdown_table(result, list(methods))
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(md)
    print(md)


def markdown_table(result: dict, methods: list[str]) -> str:
    versus_eager = "eager" in methods and "engine" in methods
    lines = [f"Device: {result['device']}, torch {result['torch']}, {result['threads']} thread(s); "
             f"DDIM, {result['steps']} steps; model {result['model']}; engine {result['engine']['dtype']}.", "",
             "| batch | " + " | ".join(f"{m} cells/s" for m in methods) + (" | engine / eager |" if versus_eager else " |"),
             "|---:|" + "---:|" * (len(methods) + versus_eager)]
    for r in result["rows"]:
        cells = [f"{r[m]['cells_per_s']:,.0f}" if "cells_per_s" in r.get(m, {}) else "skipped" for m in methods]
        speed = r.get("engine", {}).get("speedup_vs_eager")
        lines.append(f"| {r['batch']:,} | " + " | ".join(cells)
                     + (f" | {speed if speed else '-'}x |" if versus_eager else " |"))
    if "distilled_vs_engine_25" in result:
        d, steps = result["distilled_vs_engine_25"], result["distilled_steps"]
        lines += ["", f"engine_25: DPM-Solver++(2M), 25 steps; engine_distilled: the distilled student, "
                      f"{steps} step{'s' if steps != 1 else ''}; distilled / engine_25: {d['min']:.2f}x to {d['max']:.2f}x "
                      "(measured cells, the default output)."]
        if "distilled_vs_engine_25_smooth_output" in result:
            d = result["distilled_vs_engine_25_smooth_output"]
            lines[-1] += f" With smooth output (`_smooth` columns): {d['min']:.2f}x to {d['max']:.2f}x."
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
