"""Deprecated: ``scidiff.perturbation`` moved to scidiff.tasks.perturb (or scidiff.perturb). This
module re-exports the old names for one release."""
import warnings

from .tasks.perturb import perturb, predict_perturbation

warnings.warn('scidiff.perturbation is deprecated and will be removed in the next release; import from '
              'scidiff.tasks.perturb (or scidiff.perturb)',
              DeprecationWarning, stacklevel=2)
