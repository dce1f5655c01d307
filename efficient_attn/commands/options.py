"""The one validator layer of the ``effattn`` commands: option types, the one-line usage error, the output folder.

Every command builds its options from these, so a bad value is caught while the command line is parsed, before
anything is loaded or measured, and reported the same way everywhere: one line on stderr,
``effattn <command>: error: <what is wrong, what is allowed>``, exit status 2, never a traceback.

* :class:`CommandParser`: an ``argparse.ArgumentParser`` whose usage errors raise :class:`UsageError` (one line)
  instead of printing the usage and exiting; :func:`efficient_attn.cli.main` turns it into status 2.
* Option types (``type=`` of ``add_argument``): :func:`positive_float` (finite, > 0), :func:`positive_int`,
  :func:`nonnegative_int`, :func:`length` (``4096``, ``4k``, ``1m``).
* :class:`UniqueItems`: a ``nargs="+"`` action that refuses an item given twice.
* :func:`check_out_folder`: a folder that is (or can be created as) a writable directory; :func:`out_folder` is the
  same as an option type.

Suites and their command-line overrides are checked by :mod:`efficient_attn.harness.suite` and
:mod:`efficient_attn.harness.overrides` (the same checks as the TOML keys they replace), also before any work.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

__all__ = [
    "CommandParser",
    "UniqueItems",
    "UsageError",
    "check_out_folder",
    "length",
    "nonnegative_int",
    "out_folder",
    "positive_float",
    "positive_int",
]


class UsageError(Exception):
    """A bad command line; ``str(error)`` is the whole one-line message (``effattn bench: error: ...``)."""


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: ``prog: error: message`` as a :class:`UsageError`
    (subparsers made by ``add_subparsers`` are of the same class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _number(text: str, kind: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r} (not finite)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``inf`` and ``nan`` refused)."""
    value = _number(text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _integer(text: str, kind: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def length(text: str) -> int:
    """One sequence length: ``4096``, ``4k``, ``1m`` (k = 1024, m = 1024**2); >= 1."""
    raw = str(text).strip().lower()
    factor = 1
    if raw and raw[-1] in _SUFFIXES:
        factor, raw = _SUFFIXES[raw[-1]], raw[:-1]
    try:
        value = int(raw) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one length such as 4096, 4k or 1m, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive length, got {text!r}")
    return value


class UniqueItems(argparse.Action):
    """``nargs="+"`` whose items must differ: ``--tasks recall recall`` is an error, not two runs of one cell."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        items = list(values) if isinstance(values, (list, tuple)) else [values]
        seen = set()
        for item in items:
            if item in seen:
                parser.error(f"argument {option_string}: {item!r} is given twice; list each value once")
            seen.add(item)
        setattr(namespace, self.dest, items)


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` if it is a writable folder or can be created as one; ``ValueError`` naming ``option`` otherwise
    (a file there, a file on the way, a folder that is not writable). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder (an existing run folder resumes)")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{option} {path}: {probe} is a file, so the folder cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise ValueError(f"{option} {path} {what}; choose a folder you can write to")
    return path


def out_folder(option: str = "--out") -> Callable[[str], Path]:
    """:func:`check_out_folder` as an option type (checked while the command line is parsed)."""

    def check(text: str) -> Path:
        try:
            return check_out_folder(text, option)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{option} ")) from None

    check.__name__ = "out_folder"
    return check
