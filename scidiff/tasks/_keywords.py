"""Keywords renamed when the verbs got one vocabulary (``n``, ``condition``, ``guidance_scale`` for
classifier-free guidance everywhere, ``objective_scale`` for design's objective): the old ones keep
working for one release, with a DeprecationWarning."""
from __future__ import annotations

from ..checks import warn


def renamed(where: str, given: dict, renames: dict[str, tuple[str, object]]) -> list:
    """For each ``old -> (new, value)``: the value passed under the old keyword (taken out of
    ``given``, with a DeprecationWarning pointing at the caller's line) or else ``value``. A TypeError when both
    are passed (the
    new keyword's value is not ``None``) or when ``given`` holds keywords that are neither."""
    out = []
    for old, (new, value) in renames.items():
        if old in given:
            if value is not None:
                raise TypeError(f"{where}: pass {new}= or the deprecated {old}=, not both")
            warn(f"{where}({old}=...) is deprecated and will be removed; use {new}=", DeprecationWarning)
            value = given.pop(old)
        out.append(value)
    return out


def no_other_keywords(where: str, given: dict) -> None:
    if given:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(sorted(given))}")
