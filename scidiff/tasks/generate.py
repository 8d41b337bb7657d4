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
from .training import ScIDiffTrainer


def _streamed_model(path, config: Config, keys, progress: bool):
    """Cells of a file that is streamed and a model set up on them without loading ``X``:
    genes from a subsample, scaling and latent axes from one streamed pass."""
    from .data.stream_setup import setup_streaming

    dc, kwargs = config.data, config.model.model_kwargs()
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise ValueError("streaming trains from an .h5ad path (--data FILE.h5ad), not an in-memory AnnData")
    cells = setup_streaming(path, layer=dc.layer, use_raw=dc.use_raw, n_top_genes=config.model.gene_dim,
                            condition_keys=keys, input_kind=dc.input, target_sum=dc.target_sum, scaling=dc.scaling,
                            covariance=bool(kwargs.get("latent_dim")), seed=config.training.seed, progress=progress)
    if kwargs.get("latent_dim"):
        kwargs["latent_dim"] = min(kwargs["latent_dim"], len(cells), cells.spec.n_genes)
    model = ScIDiffModel(gene_dim=cells.spec.n_genes, data_spec=cells.spec, **kwargs)
    if model.latent_dim:
        m = cells.moments
        model.fit_latent_from_moments(m["mean"], m["cov"], m["n"])
    return cells, model


def train(data, out_dir, config: Config | None = None, condition_keys=None, epochs: int | None = None,
          device="auto", progress: bool = True, streaming: bool = False, resume=False,
          deterministic: bool = False):
    """Train on an AnnData or .h5ad path and write ``out_dir/model.pt`` (EMA weights, genes,
    normalisation, vocabularies), ``config.yaml`` and ``history.csv``. Returns the model.

    ``streaming=True`` reads batches from the file on disk (:mod:`scidiff.data.streaming`) and
    sets the model up from streamed statistics, so ``X`` is never loaded: for files larger than
    memory. The validation cells are then whole blocks of cells.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins the process group, trains on its
    own shard of the cells with DDP, and rank 0 alone writes files (see
    :class:`~scidiff.training.ScIDiffTrainer` for the effective batch and learning rate).
    ``resume``: ``True`` continues from the newest checkpoint in ``out_dir`` (and starts afresh
    when there is none), a path continues from that checkpoint; ``epochs`` is then the same
    number the interrupted run was given.

    Randomness: everything is seeded from ``config.training.seed`` before any of it is drawn
    (Python, numpy and torch global generators, so the weight initialisation; the train and
    validation split; the loader's order; the trainer's noise streams), so a second run with the
    same seed, data and thread count repeats the first bit for bit. ``deterministic``:
    deterministic torch kernels as well (needed for that on a GPU, and for bit-exact resume)."""
    import yaml

    from .training import distributed, seed_everything
    from .training.trainer import enable_determinism

    config = config or load_config()
    dc, tc = config.data, config.training
    use_ddp = distributed.env_world_size() > 1
    if use_ddp:
        device = distributed.init_distributed(device)
    rank, world = (distributed.rank(), distributed.world_size()) if use_ddp else (0, 1)
    shard = {"rank": rank, "world_size": world} if use_ddp else {}
    if deterministic:
        enable_determinism()
    seed_everything(tc.seed)  # before anything draws: weight init, split, loader order, noise
    keys = list(condition_keys) if condition_keys is not None else dc.all_condition_keys()
    source = data if data is not None else dc.dataset_path
    if streaming:
        if dc.perturbation_keys or dc.dose_key or dc.continuous_keys:
            raise ValueError("streaming training takes categorical condition keys only; perturbation, dose "
                             "and numeric covariates need the in-memory path")
        cells, model = _streamed_model(source, config, keys, progress)
    else:
        cells = setup_anndata(source, layer=dc.layer, use_raw=dc.use_raw,
                              n_top_genes=config.model.gene_dim, condition_keys=keys, input_kind=dc.input,
                              target_sum=dc.target_sum, scaling=dc.scaling, **dc.covariate_kwargs())
        model = ScIDiffModel.from_data(cells, **config.model.model_kwargs())
    train_cells, val_cells = (cells.split(tc.val_fraction, tc.seed) if tc.val_fraction > 0 and len(cells) >= 20
                              else (cells, None))
    trainer = ScIDiffTrainer(
        model, train_cells.loader(tc.batch_size, seed=tc.seed, **shard),
        val_cells.loader(tc.batch_size, shuffle=False, **shard) if val_cells is not None and len(val_cells) else None,
        device=device, learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
        gradient_clip_val=tc.gradient_clip_val, ema_decay=tc.ema_decay, warmup_steps=tc.warmup_steps,
        mixed_precision=tc.mixed_precision, early_stopping_patience=tc.early_stopping_patience,
        checkpoint_dir=out_dir, checkpoint_every=tc.checkpoint_every, seed=tc.seed, progress=progress and rank == 0,
        checkpoint_every_steps=tc.checkpoint_every_steps, keep_checkpoints=tc.keep_checkpoints, use_ddp=use_ddp,
        gradient_accumulation=tc.gradient_accumulation, gradient_checkpointing=tc.gradient_checkpointing,
        compile=tc.compile, log_every_steps=tc.log_every_steps)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        resolved = config.to_dict()
        resolved["model"]["gene_dim"] = cells.spec.n_genes
        resolved["data"]["condition_keys"] = keys
        atomic_path(os.path.join(out_dir, "config.yaml"),
                    lambda tmp: open(tmp, "w").write(yaml.safe_dump(resolved, sort_keys=False)))
    if resume:
        try:
            trainer.resume(out_dir if resume is True else resume)
        except FileNotFoundError:
            if resume is not True:
                raise
            if progress and rank == 0:
                print(f"no checkpoint in {out_dir}; training from the start")
    if progress and rank == 0:
        print(f"effective batch {tc.batch_size} x {world} process(es) x {tc.gradient_accumulation} accumulation = "
              f"{tc.batch_size * world * tc.gradient_accumulation} cells per step; learning rate {tc.learning_rate:g}"
              + (f"; resuming at step {trainer.step} (epoch {trainer.epoch})" if trainer.step else ""))
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


