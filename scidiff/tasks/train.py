"""The training verb: a model trained on an ``.h5ad`` file (or an AnnData), written as a run folder."""
from __future__ import annotations

import os

import anndata as ad
import yaml

from ..checks import said_once, warn, yes_no
from ..config import Config, as_config
from ..data import setup_anndata, setup_streaming
from ..data.dataset import as_names
from ..data.io import atomic_path, in_memory, user_path
from ..models import ScIDiffModel
from ..models.perturbation_prior import PerturbationPrior
from ..training import ScIDiffTrainer, distributed, enable_determinism, seed_everything
from ..training.checkpoint import MODEL_FILE, STUDENT_ENTRY, read_checkpoint
from ..training.trainer import epoch_count


def _streamed_model(path, config: Config, keys, progress: bool):
    """Cells of a file that is streamed and a model set up on them without loading ``X``
    (:meth:`ScIDiffModel.from_streamed`): genes from a subsample, scaling and latent axes from one
    streamed pass, perturbation effects from a second, the detection model from a subsample of
    whole blocks."""
    dc, kwargs = config.data, config.model.model_kwargs()
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise ValueError("streaming trains from an .h5ad path (--data FILE.h5ad), not an in-memory AnnData")
    cells = setup_streaming(path, layer=dc.layer, use_raw=dc.use_raw, n_top_genes=config.model.gene_dim,
                            condition_keys=keys, input_kind=dc.input, target_sum=dc.target_sum, scaling=dc.scaling,
                            covariance=bool(kwargs.get("latent_dim")), seed=config.training.seed, progress=progress,
                            hvg_cells=dc.hvg_cells, **dc.covariate_kwargs())
    return cells, ScIDiffModel.from_streamed(cells, seed=config.training.seed, progress=progress, **kwargs)


def default_epochs(n_cells: int) -> int:
    """Epochs when the config gives none: ``min(400, round(20000 / n_cells * 400))``, at least 1
    (scvi-tools' rule): 400 for up to 20,000 cells, then a fixed budget of about 8 million cell
    passes, so an atlas of a million cells trains 8 epochs."""
    return max(1, min(400, round(20000 / max(n_cells, 1) * 400)))


def _time_knots(spec) -> dict[str, list[float]]:
    """The values each numeric covariate (not the dose) is embedded between (``DataSpec.continuous_knots``)."""
    return {k: v for k, v in spec.continuous_knots.items() if k != spec.dose_key and v}


def fit_perturbation_prior(model, cells, adata, config: Config, verbose: bool = True) -> dict | None:
    """Fit the model's :class:`~scidiff.models.perturbation_prior.PerturbationPrior` on the training
    set (closed form; data-derived gene features when a perturbation's labels are gene names, plus
    ``data.perturbation_features`` and ``data.smiles``), set ``model.perturbation_prior`` (``None``
    without perturbations or without anything that describes them) and return its report.
    ``adata=None``: ``cells`` are streamed (:meth:`PerturbationPrior.from_streamed`)."""
    dc = config.data
    files = {"--perturbation-features / data.perturbation_features": dc.perturbation_features,
             "--smiles / data.smiles": dc.smiles}
    if not cells.spec.perturbation_keys:
        given = [flag for flag, v in files.items() if v]
        if given:
            raise ValueError(f"{' and '.join(given)} describe perturbations, but the data has no perturbation "
                             f"covariate: give --perturbation-keys (data.perturbation_keys)")
        model.perturbation_prior = None
        return None
    described = {"perturbation_features": dc.perturbation_features, "smiles": dc.smiles, "seed": config.training.seed}
    prior = (PerturbationPrior.from_cells(cells, adata, **described) if adata is not None
             else PerturbationPrior.from_streamed(cells, **described))
    model.perturbation_prior = prior
    if prior is None:
        report = {"fitted": False, "reason": "the perturbation labels are not gene names of the input and no "
                                             "--perturbation-features / --smiles file was given: unseen "
                                             "perturbations will be refused"}
        if verbose:
            print(f"perturbation prior: none ({report['reason']})")
        return report
    if verbose:
        print(prior.summary())
    return {"fitted": True, **prior.report()}


def effects_summary(report: dict) -> str:
    """One line per perturbation covariate: the singles fitted and the combination rule that
    leave-one-combination-out cross-validation chose, and the share of the seen groups' squared
    change their empirical-Bayes estimates keep (:mod:`scidiff.models.effects`)."""
    lines = []
    for key, r in report.items():
        cv = r.get("cv_mse")
        n = r["seen_combinations"]
        errors = ("CV MSE " + ", ".join(f"{k} {v:.4g}" for k, v in cv.items()) if cv else
                  "too few to cross-validate: leaving one out needs two" if n else "none to cross-validate")
        lines.append(f"perturbation effects ({key}): {r['singles_seen']} singles fitted; combinations "
                     f"{r['combination']} ({n} seen; {errors}); seen groups' "
                     f"change kept after shrinkage {r.get('seen_change_kept', 1.0):.0%}")
    return "\n".join(lines)


