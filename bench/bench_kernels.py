"""Where a sampling step's time goes on a GPU: the fused kernels against their torch references at
the engine's shapes, the device's two ceilings, and a profile of the engine's loop.

- ``ceilings``: a large bf16 matrix product (TFLOP/s) and a device-to-device copy (GB/s, bytes
  read plus written), measured here, so each kernel's rate reads against this device.
- ``block``: the modulated residual block ``h + gate * SiLU(W (LN(h)(1 + scale) + shift) + b)``
  at ``[M, 512]``: the torch reference, the fused kernel with one modulation row per cell
  (``per-row``) and with one row for all cells (``shared``, the engine's case). Each with its
  time, TFLOP/s of the ``2 M H^2`` matrix product and GB/s of the fewest bytes (``h`` read once,
  the output written once).
- ``folded_tiles``: each tile of the shared-modulation kernel, fixed, with its error against
  float64 (a miscompiled tile shows there).
- ``sampler_step``: the fused update against the reference at ``[M, D]``.
- ``engine_profile``: the CUDA kernels of one 50-step DDIM batch of the default model through
  the CUDA-graph engine, by total time (torch.profiler).

Needs a CUDA device: in Triton's interpreter the kernels' timings mean nothing. ``--check`` runs
every part on the CPU at toy sizes (``TRITON_INTERPRET=1``), to test the script, not to measure.

    python bench/bench_kernels.py [--rows 4096,65536] [--model .devdata/default_latent64.pt]
    TRITON_INTERPRET=1 python bench/bench_kernels.py --check --rows 33 --hidden 48 --dims 7 --profile-batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def median_ms(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton's do_bench; on the CPU, for
    ``--check``, three wall-clock runs)."""
    if not torch.cuda.is_available():
        import statistics
        import time

        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def ceilings(dev, size: int = 8192, copy_elements: int = 2**28) -> dict:
    a, b = (torch.randn(size, size, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: a @ b)
    src = torch.randn(copy_elements, device=dev, dtype=torch.float32)  # 1 GiB by default
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * size**3 / ms / 1e9, "copy_gb_per_s": 2 * src.numel() * 4 / copy_ms / 1e6}


def block_inputs(dev, m: int, hidden: int, seed: int):
    """bf16 ``h [m, hidden]``, weight, bias and per-row ``shift, scale, gate`` of one block."""
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(m, hidden, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(hidden, hidden, device=dev, generator=g) / hidden**0.5).to(torch.bfloat16)
    bias = torch.randn(hidden, device=dev, generator=g).to(torch.bfloat16) * 0.1
    per_row = [torch.randn(m, hidden, device=dev, generator=g).to(torch.bfloat16) * 0.3 for _ in range(3)]
    return h, w, bias, per_row


def block_rows(dev, rows: list[int], hidden: int) -> list[dict]:
    from scidiff import ops

    kernel = ops.load_kernel("modulated_block")
    out = []
    for m in rows:
        h, w, bias, per_row = block_inputs(dev, m, hidden, 0)
        shared = [t[:1].contiguous() for t in per_row]
        cases = {"torch reference, shared": lambda: ops.modulated_block_reference(h, *shared, w, bias),
                 "fused, shared": lambda: kernel.modulated_block(h, *shared, w, bias),
                 "torch reference, per-row": lambda: ops.modulated_block_reference(h, *per_row, w, bias),
                 "fused, per-row": lambda: kernel.modulated_block(h, *per_row, w, bias)}
        ref = ops.modulated_block_reference(h.double(), *(t.double() for t in shared), w.double(), bias.double())
        err = float((kernel.modulated_block(h, *shared, w, bias).double() - ref).abs().max() / ref.abs().max())
        for name, fn in cases.items():
            ms = median_ms(fn)
            extra = 3 * m * hidden * 2 if "per-row" in name else 0  # the modulation rows, read once
            row = {"rows": m, "hidden": hidden, "case": name, "ms": ms, "tflops": 2 * m * hidden**2 / ms / 1e9,
                   "gb_per_s": (2 * m * hidden * 2 + extra) / ms / 1e6}
            if name == "fused, shared":
                row["relative_error_vs_float64"] = err
            out.append(row)
            print(f"block  M={m:6d} {name:26s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s {row['gb_per_s']:7.0f} GB/s",
                  flush=True)
    return out


