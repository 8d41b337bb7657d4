"""The math of diffusion, importing nothing above it (torch, numpy and math only).

- :mod:`.schedules`: discrete variance-preserving noise schedules;
- :mod:`.plans`: torch-free sampler plans (timestep grids, :class:`~.plans.PlanStep`, the plan
  builders, :data:`~.plans.DEFAULT_SAMPLER`/:data:`~.plans.DEFAULT_STEPS`) and the one walker;
- :mod:`.samplers`: DDIM, DDPM, DPM-Solver++(2M), Heun, Euler-Maruyama as plan + walker, and
  DDIM inversion;
- :mod:`.guidance`: classifier-free guidance, objective guidance, guidance schedules, the Polyak step;
- :mod:`.smc`: sequential Monte Carlo resampling, walking with the walker's hook;
- :mod:`.distillation`: progressive distillation's grid, target and loss weight, and the
  distilled :class:`~.distillation.Student` (Salimans & Ho 2022).

Names load on first use (PEP 562), so that :mod:`.plans` imports without torch (the ONNX runtime
uses it).
"""
from __future__ import annotations

import importlib

_NAMES = {
    "plans": ["DEFAULT_SAMPLER", "DEFAULT_SPACING", "DEFAULT_STEPS", "PLANS", "SAMPLER_NAMES", "PlanStep", "WalkState",
              "alphas_cumprod_of", "halving_timesteps", "logsnr_timesteps", "sampler_plan", "step_update", "timesteps",
              "walk"],
    "schedules": ["BiologicalNoiseScheduler", "CosineNoiseScheduler", "LinearNoiseScheduler", "NoiseScheduler",
                  "get_scheduler"],
    "samplers": ["SAMPLERS", "Denoiser", "ddim", "ddim_invert", "ddpm", "dpmpp_2m", "euler_maruyama", "heun",
                 "run_plan"],
    "guidance": ["SCHEDULES", "cfg_combine", "classifier_free_guidance", "double_rows", "guidance_interval",
                 "objective_guidance", "polyak_step"],
    "smc": ["systematic_resample", "walk_smc"],
    "distillation": ["Student"],
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