def _warn_student_left_out(out_dir) -> None:
    """Warn where the run's ``model.pt`` holds a distilled student (``scidiff distil`` into it):
    this training writes new weights there, and the student, distilled from the old ones, is not
    kept with them."""
    path = os.path.join(out_dir, MODEL_FILE)
    if not os.path.exists(path):
        return
    try:
        held = STUDENT_ENTRY in read_checkpoint(path)
    except (OSError, ValueError):  # an unreadable model.pt is replaced as it was before
        return
    if held:
        warn(f"{path!r} holds a distilled student; this training replaces the weights it was distilled "
             f"from, and the new model.pt has no student: distil again (scidiff distil --model {out_dir} "
             "...) for few-step sampling")


def _write_config(out_dir, resolved: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(yaml.safe_dump(resolved, sort_keys=False))
    atomic_path(os.path.join(out_dir, "config.yaml"), write)


def train(data, out_dir, config: Config | None = None, condition_keys=None, epochs: int | None = None,
          device="auto", progress: bool = True, streaming: bool = False, resume=False,
          deterministic: bool = False):
    """Train on an AnnData or .h5ad path and write ``out_dir/model.pt`` (EMA weights, genes,
    normalisation, vocabularies), ``config.yaml`` and ``history.csv``. Returns the model.

    ``config``: a :class:`~scidiff.config.Config` (checked like a file, so a value changed in
    Python out of range is refused with its key named), a path to a YAML file, or a dict of
    sections on top of the defaults (``{"training": {"num_epochs": 5}}``); ``None``: the defaults.
    ``condition_keys``: obs keys, a list or one key as a string.

    With perturbation covariates, the model's perturbation prior (unseen perturbations from
    prior knowledge, :mod:`scidiff.models.perturbation_prior`) is fitted in closed form before
    training, from gene features of the data itself when the labels are gene names and from
    ``config.data.perturbation_features`` (a TSV) and ``config.data.smiles`` (a CSV of drugs); its
    cross-validation is printed and recorded in ``training.json`` (``"perturbation_prior"``), and
    the prior is saved inside ``model.pt``.

    ``streaming=True`` reads batches from the file on disk (:mod:`scidiff.data.streaming`) and
    sets the model up from streamed statistics (:meth:`ScIDiffModel.from_streamed`: perturbation
    effects, doses, numeric covariates and the prior included), so ``X`` is never loaded: for
    files larger than memory. The validation cells are then whole blocks of cells.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins the process group, trains on its
    own shard of the cells with DDP, and rank 0 alone writes files (see
    :class:`~scidiff.training.ScIDiffTrainer` for the effective batch and learning rate).
    ``resume``: ``True`` continues from the newest checkpoint in ``out_dir`` (and starts afresh
    when there is none), a path continues from that checkpoint; ``epochs`` is then the same
    number the interrupted run was given (or more), and the data and seed the same.

    Randomness: everything is seeded from ``config.training.seed`` before any of it is drawn
    (Python, numpy and torch global generators, so the weight initialisation; the train and
    validation split; the loader's order; the trainer's noise streams), so a second run with the
    same seed, data and thread count repeats the first bit for bit. ``deterministic``:
    deterministic torch kernels as well (needed for that on a GPU, and for bit-exact resume)."""
    if resume is not None and not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"resume must be True, False or the path of a checkpoint, got {resume!r}")
    if isinstance(out_dir, (str, os.PathLike)):
        out_dir = user_path(out_dir)
    progress, streaming, deterministic = (yes_no(name, value) for name, value in (  # 'no' read as true
        ("progress", progress), ("streaming", streaming), ("deterministic", deterministic)))
    if epochs is not None:
        epochs = epoch_count(epochs)
    config = as_config(config)  # a Config (checked: one changed in Python too), a YAML path or a dict of sections
    dc, tc = config.data, config.training
    use_ddp = distributed.env_world_size() > 1
    if use_ddp:
        device = distributed.init_distributed(device)
    rank, world = (distributed.rank(), distributed.world_size()) if use_ddp else (0, 1)
    shard = {"rank": rank, "world_size": world} if use_ddp else {}
    if deterministic:
        enable_determinism()
    seed_everything(tc.seed)  # before anything draws: weight init, split, loader order, noise
    keys = list(as_names(condition_keys)) if condition_keys is not None else dc.all_condition_keys()
    source = data if data is not None else dc.dataset_path
    if streaming and isinstance(source, ad.AnnData) and source.isbacked:  # its file, when it is the whole file
        if source.is_view:
            raise ValueError(f"streaming trains from a whole file, and this backed AnnData is a subset of "
                             f"{os.fspath(source.filename)!r}: write the subset to a file first "
                             f"(adata[...].write_h5ad(path)) and stream that, or train in memory (streaming=False)")
        source = os.fspath(source.filename)
    prior_report = effects_report = None
    adata = None
    said = set()  # the set-up, the effects and the prior read the same cells: their warnings said once
    with said_once(said):
        if streaming:
            cells, model = _streamed_model(source, config, keys, progress)
        else:
            adata = in_memory(source)  # a path, or a backed AnnData (streaming=True reads batches from its file)
            cells = setup_anndata(adata, layer=dc.layer, use_raw=dc.use_raw,
                                  n_top_genes=config.model.gene_dim, condition_keys=keys, input_kind=dc.input,
                                  target_sum=dc.target_sum, scaling=dc.scaling, **dc.covariate_kwargs())
            model = ScIDiffModel.from_data(cells, **config.model.model_kwargs())
    effects_report = getattr(model, "effects_report", None)
    if effects_report and progress and rank == 0:
        print(effects_summary(effects_report))
    if progress and rank == 0:
        if cells.spec.gene_symbol_column:
            print(f"genes: IDs in var_names, symbols in var[{cells.spec.gene_symbol_column!r}]; perturbation labels "
                  "and design targets may name a gene by either (--gene-symbols none: IDs only)")
        for key, knots in _time_knots(cells.spec).items():
            shown = ", ".join(f"{k:g}" for k in knots[:8]) + (", ..." if len(knots) > 8 else "")
            print(f"{key}: embedded piecewise linearly between {len(knots)} training values ({shown})")
    with said_once(said):
        prior_report = fit_perturbation_prior(model, cells, adata, config, verbose=progress and rank == 0)
    del adata
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
        compile=tc.compile, log_every_steps=tc.log_every_steps, final_sigma=tc.final_sigma)
    if resume:
        try:
            trainer.resume(out_dir if resume is True else resume)
        except FileNotFoundError:
            if resume is not True:
                raise
            if progress and rank == 0:
                print(f"no checkpoint in {out_dir}; training from the start")
    resolved = config.to_dict()
    resolved["model"]["gene_dim"] = cells.spec.n_genes
    resolved["data"]["condition_keys"] = keys
    # a fresh run over a finished one writes its config.yaml with its model.pt, so that the folder's
    # model and config always belong together (an interrupted run leaves the old pair as it was); a
    # resumed run too, once training has accepted the epochs, data and batch size (a refused one leaves
    # the run's config as it was)
    replaces = not trainer.resumed and os.path.exists(os.path.join(out_dir, "model.pt"))
    if rank == 0 and replaces and progress:
        print(f"{out_dir} holds a finished run: its model.pt and config.yaml are replaced when this run ends")
    later = replaces or (trainer.resumed and os.path.exists(os.path.join(out_dir, "config.yaml")))
    if rank == 0:
        _warn_student_left_out(out_dir)
    if rank == 0 and not later:
        _write_config(out_dir, resolved)
    if progress and rank == 0:
        print(f"effective batch {tc.batch_size} x {world} process(es) x {tc.gradient_accumulation} accumulation = "
              f"{tc.batch_size * world * tc.gradient_accumulation} cells per step; learning rate {tc.learning_rate:g}"
              + (f"; resuming at step {trainer.step} (epoch {trainer.epoch})" if trainer.step else ""))
    trainer.report.update({k: v for k, v in (("perturbation_effects", effects_report),
                                             ("perturbation_prior", prior_report),
                                             ("numeric_covariate_knots", _time_knots(cells.spec))) if v})
    if epochs is None:
        epochs = tc.num_epochs if tc.num_epochs is not None else default_epochs(len(train_cells))
        if progress and rank == 0 and tc.num_epochs is None:
            print(f"{epochs} epochs for {len(train_cells)} training cells (min(400, 20000 x 400 / cells); "
                  "--epochs or training.num_epochs to choose)")
    trainer.train(epochs)
    if rank == 0 and later:
        _write_config(out_dir, resolved)
    fitted = (trainer.weights_kept or {}).get("final_sigma")
    if fitted and progress and rank == 0:
        print(f"generation ends at noise level {fitted['fitted']:.3f}: where generated cells lie as far from the "
              f"training cells as the {fitted['validation_cells']} validation cells do (training.final_sigma)")
    return model
