"""Training: the trainer, losses, EMA, checkpoints and the multi-process helpers."""
from .checkpoint import load_model, read_checkpoint, read_training_checkpoint, save_model
from .ema import EMA
from .losses import (BiologicalConstraints, denoising_loss, nonnegativity_loss, pathway_consistency_loss,
                     sparsity_loss)
from .rng import seed_everything
from .trainer import EarlyBestWarning, ScIDiffTrainer, enable_determinism

__all__ = ["BiologicalConstraints", "EMA", "EarlyBestWarning", "ScIDiffTrainer", "denoising_loss", "enable_determinism",
           "load_model", "nonnegativity_loss", "pathway_consistency_loss", "read_checkpoint", "read_training_checkpoint",
           "save_model", "seed_everything", "sparsity_loss"]
