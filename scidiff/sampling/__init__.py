"""Deprecated: ``scidiff.sampling`` moved to scidiff.diffusion (samplers, plans, guidance),
scidiff.engine (SamplingEngine) and scidiff.tasks.design (InverseDesigner, PhenotypeTarget). This
module re-exports the old names for one release."""
import warnings

from ..diffusion.guidance import classifier_free_guidance, objective_guidance
from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS, PlanStep, sampler_plan, timesteps
from ..diffusion.samplers import SAMPLERS, ddim, ddim_invert, ddpm, dpmpp_2m, euler_maruyama, heun, run_plan
from ..engine import SamplingEngine
from ..tasks.design import InverseDesigner, ObjectiveFunction, PhenotypeTarget

warnings.warn('scidiff.sampling is deprecated and will be removed in the next release; import from '
              'scidiff.diffusion (samplers, plans, guidance), scidiff.engine (SamplingEngine) and '
              'scidiff.tasks.design (InverseDesigner, PhenotypeTarget)',
              DeprecationWarning, stacklevel=2)
