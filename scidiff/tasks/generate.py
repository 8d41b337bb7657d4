"""The generation verb: cells from a trained model as an AnnData, or straight into an ``.h5ad``
(one writer, with the plain sampler or the fast engine, in one process or sharded over many)."""
from __future__ import annotations

import json
import os
import re
import secrets

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import read_h5ad
from ..data.h5ad_writer import H5adWriter
from ..data.io import atomic_path, staged_files, user_path
from ..data.spec import scanpy_log1p
from ..checks import condition_mapping, refuse_one_condition, whole_number, yes_no
from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS, check_steps
from ..engine import CPU_CHUNK, SamplingEngine
from ..models import ScIDiffModel
from ..models.cell_draws import check_seed
from ..training import distributed
from ._keywords import no_other_keywords, renamed
from .cells import model_spec


def fresh_seed() -> int:
    """A seed for ``seed=None``: drawn from the operating system, then recorded with the cells, in
    ``[0, 2**32)`` as every seed (:func:`~scidiff.models.cell_draws.check_seed`), so that
    ``scidiff sample --seed`` draws them again."""
    return secrets.randbits(32)


def _per_cell(value) -> bool:
    """Whether a condition's value gives one label per cell (as ``model.sample`` takes them)."""
    return isinstance(value, (list, tuple, np.ndarray, pd.Series, pd.Index, pd.Categorical, torch.Tensor))


def _as_labels(spec, condition: dict) -> dict:
    """``condition`` with per-cell values as lists and categorical codes (an int, a code tensor,
    multi-hot perturbation rows) as the labels they stand for, so that ``obs`` and the training
    groups a mixture is drawn from see labels (``{"cell_type": 2}`` is the vocabulary's third
    label, not a cell type ``"2"``), and a list of one label as that label for every cell. Labels
    given as text stay as written."""
    out = {}
    for key, value in condition.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        per_cell = _per_cell(value)
        if per_cell and not isinstance(value, torch.Tensor):
            value = value.tolist() if hasattr(value, "tolist") else list(value)
        values = value if isinstance(value, list) else [value]
        if key in spec.categorical and not all(isinstance(v, str) for v in values):
            rows = len(value) if per_cell else 1
            labels = spec.decode_conditions(spec.encode_conditions({key: value}, rows))[key]
            value = labels if per_cell else labels[0]
        elif isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, list) and len(value) == 1:  # one label broadcast to every cell, as model.sample
            value = value[0]
        out[key] = value
    return out


def _check_generate(model: ScIDiffModel, n: int, condition: dict | None) -> dict:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer number of cells, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    spec = model_spec(model)
    condition = _as_labels(spec, condition_mapping(condition))
    per_cell = any(_per_cell(v) for v in condition.values())
    spec.encode_conditions(condition, n if per_cell else 1)  # validate labels before any work
    return condition


def _runs(n: int, condition: dict) -> list[tuple[dict, int]]:
    """``[(labels, cells), ...]``: the runs of consecutive cells that ``condition`` labels alike
    (one label per cell where a value is a list, the same label elsewhere)."""
    columns = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) if _per_cell(v) else [v] * n
               for k, v in condition.items()}
    cells = [dict(zip(columns, labels)) for labels in zip(*columns.values())]
    runs: list[tuple[dict, int]] = []
    for labels in cells:
        if runs and runs[-1][0] == labels:
            runs[-1] = (labels, runs[-1][1] + 1)
        else:
            runs.append((labels, 1))
    return runs


