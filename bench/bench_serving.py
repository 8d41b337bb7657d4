"""Serving: the onnxruntime sampler against the torch eager sampler, and a bounded HTTP load test.

1. A model of the default architecture (2,000 HVGs, hidden 512, 6 blocks, 64-dim PCA latent, 1,000
   timesteps) is trained for a few epochs on Kang IFN-beta PBMCs (or ``--model RUN`` is used) and
   exported with :func:`scidiff.export.export_onnx`.
2. Throughput, same machine, same run, one thread each: ``ScIDiffModel.sample`` (torch eager, the
   reference sampler) vs :class:`scidiff.export.runtime.OnnxSampler` (numpy + onnxruntime), same
   batch (``--batch`` cells of one condition), sampler and steps, with and without classifier-free
   guidance; on CPU, and also on CUDA when a GPU and onnxruntime-gpu are present. Cells/s is the median over ``--repeats`` timed runs (the two samplers alternating)
   after a warm-up run each.
3. Load test: ``scidiff serve`` in a subprocess on 127.0.0.1 (one onnxruntime thread);
   ``--clients`` client threads send ``--requests`` requests in total (``--cells`` cells each,
   rotating conditions and seeds), stopping when all are answered or after ``--max-seconds``.
   Reports throughput, p50/p99 latency, errors and how many requests the batcher merged per run.
4. Fairness: ``scidiff serve`` again (one onnxruntime thread, ``--slice-cell-steps`` cells x steps
   per scheduler slice). A small request (``--fair-small-cells`` cells, ``--fair-small-steps``
   steps) is timed alone, then one after another while a big one (``--fair-big-cells`` x
   ``--fair-big-steps``) runs; reported with the big request's time and the time of one slice
   (the big request's time over its slices), the bound a small request should stay near.

    python bench/bench_serving.py [--model RUN] [--out bench/results/serving.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import machine_info  # bench/machine_info.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")


def machine() -> dict:
    import onnxruntime
    import torch

    return machine_info.machine(torch=torch.__version__, onnxruntime=onnxruntime.__version__)


def train_model(epochs: int, seed: int = 0):
    import scidiff
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    if not os.path.exists(DATA):
        sys.exit(f"needs the Kang data at {DATA} (or pass --model RUN)")
    import torch

    torch.manual_seed(seed)
    cells = scidiff.setup_anndata(DATA, n_top_genes=2000, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(cells, hidden_dim=512, num_layers=6, num_timesteps=1000, latent_dim=64)
    ScIDiffTrainer(model, cells.loader(256, seed=seed), device="cpu", warmup_steps=20,
                   early_stopping_patience=None, progress=False, seed=seed).train(epochs)
    return model.eval()


def time_interleaved(fns: list, repeats: int) -> list[list[float]]:
    """Seconds per call of each function, alternating between them (so a change in the load of
    a shared machine hits both alike), after one warm-up call each."""
    for fn in fns:
        fn(0)
    out = [[] for _ in fns]
    for i in range(repeats):
        for fn, times in zip(fns, out):
            t0 = time.perf_counter()
            fn(i + 1)
            times.append(time.perf_counter() - t0)
    return out


def throughput(model, onnx_path, batch: int, steps: int, repeats: int, condition: dict,
               device: str = "cpu") -> list[dict]:
    import torch

    from scidiff.export.runtime import OnnxSampler

    torch.set_num_threads(1)
    ort_sampler = OnnxSampler(onnx_path, device=device, threads=1)
    model = model.to(device)
    rows = []
    for sampler, n_steps, w in (("ddim", steps, 1.0), ("ddim", steps, 2.0), ("dpmpp_2m", 20, 1.0)):
        def run_torch(seed):
            model.sample(batch, condition, sampler=sampler, steps=n_steps, guidance_scale=w, seed=seed)
            if device == "cuda":
                torch.cuda.synchronize()

        def run_onnx(seed):
            ort_sampler.sample(batch, condition, sampler=sampler, steps=n_steps, guidance=w, seed=seed, output="arrays")

        t_torch, t_onnx = time_interleaved([run_torch, run_onnx], repeats)
        row = {"device": device, "providers": ort_sampler.providers, "sampler": sampler, "steps": n_steps,
               "guidance": w, "batch": batch,
               "torch_eager_cells_per_s": round(batch / statistics.median(t_torch), 1),
               "onnxruntime_cells_per_s": round(batch / statistics.median(t_onnx), 1),
               "torch_seconds": [round(t, 4) for t in t_torch], "onnxruntime_seconds": [round(t, 4) for t in t_onnx]}
        row["speedup"] = round(row["onnxruntime_cells_per_s"] / row["torch_eager_cells_per_s"], 2)
        print(f"  [{device}] {sampler} {n_steps} steps, guidance {w}: torch {row['torch_eager_cells_per_s']} cells/s, "
              f"onnxruntime {row['onnxruntime_cells_per_s']} cells/s ({row['speedup']}x)", flush=True)
        rows.append(row)
    # the same x_T through both: how close the two samplers' cells are (same sampler, same noise)
    if device == "cpu":
        x_T = torch.randn(batch, model.diffusion_dim, generator=torch.Generator().manual_seed(0))
        a = model.sample(batch, condition, sampler="ddim", steps=steps, generator=torch.Generator().manual_seed(0),
                         observed=False)  # smooth on both sides: the measurements come from different generators
        b = ort_sampler.sample(batch, condition, sampler="ddim", steps=steps, x_T=x_T.numpy(), output="arrays",
                               observed=False)["X"]
        rows.append({"parity_max_abs_diff_expression": float(np.abs(a.numpy() - b).max()), "parity_steps": steps})
    model.to("cpu")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(onnx_path, clients: int, total: int, cells: int, steps: int, max_seconds: float, fmt: str,
              labels: list[str]) -> dict:
    import httpx

    proc, url = start_server(onnx_path, "--window-ms", 5)
    try:
        lock = threading.Lock()
        state = {"next": 0}
        latencies, errors = [], []
        stop_at = time.monotonic() + max_seconds

        def client():
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < stop_at:
                    with lock:
                        i = state["next"]
                        if i >= total:
                            return
                        state["next"] += 1
                    body = {"n": cells, "seed": i, "steps": steps, "format": fmt,
                            "condition": {"cell_type": labels[i % len(labels)]}}
                    t0 = time.perf_counter()
                    try:
                        r = http.post(f"{url}/generate", json=body)
                        ok = r.status_code == 200 and len(r.content) > 0
                    except httpx.HTTPError as exc:
                        ok, r = False, exc
                    dt = time.perf_counter() - t0
                    with lock:
                        (latencies if ok else errors).append(dt if ok else str(getattr(r, "status_code", r)))

        before = httpx.get(f"{url}/health", timeout=10).json()["stats"]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{url}/health", timeout=10).json()["stats"]
    finally:
        stop_server(proc)
    runs = stats["runs"] - before["runs"]
    done = len(latencies)
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests_planned": total, "requests_ok": done, "errors": len(errors),
            "error_samples": errors[:5], "cells_per_request": cells, "steps": steps, "format": fmt,
            "wall_s": round(wall, 2), "requests_per_s": round(done / wall, 2), "cells_per_s": round(done * cells / wall, 1),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if done else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if done else None,
            "latency_ms_max": round(float(lat.max()), 1) if done else None,
            "sampling_runs": runs, "requests_per_run": round(done / runs, 2) if runs else None,
            "scheduler_slices": stats["slices"] - before["slices"] if "slices" in stats else None,
            "max_requests_merged": stats["max_merged"], "stopped_by": "total" if done + len(errors) >= total else "time"}


def start_server(onnx_path, *extra) -> tuple[subprocess.Popen, str]:
    """``scidiff serve`` on a free port of 127.0.0.1 (one onnxruntime thread); returns it and its URL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "scidiff", "serve", "--model", str(onnx_path), "--port", str(port),
                             "--threads", "1", *map(str, extra)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"{url}/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError("the server did not start in 120 s") from None
            time.sleep(0.2)


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def fairness(onnx_path, label: str, big_cells: int, big_steps: int, small_cells: int, small_steps: int,
             slice_cell_steps: int, repeats: int) -> dict:
    """Latency of a small request alone and while a big one runs (the scheduler's slices)."""
    import httpx

    proc, url = start_server(onnx_path, "--slice-cell-steps", slice_cell_steps, "--max-cells", max(big_cells, 10_000),
                             "--max-steps", max(big_steps, 1000))
    small = {"n": small_cells, "steps": small_steps, "sampler": "ddim", "format": "npz", "condition": {"cell_type": label}}
    big = {"n": big_cells, "steps": big_steps, "sampler": "ddim", "format": "npz", "condition": {"cell_type": label}}
    try:
        with httpx.Client(timeout=3600) as http:
            def post(body, seed) -> float:
                t0 = time.perf_counter()
                r = http.post(f"{url}/generate", json={**body, "seed": seed})
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
                return time.perf_counter() - t0

            def slices() -> int:
                return http.get(f"{url}/health").json()["stats"]["slices"]

            post(small, 0)  # warm-up
            alone = [post(small, i) for i in range(repeats)]
            before = slices()
            big_alone = post(big, 0)
            big_slices = slices() - before
            state: dict = {}

            def run_big():
                with httpx.Client(timeout=3600) as other:
                    t0 = time.perf_counter()
                    r = other.post(f"{url}/generate", json={**big, "seed": 1})
                    state.update(seconds=time.perf_counter() - t0, status=r.status_code)

            before = slices()
            thread = threading.Thread(target=run_big)
            thread.start()
            while slices() < before + 2:
                time.sleep(0.005)
            behind = []
            while "seconds" not in state:  # small requests one after another while the big one runs
                t = post(small, 100 + len(behind))
                if "seconds" not in state:
                    behind.append(t)
            thread.join()
            if state["status"] != 200:
                raise RuntimeError(f"the big request failed: {state['status']}")
    finally:
        stop_server(proc)
    slice_ms = 1000 * big_alone / max(big_slices, 1)
    ms = lambda v: round(1000 * v, 1)  # noqa: E731
    return {"slice_cell_steps": slice_cell_steps, "small": f"{small_cells} cells x {small_steps} steps",
            "big": f"{big_cells} cells x {big_steps} steps", "format": "npz", "threads": 1,
            "small_alone_ms_median": ms(statistics.median(alone)),
            "small_behind_big_ms_median": ms(statistics.median(behind)) if behind else None,
            "small_behind_big_ms_max": ms(max(behind)) if behind else None,
            "small_requests_behind_big": len(behind),
            "big_alone_s": round(big_alone, 2), "big_with_small_requests_s": round(state["seconds"], 2),
            "big_slices": big_slices, "one_slice_ms": round(slice_ms, 1),
            "bound_small_alone_plus_one_slice_ms": round(1000 * statistics.median(alone) + slice_ms, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="run folder or model.pt (default: train on Kang)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="total requests in the load test")
    ap.add_argument("--cells", type=int, default=32, help="cells per load-test request")
    ap.add_argument("--load-steps", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--format", default="npz", choices=["json", "npz", "h5ad"])
    ap.add_argument("--slice-cell-steps", type=int, default=2048, help="the server's scheduler slice (fairness row)")
    ap.add_argument("--fair-big-cells", type=int, default=1000)
    ap.add_argument("--fair-big-steps", type=int, default=200)
    ap.add_argument("--fair-small-cells", type=int, default=4)
    ap.add_argument("--fair-small-steps", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serving.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from scidiff.data.io import atomic_path
    from scidiff.export import export_onnx
    from scidiff.training import load_model

    result = {"machine": machine(), "settings": vars(args)}
    t0 = time.perf_counter()
    model = load_model(args.model) if args.model else train_model(args.epochs)
    result["model"] = {k: model.config()[k] for k in ("gene_dim", "hidden_dim", "num_layers", "latent_dim",
                                                      "num_timesteps")}
    result["model"]["trained"] = args.model or f"{args.epochs} epochs on Kang ({os.path.basename(DATA)})"
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    labels = list(model.data_spec.categorical["cell_type"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        exported = export_onnx(model, path, steps=args.steps)
        result["export"] = {"seconds": round(time.perf_counter() - t0, 1), "max_abs_error": exported["max_abs_error"],
                            "onnx_bytes": os.path.getsize(path)}
        print(f"exported in {result['export']['seconds']} s, max abs error {exported['max_abs_error']:.2e}", flush=True)
        print("throughput (1 thread each):", flush=True)
        result["throughput"] = throughput(model, path, args.batch, args.steps, args.repeats, {"cell_type": labels[0]})
        if torch.cuda.is_available():  # a lent GPU: torch eager on CUDA vs onnxruntime's CUDA provider
            try:
                result["throughput"] += throughput(model, path, args.batch, args.steps, args.repeats,
                                                   {"cell_type": labels[0]}, device="cuda")
            except RuntimeError as exc:  # onnxruntime-gpu missing or unusable
                result["gpu_skipped"] = str(exc)
                print(f"  GPU rows skipped: {exc}", flush=True)
        print("load test:", flush=True)
        result["load_test"] = load_test(path, args.clients, args.requests, args.cells, args.load_steps,
                                        args.max_seconds, args.format, labels)
        print("  " + json.dumps({k: v for k, v in result["load_test"].items() if k != "error_samples"}), flush=True)
        print("fairness:", flush=True)
        result["fairness"] = fairness(path, labels[0], args.fair_big_cells, args.fair_big_steps, args.fair_small_cells,
                                      args.fair_small_steps, args.slice_cell_steps, args.repeats)
        print("  " + json.dumps(result["fairness"]), flush=True)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    atomic_path(args.out, lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
