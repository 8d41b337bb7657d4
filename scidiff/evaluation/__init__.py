"""Evaluation: distribution metrics, baselines and reports."""
from .metrics import (classifier_auc, energy_distance, evaluate_generation_quality, fit_pca, frechet_distance,
                      gene_correlation_preservation, measurement_properties, mmd_rbf)

__all__ = ["classifier_auc", "energy_distance", "evaluate_generation_quality", "fit_pca", "frechet_distance",
           "gene_correlation_preservation", "measurement_properties", "mmd_rbf"]