def _runner(model, engine, sampler, steps, eta, guidance_scale, chunk_size=None):
    """``(model, engine or None, settings, chunk_size)``: ``model`` may be a
    :class:`SamplingEngine` (its settings then apply), ``engine=True`` makes one from the settings.
    ``chunk_size`` (cells drawn at a time; ``None``: the engine's CPU chunk, :data:`CPU_CHUNK`, off
    CUDA, 4,096 on it): off CUDA an engine made here draws in the same chunks as the plain sampler,
    so both give the same cells for a seed (on CUDA it keeps its own large batches: its noise is
    the kernel's there)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    cuda = next((model.model if isinstance(model, SamplingEngine) else model).parameters()).device.type == "cuda"
    chunk_size = int(chunk_size or (4096 if cuda else CPU_CHUNK))
    if isinstance(model, SamplingEngine):
        engine, model = model, model.model
    elif engine is True:
        engine = SamplingEngine(model, sampler, steps, eta=eta, guidance_scale=guidance_scale,
                                chunk_size=None if cuda else chunk_size)
    elif engine in (None, False):
        engine = None
    elif not isinstance(engine, SamplingEngine):
        raise TypeError(f"engine must be True, False or a SamplingEngine, got {type(engine).__name__}")
    if engine is not None:
        sampler, steps, eta, guidance_scale = engine.sampler, engine.steps, engine.eta, engine.guidance_scale
    steps = check_steps(model.sampling_steps(sampler, steps, eta))  # "distilled": the student's own; 5.0: 5
    return model, engine, {"sampler": sampler, "steps": steps, "eta": eta, "guidance_scale": guidance_scale}, chunk_size


class Mixture:
    """Cells of several groups drawn as one stream: ``conditions[i]`` labels ``cells[i]``
    consecutive cells. The network sees each cell's own labels (one batch holds many groups), so
    a mixture over thousands of training groups costs what one group of its size costs."""

    def __init__(self, conditions: list[dict], cells):
        self.conditions, self.cells = list(conditions), np.asarray(cells, dtype=np.int64)
        self.ends = np.cumsum(self.cells)
        self.keys = list(dict.fromkeys(k for c in self.conditions for k in c))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def part(self, a: int, b: int) -> "Mixture":
        """Cells ``a`` to ``b`` of the stream, as a mixture of their own."""
        starts = self.ends - self.cells
        cells = np.clip(np.minimum(self.ends, b) - np.maximum(starts, a), 0, None)
        return Mixture([c for c, k in zip(self.conditions, cells) if k], cells[cells > 0])

    def labels(self, a: int, b: int) -> dict[str, list]:
        """Each label of cells ``a`` to ``b``, per covariate."""
        part = self.part(a, b)
        return {k: [c[k] for c, m in zip(part.conditions, part.cells.tolist()) for _ in range(m)] for k in self.keys}


def _chunks(model, engine, n: int, condition, *, seed: int, chunk_size: int, observed: bool, settings: dict):
    """``n`` generated cells as ``(numpy chunk, its labels)``: the engine's chunks (its
    ``chunk_size``), else ``model.sample`` on chunks of at most ``chunk_size`` cells, one
    generator seeded with ``seed`` across them (the engine draws in the same order). A
    :class:`Mixture` is drawn the same way, each chunk under its cells' own labels."""
    mixture = condition if isinstance(condition, Mixture) else None
    if engine is not None and mixture is None:
        for x in engine.stream(n, condition, seed=seed, observed=observed):
            yield x.numpy(), condition
        return
    size = engine.chunk_size if engine is not None else chunk_size
    gen = torch.Generator(device=engine.device if engine is not None else next(model.parameters()).device)
    gen.manual_seed(int(seed))
    for start in range(0, n, size):
        b = min(size, n - start)
        cond = mixture.labels(start, start + b) if mixture is not None else condition
        if engine is not None:  # one chunk of the engine's stream, from the shared generator
            x = next(engine.stream(b, cond, generator=gen, observed=observed))
        else:
            x = model.sample(b, cond, generator=gen, observed=observed, **settings)
        yield x.cpu().numpy().astype(np.float32, copy=False), cond


def expression_note(model, observed: bool) -> str:
    """What generated ``X`` holds (``observed``: whether the cells are measured), for
    ``uns['scidiff']['expression']``."""
    what = "log1p-normalised" + (f" (target_sum {model.data_spec.target_sum:g})" if model.data_spec.target_sum else "")
    return what + (", measured through the detection model" if observed else ", smooth")


