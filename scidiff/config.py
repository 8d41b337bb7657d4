"""Configuration: dataclasses for each section, loaded from YAML in this one place.

``configs/default.yaml`` keeps the keys of the original scIDiff design (model: gene_dim,
hidden_dim, num_layers, num_timesteps, conditioning_dim; training: batch_size, learning_rate,
num_epochs, gradient_clip_val; data: dataset_path, batch_key, cell_type_key) and adds scidiff's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml


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

    def scheduler(self):
        from .models import get_scheduler

        extra = {"sparsity_factor": self.sparsity_factor} if self.noise_schedule == "biological" else {}
        return get_scheduler(self.noise_schedule, self.num_timesteps, **extra)

    def model_kwargs(self) -> dict:
        return {"hidden_dim": self.hidden_dim, "num_layers": self.num_layers, "num_timesteps": self.num_timesteps,
                "conditioning_dim": self.conditioning_dim, "noise_scheduler": self.scheduler(),
                "dropout": self.dropout, "cond_dropout": self.cond_dropout, "latent_dim": self.latent_dim or None}


@dataclass
class TrainingConfig:
    batch_size: int = 256
    learning_rate: float = 1e-3
    num_epochs: int = 300
    gradient_clip_val: float = 1.0
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    warmup_steps: int = 200
    val_fraction: float = 0.1
    early_stopping_patience: int | None = 50
    checkpoint_every: int = 25
    mixed_precision: str = "auto"
    seed: int = 0
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 1
    log_every_steps: int = 0


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
    dose_key: str | None = None
    continuous_keys: list[str] = field(default_factory=list)

    def covariate_kwargs(self) -> dict:
        """Perturbation, dose and numeric covariates, as :func:`scidiff.setup_anndata` takes them."""
        return {"perturbation_keys": list(self.perturbation_keys), "control_labels": list(self.control_labels),
                "dose_key": self.dose_key, "continuous_keys": list(self.continuous_keys)}

    def all_condition_keys(self) -> list[str]:
        keys = [k for k in (self.cell_type_key, self.batch_key) if k]
        return list(dict.fromkeys(keys + list(self.condition_keys)))


@dataclass
class SamplingConfig:
    sampler: str = "dpmpp_2m"
    steps: int = 25
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


def _coerce(cls, section: str, values: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KeyError(f"{source}: unknown key(s) {unknown} in section '{section}'; known keys: {sorted(fields)}")
    out = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if value is not None and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                value = type(default)(float(value)) if isinstance(default, int) else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {section}.{name} must be a number, got {value!r}") from None
        out[name] = value
    return cls(**out)


def default_config_path() -> str:
    return str(resources.files("scidiff") / "configs" / "default.yaml")


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Read a YAML config (default: the packaged ``default.yaml``); ``overrides`` is
    ``{section: {key: value}}`` applied on top. Unknown sections or keys are errors."""
    path = os.fspath(path) if path else default_config_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such config file: {path!r}")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of sections (model, training, data, sampling)")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    classes = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig, "sampling": SamplingConfig}
    unknown = sorted(set(raw) - set(classes))
    if unknown:
        raise KeyError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(classes)}")
    return Config(**{s: _coerce(c, s, raw.get(s) or {}, path) for s, c in classes.items()})
