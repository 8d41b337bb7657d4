"""Discrete variance-preserving noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021).

A schedule is the sequence ``alpha_bar[t]`` for ``t = 0 .. T-1``: the forward process is
``x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps``. Samplers read only
``alphas_cumprod`` (a float64 tensor) and ``num_timesteps``, so any schedule here plugs into any
sampler in :mod:`scidiff.diffusion.samplers`.
"""
from __future__ import annotations

import math

import torch

_MAX_BETA = 0.999


class NoiseScheduler:
    """Base class: holds ``betas`` and ``alphas_cumprod`` (float64) and the forward process."""

    kind = "base"

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` per timestep."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``q(x_t | x_0)`` for integer timesteps ``t`` of shape ``[B]``."""
        ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).unsqueeze(-1)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def config(self) -> dict:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class LinearNoiseScheduler(NoiseScheduler):
    """Linear betas from ``beta_start`` to ``beta_end`` (Ho et al. 2020, DDPM)."""

    kind = "linear"

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    def config(self) -> dict:
        return {**super().config(), "beta_start": self.beta_start, "beta_end": self.beta_end}


def _cosine_alpha_bar(u: torch.Tensor, s: float) -> torch.Tensor:
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _betas_from_alpha_bar(fn, num_timesteps: int) -> torch.Tensor:
    """``beta_t = 1 - abar(t+1)/abar(t)`` on the grid ``u = t / T``, clipped at 0.999."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = fn(u)
    betas = 1.0 - ab[1:] / ab[:-1]
    return betas.clamp(min=1e-8, max=_MAX_BETA)


class CosineNoiseScheduler(NoiseScheduler):
    """``alpha_bar(u) = cos^2((u + s)/(1 + s) * pi/2) / cos^2(s/(1+s) * pi/2)`` (Nichol & Dhariwal 2021)."""

    kind = "cosine"

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008):
        self.s = float(s)
        norm = _cosine_alpha_bar(torch.zeros((), dtype=torch.float64), self.s)
        super().__init__(_betas_from_alpha_bar(lambda u: _cosine_alpha_bar(u, self.s) / norm, num_timesteps))

    def config(self) -> dict:
        return {**super().config(), "s": self.s}


class BiologicalNoiseScheduler(NoiseScheduler):
    """A cosine schedule whose clock is slowed near the data: ``alpha_bar(u) = cosine(u ** (1 + k))``.

    ``k = sparsity_factor >= 0`` (``k = 0`` is the cosine schedule). Single-cell expression is
    sparse: most entries are exact zeros and the signal that tells a silent gene from a lowly
    expressed one is about one count, i.e. ``log1p`` steps of 0.3-0.7, far below a gene's total
    spread. A cosine schedule buries that detail within its first few percent of timesteps, so
    uniform-``t`` training spends almost no updates on it and a 50-step sampler takes one or two
    steps through it. Warping time by ``u ** (1 + k)`` leaves both ends fixed (``alpha_bar`` runs from
    1 to the same terminal value) but spends a larger share of timesteps at high signal-to-noise,
    where the zero pattern and low counts are resolved. :meth:`from_sparsity` picks ``k`` from the
    fraction of zeros in the data.
    """

    kind = "biological"

    def __init__(self, num_timesteps: int = 1000, sparsity_factor: float = 0.5, s: float = 0.008):
        if sparsity_factor < 0:
            raise ValueError(f"sparsity_factor must be >= 0, got {sparsity_factor}")
        self.sparsity_factor, self.s = float(sparsity_factor), float(s)
        norm = _cosine_alpha_bar(torch.zeros((), dtype=torch.float64), self.s)
        power = 1.0 + self.sparsity_factor
        super().__init__(
            _betas_from_alpha_bar(lambda u: _cosine_alpha_bar(u**power, self.s) / norm, num_timesteps)
        )

    @classmethod
    def from_sparsity(cls, zero_fraction: float, num_timesteps: int = 1000) -> "BiologicalNoiseScheduler":
        """``sparsity_factor = zero_fraction``: dense data keeps the cosine clock, 90%-zero data gets ``u**1.9``."""
        if not 0.0 <= zero_fraction <= 1.0:
            raise ValueError(f"zero_fraction must be in [0, 1], got {zero_fraction}")
        return cls(num_timesteps, sparsity_factor=zero_fraction)

    def config(self) -> dict:
        return {**super().config(), "sparsity_factor": self.sparsity_factor, "s": self.s}


SCHEDULERS = {c.kind: c for c in (LinearNoiseScheduler, CosineNoiseScheduler, BiologicalNoiseScheduler)}


def get_scheduler(kind: str = "cosine", num_timesteps: int = 1000, **kwargs) -> NoiseScheduler:
    """Build a schedule by name (``linear``, ``cosine``, ``biological``)."""
    if isinstance(kind, dict):
        kwargs = {k: v for k, v in kind.items() if k not in ("kind", "num_timesteps")}
        num_timesteps = kind.get("num_timesteps", num_timesteps)
        kind = kind["kind"]
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown noise schedule {kind!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[kind](num_timesteps=num_timesteps, **kwargs)
