"""Deprecated: ``scidiff.sampling.inverse_design`` moved to scidiff.tasks.design (and
scidiff.diffusion.guidance for objective_guidance). This module re-exports the old names for one
release."""
import warnings

from ..diffusion.guidance import SCHEDULES, guidance_interval, objective_guidance
from ..diffusion.smc import systematic_resample
from ..tasks.design import *  # noqa: F401,F403
from ..tasks.design.designer import _jsonable  # noqa: F401

warnings.warn('scidiff.sampling.inverse_design is deprecated and will be removed in the next release; import '
              'from scidiff.tasks.design (and scidiff.diffusion.guidance for objective_guidance)',
              DeprecationWarning, stacklevel=2)
