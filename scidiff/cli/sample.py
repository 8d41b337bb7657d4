"""``scidiff sample``: generated cells to an ``.h5ad`` (or one shard per process and a manifest)."""
from __future__ import annotations

from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS
from .common import (SAMPLER_CHOICES, check_out, device_name, finite_float, nonnegative_float,
                     parse_conditioning, positive_int, sampling_settings, seed_value)


def add(sub):
    p = sub.add_parser("sample", help="generate cells from a trained model",
                       description="Generate cells; the output .h5ad has the model's genes as var_names "
                                   "and the conditions in obs. Cells are measured (sparse) where the model has a "
                                   "detection model, else smooth; uns['scidiff'] says which.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("-n", type=positive_int, required=True,
                   help="cells per condition. Covariates a condition leaves out (all of them without --condition) "
                        "are drawn like the training data: its groups (e.g. cell type x condition) that carry the "
                        "condition, in their proportions, labelled in obs")
    p.add_argument("--condition", action="append", default=None,
                   help="key=value[,key=value]; repeat the flag for several groups")
    p.add_argument("--config", default=None,
                   help="YAML whose sampling section gives the defaults of --sampler, --steps, --eta and --guidance "
                        f"(default: the run's config.yaml, else {DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps, eta 0, guidance 1)")
    p.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                   help="ddim, ddpm, dpmpp_2m (DPM-Solver++ 2M: 25 steps match DDPM's 1,000 on Kang), heun "
                        "(probability-flow ODE, 2 evaluations a step), euler_maruyama (reverse SDE), distilled (the "
                        "model's few-step student from `scidiff distil`, in its own steps)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--eta", type=nonnegative_float, default=None)
    p.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--device", type=device_name, default="cpu")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--observed", action="store_true",
                      help="measured cells (sparse, with the training data's detection rates): the default for "
                           "principal-axes models; with this flag, an error for a model that cannot measure")
    kind.add_argument("--smooth", action="store_true",
                      help="each cell's smooth expression instead of a measurement of it")
    p.add_argument("--engine", action="store_true",
                   help="the fast sampling engine (bf16 network where supported, per-condition caching; "
                        "CUDA graphs and Triton kernels on a GPU)")
    p.add_argument("--out", required=True,
                   help="output .h5ad; or a folder (any path not ending in .h5ad, and always under torchrun): one "
                        "shard per process (each its share of the cells and its own seed stream) + manifest.json")
    p.add_argument("--merge", action="store_true",
                   help="with a folder: also concatenate the shards into FOLDER/generated.h5ad")


def _ddim_eta(args, settings: dict) -> dict:
    """``eta`` is DDIM's alone: ``--eta`` with another sampler is an error (it would be ignored);
    an ``eta`` of the config's sampling section does not follow ``--sampler`` to another sampler."""
    if settings["sampler"] != "ddim":
        if args.eta:
            raise ValueError(f"--eta applies to --sampler ddim only; the sampler is {settings['sampler']!r} "
                             f"(leave --eta out, or add --sampler ddim)")
        settings = {**settings, "eta": 0.0}
    return settings


def _observed(args) -> bool | None:
    """``--observed`` / ``--smooth`` as the ``observed`` argument (``None``: the model's default)."""
    return True if args.observed else False if args.smooth else None


def _kind(observed: bool, args) -> str:
    """What the written cells are, for the closing line (the flag that chose them, if one did)."""
    if observed:
        return "measured cells"
    return "smooth cells (--smooth)" if args.smooth else "smooth cells: no detection model to measure them"


def _sharded_output(out: str) -> bool:
    from ..training import distributed  # lazy: keeps --help light (torch, anndata)

    if distributed.env_world_size() > 1:
        if out.lower().endswith(".h5ad"):
            raise ValueError(f"under torchrun every process writes its own shard: give --out a folder, not {out!r}")
        return True
    return not out.lower().endswith(".h5ad")  # 'GEN.H5AD' is a file too


def _sample_sharded(args, model, groups, settings):
    """``sample --out FOLDER``: this process's shard (all of it without torchrun), then rank 0
    writes the manifest (and the merged file)."""
    import torch.distributed as dist  # lazy: keeps --help light (torch)

    from ..tasks.generate import MANIFEST, MERGED_FILE, generate_sharded  # lazy: keeps --help light (torch, anndata)
    from ..training import distributed  # lazy: keeps --help light (torch, anndata)

    world = distributed.env_world_size()
    if args.engine:
        raise ValueError("--engine writes one file; use it without a folder --out (sharded output uses the "
                         "standard sampler)")
    if world > 1 and not distributed.is_distributed():
        dist.init_process_group("gloo")  # only for the barrier before the manifest
        if str(args.device).startswith("cuda"):
            model.to(distributed.distributed_device("cuda"))
    try:
        manifest = generate_sharded(model, args.n, args.out, groups, rank=distributed.rank(), world_size=world,
                                    seed=args.seed, merge=args.merge, progress=distributed.is_main_process(),
                                    observed=_observed(args), **settings)
    finally:
        if world > 1 and distributed.is_distributed():
            dist.destroy_process_group()
    if manifest is not None:
        files = f"{len(manifest['shards'])} shard(s), {MANIFEST}" + (f", {MERGED_FILE}" if args.merge else "")
        print(f"wrote {manifest['cells']} cells x {manifest['genes']} genes to {args.out} "
              f"({files}; {_kind(manifest['observed'], args)}{_mixture_note(model, args.n, groups, args.seed)})")


def run(args):
    from ..tasks.generate import generate_to_file  # lazy: keeps --help light (torch, anndata)
    from ..training import load_model  # lazy: keeps --help light (torch, anndata)
    from ..training.trainer import resolve_device  # lazy: keeps --help light (torch, anndata)

    settings = _ddim_eta(args, sampling_settings(args))  # a bad --config fails before the model loads
    sharded = _sharded_output(args.out)
    check_out(args.out, folder=sharded)
    model = load_model(args.model, map_location=str(resolve_device(args.device)))
    if settings["sampler"] == "distilled" and args.steps is not None:  # model.sample reads 25 as "its own"
        own = model.sampling_steps("distilled", None)
        if args.steps != own:
            raise ValueError(f"--steps: the distilled student samples in exactly {own} steps, not {args.steps} "
                             f"(leave --steps out, or distil again for another number)")
    groups = [parse_conditioning(model, c, "--condition") for c in (args.condition or [None])]
    if sharded:
        return _sample_sharded(args, model, groups, settings)
    # written chunk by chunk (bounded memory, progress bar); the file appears when complete
    observed = model.resolve_observed(_observed(args))
    cells, genes = generate_to_file(model, args.n, args.out, groups, seed=args.seed, observed=observed,
                                    engine=args.engine, **settings)
    note = _mixture_note(model, args.n, groups, args.seed)
    print(f"wrote {cells} cells x {genes} genes to {args.out} ({_kind(observed, args)}{note})")


def _mixture_note(model, n: int, groups: list, seed: int) -> str:
    """Where conditions left covariates out, how many training groups their cells were drawn from."""
    from ..tasks.generate import Mixture, plan_groups  # lazy: keeps --help light (torch, anndata)

    mixed = [len(c.conditions) for c in plan_groups(model, n, groups, seed) if isinstance(c, Mixture)]
    return f"; drawn from {sum(mixed)} training groups in their proportions" if mixed else ""
