"""``scidiff`` command line. :data:`COMMANDS` is the one table of commands (name -> how to add
its arguments, how to run it): the parser is built from it and :func:`main` dispatches through
it. :func:`main` turns bad input into ``scidiff CMD: error: ...`` and exit status 2
(:func:`user_error`); anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from typing import Callable, NamedTuple

from .design import add_design, cmd_design
from .export.commands import add_export_onnx, add_serve, cmd_export_onnx, cmd_serve

SAMPLER_CHOICES = ["ddim", "ddpm", "dpmpp_2m", "euler_maruyama", "heun"]


# -- argument types: a bad value is an argparse error (exit 2) that names the flag ----------------
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_value(text: str) -> int:
    """A seed in [0, 2**32): what every generator (numpy's too) takes."""
    value = _integer(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {text}")
    return value


def finite_float(text: str) -> float:
    return _real(text)


def nonnegative_float(text: str) -> float:
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1]."""
    value = _real(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_train(sub):
    p = sub.add_parser("train", help="train a model on an .h5ad file",
                       description="Train a conditional diffusion model on an .h5ad file and write RUN_DIR/model.pt.")
    p.add_argument("--data", required=True, help="input .h5ad (raw counts or log-normalised)")
    p.add_argument("--out", required=True, help="run folder for model.pt, config.yaml, history.csv")
    p.add_argument("--condition-keys", default=None,
                   help="comma-separated obs keys to condition on, e.g. cell_type,condition")
    p.add_argument("--config", default=None, help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--epochs", type=positive_int, default=None, help="override training.num_epochs")
    p.add_argument("--layer", default=None, help="read expression from this layer instead of X")
    p.add_argument("--use-raw", action="store_true", help="read expression from .raw")
    p.add_argument("--n-genes", type=positive_int, default=None,
                   help="number of highly variable genes (model.gene_dim)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--seed", type=seed_value, default=None,
                   help="seeds everything random in the run (default: training.seed)")
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
    g.add_argument("--gradient-accumulation", type=positive_int, default=None,
                   help="micro-batches per optimizer step")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the score network's blocks in the backward pass (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward and backward")
    g.add_argument("--checkpoint-every-steps", type=nonnegative_int, default=None,
                   help="also checkpoint every N optimizer steps (mid-epoch too)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=None, help="keep the newest N checkpoints")
    g.add_argument("--log-every-steps", type=nonnegative_int, default=None,
                   help="append loss and cells/s to RUN/steps.csv every N steps")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: with --seed, identical runs give bit-identical models "
                        "(and bit-exact resume on GPU; slower)")


def _add_sample(sub):
    p = sub.add_parser("sample", help="generate cells from a trained model",
                       description="Generate cells; the output .h5ad has the model's genes as var_names "
                                   "and the conditions in obs.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("-n", type=positive_int, required=True, help="cells per condition")
    p.add_argument("--condition", action="append", default=None,
                   help="key=value[,key=value]; repeat the flag for several groups")
    p.add_argument("--config", default=None,
                   help="YAML whose sampling section gives the defaults of --sampler, --steps, --eta and --guidance "
                        "(default: the run's config.yaml, else dpmpp_2m, 25 steps, eta 0, guidance 1)")
    p.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                   help="ddim, ddpm, dpmpp_2m (DPM-Solver++ 2M: 25 steps match DDPM's 1,000 on Kang), heun "
                        "(probability-flow ODE, 2 evaluations a step), euler_maruyama (reverse SDE)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--eta", type=nonnegative_float, default=None)
    p.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--device", type=device_name, default="cpu")
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
    p.add_argument("--epochs", type=positive_int, default=400)
    p.add_argument("--seed", type=seed_value, default=0)


def _add_predict(sub):
    p = sub.add_parser("predict", help="predict perturbation responses of control cells",
                       description="Map each control cell to its predicted perturbed state (DDIM inversion under "
                                   "its own condition, decoding under the target) and write an .h5ad that pairs "
                                   "every input cell with its prediction (X = predicted, layers['control'] = input).")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="control cells (.h5ad)")
    p.add_argument("--target", required=True, help="key=value[,key=value], e.g. condition=stimulated or drug=A+B,dose=10")
    p.add_argument("--method", default="counterfactual", choices=["counterfactual", "population"])
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM inversion and decoding steps")
    p.add_argument("--config", default=None,
                   help="YAML whose sampling section gives the default of --guidance (default: the run's config.yaml)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: sampling.guidance_scale of the config, else 1)")
    p.add_argument("--seed", type=seed_value, default=0)
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
    p.add_argument("--strength", type=unit_interval, default=None,
                   help="noise level in (0, 1] (default: chosen by MCV)")
    p.add_argument("--likelihood-weight", type=nonnegative_float, default=1.0)
    p.add_argument("--samples", type=positive_int, default=1, help="posterior samples to average")
    p.add_argument("--layer", default=None, help="read expression from this layer (e.g. counts)")
    p.add_argument("--seed", type=seed_value, default=0)


# -- what the handlers share ---------------------------------------------------------------------
def check_out(path, folder: bool = False) -> str:
    """Fail before any work when ``--out`` cannot be written: a file where a folder is needed or
    the other way round, a file in the way of its folder, or a folder without write permission.
    A file's missing parent folders are created. Returns the path."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"--out {path!r} is a file; give a folder")
    if not folder and os.path.isdir(full):
        raise ValueError(f"--out {path!r} is a folder; give a file path")
    existing = full if folder else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write --out {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {path!r}: no permission to write in {existing!r}")
    if not folder:
        os.makedirs(os.path.dirname(full), exist_ok=True)
    return path


def parse_conditioning(model, text: str | None, flag: str) -> dict:
    """``key=value[,key=value]`` of ``flag`` as conditioning the model accepts (numeric
    covariates as numbers); a bad key, label or number is an error naming the flag."""
    from .pipeline import parse_conditions

    try:
        conditions = parse_conditions(text)
        spec = model.data_spec
        if spec is not None:
            for key in [k for k in conditions if k in spec.continuous]:
                try:
                    conditions[key] = float(conditions[key])
                except ValueError:
                    raise ValueError(f"{key} must be a number, got {conditions[key]!r}") from None
            spec.encode_conditions(conditions, 1)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{flag} {text!r}: {user_error(exc) or exc}") from None
    return conditions


def sampling_settings(args) -> dict:
    """``sampler``, ``steps``, ``eta`` and ``guidance_scale``: each flag given, else the sampling
    section of ``--config``, else of the run's config.yaml, else the defaults."""
    from .config import sampling_config

    section = sampling_config(args.model, getattr(args, "config", None))
    given = {"sampler": getattr(args, "sampler", None), "steps": getattr(args, "steps", None),
             "eta": getattr(args, "eta", None), "guidance_scale": getattr(args, "guidance", None)}
    return {k: v if v is not None else getattr(section, k) for k, v in given.items()}


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
    check_out(args.out, folder=True)
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


def _sample_sharded(args, model, groups, settings):
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
                                             seed=args.seed, merge=args.merge, progress=distributed.is_main_process(),
                                             observed=args.observed, **settings)
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
    from .training.trainer import resolve_device

    settings = sampling_settings(args)  # a bad --config fails before the model loads
    sharded = _sharded_output(args.out)
    check_out(args.out, folder=sharded)
    model = load_model(args.model, map_location=str(resolve_device(args.device)))
    groups = [parse_conditioning(model, c, "--condition") for c in (args.condition or [None])]
    if sharded:
        return _sample_sharded(args, model, groups, settings)
    # written chunk by chunk (bounded memory, progress bar); the file appears when complete
    if args.engine:
        from .sampling import SamplingEngine

        engine = SamplingEngine(model, settings["sampler"], settings["steps"], eta=settings["eta"],
                                guidance_scale=settings["guidance_scale"])
        cells, genes = engine.write_h5ad(args.out, args.n, groups, seed=args.seed, observed=args.observed)
    else:
        cells, genes = pipeline.generate_to_file(model, args.n, args.out, groups, seed=args.seed,
                                                 observed=args.observed, **settings)
    print(f"wrote {cells} cells x {genes} genes to {args.out}")


def cmd_evaluate(args):
    import json

    from . import pipeline

    check_out(args.out, folder=True)
    metrics = pipeline.evaluate_files(args.real, args.generated, args.out, args.groupby, plots=not args.no_plots)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1, default=float))


