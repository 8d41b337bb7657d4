"""``scidiff`` command line: train, sample, evaluate, demo, export-onnx, serve."""
from __future__ import annotations

import argparse
import sys

from .design import add_design, cmd_design
from .export.commands import add_export_onnx, add_serve, cmd_export_onnx, cmd_serve


def _add_train(sub):
    p = sub.add_parser("train", help="train a model on an .h5ad file",
                       description="Train a conditional diffusion model on an .h5ad file and write RUN_DIR/model.pt.")
    p.add_argument("--data", required=True, help="input .h5ad (raw counts or log-normalised)")
    p.add_argument("--out", required=True, help="run folder for model.pt, config.yaml, history.csv")
    p.add_argument("--condition-keys", default=None,
                   help="comma-separated obs keys to condition on, e.g. cell_type,condition")
    p.add_argument("--config", default=None, help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="override training.num_epochs")
    p.add_argument("--layer", default=None, help="read expression from this layer instead of X")
    p.add_argument("--use-raw", action="store_true", help="read expression from .raw")
    p.add_argument("--n-genes", type=int, default=None, help="number of highly variable genes (model.gene_dim)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--perturbation-keys", default=None,
                   help="comma-separated condition keys that are perturbations (A+B = combination)")
    p.add_argument("--dose-key", default=None, help="numeric obs column with the perturbation dose")
    p.add_argument("--control-labels", default=None, help="comma-separated labels meaning no perturbation")
    p.add_argument("--streaming", action="store_true",
                   help="stream batches from the file on disk instead of loading X (files larger than memory)")
    g = p.add_argument_group("scale and faults",
                             "Several processes: torchrun --nproc_per_node N -m scidiff train ... (DDP; each process "
                             "trains on its own shard; effective batch = batch size x N x gradient accumulation, the "
                             "learning rate is not rescaled).")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (weights, optimizer, schedule, RNG states and "
                        "position in the data); starts afresh when there is none. Give the same --epochs as before")
    g.add_argument("--mixed-precision", choices=["auto", "bf16", "no"], default=None,
                   help="bf16 autocast (auto = on CUDA only)")
    g.add_argument("--gradient-accumulation", type=int, default=None, help="micro-batches per optimizer step")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the score network's blocks in the backward pass (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward and backward")
    g.add_argument("--checkpoint-every-steps", type=int, default=None,
                   help="also checkpoint every N optimizer steps (mid-epoch too)")
    g.add_argument("--keep-checkpoints", type=int, default=None, help="keep the newest N checkpoints")
    g.add_argument("--log-every-steps", type=int, default=None,
                   help="append loss and cells/s to RUN/steps.csv every N steps")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (bit-exact resume on GPU; slower)")


def _add_sample(sub):
    p = sub.add_parser("sample", help="generate cells from a trained model",
                       description="Generate cells; the output .h5ad has the model's genes as var_names "
                                   "and the conditions in obs.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("-n", type=int, required=True, help="cells per condition")
    p.add_argument("--condition", action="append", default=None,
                   help="key=value[,key=value]; repeat the flag for several groups")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["ddim", "ddpm", "dpmpp_2m", "euler_maruyama", "heun"],
                   help="ddim, ddpm, dpmpp_2m (DPM-Solver++ 2M: 25 steps match DDPM's 1,000 on Kang), heun "
                        "(probability-flow ODE, 2 evaluations a step), euler_maruyama (reverse SDE)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--observed", action="store_true",
                   help="write measured cells (sparse, with the training data's detection rates; principal-axes "
                        "models) instead of their smooth expression")
    p.add_argument("--engine", action="store_true",
                   help="the fast sampling engine (bf16 network where supported, per-condition caching; "
                        "CUDA graphs and Triton kernels on a GPU)")
    p.add_argument("--out", required=True,
                   help="output .h5ad; or a folder (any path not ending in .h5ad, and always under torchrun): one "
                        "shard per process (each its share of the cells and its own seed stream) + manifest.json")
    p.add_argument("--merge", action="store_true",
                   help="with a folder: also concatenate the shards into FOLDER/generated.h5ad")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="score generated cells against real ones",
                       description="Write metrics.json and PNG plots comparing generated to real cells.")
    p.add_argument("--real", required=True)
    p.add_argument("--generated", required=True)
    p.add_argument("--groupby", default=None, help="obs key present in both files, e.g. cell_type")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-plots", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="train, sample and evaluate on PBMCs bundled with scanpy",
                       description="Train on scanpy's pbmc68k_reduced conditioned on bulk_labels, generate "
                                   "every cell type, evaluate and write a report (about 5 minutes on 2 cores).")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)


