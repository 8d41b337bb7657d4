"""Deprecated: ``scidiff.denoising`` moved to scidiff.tasks.denoise (or scidiff.denoise). This module
re-exports the old names for one release."""
import warnings

from .tasks.denoise import DEFAULT_STRENGTH, binomial_split, denoise

warnings.warn('scidiff.denoising is deprecated and will be removed in the next release; import from '
              'scidiff.tasks.denoise (or scidiff.denoise)',
              DeprecationWarning, stacklevel=2)

__all__ = ["DEFAULT_STRENGTH", "binomial_split", "denoise"]