def cmd_predict(args):
    from . import pipeline
    from .perturbation import predict_perturbation
    from .training import load_model

    guidance = sampling_settings(args)["guidance_scale"]
    check_out(args.out)
    model = load_model(args.model)
    target = parse_conditioning(model, args.target, "--target")
    if not target:
        raise ValueError("--target is empty; give at least one covariate, e.g. condition=stimulated")
    out = predict_perturbation(model, args.data, target, method=args.method, steps=args.steps,
                               guidance_scale=guidance, seed=args.seed)
    pipeline.write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} predicted cells x {out.n_vars} genes to {args.out}")


def cmd_denoise(args):
    from . import pipeline
    from .denoising import DEFAULT_STRENGTH, denoise
    from .training import load_model

    check_out(args.out)
    model = load_model(args.model)
    strength = args.strength if args.strength is not None else DEFAULT_STRENGTH
    out = denoise(model, args.data, method=args.method, strength=strength,
                  likelihood_weight=args.likelihood_weight, n_samples=args.samples, layer=args.layer, seed=args.seed)
    pipeline.write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} denoised cells x {out.n_vars} genes to {args.out} (layers['scidiff_denoised'])")


def cmd_demo(args):
    from .demo import run_demo

    check_out(args.out, folder=True)
    run_demo(args.out, epochs=args.epochs, seed=args.seed)


