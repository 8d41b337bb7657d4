"""Configuration: dataclasses for each section, loaded from YAML in this one place. It names
components and builds none; the sampler names and defaults come from the torch-free
:mod:`scidiff.diffusion.plans`, where they are written once.

``configs/default.yaml`` keeps the keys of the original scIDiff design (model: gene_dim,
hidden_dim, num_layers, num_timesteps, conditioning_dim; training: batch_size, learning_rate,
num_epochs, gradient_clip_val; data: dataset_path, batch_key, cell_type_key) and adds scidiff's.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from .diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_NAMES
from .textfiles import encoding_error


@dataclass
class ModelConfig:
    gene_dim: int = 2000
    hidden_dim: int = 512
    num_layers: int = 6
    num_timesteps: int = 1000
    conditioning_dim: int = 128
    noise_schedule: str = "cosine"
    sparsity_factor: float = 0.5
    dropout: float = 0.0
    cond_dropout: float = 0.1
    latent_dim: int | None = 64
    axis_sigma_data: bool = False

    def scheduler_config(self) -> dict:
        """The noise schedule by name, as :func:`scidiff.diffusion.schedules.get_scheduler` (and
        ``ScIDiffModel(noise_scheduler=...)``) takes it."""
        extra = {"sparsity_factor": self.sparsity_factor} if self.noise_schedule == "biological" else {}
        return {"kind": self.noise_schedule, "num_timesteps": self.num_timesteps, **extra}

    def model_kwargs(self) -> dict:
        """:class:`scidiff.models.ScIDiffModel` keyword arguments (the schedule by name: the config
        builds nothing)."""
        return {"hidden_dim": self.hidden_dim, "num_layers": self.num_layers, "num_timesteps": self.num_timesteps,
                "conditioning_dim": self.conditioning_dim, "noise_scheduler": self.scheduler_config(),
                "dropout": self.dropout, "cond_dropout": self.cond_dropout, "latent_dim": self.latent_dim or None,
                "axis_sigma_data": self.axis_sigma_data}


@dataclass
class TrainingConfig:
    batch_size: int = 256
    learning_rate: float = 1e-3
    num_epochs: int | None = None  # None: default_epochs(training cells), scvi-tools' rule
    gradient_clip_val: float = 1.0
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    warmup_steps: int = 200
    val_fraction: float = 0.1
    early_stopping_patience: int | None = None
    checkpoint_every: int = 25
    mixed_precision: str = "auto"
    seed: int = 0
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 1
    log_every_steps: int = 0
    final_sigma: float | str = 0.0  # where generation ends: 0 = clean data; "auto" = fitted on the validation cells


@dataclass
class DataConfig:
    dataset_path: str | None = None
    layer: str | None = None
    use_raw: bool = False
    input: str = "auto"
    target_sum: float | None = 1e4
    scaling: str = "global"
    batch_key: str | None = None
    cell_type_key: str | None = None
    condition_keys: list[str] = field(default_factory=list)
    perturbation_keys: list[str] = field(default_factory=list)
    control_labels: list[str] = field(default_factory=lambda: ["control", "ctrl"])
    separator: str = "+"  # between the singles of a combination label (scPerturb: "_")
    gene_symbols: str | None = "auto"  # var column of gene symbols beside Ensembl IDs (scanpy's gene_symbols=)
    hvg_cells: int = 20000  # streaming: cells the input kind and highly variable genes are read on
    dose_key: str | None = None
    continuous_keys: list[str] = field(default_factory=list)
    # prior knowledge of perturbations, for unseen ones (scidiff.models.perturbation_prior): a TSV of
    # features per label, and a CSV of name,smiles for drugs (Morgan fingerprints; the chem extra)
    perturbation_features: str | None = None
    smiles: str | None = None

    def covariate_kwargs(self) -> dict:
        """Perturbation, dose and numeric covariates, as :func:`scidiff.setup_anndata` takes them."""
        return {"perturbation_keys": list(self.perturbation_keys), "control_labels": list(self.control_labels),
                "separator": self.separator, "gene_symbols": self.gene_symbols,
                "dose_key": self.dose_key, "continuous_keys": list(self.continuous_keys)}

    def all_condition_keys(self) -> list[str]:
        keys = [k for k in (self.cell_type_key, self.batch_key) if k]
        return list(dict.fromkeys(keys + list(self.condition_keys)))


@dataclass
class SamplingConfig:
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    guidance_scale: float = 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {"model.noise_schedule": ("cosine", "linear", "biological"),
            "training.mixed_precision": ("auto", "bf16", "no"),
            "data.input": ("auto", "counts", "log1p"), "data.scaling": ("global", "gene", "none"),
            "sampling.sampler": SAMPLER_NAMES}

# value rules checked after the type: (test, what it means); None passes where the type allows it
_RULES = {
    "model.gene_dim": (lambda v: v >= 1, ">= 1"), "model.hidden_dim": (lambda v: v >= 1, ">= 1"),
    "model.num_layers": (lambda v: v >= 1, ">= 1"), "model.num_timesteps": (lambda v: v >= 2, ">= 2"),
    "model.conditioning_dim": (lambda v: v >= 1, ">= 1"), "model.latent_dim": (lambda v: v >= 0, ">= 0"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "model.cond_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training.batch_size": (lambda v: v >= 1, ">= 1"), "training.learning_rate": (lambda v: v > 0, "> 0"),
    "training.num_epochs": (lambda v: v >= 1, ">= 1 (or null: by the number of cells)"), "training.gradient_clip_val": (lambda v: v >= 0, ">= 0"),
    "training.weight_decay": (lambda v: v >= 0, ">= 0"), "training.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training.warmup_steps": (lambda v: v >= 0, ">= 0"), "training.val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training.early_stopping_patience": (lambda v: v >= 1, ">= 1 (or null: off)"),
    "training.checkpoint_every": (lambda v: v >= 0, ">= 0"), "training.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "training.gradient_accumulation": (lambda v: v >= 1, ">= 1"),
    "training.checkpoint_every_steps": (lambda v: v >= 0, ">= 0"),
    "training.keep_checkpoints": (lambda v: v >= 1, ">= 1"), "training.log_every_steps": (lambda v: v >= 0, ">= 0"),
    "training.final_sigma": (lambda v: v == "auto" or (not isinstance(v, str) and v >= 0), "'auto' or >= 0"),
    "data.target_sum": (lambda v: v > 0, "> 0 (or null)"), "data.hvg_cells": (lambda v: v >= 1, ">= 1"),
    "sampling.steps": (lambda v: v >= 1, ">= 1"), "sampling.eta": (lambda v: v >= 0, ">= 0"),
}


def _number(value, kind: type):
    """``value`` as ``kind`` (int or float), or ``None`` when it is not one. YAML reads ``1e-3``
    as a string, so numeric strings count; an int must be integral; booleans are no numbers, nor
    are infinities and NaN (``.inf`` as a learning rate trains a model of NaNs)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if kind is float:
        return number
    return int(number) if number.is_integer() else None


