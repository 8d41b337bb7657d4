"""Deprecated: ``scidiff.regulators`` moved to scidiff.tasks.design (screen and attribution). This
module re-exports the old names for one release."""
import warnings

from .tasks.design.attribution import (TF_METHODS, gene_attribution, integrated_gradients, read_tf_network,
                                       tf_activity_change, tf_weight_matrix, ulm, wmean)
from .tasks.design.screen import candidate_conditions, condition_label, screen_perturbations, seen_combinations

warnings.warn('scidiff.regulators is deprecated and will be removed in the next release; import from '
              'scidiff.tasks.design (screen and attribution)',
              DeprecationWarning, stacklevel=2)