class Command(NamedTuple):
    """One ``scidiff`` command: ``add(subparsers)`` registers its parser under the command's name
    in :data:`COMMANDS`; ``run(args)`` does the work."""
    add: Callable
    run: Callable


COMMANDS: dict[str, Command] = {
    "train": Command(_add_train, cmd_train),
    "sample": Command(_add_sample, cmd_sample),
    "evaluate": Command(_add_evaluate, cmd_evaluate),
    "predict": Command(_add_predict, cmd_predict),
    "denoise": Command(_add_denoise, cmd_denoise),
    "design": Command(add_design, cmd_design),
    "demo": Command(_add_demo, cmd_demo),
    "export-onnx": Command(add_export_onnx, cmd_export_onnx),
    "serve": Command(add_serve, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``scidiff`` parser: one subcommand per entry of :data:`COMMANDS`, in its order."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="scidiff", description="Score-based diffusion for single-cell expression.")
    parser.add_argument("--version", action="version", version=f"scidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add(sub)
        if name not in sub.choices:
            raise RuntimeError(f"{command.add.__name__} did not register the command {name!r}")
    if set(sub.choices) != set(COMMANDS):
        raise RuntimeError(f"commands registered outside the table: {sorted(set(sub.choices) - set(COMMANDS))}")
    return parser


def user_error(exc: BaseException) -> str | None:
    """The message for an exception that means bad input or a bad environment (exit status 2),
    or ``None`` for one that means a bug (it keeps its traceback). Bad input: ValueErrors (what
    scidiff raises on bad values), KeyErrors that carry a sentence (a bare ``KeyError('x')`` is
    a failed lookup, a bug), and operating-system errors (missing files, permissions, a full
    disk), shown as the system's reason and the file."""
    if isinstance(exc, KeyError):
        text = exc.args[0] if len(exc.args) == 1 else None
        return text if isinstance(text, str) and len(text.split()) >= 3 else None
    if isinstance(exc, ValueError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            return f"{exc.strerror}: {exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 else "")
        return str(exc) or type(exc).__name__
    return None


@contextlib.contextmanager
def _plain_warnings(command: str):
    """Show scidiff's own warnings as ``scidiff COMMAND: warning: ...`` lines while a command
    runs (others keep Python's format, with their source)."""
    original = warnings.formatwarning
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def fmt(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"scidiff {command}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        with _plain_warnings(args.command):
            COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print(f"scidiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"scidiff {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
