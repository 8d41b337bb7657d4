"""Checks of the whole numbers users pass from Python (a number of epochs, genes, samples; a seed;
a batch size): one rule for every entry point. Plain Python: the set-up, the engine, training,
the per-cell draws and the tasks share it."""
from __future__ import annotations

import math
from numbers import Integral, Real


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


def yes_no(name: str, value) -> bool:
    """A yes/no argument as a bool: a Python or numpy bool (``np.False_ is False`` is false); text
    such as ``'no'``, which reads as true, or a number is a ``ValueError`` naming it."""
    kind = type(value)  # numpy's bool (np.bool_, named 'bool' since numpy 2), without importing numpy
    if not isinstance(value, bool) and not (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


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
