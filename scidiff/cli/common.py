"""What the commands share: typed flags (a bad value is an argparse error, exit 2, naming the
flag), the ``--out`` check, ``key=value`` conditions, sampling defaults, and which exceptions mean
bad input. Nothing here imports torch: ``scidiff --help`` stays fast."""
from __future__ import annotations

import argparse
import os
import re
import unicodedata

from ..config import sampling_config
from ..diffusion.plans import SAMPLER_NAMES

SAMPLER_CHOICES = list(SAMPLER_NAMES)


# -- argument types --------------------------------------------------------------------------------
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(name: str, parse, test=None, rule: str = ""):
    """An argparse type: ``parse`` the text, then refuse values failing ``test`` ("must RULE")."""
    def check(text: str):
        value = parse(text)
        if test is not None and not test(value):
            raise argparse.ArgumentTypeError(f"must {rule}, got {text}")
        return value

    check.__name__ = name
    return check


positive_int = _checked("positive_int", _integer, lambda v: v >= 1, "be >= 1")
nonnegative_int = _checked("nonnegative_int", _integer, lambda v: v >= 0, "be >= 0")
# a seed: what every generator (numpy's too) takes
seed_value = _checked("seed_value", _integer, lambda v: 0 <= v < 2**32, "lie in [0, 2**32)")
finite_float = _checked("finite_float", _real)
nonnegative_float = _checked("nonnegative_float", _real, lambda v: v >= 0, "be >= 0")
positive_float = _checked("positive_float", _real, lambda v: v > 0, "be > 0")
unit_interval = _checked("unit_interval", _real, lambda v: 0 < v <= 1, "lie in (0, 1]")


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def separator_text(text: str) -> str:
    """argparse type of ``--separator``: the text between the singles of a combination label."""
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"the separator must be non-empty text without surrounding spaces, "
                                         f"got {text!r}")
    return text


SEPARATOR_HELP = ("the text between the singles of a combination label (default: +, as in A+B and GEARS' A+ctrl; "
                  "scPerturb writes A_B: --separator _)")


def add_expression_source(p, data: str = "--data") -> None:
    """``--layer`` / ``--use-raw``: where ``data``'s expression lies in its file (default ``X``)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--layer", default=None, help=f"read {data}'s expression from this layer (e.g. counts) "
                                                      "instead of X")
    where.add_argument("--use-raw", action="store_true", help=f"read {data}'s expression from .raw instead of X")


def split(text):
    """``"a, b"`` -> ``["a", "b"]`` (``None`` stays ``None``)."""
    return [k.strip() for k in text.split(",") if k.strip()] if text is not None else None


# -- what the handlers share -----------------------------------------------------------------------
def check_out(path, folder: bool = False, reads: dict | None = None) -> str:
    """Fail before any work when ``--out`` cannot be written: a file where a folder is needed or
    the other way round, a file in the way of its folder, a folder without write permission, or
    one of the files the command reads (``reads``: flag -> path; ``--model`` a run folder or its
    checkpoint), which the output would replace. Nothing is created here (a run refused later
    leaves no empty folder): the writers create a file's missing parent folders. Returns the path."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    for flag, given in (reads or {}).items():
        if given is not None and flag == "--model" and os.path.isdir(given):
            from ..training.checkpoint import MODEL_FILE  # lazy: keeps --help light (torch)

            given = os.path.join(given, MODEL_FILE)
        if given is not None and os.path.isfile(full) and os.path.exists(given) and os.path.samefile(full, given):
            raise ValueError(f"--out {path!r} is the {flag} file, which the output would replace; give a new path")
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"--out {path!r} is a file; give a folder")
    if not folder and (os.path.isdir(full) or path.endswith(("/", os.sep))):  # 'out/': a folder, made or not
        raise ValueError(f"--out {path!r} is a folder; give a file path")
    existing = full if folder else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write --out {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {path!r}: no permission to write in {existing!r}")
    return path


QUOTES = "\"'\u201c\u201d\u2018\u2019\u201e\u00ab\u00bb"  # straight, smart and guillemet quotes


def parse_conditions(text: str | None) -> dict[str, str]:
    """``"cell_type=B,condition=stimulated"`` -> ``{"cell_type": "B", "condition": "stimulated"}``.
    A comma starts a new ``key=value`` only where an ``=`` follows before the next comma, so a
    label may hold commas (Cell Ontology's ``CD8-positive, alpha-beta T cell``)."""
    pieces: list[str] = []
    for piece in (text or "").split(","):
        if pieces and "=" not in piece:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    out = {}
    for part in pieces:
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"conditions are written key=value[,key=value]; got {part!r}")
        key, value = part.split("=", 1)
        for word in (key.strip(), value.strip()):
            if len(word) >= 2 and word[0] in QUOTES and word[-1] in QUOTES:  # pasted from a paper or a shell line
                at = part.index(word) + 1
                raise ValueError(f"{part!r}: {word!r} is in quotes ({word[0]!r}, U+{ord(word[0]):04X} "
                                 f"{unicodedata.name(word[0])}, at character {at}); write "
                                 f"{key.strip().strip(QUOTES)}={value.strip().strip(QUOTES)} without them")
        if key.strip() in out:
            raise ValueError(f"{key.strip()!r} is given twice in {text!r}; one value per key (for several groups, "
                             "repeat the flag)")
        out[key.strip()] = value.strip()
    return out


