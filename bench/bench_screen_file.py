"""Memory of predicting a screen of many targets: stacked in memory (``predict_screen``, then
``write_h5ad``) against written target by target (``predict_screen_to_file``, what ``scidiff
predict`` does), each in a fresh process, with the same model, control cells and targets.

The model is trained for one epoch (``scidiff train --streaming``) on the synthetic screen of
``bench_screen_streaming.py`` (default 20,000 cells x 2,000 genes, 100 knockouts, all genes kept);
the control cells are ``--controls`` of its non-targeting cells; the targets its first
``--targets`` knockouts; DDIM with ``--steps`` steps.

    python bench/bench_screen_file.py [--targets 40] [--controls 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import machine_info
machine_info.reset_peak_memory()
import torch
torch.set_num_threads({threads})
from scidiff.data import write_h5ad
from scidiff.tasks.screen import predict_screen, predict_screen_to_file
from scidiff.training import load_model

model = load_model({run!r})
targets = [{{"gene": g}} for g in model.data_spec.categorical["gene"][:{targets}]]
t = time.perf_counter()
if {stacked!r}:
    write_h5ad(predict_screen(model, {controls!r}, targets, steps={steps}, progress=False), {out!r})
else:
    predict_screen_to_file(model, {controls!r}, targets, {out!r}, steps={steps}, progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_gb": machine_info.peak_rss_gb()}}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--perturbations", type=int, default=100)
    p.add_argument("--targets", type=int, default=40)
    p.add_argument("--controls", type=int, default=2_000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "screen_file.json"))
    args = p.parse_args(argv)

    import anndata as ad
    import torch

    import machine_info
    import scidiff
    from bench_screen_streaming import write_screen
    from scidiff.cli import main as cli

    root = os.path.join(HERE, "..")
    with tempfile.TemporaryDirectory() as tmp:
        screen = os.path.join(tmp, "screen.h5ad")
        write_screen(screen, args.cells, args.genes, args.perturbations)
        cells = ad.read_h5ad(screen)
        controls = os.path.join(tmp, "controls.h5ad")
        cells[cells.obs["gene"] == "non-targeting"][:args.controls].copy().write_h5ad(controls)
        del cells
        run = os.path.join(tmp, "run")
        assert cli(["train", "--data", screen, "--streaming", "--condition-keys", "gene,gem_group",
                    "--perturbation-keys", "gene", "--control-labels", "non-targeting", "--n-genes", str(args.genes),
                    "--epochs", "1", "--out", run]) == 0
        modes = {}
        for mode, stacked in (("stacked_in_memory", True), ("target_by_target", False)):
            code = CHILD.format(root=root, bench=HERE, threads=args.threads, run=run, targets=args.targets, stacked=stacked,
                                controls=controls, steps=args.steps, out=os.path.join(tmp, f"{mode}.h5ad"))
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            modes[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode}: {modes[mode]['seconds']:.1f} s, peak RSS {modes[mode]['peak_rss_gb']:.2f} GB", flush=True)
    result = {"args": vars(args), "modes": modes,
              "memory_ratio": modes["stacked_in_memory"]["peak_rss_gb"] / modes["target_by_target"]["peak_rss_gb"],
              "time_ratio": modes["stacked_in_memory"]["seconds"] / modes["target_by_target"]["seconds"],
              "machine": machine_info.machine(scidiff=scidiff.__version__, torch=torch.__version__)}
    print(f"stacked / target by target: peak memory {result['memory_ratio']:.2f}x, time {result['time_ratio']:.2f}x")

    machine_info.write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
