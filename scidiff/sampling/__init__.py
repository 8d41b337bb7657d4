"""Samplers over a denoiser, guidance wrappers that return denoisers, and the fast engine."""
from .engine import SamplingEngine
from .guidance import classifier_free_guidance
from .inverse_design import InverseDesigner, ObjectiveFunction, PhenotypeTarget, objective_guidance
from .samplers import (DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, PlanStep, ddim, ddim_invert, ddpm, dpmpp_2m,
                       euler_maruyama, heun, run_plan, sampler_plan, timesteps)

__all__ = ["DEFAULT_SAMPLER", "DEFAULT_STEPS", "SAMPLERS", "PlanStep", "SamplingEngine", "classifier_free_guidance",
           "ddim", "ddim_invert", "ddpm", "dpmpp_2m", "euler_maruyama", "heun", "run_plan", "sampler_plan", "timesteps"]
__all__ += ["InverseDesigner", "ObjectiveFunction", "PhenotypeTarget", "objective_guidance"]
