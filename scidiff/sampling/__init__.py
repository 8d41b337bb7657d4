"""Samplers over a denoiser, and guidance wrappers that return denoisers."""
from .guidance import classifier_free_guidance
from .samplers import SAMPLERS, ddim, ddim_invert, ddpm, timesteps

__all__ = ["SAMPLERS", "classifier_free_guidance", "ddim", "ddim_invert", "ddpm", "timesteps"]