def _generation_uns(model, settings: dict, seed, observed: bool, engine=None) -> dict:
    steps, sampler = settings["steps"], settings["sampler"]
    steps = model.num_timesteps if steps is None else min(int(steps), model.num_timesteps)  # None: all T
    eta = float(settings["eta"]) if sampler == "ddim" else 0.0  # the other samplers have no eta
    uns = {"sampler": sampler, "steps": steps, "eta": eta,
           "guidance_scale": float(settings["guidance_scale"]), "seed": int(seed), "observed": bool(observed),
           "expression": expression_note(model, observed)}
    if model.data_spec.target_sum:  # the library size X was normalised to, for scidiff evaluate
        uns["target_sum"] = float(model.data_spec.target_sum)
    if engine is not None:
        uns.update(network_evaluations=len(engine.plan), engine_dtype=str(engine.dtype).replace("torch.", ""))
    return uns


def plan_groups(model, n: int, groups=None, seed: int | None = 0) -> list[dict | Mixture]:
    """What to generate, ``n`` cells of each: the condition dicts of ``groups``. Where a condition
    leaves out covariates the model was trained on (or there is none), its ``n`` cells are a
    :class:`Mixture` of the training groups that carry it, in their training proportions, each
    labelled in full (:meth:`~scidiff.data.DataSpec.training_mixture`, rounded from ``seed + i``
    for the ``i``-th group, as the group's cells are drawn):
    cells like the training data. On Kang this scores better against held-out cells than
    leaving the missing covariates to classifier-free guidance's null condition, which is learnt
    from the few training steps that dropped them (``bench/bench_unconditional.py``); that distribution stays
    ``model.sample``'s. A condition may give one label per cell (a list of ``n``), as
    ``model.sample`` takes them. The labels of ``groups`` are checked before any work (the
    training groups' own come from the model's spec)."""
    refuse_one_condition(groups, "groups", "{'cell_type': 'B'}")
    plan = []
    for i, condition in enumerate([_check_generate(model, n, g) for g in (groups or [{}])]):
        mixed = any(_per_cell(v) for v in condition.values())  # one label per cell: runs of alike cells
        shares, group_seed = [], None if seed is None else seed + i  # group i is seeded with seed + i
        for labels, cells in _runs(n, condition) if mixed else [(condition, n)]:
            found = model.data_spec.training_mixture(cells, labels, group_seed) if model.data_spec is not None else []
            mixed |= bool(found)
            shares += found or [(labels, cells)]
        plan.append(Mixture(*zip(*shares)) if mixed else condition)
    return plan


def _obs(labels: dict, m: int, continuous=()) -> dict:
    """A chunk's labels (one per covariate, or one per cell) as ``m`` values per covariate:
    numbers for the ``continuous`` covariates (a dose, a time), strings for the others."""
    kind = {k: float if k in continuous else str for k in labels}
    return {k: [kind[k](x) for x in v] if isinstance(v, list) else [kind[k](v)] * m for k, v in labels.items()}


def _obs_frame(labels: list[dict], index, spec) -> pd.DataFrame:
    """The chunks' :func:`_obs` as one ``obs``: numbers as floats, labels of the type of the
    training column (:meth:`~scidiff.data.DataSpec.labels_as_trained`: a boolean column's
    ``True``, a cluster's ``2``), else categorical text."""
    def column(key, values):
        return (np.asarray(values, np.float64) if values and isinstance(values[0], float)
                else spec.labels_as_trained(key, values))

    return pd.DataFrame({k: column(k, [v for chunk in labels for v in chunk[k]]) for k in labels[0]}, index=index)