def _typed(value, annotation: str, where: str):
    """``value`` converted to the field type written in ``annotation`` (``int``, ``float | None``,
    ``list[str]``, ...), or a ValueError naming ``where``."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{where} must not be null (expected {annotation})")
    for kind in kinds:
        if kind in ("int", "float"):
            number = _number(value, int if kind == "int" else float)
            if number is not None:
                return number
        elif kind == "bool" and isinstance(value, bool):
            return value
        elif kind == "str" and isinstance(value, str):
            return value
        elif kind == "list[str]" and isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return [str(v) for v in value]
    hint = " (a YAML list, e.g. [a, b])" if "list[str]" in kinds else ""
    if {"int", "float"} & set(kinds) and isinstance(value, float) and not math.isfinite(value):
        hint = " (a finite number)"
    raise ValueError(f"{where} must be {annotation}{hint}, got {value!r}")


def _check_value(name: str, value, where: str) -> None:
    if value is None:
        return
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"{where} must be one of {list(_CHOICES[name])}, got {value!r}")
    if name in _RULES and not _RULES[name][0](value):
        raise ValueError(f"{where} must be {_RULES[name][1]}, got {value!r}")


def _coerce(cls, section: str, values, source: str):
    """Section ``section`` of a config as ``cls``: unknown keys, wrong types and values out of
    range are errors that name the file and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section '{section}' must be a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, values)) - set(fields))
    if unknown:
        raise KeyError(f"{source}: unknown key(s) {unknown} in section '{section}'; known keys: {sorted(fields)}")
    out = {}
    for name, value in values.items():
        where = f"{source}: {section}.{name}"
        out[name] = _typed(value, str(fields[name].type), where)
        _check_value(f"{section}.{name}", out[name], where)
    return cls(**out)