def _check_generate(model: ScIDiffModel, n: int, conditioning: dict | None) -> dict:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if model.data_spec is None:
        raise ValueError("this model carries no gene list; train it through scidiff.setup_anndata")
    conditioning = dict(conditioning or {})
    model.data_spec.encode_conditions(conditioning, 1)  # validate labels before any work
    return conditioning


def _sample_chunks(model: ScIDiffModel, n: int, conditioning: dict, *, sampler, steps, eta, guidance_scale, seed,
                   chunk_size, bar, observed=False):
    """Yield ``n`` generated cells as numpy chunks of at most ``chunk_size`` (one generator seeded
    with ``seed`` across the chunks)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for start in range(0, n, chunk_size):
        b = min(chunk_size, n - start)
        x = model.sample(b, conditioning, sampler=sampler, steps=steps, eta=eta,
                         guidance_scale=guidance_scale, generator=gen, observed=observed)
        bar.update(b)
        yield x.cpu().numpy().astype(np.float32, copy=False)


def expression_note(model, observed: bool) -> str:
    """What generated ``X`` holds, for ``uns['scidiff']['expression']``."""
    what = "log1p-normalised" + (f" (target_sum {model.data_spec.target_sum:g})" if model.data_spec.target_sum else "")
    return what + (", measured through the detection model" if observed else ", smooth")


def _generation_uns(model, sampler, steps, eta, guidance_scale, seed, observed=False) -> dict:
    return {"sampler": sampler, "steps": -1 if steps is None else int(steps), "eta": float(eta),
            "guidance_scale": float(guidance_scale), "seed": int(seed), "observed": bool(observed),
            "expression": expression_note(model, observed)}


def generate(model: ScIDiffModel, n: int, conditioning: dict | None = None, *, sampler: str = "dpmpp_2m",
             steps: int | None = 25, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
             chunk_size: int = 4096, progress: bool = True, observed: bool = False) -> ad.AnnData:
    """``n`` generated cells as an AnnData (log1p-normalised expression in ``X``, the model's
    genes as ``var_names``, the conditions in ``obs``), produced in chunks. ``observed``:
    measured cells (sparse, :meth:`ScIDiffModel.observe`) instead of smooth expression. For more
    cells than fit in memory use :func:`generate_to_file`."""
    from tqdm.auto import tqdm

    conditioning = _check_generate(model, n, conditioning)
    with tqdm(total=n, desc="sampling", unit="cell", disable=not progress) as bar:
        parts = list(_sample_chunks(model, n, conditioning, sampler=sampler, steps=steps, eta=eta,
                                    guidance_scale=guidance_scale, seed=seed, chunk_size=chunk_size, bar=bar,
                                    observed=observed))
    obs = pd.DataFrame({k: pd.Categorical([str(v)] * n) for k, v in conditioning.items()},
                       index=[f"generated_{i}" for i in range(n)])
    out = ad.AnnData(X=np.concatenate(parts), obs=obs)
    out.var_names = list(model.data_spec.gene_names)
    out.uns["scidiff"] = _generation_uns(model, sampler, steps, eta, guidance_scale, seed, observed)
    return out


def generate_to_file(model: ScIDiffModel, n: int, out, groups=None, *, sampler: str = "dpmpp_2m",
                     steps: int | None = 25, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
                     chunk_size: int = 4096, progress: bool = True, first_index: int = 0,
                     observed: bool = False) -> tuple[int, int]:
    """Generate ``n`` cells for each conditioning dict in ``groups`` (group ``i`` seeded with
    ``seed + i``) straight into the ``.h5ad`` at ``out``, one chunk at a time: memory stays
    bounded by ``chunk_size`` cells. The file appears only when complete and holds what
    :func:`generate` + ``anndata.concat`` would (cells named ``generated_<i>[-<group>]``, ``i``
    counted from ``first_index``). Returns ``(cells, genes)``."""
    from tqdm.auto import tqdm

    from .data.h5ad_writer import H5adWriter

    groups = [_check_generate(model, n, g) for g in (groups or [{}])]
    several = len(groups) > 1
    with H5adWriter(out, model.data_spec.gene_names) as writer, \
            tqdm(total=n * len(groups), desc="sampling", unit="cell", disable=not progress) as bar:
        writer.uns = {"scidiff": _generation_uns(model, sampler, steps, eta, guidance_scale, seed, observed)}
        for i, cond in enumerate(groups):
            start = int(first_index)
            for x in _sample_chunks(model, n, cond, sampler=sampler, steps=steps, eta=eta,
                                    guidance_scale=guidance_scale, seed=seed + i, chunk_size=chunk_size, bar=bar,
                                    observed=observed):
                names = [f"generated_{j}" + (f"-{i}" if several else "") for j in range(start, start + len(x))]
                writer.append(x, obs={k: str(v) for k, v in cond.items()}, obs_names=names)
                start += len(x)
        cells = writer.n_cells
    return cells, len(model.data_spec.gene_names)


MANIFEST = "manifest.json"
MERGED_FILE = "generated.h5ad"


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.h5ad"


def _h5ad_cells(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        x = f["X"]
        return int(x.shape[0] if isinstance(x, h5py.Dataset) else x.attrs["shape"][0])


def generate_sharded(model: ScIDiffModel, n: int, out_dir, groups=None, *, rank: int = 0, world_size: int = 1,
                     sampler: str = "dpmpp_2m", steps: int | None = 25, eta: float = 0.0, guidance_scale: float = 1.0,
                     seed: int = 0, chunk_size: int = 4096, progress: bool = True, merge: bool = False,
                     observed: bool = False) -> dict | None:
    """Generation scaled out over ``world_size`` processes (e.g. ``torchrun``): this ``rank``
    generates its contiguous share of the ``n`` cells of each group into
    ``out_dir/shard-<rank>-of-<world_size>.h5ad`` (:func:`generate_to_file`), from its own seed
    stream (rank 0: ``seed``, so shard 0 equals a one-process run of its size; rank ``r``:
    :func:`~scidiff.training.distributed.derived_seed`). Cell names are global
    (``generated_<i>``), so the shards concatenate without clashes. Once every rank is done
    (a barrier when a process group is up), rank 0 checks the shards, writes
    ``out_dir/manifest.json`` and, with ``merge``, one ``out_dir/generated.h5ad`` concatenated
    on disk (bounded memory). Returns the manifest on rank 0, ``None`` elsewhere.
    :func:`read_generated` opens the result."""
    from .training import distributed

    groups = [_check_generate(model, n, g) for g in (groups or [{}])]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    first, count = distributed.share(n, rank, world_size)
    rank_seed = distributed.derived_seed(seed, rank)
    if count:
        generate_to_file(model, count, os.path.join(out_dir, shard_name(rank, world_size)), groups, sampler=sampler,
                         steps=steps, eta=eta, guidance_scale=guidance_scale, seed=rank_seed, chunk_size=chunk_size,
                         progress=progress, first_index=first, observed=observed)
    distributed.barrier()  # every shard is complete past this point
    if rank != 0:
        return None
    shards = []
    for r in range(world_size):
        f, c = distributed.share(n, r, world_size)
        if not c:
            continue
        name = shard_name(r, world_size)
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {path!r} of rank {r} is missing; did every rank finish?")
        found = _h5ad_cells(path)
        if found != c * len(groups):
            raise ValueError(f"shard {path!r} holds {found} cells, expected {c * len(groups)}")
        shards.append({"file": name, "rank": r, "cells": found, "first_index": f,
                       "seed": distributed.derived_seed(seed, r)})
    manifest = {"format": "scidiff.generated", "format_version": 1, "cells": n * len(groups),
                "cells_per_group": n, "genes": len(model.data_spec.gene_names),
                "groups": [{k: str(v) for k, v in g.items()} for g in groups], "world_size": world_size,
                **_generation_uns(model, sampler, steps, eta, guidance_scale, seed), "shards": shards}
    if merge:
        merge_generated(out_dir, manifest=manifest)
        manifest["merged"] = MERGED_FILE
    atomic_path(os.path.join(out_dir, MANIFEST), lambda tmp: open(tmp, "w").write(json.dumps(manifest, indent=1)))
    return manifest


def _read_manifest(out_dir) -> dict:
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {os.fspath(out_dir)!r}: not a sharded generation folder, or "
                                f"the generation has not finished")
    with open(path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != "scidiff.generated":
        raise ValueError(f"{path!r} is not a scidiff generation manifest")
    return manifest


def merge_generated(out_dir, out_file=None, manifest: dict | None = None, chunk_cells: int = 65536) -> str:
    """Concatenate the shards of a sharded generation, in rank order, into one ``.h5ad``
    (``out_dir/generated.h5ad`` by default), ``chunk_cells`` cells at a time (memory bounded by
    the chunk); the file appears only when complete."""
    import h5py

    from .data.h5ad_writer import H5adWriter

    read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
    manifest = manifest or _read_manifest(out_dir)
    out_file = os.fspath(out_file) if out_file else os.path.join(os.fspath(out_dir), MERGED_FILE)
    files = [os.path.join(os.fspath(out_dir), s["file"]) for s in manifest["shards"]]
    if not files:
        raise ValueError(f"the manifest of {os.fspath(out_dir)!r} lists no shards")
    with h5py.File(files[0], "r") as f:
        genes = [str(g) for g in read_elem(f["var"]).index]
        uns = read_elem(f["uns"]) if "uns" in f else {}
    with H5adWriter(out_file, genes) as writer:
        writer.uns = uns
        for path in files:
            with h5py.File(path, "r") as f:
                x = f["X"]
                if not isinstance(x, h5py.Dataset):
                    raise ValueError(f"{path!r}: merging expects dense X, as generate_to_file writes it")
                if [str(g) for g in read_elem(f["var"]).index] != genes:
                    raise ValueError(f"{path!r} has other genes than {files[0]!r}")
                obs = f["obs"]
                names = obs[obs.attrs.get("_index", "_index")]
                columns = {}
                for key in [str(k) for k in obs.attrs.get("column-order", [])]:
                    cats = np.append(obs[key]["categories"].asstr()[:], "nan")  # code -1 -> "nan"
                    columns[key] = (obs[key]["codes"], cats)
                for a in range(0, x.shape[0], chunk_cells):
                    b = min(x.shape[0], a + chunk_cells)
                    writer.append(x[a:b], obs={k: cats[codes[a:b]] for k, (codes, cats) in columns.items()},
                                  obs_names=names.asstr()[a:b])
    return out_file


def read_generated(out_dir) -> ad.AnnData:
    """The cells of a sharded generation folder as one AnnData (the merged file when there is
    one, else the shards concatenated in rank order)."""
    manifest = _read_manifest(out_dir)
    if manifest.get("merged"):
        return read_h5ad(os.path.join(os.fspath(out_dir), manifest["merged"]))
    parts = [read_h5ad(os.path.join(os.fspath(out_dir), s["file"])) for s in manifest["shards"]]
    out = ad.concat(parts, uns_merge="first") if len(parts) > 1 else parts[0]
    out.uns["scidiff"] = {k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}
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


__all__ = ["evaluate_files", "generate", "generate_sharded", "generate_to_file", "merge_generated", "parse_conditions",
           "read_generated", "read_h5ad", "train", "transform_like", "write_h5ad"]