def generate(model, n: int, condition: dict | None = None, *, sampler: str = DEFAULT_SAMPLER,
             steps: int | None = DEFAULT_STEPS, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
             chunk_size: int | None = None, progress: bool = True, observed: bool | None = None, engine=None,
             **deprecated) -> ad.AnnData:
    """``n`` generated cells as an AnnData (log1p-normalised expression in ``X``, the model's
    genes as ``var_names``, the condition in ``obs``), produced in chunks. ``condition``:
    covariate -> label (``conditioning=`` is its deprecated name); without one, a model trained
    on covariates gives cells like its training data, its groups in their proportions and
    labelled in ``obs`` (:func:`plan_groups`). ``observed``: measured cells (sparse,
    :meth:`ScIDiffModel.observe`), the default where the model can measure
    (:meth:`ScIDiffModel.resolve_observed`), or smooth expression (``False``); ``uns['scidiff']``
    says which. ``engine``: ``True`` generates with a :class:`~scidiff.engine.SamplingEngine`
    made from the settings (or pass one, or pass one as ``model``). For more cells than fit in
    memory use :func:`generate_to_file`. ``seed``: ``None`` draws a fresh one, recorded in
    ``uns['scidiff']['seed']`` so that the cells can be drawn again."""
    (condition,) = renamed("scidiff.generate", deprecated, {"conditioning": ("condition", condition)})
    no_other_keywords("scidiff.generate", deprecated)
    progress = yes_no("progress", progress)  # 'no' showed the bar: any non-empty text is true
    seed = fresh_seed() if seed is None else check_seed(seed)  # -1 and 2**32 + 3 drew other seeds' cells
    model, engine, settings, chunk_size = _runner(model, engine, sampler, steps, eta, guidance_scale, chunk_size)
    (condition,) = plan_groups(model, n, [condition], seed)
    observed = model.resolve_observed(observed)
    parts, labels = [], []
    with tqdm(total=n, desc="sampling", unit="cell", disable=not progress) as bar:
        for x, cond in _chunks(model, engine, n, condition, seed=seed, chunk_size=chunk_size, observed=observed,
                               settings=settings):
            parts.append(x)
            labels.append(_obs(cond, len(x), model.data_spec.continuous))
            bar.update(len(x))
    out = ad.AnnData(X=np.concatenate(parts),
                     obs=_obs_frame(labels, [f"generated_{i}" for i in range(n)], model.data_spec))
    out.var = model.data_spec.var_frame(training_columns=True)
    out.uns["scidiff"] = _generation_uns(model, settings, seed, observed, engine)
    out.uns["log1p"] = scanpy_log1p()  # X is log1p, as scanpy records it
    return out


def generate_to_file(model, n: int, out, groups=None, *, sampler: str = DEFAULT_SAMPLER,
                     steps: int | None = DEFAULT_STEPS, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
                     chunk_size: int | None = None, progress: bool = True, first_index: int = 0,
                     observed: bool | None = None, engine=None) -> tuple[int, int]:
    """Generate ``n`` cells for each condition dict in ``groups`` (group ``i`` seeded with
    ``seed + i``; without a condition, ``n`` cells like the training data, :func:`plan_groups`)
    straight into the ``.h5ad`` at ``out``, one chunk at a time: memory stays bounded by the
    chunk. The file appears only when complete and holds what :func:`generate` +
    ``anndata.concat`` would (cells named ``generated_<i>[-<group>]``, ``i`` counted from
    ``first_index``). ``engine``, ``observed``: as in :func:`generate` (the one writer, engine or
    not). Returns ``(cells, genes)``."""
    progress = yes_no("progress", progress)  # 'no' showed the bar: any non-empty text is true
    model, engine, settings, chunk_size = _runner(model, engine, sampler, steps, eta, guidance_scale, chunk_size)
    seed = fresh_seed() if seed is None else check_seed(seed)  # recorded in the file's uns
    out = user_path(out)
    return _write_groups(model, engine, out, plan_groups(model, n, groups, seed), int(first_index), n, seed=seed,
                         chunk_size=chunk_size, progress=progress, observed=model.resolve_observed(observed),
                         settings=settings)


