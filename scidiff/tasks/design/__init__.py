"""Inverse design: cells toward a target phenotype, and what could produce them.

- :mod:`.targets`: :class:`PhenotypeTarget` (gene levels, markers up, genes down, a cell type);
- :mod:`.objectives`: differentiable per-cell losses (the objective seam);
- :mod:`.classifier`: :class:`CellTypeClassifier` for cell-type targets;
- :mod:`.designer`: :class:`InverseDesigner` (guided sampling, resampling, selection, retries)
  and the verb :func:`design` (``scidiff.design``);
- :mod:`.screen`: the in-silico perturbation screen; :mod:`.attribution`: genes (integrated
  gradients) and TFs behind a design;
- :mod:`.job`: ``scidiff design``'s job (:func:`run_design`: cells, report and rankings to files).
"""
from .attribution import (gene_attribution, integrated_gradients, read_tf_network, tf_activity_change,
                          tf_weight_matrix, ulm, wmean)
from .classifier import CellTypeClassifier
from .designer import DesignResult, InverseDesigner, design
from .job import output_paths, run_design
from .objectives import (CellTypeObjective, GeneExpressionObjective, MarkerGeneObjective, NonNegativityObjective,
                         ObjectiveFunction, RealismObjective, SparsityObjective, SuppressedGeneObjective)
from .screen import candidate_conditions, condition_label, screen_perturbations, seen_combinations
from .targets import GeneConstraint, PhenotypeTarget, UnknownGeneError, constraint_hits, met_every_target

__all__ = ["CellTypeClassifier", "CellTypeObjective", "DesignResult", "GeneConstraint", "GeneExpressionObjective",
           "InverseDesigner", "MarkerGeneObjective", "NonNegativityObjective", "ObjectiveFunction", "PhenotypeTarget",
           "RealismObjective", "SparsityObjective", "SuppressedGeneObjective", "UnknownGeneError",
           "candidate_conditions", "condition_label", "constraint_hits", "design", "gene_attribution",
           "integrated_gradients", "met_every_target", "output_paths", "read_tf_network", "run_design",
           "screen_perturbations", "seen_combinations", "tf_activity_change", "tf_weight_matrix", "ulm", "wmean"]