def tile_rows(dev, rows: list[int], hidden: int) -> list[dict]:
    """Every tile of the folded (shared-modulation) block kernel, fixed instead of autotuned, and
    the tile that also writes the rows' statistics: time and error against float64. A tile whose
    error stands out is miscompiled on this device."""
    from scidiff import ops

    kernel = ops.load_kernel("modulated_block")
    out = []
    for m in rows:
        h, w, bias, per_row = block_inputs(dev, m, hidden, 1)
        shift, scale, gate = (t[:1].contiguous() for t in per_row)
        ref = ops.modulated_block_reference(*(t.double() for t in (h, shift, scale, gate, w, bias)))
        weight_t, u, v = ops.fold_layer_norm(w, bias, shift, scale)
        mean, rstd = kernel.row_stats(h)
        tiles = [({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, False)
                 for c in kernel.FOLDED_CONFIGS] + [(None, True)]
        for config, stats_out in tiles:
            def run():
                return kernel.folded_linear(h, mean, rstd, weight_t[0], u[0], v[0], gate[0], stats_out=stats_out,
                                            config=config)
            res = run()
            res = res[0] if stats_out else res
            err = float((res.double() - ref).abs().max() / ref.abs().max())
            ms = median_ms(run)
            name = ("statistics-writing tile" if stats_out
                    else "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**config))
            out.append({"rows": m, "hidden": hidden, "tile": name, "ms": ms, "tflops": 2 * m * hidden**2 / ms / 1e9,
                        "relative_error_vs_float64": err})
            print(f"tile   M={m:6d} {name:26s} {ms:8.3f} ms {out[-1]['tflops']:7.1f} TFLOP/s  error {err:.2e}",
                  flush=True)
    return out


def sampler_step_rows(dev, rows: list[int], dims: list[int]) -> list[dict]:
    from scidiff import ops

    kernel = ops.load_kernel("sampler_step")
    out = []
    for m in rows:
        for d in dims:
            x, pred, prev = (torch.randn(m, d, device=dev) for _ in range(3))
            coef = torch.tensor([0.9, 0.1, 0.05, 0.0], device=dev)
            for name, fn in {"torch reference": lambda: ops.sampler_step_reference(x, pred, None, prev, coef),
                             "fused": lambda: kernel.sampler_step(x, pred, None, prev, coef)}.items():
                ms = median_ms(fn)
                row = {"rows": m, "dim": d, "case": name, "ms": ms, "gb_per_s": 5 * m * d * 4 / ms / 1e6}
                out.append(row)
                print(f"step   M={m:6d} D={d:5d} {name:16s} {ms:8.3f} ms {row['gb_per_s']:7.0f} GB/s", flush=True)
    return out


def engine_profile(dev, model_path: str, batch: int, top: int) -> dict:
    import scidiff
    from scidiff.engine import SamplingEngine
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    model = scidiff.load_model(model_path).to(dev)
    cond = {k: v[0] for k, v in model.data_spec.categorical.items()}
    engine = SamplingEngine(model, "ddim", 50)
    engine.sample(batch, cond, seed=0, to_cpu=False)  # capture
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        engine.sample(batch, cond, seed=1, to_cpu=False)
        sync()
    kind = "CUDA" if cuda else "CPU"
    events = [e for e in prof.key_averages() if e.device_type.name == kind]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events)
    rows = sorted(events, key=lambda e: -own(e))[:top]
    table = [{"kernel": e.key[:120], "calls": e.count, "ms": own(e) / 1e3, "share": own(e) / max(total, 1)}
             for e in rows]
    for r in table:
        print(f"{r['share']:6.1%} {r['ms']:9.3f} ms {r['calls']:6d}x  {r['kernel']}", flush=True)
    return {"batch": batch, "device_ms_total": total / 1e3, "kernels": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="4096,65536")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dims", default="64,2000", help="sampler-state widths (latent, genes)")
    p.add_argument("--model", default=os.path.join(os.path.dirname(HERE), ".devdata", "default_latent64.pt"),
                   help="a saved model to profile through the engine (bench_sampling.py --save-model)")
    p.add_argument("--profile-batch", type=int, default=65536)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--check", action="store_true", help="run on the CPU under TRITON_INTERPRET=1 (no numbers)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "kernels.json"))
    args = p.parse_args(argv)
    if args.check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--check needs TRITON_INTERPRET=1 in the environment")
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        sys.exit("bench_kernels.py needs a CUDA device (or --check)")
    rows = [int(r) for r in args.rows.split(",")]
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (--check)",
              "torch": torch.__version__}
    result["ceilings"] = ceilings(dev) if dev.type == "cuda" else ceilings(dev, 64, 2**12)
    print(result["ceilings"], flush=True)
    result["block"] = block_rows(dev, rows, args.hidden)
    result["folded_tiles"] = tile_rows(dev, rows, args.hidden)
    result["sampler_step"] = sampler_step_rows(dev, rows, [int(d) for d in args.dims.split(",")])
    if os.path.exists(args.model):
        result["engine_profile"] = engine_profile(dev, args.model, args.profile_batch, args.top)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
