"""Training: the trainer, losses, EMA and checkpoints."""
from .checkpoint import load_model, read_checkpoint, save_model
from .ema import EMA
from .losses import (BiologicalConstraints, denoising_loss, nonnegativity_loss, pathway_consistency_loss,
                     sparsity_loss)
from .trainer import ScIDiffTrainer

__all__ = ["BiologicalConstraints", "EMA", "ScIDiffTrainer", "denoising_loss", "load_model",
           "nonnegativity_loss", "pathway_consistency_loss", "read_checkpoint", "save_model", "sparsity_loss"]
