"""The end-to-end jobs behind the command line: train on a file, generate an AnnData,
evaluate generated cells against real ones. Each is a plain function over the Python API."""
from __future__ import annotations

import json
import os
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .config import Config, load_config
from .data import read_h5ad, setup_anndata, transform_like, write_h5ad
from .data.io import atomic_path
from .models import ScIDiffModel
from .training import ScIDiffTrainer, save_model


def train(data, out_dir, config: Config | None = None, condition_keys=None, epochs: int | None = None,
          device="auto", progress: bool = True):
    """Train on an AnnData or .h5ad path and write ``out_dir/model.pt`` (EMA weights, genes,
    normalisation, vocabularies), ``config.yaml`` and ``history.csv``. Returns the model."""
    import yaml

    config = config or load_config()
    dc, tc = config.data, config.training
    keys = list(condition_keys) if condition_keys is not None else dc.all_condition_keys()
    cells = setup_anndata(data if data is not None else dc.dataset_path, layer=dc.layer, use_raw=dc.use_raw,
                          n_top_genes=config.model.gene_dim, condition_keys=keys, input_kind=dc.input,
                          target_sum=dc.target_sum, scaling=dc.scaling)
    train_cells, val_cells = (cells.split(tc.val_fraction, tc.seed) if tc.val_fraction > 0 and len(cells) >= 20
                              else (cells, None))
    model = ScIDiffModel.from_data(cells, **config.model.model_kwargs())
    trainer = ScIDiffTrainer(
        model, train_cells.loader(tc.batch_size, seed=tc.seed),
        val_cells.loader(tc.batch_size, shuffle=False) if val_cells is not None and len(val_cells) else None,
        device=device, learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
        gradient_clip_val=tc.gradient_clip_val, ema_decay=tc.ema_decay, warmup_steps=tc.warmup_steps,
        mixed_precision=tc.mixed_precision, early_stopping_patience=tc.early_stopping_patience,
        checkpoint_dir=out_dir, checkpoint_every=tc.checkpoint_every, seed=tc.seed, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    resolved = config.to_dict()
    resolved["model"]["gene_dim"] = cells.spec.n_genes
    resolved["data"]["condition_keys"] = keys
    atomic_path(os.path.join(out_dir, "config.yaml"),
                lambda tmp: open(tmp, "w").write(yaml.safe_dump(resolved, sort_keys=False)))
    trainer.train(epochs if epochs is not None else tc.num_epochs)
    return model


def parse_conditions(text: str | None) -> dict[str, str]:
    """``"cell_type=B,condition=stimulated"`` -> ``{"cell_type": "B", "condition": "stimulated"}``."""
    out = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"conditions are written key=value[,key=value]; got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def generate(model: ScIDiffModel, n: int, conditioning: dict | None = None, *, sampler: str = "ddim",
             steps: int | None = 50, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
             chunk_size: int = 4096, progress: bool = True) -> ad.AnnData:
    """``n`` generated cells as an AnnData (log1p-normalised expression in ``X``, the model's
    genes as ``var_names``, the conditions in ``obs``), produced in chunks."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if model.data_spec is None:
        raise ValueError("this model carries no gene list; train it through scidiff.setup_anndata")
    conditioning = dict(conditioning or {})
    model.data_spec.encode_conditions(conditioning, 1)  # validate labels before any work
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    parts = []
    with tqdm(total=n, desc="sampling", unit="cell", disable=not progress) as bar:
        for start in range(0, n, chunk_size):
            b = min(chunk_size, n - start)
            x = model.sample(b, conditioning, sampler=sampler, steps=steps, eta=eta,
                             guidance_scale=guidance_scale, generator=gen)
            parts.append(x.cpu().numpy())
            bar.update(b)
    obs = pd.DataFrame({k: pd.Categorical([str(v)] * n) for k, v in conditioning.items()},
                       index=[f"generated_{i}" for i in range(n)])
    out = ad.AnnData(X=np.concatenate(parts).astype(np.float32), obs=obs)
    out.var_names = list(model.data_spec.gene_names)
    out.uns["scidiff"] = {"sampler": sampler, "steps": -1 if steps is None else int(steps), "eta": float(eta),
                          "guidance_scale": float(guidance_scale), "seed": int(seed),
                          "expression": "log1p-normalised" + (f" (target_sum {model.data_spec.target_sum:g})"
                                                             if model.data_spec.target_sum else "")}
    return out


def _log_expression_of(adata: ad.AnnData, genes) -> np.ndarray:
    from .data.dataset import _log_expression
    from .data.preprocess import dense, gene_columns

    matrix, var_names, _, _ = _log_expression(adata, None, False, "auto", 1e4)
    return dense(matrix[:, gene_columns(var_names, genes)])


def evaluate_files(real, generated, out_dir, groupby: str | None = None, plots: bool = True) -> dict:
    """Score generated cells against real ones on the generated file's genes; write
    ``metrics.json`` and the report plots into ``out_dir``."""
    from .evaluation import evaluate_generation_quality
    from .evaluation.plots import report_plots

    real_ad = real if isinstance(real, ad.AnnData) else read_h5ad(real)
    gen_ad = generated if isinstance(generated, ad.AnnData) else read_h5ad(generated)
    genes = [str(g) for g in gen_ad.var_names]
    missing = [g for g in genes if g not in set(map(str, real_ad.var_names))]
    if missing:
        raise KeyError(f"{len(missing)} genes of the generated file are not in the real file: {missing[:20]}")
    real_x, gen_x = _log_expression_of(real_ad, genes), _log_expression_of(gen_ad, genes)
    labels = {}
    if groupby:
        for name, a in (("real", real_ad), ("generated", gen_ad)):
            if groupby not in a.obs:
                raise KeyError(f"obs key {groupby!r} is not in the {name} file; available obs keys: {list(a.obs.columns)}")
        labels = {"cell_types": real_ad.obs[groupby].astype(str).to_numpy(),
                  "generated_cell_types": gen_ad.obs[groupby].astype(str).to_numpy()}
    t0 = time.perf_counter()
    metrics = evaluate_generation_quality(real_x, gen_x, **labels)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        metrics["plots"] = [os.path.basename(p) for p in report_plots(real_x, gen_x, out_dir)]
    atomic_path(os.path.join(out_dir, "metrics.json"),
                lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=1, default=float)))
    return metrics


__all__ = ["evaluate_files", "generate", "parse_conditions", "read_h5ad", "train", "transform_like", "write_h5ad"]
