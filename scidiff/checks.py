"""Checks of the whole numbers users pass from Python (a number of epochs, genes, samples; a seed;
a batch size), of yes/no arguments and of choices given as text: one rule for every entry point;
and :func:`warn`, which points scidiff's warnings at the user's line. Plain Python: the set-up,
the engine, training, the per-cell draws and the tasks share it."""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from numbers import Integral, Real

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CLI = os.path.join(_PACKAGE, "cli") + os.sep
_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"), os.sep + "contextlib.py")  # torch.no_grad's wrapper


def whole_number(name: str, value, low: int | None = None, high: int | None = None, *,
                 what: str = "a whole number", integral_floats: bool = True) -> int:
    """``value`` as an int: a Python or numpy integer, or a float without a fractional part
    (``10.0``, as a YAML, JSON or CSV value may give it; ``integral_floats=False``: integers only,
    for a number of cells), within ``[low, high]`` where given. A bool, text, ``None``, NaN,
    ``2.5`` or a value out of range is a ``ValueError``: ``"{name} must be {what}, got {value!r}"``
    (``what`` says the rule, e.g. ``"an integer >= 1"``)."""
    if (isinstance(value, bool) or not isinstance(value, Real if integral_floats else Integral)
            or not math.isfinite(value) or value != int(value)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def yes_no(name: str, value, none: str | None = None) -> bool | None:
    """A yes/no argument as a bool: a Python or numpy bool (``np.False_ is False`` is false); text
    such as ``'no'``, which reads as true, or a number is a ``ValueError`` naming it:
    ``"{name} must be True or False, got 'no'"``. ``none``: what ``None`` means where it is
    allowed (returned as ``None``), said in the message: ``"True, False or None ({none})"``."""
    if value is None and none is not None:
        return None
    kind = type(value)  # numpy's bool (np.bool_, named 'bool' since numpy 2), without importing numpy
    if not isinstance(value, bool) and not (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        choices = "True or False" if none is None else f"True, False or None ({none})"
        raise ValueError(f"{name} must be {choices}, got {value!r}")
    return bool(value)


def choice(what: str, value, choices):
    """``value`` where it is one of ``choices`` (a sampler, a method), else a ``ValueError`` listing
    them, the one way choices given as text are refused: ``"unknown {what} 'X'; choose one of [...]"``
    (``'DDIM'`` and ``'ddim '`` are not ``'ddim'``)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    return value


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the user's line: the first frame outside the scidiff package
    (past torch.no_grad's wrapper), or the command line's own frame (``scidiff.cli``, whose format
    shows scidiff's warnings as ``scidiff COMMAND: warning: ...``), wherever in the package it is
    raised (Python 3.11 has no ``skip_file_prefixes``)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_CLI) or not (path.startswith(_PACKAGE) or path.endswith(_WRAPPERS)):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def said_once(said: set | None = None):
    """Show each warning raised inside the block once: those whose ``(category, text)`` is in
    ``said`` (updated; a set shared over the blocks of one job) are dropped, as are repeats. The
    same cells read again by each step of a job (a screen's targets; training's set-up, effects
    and prior) warned about them once per read. The warnings are shown as the block ends, at the
    lines that raised them, an error inside too."""
    said = set() if said is None else said
    caught = []
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught = list(record)
    finally:
        for w in caught:
            if (w.category, str(w.message)) not in said:
                said.add((w.category, str(w.message)))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def real_number(name: str, value, test=lambda v: True, *, what: str = "a finite number") -> float:
    """``value`` as a float: a Python or numpy real number, finite, passing ``test``; a bool, text,
    ``None`` or NaN is a ``ValueError``: ``"{name} must be {what}, got {value!r}"``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not test(float(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def generator_seed(seed) -> int:
    """``seed`` for a torch generator (``model.sample``, the engine) as an int in ``[0, 2**64)``,
    the range torch takes (numpy integers too, which torch refuses), else a ValueError naming it:
    a negative seed would wrap to another one."""
    return whole_number("seed", seed, 0, 2**64 - 1, what="an integer in [0, 2**64)")


def refuse_one_condition(value, name: str, example: str, items: str = "condition dicts") -> None:
    """Refuse text or one dict where a list of ``items`` is asked for (a dict was read as its keys,
    text letter by letter): a ValueError naming ``name``, with ``example`` (e.g. ``{'drug': 'A'}``)."""
    if isinstance(value, (str, bytes)) or callable(getattr(value, "items", None)):
        raise ValueError(f"{name} must be a list of {items}, e.g. [{example}], got {value!r}")


def condition_mapping(value, name: str = "condition") -> dict:
    """``value`` (covariate -> label: a dict, any mapping, a pandas Series) as a dict, ``None`` as
    ``{}``; text or another sequence is a ValueError naming ``name``, as the ONNX runtime says it
    (``dict("stim")`` read it letter by letter: "dictionary update sequence element #0 has length 1")."""
    if value is None:
        return {}
    items = getattr(value, "items", None)
    if isinstance(value, (str, bytes)) or not callable(items):
        raise ValueError(f"{name} must be a dict of covariate -> label (e.g. {{'cell_type': 'B'}}), got {value!r}")
    return dict(items())
