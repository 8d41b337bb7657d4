"""scidiff: score-based diffusion for single-cell gene expression."""
__version__ = "0.1.0"

from .data import setup_anndata, transform_like  # noqa: E402
from .models import ScIDiffModel  # noqa: E402
from .training import ScIDiffTrainer, load_model, save_model  # noqa: E402

__all__ = ["ScIDiffModel", "ScIDiffTrainer", "load_model", "save_model", "setup_anndata", "transform_like"]
