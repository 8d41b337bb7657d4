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


def generator_seed(seed) -> int:
    """``seed`` for a torch generator (``model.sample``, the engine) as an int in ``[0, 2**64)``,
    the range torch takes (numpy integers too, which torch refuses), else a ValueError naming it:
    a negative seed would wrap to another one."""
    return whole_number("seed", seed, 0, 2**64 - 1, what="an integer in [0, 2**64)")
