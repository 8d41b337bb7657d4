"""scidiff: score-based diffusion for single-cell gene expression.

The verbs take a trained model first and give cells, with one vocabulary (``n``, ``condition``,
``sampler``, ``steps``, ``guidance_scale``, ``seed``, ``progress``): :func:`generate`,
:func:`perturb`, :func:`denoise`, :func:`design` (and :func:`train` a model first).
"""
__version__ = "0.1.0"

# Names load on first use (PEP 562), so that the torch-free parts (scidiff.export.runtime, the
# ONNX server, the command line's --help) import without torch.
_LAZY = {"setup_anndata": ("data", "setup_anndata"), "transform_like": ("data", "transform_like"),
         "ScIDiffModel": ("models", "ScIDiffModel"), "ScIDiffTrainer": ("training", "ScIDiffTrainer"),
         "load_model": ("training", "load_model"), "save_model": ("training", "save_model"),
         "SamplingEngine": ("engine", "SamplingEngine"),
         "InverseDesigner": ("tasks.design", "InverseDesigner"), "PhenotypeTarget": ("tasks.design", "PhenotypeTarget"),
         "generate": ("tasks.generate", "generate"), "perturb": ("tasks.perturb", "perturb"),
         "predict_perturbation": ("tasks.perturb", "predict_perturbation"), "denoise": ("tasks.denoise", "denoise"),
         "design": ("tasks.design", "design"), "train": ("tasks.train", "train")}
_SUBPACKAGES = {"config", "data", "diffusion", "models", "ops", "engine", "training", "evaluation", "tasks", "export",
                "cli"}
_SUBPACKAGES |= {"sampling", "pipeline", "perturbation", "denoising", "regulators"}  # deprecated addresses


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["InverseDesigner", "PhenotypeTarget", "SamplingEngine", "ScIDiffModel", "ScIDiffTrainer", "denoise",
           "design", "generate", "load_model", "perturb", "predict_perturbation", "save_model", "setup_anndata",
           "train", "transform_like"]
