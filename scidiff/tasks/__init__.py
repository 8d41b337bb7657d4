"""The verbs: each takes a trained model first and gives cells (an AnnData), with one vocabulary:
``n`` cells, ``condition``, ``sampler``, ``steps``, ``guidance_scale`` (classifier-free guidance),
``seed``, ``progress``.

- :mod:`.generate`: :func:`~.generate.generate`, :func:`~.generate.generate_to_file` (the one
  writer, engine or not) and :func:`~.generate.generate_sharded` (many processes);
- :mod:`.perturb`: :func:`~.perturb.perturb` (``predict_perturbation``), counterfactuals of control cells;
- :mod:`.denoise`: :func:`~.denoise.denoise` with the model as the prior;
- :mod:`.design`: inverse design (:func:`~.design.design`, :class:`~.design.InverseDesigner`),
  the in-silico screen and attributions;
- :mod:`.train`, :mod:`.evaluate`, :mod:`.demo`: the jobs behind ``scidiff train``,
  ``evaluate`` and ``demo``.

The modules are named after their verbs, so the verbs themselves are reached through them (or
from the top level: ``scidiff.generate``, ``scidiff.perturb``, ``scidiff.denoise``,
``scidiff.design``).
"""

_MODULES = {"cells", "demo", "denoise", "design", "evaluate", "generate", "perturb", "screen", "train", "trajectory"}


def __getattr__(name):
    """Import a task module on first use (PEP 562), so that ``scidiff.tasks.screen.predict_screen``
    and ``scidiff.tasks.trajectory.trajectory`` work after a bare ``import scidiff``."""
    if name in _MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