def default_config_path() -> str:
    return str(resources.files("scidiff") / "configs" / "default.yaml")


def _read_yaml(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such config file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"config {path!r} is a folder, not a YAML file")
    wrong = encoding_error(path, "config")  # Excel's / Notepad's "Unicode": UTF-16
    if wrong is not None:
        raise wrong
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (YAML) file") from None


SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig, "sampling": SamplingConfig}


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Read a YAML config (default: the packaged ``default.yaml``); ``overrides`` is
    ``{section: {key: value}}`` applied on top (``None`` values are skipped). Unknown sections
    or keys, values of the wrong type and values out of range are errors naming the file."""
    path = os.fspath(path) if path else default_config_path()
    raw = _read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of sections (model, training, data, sampling), "
                         f"got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(SECTIONS))
    if unknown:
        raise KeyError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(SECTIONS)}")
    raw = {s: {} if raw.get(s) is None else raw[s] for s in SECTIONS}
    for section, values in (overrides or {}).items():
        _check_section(section, values, "overrides")
        set_values = {k: v for k, v in values.items() if v is not None}
        if set_values:
            _coerce(SECTIONS[section], section, set_values, "command line")  # blame the flag, not the file
            if not isinstance(raw[section], dict):  # the file's section is refused, not replaced by the flags
                raise ValueError(f"{path}: section '{section}' must be a mapping of keys, got {raw[section]!r}")
            raw[section] = {**raw[section], **set_values}
    return Config(**{s: _coerce(c, s, raw[s], path) for s, c in SECTIONS.items()})


def _check_section(section, values, source: str) -> None:
    """A section given in Python (overrides, a dict config): a known name holding a mapping."""
    if section not in SECTIONS:
        raise KeyError(f"{source}: unknown section {section!r}; known sections: {sorted(SECTIONS)}")
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section {section!r} must be a mapping of keys, e.g. "
                         f"{{{section!r}: {{key: value}}}}, got {values!r}")


def check_config(config: Config, source: str = "config") -> Config:
    """``config`` checked as :func:`load_config` checks a file (types, ranges, choices), for a
    :class:`Config` built or changed in Python (``config.training.val_fraction = 1.5``); errors
    name ``source`` and the key. Returns the checked copy (numbers of the field's type)."""
    if not isinstance(config, Config):
        raise TypeError(f"{source} must be a scidiff Config (scidiff.config.load_config), got {type(config).__name__}")
    out = {}
    for section, cls in SECTIONS.items():
        values = getattr(config, section)
        if not isinstance(values, cls):
            raise TypeError(f"{source}: section '{section}' must be a {cls.__name__}, got {type(values).__name__}")
        out[section] = _coerce(cls, section, dataclasses.asdict(values), source)
    return Config(**out)


def as_config(config, source: str = "config") -> Config:
    """A checked :class:`Config` from ``None`` (the defaults), a :class:`Config`, a path to a YAML
    file, or a dict of sections applied on top of the defaults (``{"training": {"num_epochs": 5}}``)."""
    if config is None:
        return load_config()
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if isinstance(config, dict):  # unlike load_config's overrides, a None here is a value (latent_dim: None)
        raw = load_config().to_dict()
        for section, values in config.items():
            _check_section(section, values, source)
            raw[section].update(values)
        return Config(**{s: _coerce(c, s, raw[s], source) for s, c in SECTIONS.items()})
    return check_config(config, source)


def run_config_path(model_path) -> str | None:
    """The ``config.yaml`` that ``scidiff train`` wrote beside a run's ``model.pt`` (``model_path``:
    the run folder or a checkpoint in it, ``checkpoints/step-*.pt`` included), or ``None``."""
    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
        return None
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path) and os.path.basename(folder) == "checkpoints" and not os.path.isdir(model_path):
        path = os.path.join(os.path.dirname(folder), "config.yaml")  # a training checkpoint the run kept
    return path if os.path.isfile(path) else None


def sampling_config(model_path=None, config_path=None) -> SamplingConfig:
    """The ``sampling`` section that applies to a trained model: from ``config_path`` when given,
    else from the run's own ``config.yaml`` (:func:`run_config_path`), else the defaults."""
    path = config_path or (run_config_path(model_path) if model_path is not None else None)
    return load_config(path).sampling if path else SamplingConfig()