def _write_groups(model, engine, out, plan, first: int, cells: int, *, seed: int, chunk_size: int, progress: bool,
                  observed: bool, settings: dict) -> tuple[int, int]:
    """The writer of :func:`generate_to_file`: ``cells`` cells of each condition of ``plan``,
    named from ``first`` on."""
    several = len(plan) > 1
    with H5adWriter(out, model.data_spec.gene_names) as writer, \
            tqdm(total=cells * len(plan), desc="sampling", unit="cell", disable=not progress) as bar:
        writer.uns = {"scidiff": _generation_uns(model, settings, seed, observed, engine), "log1p": scanpy_log1p()}
        writer.var, writer.label_types = model.data_spec.var_frame(training_columns=True), model.data_spec.label_types
        for i, cond in enumerate(plan):
            start = first
            for x, labels in _chunks(model, engine, cells, cond, seed=seed + i, chunk_size=chunk_size,
                                     observed=observed, settings=settings):
                names = [f"generated_{j}" + (f"-{i}" if several else "") for j in range(start, start + len(x))]
                writer.append(x, obs=_obs(labels, len(x), model.data_spec.continuous), obs_names=names)
                start += len(x)
                bar.update(len(x))
        cells = writer.n_cells
    return cells, len(model.data_spec.gene_names)


MANIFEST = "manifest.json"
MERGED_FILE = "generated.h5ad"


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.h5ad"


def _h5ad_cells(path: str) -> int:
    with h5py.File(path, "r") as f:
        x = f["X"]
        return int(x.shape[0] if isinstance(x, h5py.Dataset) else x.attrs["shape"][0])


def generate_sharded(model, n: int, out_dir, groups=None, *, rank: int = 0, world_size: int = 1,
                     sampler: str = DEFAULT_SAMPLER, steps: int | None = DEFAULT_STEPS, eta: float = 0.0,
                     guidance_scale: float = 1.0, seed: int = 0, chunk_size: int | None = None, progress: bool = True,
                     merge: bool = False, observed: bool | None = None, engine=None) -> dict | None:
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
    if seed is None:
        raise ValueError("generate_sharded needs a seed: every rank draws its share from the same one")
    seed = check_seed(seed)
    progress, merge = yes_no("progress", progress), yes_no("merge", merge)  # 'no' merged: non-empty text is true
    model, engine, settings, chunk_size = _runner(model, engine, sampler, steps, eta, guidance_scale, chunk_size)
    plan = plan_groups(model, n, groups, seed)  # every rank the same plan
    observed = model.resolve_observed(observed)
    world_size = whole_number("world_size", world_size, 1, what="an integer >= 1")  # True was one process
    rank = whole_number("rank", rank, what="an integer")  # True was rank 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
    out_dir = user_path(out_dir)
    with staged_files(out_dir):  # nothing staged: a folder made here is not left behind empty by a failed shard
        os.makedirs(out_dir, exist_ok=True)
        if rank == 0:
            _remove_earlier_manifest(out_dir)
        first, count = distributed.share(n, rank, world_size)
        if count:  # this rank's cells of each condition; of a mixture, its slice of the stream
            mine = [cond.part(first, first + count) if isinstance(cond, Mixture) else cond for cond in plan]
            _write_groups(model, engine, os.path.join(out_dir, shard_name(rank, world_size)), mine, first, count,
                          seed=distributed.derived_seed(seed, rank), chunk_size=chunk_size, progress=progress,
                          observed=observed, settings=settings)
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
        if found != c * len(plan):
            raise ValueError(f"shard {path!r} holds {found} cells, expected {c * len(plan)}")
        shards.append({"file": name, "rank": r, "cells": found, "first_index": f,
                       "seed": distributed.derived_seed(seed, r)})
    groups = [(g, int(k)) for cond in plan for g, k in (zip(cond.conditions, cond.cells)
                                                         if isinstance(cond, Mixture) else [(cond, n)])]
    manifest = {"format": "scidiff.generated", "format_version": 1, "cells": n * len(plan), "cells_per_group": n,
                "genes": len(model.data_spec.gene_names),
                "groups": [{k: str(v) for k, v in g.items()} for g, _ in groups], "group_cells": [k for _, k in groups],
                "world_size": world_size,
                **_generation_uns(model, settings, seed, observed, engine), "shards": shards}
    if merge:
        merge_generated(out_dir, manifest=manifest)
        manifest["merged"] = MERGED_FILE
    atomic_path(os.path.join(out_dir, MANIFEST), lambda tmp: open(tmp, "w").write(json.dumps(manifest, indent=1)))
    listed = {s["file"] for s in manifest["shards"]}
    for name in os.listdir(out_dir):  # an earlier run's shards (another number of processes) are not these cells
        if re.fullmatch(r"shard-\d+-of-\d+\.h5ad", name) and name not in listed:
            os.remove(os.path.join(out_dir, name))
    return manifest


