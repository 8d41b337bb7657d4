"""scidiff: score-based diffusion for single-cell gene expression."""
__version__ = "0.1.0"

# Names load on first use (PEP 562), so that the torch-free parts (scidiff.export.runtime, the
# ONNX server) import without torch.
_LAZY = {"setup_anndata": "data", "transform_like": "data", "ScIDiffModel": "models",
         "ScIDiffTrainer": "training", "load_model": "training", "save_model": "training"}
_LAZY.update({"InverseDesigner": "sampling", "PhenotypeTarget": "sampling"})
_LAZY.update({"denoise": "denoising", "predict_perturbation": "perturbation"})
_SUBPACKAGES = {"data", "models", "sampling", "training", "evaluation", "export", "pipeline", "config", "cli"}
_SUBPACKAGES |= {"regulators", "design"}
_SUBPACKAGES |= {"perturbation", "denoising"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ScIDiffModel", "ScIDiffTrainer", "load_model", "save_model", "setup_anndata", "transform_like"]
__all__ += ["InverseDesigner", "PhenotypeTarget"]
__all__ += ["denoise", "predict_perturbation"]
