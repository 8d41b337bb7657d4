"""``scidiff`` command line. :data:`COMMANDS` is the one table of commands (name -> how to add
its arguments, how to run it), one module per command (:mod:`.train`, :mod:`.sample`, ...): the
parser is built from it and :func:`main` dispatches through it. :func:`main` turns bad input into
``scidiff CMD: error: ...`` and exit status 2 (:func:`user_error`); anything else is a bug and
keeps its traceback. Ctrl-C (status 130) and SIGTERM (143) stop a command with its files'
temporary names removed. Importing this package does not import torch (``scidiff --help`` is fast):
each command imports its task when it runs."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Callable, NamedTuple

from .. import __version__
from . import demo, denoise, design, distil, evaluate, export_onnx, predict, sample, serve, train
from .common import (SAMPLER_CHOICES, check_out, device_name, finite_float, nonnegative_float, nonnegative_int,
                     parse_conditioning, parse_conditions, positive_int, sampling_settings, seed_value, unit_interval,
                     user_error)

__all__ = ["COMMANDS", "Command", "SAMPLER_CHOICES", "build_parser", "check_out", "device_name", "finite_float",
           "main", "nonnegative_float", "nonnegative_int", "parse_conditioning", "parse_conditions", "positive_int",
           "sampling_settings", "seed_value", "unit_interval", "user_error"]


class Command(NamedTuple):
    """One ``scidiff`` command: ``add(subparsers)`` registers its parser under the command's name
    in :data:`COMMANDS`; ``run(args)`` does the work."""
    add: Callable
    run: Callable


COMMANDS: dict[str, Command] = {name: Command(module.add, module.run) for name, module in (
    ("train", train), ("distil", distil), ("sample", sample), ("evaluate", evaluate), ("predict", predict),
    ("denoise", denoise), ("design", design), ("demo", demo), ("export-onnx", export_onnx), ("serve", serve))}


def build_parser() -> argparse.ArgumentParser:
    """The ``scidiff`` parser: one subcommand per entry of :data:`COMMANDS`, in its order."""
    parser = argparse.ArgumentParser(prog="scidiff", description="Score-based diffusion for single-cell expression.")
    parser.add_argument("--version", action="version", version=f"scidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add(sub)
        if name not in sub.choices:
            raise RuntimeError(f"{command.add.__name__} did not register the command {name!r}")
    if set(sub.choices) != set(COMMANDS):
        raise RuntimeError(f"commands registered outside the table: {sorted(set(sub.choices) - set(COMMANDS))}")
    parser.set_defaults(_command_parsers=sub.choices)
    return parser


@contextlib.contextmanager
def _plain_warnings(command: str):
    """Show scidiff's own warnings as ``scidiff COMMAND: warning: ...`` lines while a command
    runs (others keep Python's format, with their source)."""
    original = warnings.formatwarning
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

    def fmt(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"scidiff {command}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = original


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, ``kill``) while a command runs: unwound as Ctrl-C
    is, so every file being written removes its temporary name."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse reports these from the top-level parser: say them under the command's name and usage
        (args._command_parsers[args.command] if args.command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        parser.print_help()
        return 0
    try:
        with _plain_warnings(args.command), _terminate_as_interrupt():
            COMMANDS[args.command].run(args)
    except Terminated:
        print(f"scidiff {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"scidiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"scidiff {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