def _remove_earlier_manifest(out_dir: str) -> None:
    """Remove an earlier generation's manifest from ``out_dir``, and the merged file it names:
    until this one ends, the folder reads as unfinished (its shards are being replaced), and no
    merged file of other cells stands beside them."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as fh:
            merged = json.load(fh).get("merged")
    except (OSError, ValueError, AttributeError):  # not a manifest scidiff wrote: its merged file unknown
        merged = None
    os.remove(path)
    if isinstance(merged, str) and os.path.basename(merged) == merged and os.path.isfile(os.path.join(out_dir, merged)):
        os.remove(os.path.join(out_dir, merged))


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
    read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
    out_dir = user_path(out_dir)
    manifest = manifest or _read_manifest(out_dir)
    out_file = user_path(out_file) if out_file else os.path.join(out_dir, MERGED_FILE)
    files = [os.path.join(os.fspath(out_dir), s["file"]) for s in manifest["shards"]]
    if not files:
        raise ValueError(f"the manifest of {os.fspath(out_dir)!r} lists no shards")
    with h5py.File(files[0], "r") as f:
        var = read_elem(f["var"])
        uns = read_elem(f["uns"]) if "uns" in f else {}
    genes = [str(g) for g in var.index]
    with H5adWriter(out_file, genes) as writer:
        writer.uns, writer.var = uns, var  # the gene symbols beside the names
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
                    if isinstance(obs[key], h5py.Dataset) and obs[key].dtype.kind == "b":  # a boolean covariate
                        writer.label_types[key] = "bool"
                        columns[key] = (obs[key], np.array([False, True], dtype=object))
                    elif isinstance(obs[key], h5py.Dataset):  # numbers (a dose, a time)
                        columns[key] = (obs[key], None)
                    else:  # labels (text, or a covariate's booleans or numbers); code -1 (missing) -> None
                        stored = obs[key]["categories"]
                        if stored.dtype.kind in "biuf":
                            writer.label_types[key] = f"category:{stored.dtype}"
                        cats = stored.asstr()[:] if stored.dtype.kind not in "biuf" else stored[:]
                        columns[key] = (obs[key]["codes"], np.append(cats.astype(object), None))
                for a in range(0, x.shape[0], chunk_cells):
                    b = min(x.shape[0], a + chunk_cells)
                    writer.append(x[a:b], obs={k: values[a:b] if cats is None else cats[values[a:b].astype(np.int64)]
                                               for k, (values, cats) in columns.items()},
                                  obs_names=names.asstr()[a:b])
    return out_file


def read_generated(out_dir) -> ad.AnnData:
    """The cells of a sharded generation folder as one AnnData (the merged file when there is
    one, else the shards concatenated in rank order)."""
    out_dir = user_path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest.get("merged"):
        return read_h5ad(os.path.join(os.fspath(out_dir), manifest["merged"]))
    parts = [read_h5ad(os.path.join(os.fspath(out_dir), s["file"])) for s in manifest["shards"]]
    out = ad.concat(parts, uns_merge="first") if len(parts) > 1 else parts[0]
    out.uns["scidiff"] = {k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}
    return out