def parse_conditioning(model, text: str | None, flag: str) -> dict:
    """``key=value[,key=value]`` of ``flag`` as conditioning the model accepts (numeric
    covariates as numbers); a bad key, label or number is an error naming the flag."""
    conditions = {}
    try:
        conditions = parse_conditions(text)
        spec = model.data_spec
        if spec is not None:
            for key in [k for k in conditions if k in spec.continuous]:
                try:
                    conditions[key] = float(conditions[key])
                except ValueError:
                    raise ValueError(f"{key} must be a number, got {conditions[key]!r}") from None
            spec.encode_conditions(conditions, 1)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{flag} {text!r}: {user_error(exc) or exc}{_prior_hint(model, conditions)}") from None
    return conditions


def _prior_hint(model, conditions: dict) -> str:
    """Where a perturbation asked for was never seen but the model's prior describes it: how to
    predict it instead (cells are drawn only under seen conditions)."""
    if model.data_spec is None or getattr(model, "perturbation_prior", None) is None:
        return ""
    from ..tasks.perturb import split_target  # lazy: keeps --help light (torch)

    try:
        _, unseen = split_target(model, conditions)  # raises where nothing describes the label
    except (KeyError, ValueError):
        return ""
    for key, label in unseen.items():
        return (f". Cells are drawn only under perturbations seen in training; the model's prior describes "
                f"{label.split(model.data_spec.separator)}: predict control cells under it with scidiff predict "
                f"--target {key}={conditions[key]} (--method population for fresh cells)")
    return ""


def sampling_settings(args) -> dict:
    """``sampler``, ``steps``, ``eta`` and ``guidance_scale``: each flag given, else the sampling
    section of ``--config``, else of the run's config.yaml, else the defaults. The distilled
    sampler walks its student's own steps unless ``--steps`` says otherwise (``steps`` ``None``)."""
    section = sampling_config(args.model, getattr(args, "config", None))
    given = {"sampler": getattr(args, "sampler", None), "steps": getattr(args, "steps", None),
             "eta": getattr(args, "eta", None), "guidance_scale": getattr(args, "guidance", None)}
    settings = {k: v if v is not None else getattr(section, k) for k, v in given.items()}
    if settings["sampler"] == "distilled" and given["steps"] is None:
        settings["steps"] = None
    return settings


def user_error(exc: BaseException) -> str | None:
    """The message for an exception that means bad input or a bad environment (exit status 2),
    or ``None`` for one that means a bug (it keeps its traceback). Bad input: ValueErrors (what
    scidiff raises on bad values), KeyErrors that carry a sentence (a bare ``KeyError('x')`` is
    a failed lookup, a bug), and operating-system errors (missing files, permissions, a full
    disk), shown as the system's reason and the file."""
    if isinstance(exc, KeyError):
        text = exc.args[0] if len(exc.args) == 1 else None
        return text if isinstance(text, str) and len(text.split()) >= 3 else None
    if isinstance(exc, ValueError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            return f"{exc.strerror}: {exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 else "")
        return str(exc) or type(exc).__name__
    return None