def _add_predict(sub):
    p = sub.add_parser("predict", help="predict perturbation responses of control cells",
                       description="Map each control cell to its predicted perturbed state (DDIM inversion under "
                                   "its own condition, decoding under the target) and write an .h5ad that pairs "
                                   "every input cell with its prediction (X = predicted, layers['control'] = input).")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="control cells (.h5ad)")
    p.add_argument("--target", required=True, help="key=value[,key=value], e.g. condition=stimulated or drug=A+B,dose=10")
    p.add_argument("--method", default="counterfactual", choices=["counterfactual", "population"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")


def _add_denoise(sub):
    p = sub.add_parser("denoise", help="denoise cells with a trained model as the prior",
                       description="Denoise scRNA-seq (SDEdit, or posterior sampling with the Poisson likelihood of "
                                   "the counts); denoised log1p values go to layers['scidiff_denoised'], cells and "
                                   "genes keep their order.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="cells to denoise (.h5ad)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--method", default="sdedit", choices=["sdedit", "posterior"])
    p.add_argument("--strength", type=float, default=None, help="noise level in (0, 1] (default: chosen by MCV)")
    p.add_argument("--likelihood-weight", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=1, help="posterior samples to average")
    p.add_argument("--layer", default=None, help="read expression from this layer (e.g. counts)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="scidiff", description="Score-based diffusion for single-cell expression.")
    parser.add_argument("--version", action="version", version=f"scidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_sample, _add_evaluate, _add_predict, add_design, _add_demo, add_export_onnx,
                add_serve):
        add(sub)
    return parser


def _split(text):
    return [k.strip() for k in text.split(",") if k.strip()] if text is not None else None


def cmd_train(args):
    from . import pipeline
    from .config import load_config

    overrides = {"model": {"gene_dim": args.n_genes},
                 "training": {"batch_size": args.batch_size, "seed": args.seed,
                              "mixed_precision": args.mixed_precision,
                              "gradient_accumulation": args.gradient_accumulation,
                              "gradient_checkpointing": True if args.gradient_checkpointing else None,
                              "compile": True if args.compile else None,
                              "checkpoint_every_steps": args.checkpoint_every_steps,
                              "keep_checkpoints": args.keep_checkpoints, "log_every_steps": args.log_every_steps},
                 "data": {"layer": args.layer, "use_raw": True if args.use_raw else None,
                          "perturbation_keys": _split(args.perturbation_keys), "dose_key": args.dose_key,
                          "control_labels": _split(args.control_labels)}}
    config = load_config(args.config, overrides)
    keys = _split(args.condition_keys)
    if keys is not None and config.data.perturbation_keys:
        keys = list(dict.fromkeys(keys + config.data.perturbation_keys))
    pipeline.train(args.data, args.out, config, condition_keys=keys, epochs=args.epochs, device=args.device,
                   streaming=args.streaming, resume=args.resume, deterministic=args.deterministic)
    from .training import distributed

    if distributed.is_main_process():
        print(f"model written to {args.out}")
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def _sharded_output(out: str) -> bool:
    from .training import distributed

    if distributed.env_world_size() > 1:
        if out.endswith(".h5ad"):
            raise ValueError(f"under torchrun every process writes its own shard: give --out a folder, not {out!r}")
        return True
    return not out.endswith(".h5ad")


def _sample_sharded(args, model, groups):
    """``sample --out FOLDER``: this process's shard (all of it without torchrun), then rank 0
    writes the manifest (and the merged file)."""
    import torch.distributed as dist

    from . import pipeline
    from .training import distributed

    world = distributed.env_world_size()
    if args.engine:
        raise ValueError("--engine writes one file; use it without a folder --out (sharded output uses the "
                         "standard sampler)")
    if world > 1 and not distributed.is_distributed():
        dist.init_process_group("gloo")  # only for the barrier before the manifest
        if str(args.device).startswith("cuda"):
            model.to(distributed.distributed_device("cuda"))
    try:
        manifest = pipeline.generate_sharded(model, args.n, args.out, groups, rank=distributed.rank(), world_size=world,
                                             sampler=args.sampler, steps=args.steps, eta=args.eta,
                                             guidance_scale=args.guidance, seed=args.seed, merge=args.merge,
                                             progress=distributed.is_main_process(), observed=args.observed)
    finally:
        if world > 1 and distributed.is_distributed():
            dist.destroy_process_group()
    if manifest is not None:
        print(f"wrote {manifest['cells']} cells x {manifest['genes']} genes to {args.out} "
              f"({len(manifest['shards'])} shard(s), {pipeline.MANIFEST}"
              + (f", {pipeline.MERGED_FILE})" if args.merge else ")"))


def cmd_sample(args):
    from . import pipeline
    from .training import load_model

    model = load_model(args.model, map_location=args.device)
    groups = [pipeline.parse_conditions(c) for c in (args.condition or [None])]
    for g in groups:  # fail on a bad label before generating anything
        model.data_spec.encode_conditions(g, 1)
    if _sharded_output(args.out):
        return _sample_sharded(args, model, groups)
    # written chunk by chunk (bounded memory, progress bar); the file appears when complete
    if args.engine:
        from .sampling import SamplingEngine

        engine = SamplingEngine(model, args.sampler, args.steps, eta=args.eta, guidance_scale=args.guidance)
        cells, genes = engine.write_h5ad(args.out, args.n, groups, seed=args.seed, observed=args.observed)
    else:
        cells, genes = pipeline.generate_to_file(model, args.n, args.out, groups, sampler=args.sampler,
                                                 steps=args.steps, eta=args.eta, guidance_scale=args.guidance,
                                                 seed=args.seed, observed=args.observed)
    print(f"wrote {cells} cells x {genes} genes to {args.out}")


def cmd_evaluate(args):
    import json

    from . import pipeline

    metrics = pipeline.evaluate_files(args.real, args.generated, args.out, args.groupby, plots=not args.no_plots)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1, default=float))


def cmd_predict(args):
    from . import pipeline
    from .perturbation import predict_perturbation
    from .training import load_model

    model = load_model(args.model)
    target = pipeline.parse_conditions(args.target)
    for key in [k for k in target if k in model.data_spec.continuous]:
        try:
            target[key] = float(target[key])
        except ValueError:
            raise ValueError(f"{key} must be a number, got {target[key]!r}") from None
    out = predict_perturbation(model, args.data, target, method=args.method, steps=args.steps,
                               guidance_scale=args.guidance, seed=args.seed)
    pipeline.write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} predicted cells x {out.n_vars} genes to {args.out}")


def cmd_denoise(args):
    from . import pipeline
    from .denoising import DEFAULT_STRENGTH, denoise
    from .training import load_model

    model = load_model(args.model)
    out = denoise(model, args.data, method=args.method, strength=args.strength or DEFAULT_STRENGTH,
                  likelihood_weight=args.likelihood_weight, n_samples=args.samples, layer=args.layer, seed=args.seed)
    pipeline.write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} denoised cells x {out.n_vars} genes to {args.out} (layers['scidiff_denoised'])")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "predict": cmd_predict, "denoise": cmd_denoise,
            "design": cmd_design,
            "demo": cmd_demo,
            "export-onnx": cmd_export_onnx, "serve": cmd_serve}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"scidiff {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
