"""``scidiff train``: a model trained on an ``.h5ad`` file, written as a run folder."""
from __future__ import annotations

from ..config import load_config
from .common import (SEPARATOR_HELP, add_expression_source, check_out, device_name, nonnegative_int, positive_int,
                     seed_value, separator_text, split)


def add(sub):
    p = sub.add_parser("train", help="train a model on an .h5ad file",
                       description="Train a conditional diffusion model on an .h5ad file and write RUN_DIR/model.pt.")
    p.add_argument("--data", required=True, help="input .h5ad (raw counts or log-normalised)")
    p.add_argument("--out", required=True, help="run folder for model.pt, config.yaml, history.csv")
    p.add_argument("--condition-keys", default=None,
                   help="comma-separated obs keys to condition on, e.g. cell_type,condition")
    p.add_argument("--config", default=None, help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs (default: training.num_epochs, else min(400, 20000 x 400 / training cells))")
    add_expression_source(p)
    p.add_argument("--n-genes", type=positive_int, default=None,
                   help="number of highly variable genes (model.gene_dim)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--seed", type=seed_value, default=None,
                   help="seeds everything random in the run (default: training.seed)")
    p.add_argument("--early-stopping-patience", type=positive_int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation loss and keep the best weights "
                        "(default: off, training.early_stopping_patience)")
    p.add_argument("--perturbation-keys", default=None,
                   help="comma-separated condition keys that are perturbations (A+B = combination)")
    p.add_argument("--dose-key", default=None, help="numeric obs column with the perturbation dose")
    p.add_argument("--continuous-keys", default=None,
                   help="comma-separated numeric obs columns to condition on, e.g. a time course's day (embedded "
                        "piecewise linearly between the values training saw)")
    p.add_argument("--control-labels", default=None, help="comma-separated labels meaning no perturbation")
    p.add_argument("--separator", type=separator_text, default=None, help=SEPARATOR_HELP + " (data.separator)")
    p.add_argument("--gene-symbols", default=None, metavar="COLUMN",
                   help="var column with gene symbols where var_names are IDs (Ensembl), so that perturbation "
                        "labels and design targets may name genes by symbol (default: auto, the first of "
                        "feature_name, gene_symbols, gene_name... present; none: off) (data.gene_symbols)")
    p.add_argument("--perturbation-features", default=None, metavar="FILE.tsv",
                   help="prior knowledge of perturbations for unseen ones: a TSV with a header, one row per label "
                        "(first column), numeric features (a gene embedding, GO terms, a network row). Labels that "
                        "are gene names are also described from the data (co-expression in the control cells)")
    p.add_argument("--smiles", default=None, metavar="FILE.csv",
                   help="drugs for unseen ones: a CSV of name,smiles rows -> Morgan fingerprints (needs RDKit: "
                        "pip install 'scidiff[chem]')")
    p.add_argument("--hvg-cells", type=positive_int, default=None,
                   help="with --streaming: cells (random whole blocks) the highly variable genes are chosen on "
                        "(default 20,000, data.hvg_cells; the in-memory path uses all)")
    p.add_argument("--streaming", action="store_true",
                   help="stream batches from the file on disk instead of loading X (atlases and screens larger "
                        "than memory; perturbation effects, doses and the prior are fitted from streamed passes)")
    g = p.add_argument_group("scale and faults",
                             "Several processes: torchrun --nproc_per_node N -m scidiff train ... (DDP; each process "
                             "trains on its own shard; effective batch = batch size x N x gradient accumulation, the "
                             "learning rate is not rescaled).")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (weights, optimizer, schedule, RNG states and "
                        "position in the data); starts afresh when there is none. Give the same --data, --seed and "
                        "--epochs as before (more epochs to train on)")
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


def run(args):
    from ..tasks.train import train  # lazy: keeps --help light (torch, anndata)
    from ..training import distributed  # lazy: keeps --help light (torch, anndata)

    overrides = {"model": {"gene_dim": args.n_genes},
                 "training": {"batch_size": args.batch_size, "seed": args.seed,
                              "early_stopping_patience": args.early_stopping_patience,
                              "mixed_precision": args.mixed_precision,
                              "gradient_accumulation": args.gradient_accumulation,
                              "gradient_checkpointing": True if args.gradient_checkpointing else None,
                              "compile": True if args.compile else None,
                              "checkpoint_every_steps": args.checkpoint_every_steps,
                              "keep_checkpoints": args.keep_checkpoints, "log_every_steps": args.log_every_steps},
                 "data": {"layer": args.layer, "use_raw": True if args.use_raw else None,
                          "perturbation_keys": split(args.perturbation_keys), "dose_key": args.dose_key,
                          "continuous_keys": split(args.continuous_keys),
                          "control_labels": split(args.control_labels), "separator": args.separator,
                          "gene_symbols": args.gene_symbols,
                          "hvg_cells": args.hvg_cells,
                          "perturbation_features": args.perturbation_features, "smiles": args.smiles}}
    config = load_config(args.config, overrides)
    check_out(args.out, folder=True)
    keys = split(args.condition_keys)
    if keys is not None and config.data.perturbation_keys:
        keys = list(dict.fromkeys(keys + config.data.perturbation_keys))
    train(args.data, args.out, config, condition_keys=keys, epochs=args.epochs, device=args.device,
                   streaming=args.streaming, resume=args.resume, deterministic=args.deterministic)
    if distributed.is_main_process():
        print(f"model written to {args.out}")
    if distributed.is_distributed():
        import torch.distributed as dist  # lazy: keeps --help light (torch)

        dist.destroy_process_group()
