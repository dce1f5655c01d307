"""Error classes and the checks every validator shares. A leaf module: it imports nothing from the package.

One way to say each kind of mistake, used by the registry, the attention configs, the suites, the CLI and the peers:

* :func:`unknown_name_error`: an unknown name (key, suite, peer, option value) with the nearest valid names;
* :func:`check_parameter_names`: unknown keyword parameters, each with its nearest spelling, and the allowed list;
* :func:`require_positive_int`: a positive int (bools rejected);
* :func:`check_typed_value`, :func:`check_field_types`: a value of the type a (dataclass) field declares;
* :func:`did_you_mean`: the hint itself, for errors of other classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any, Iterable

__all__ = [
    "BackendUnavailableError",
    "check_field_types",
    "check_parameter_names",
    "check_required_parameters",
    "check_typed_value",
    "did_you_mean",
    "require_positive_int",
    "suggest",
    "unknown_name_error",
]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (device, mode or missing package); the message says why."""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Nearest spellings of ``name`` among ``candidates`` (for error messages)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'x', 'y'?"`` for the nearest spellings of ``name``, or ``""`` when none is near."""
    near = suggest(str(name), candidates, n=n)
    return f"; did you mean {', '.join(repr(k) for k in near)}?" if near else ""


def unknown_name_error(
    kind: str,
    name: str,
    known: list[str],
    known_label: str,
    error: type[Exception] = KeyError,
    *,
    owner: str | None = None,
) -> Exception:
    """An ``error`` (a ``KeyError`` unless told) for an unknown ``name`` that suggests the nearest of ``known`` and
    lists them all: ``unknown attention key 'windw'; did you mean 'window'? (registered: full, window, ...)``.

    ``owner`` says whose names they are: ``unknown backend 'sdp' for attention 'full'; did you mean 'sdpa'? ...``.
    """
    whose = f" for {owner}" if owner else ""
    return error(f"unknown {kind} {name!r}{whose}{did_you_mean(name, known)} ({known_label}: {', '.join(known)})")


def check_parameter_names(given: Iterable[str], allowed: list[str], owner: str) -> None:
    """Raise a ``TypeError`` naming every name in ``given`` that is not in ``allowed``, with the nearest spelling
    and the allowed list; ``owner`` says whose parameters they are (e.g. ``"attention 'window'"``)."""
    unknown = [name for name in given if name not in allowed]
    if not unknown:
        return
    parts = []
    for name in unknown:
        near = suggest(name, allowed, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise TypeError(
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(parts)} for {owner}; "
        f"allowed: {', '.join(allowed)}"
    )


def require_positive_int(name: str, value: object, error: type[Exception] = ValueError) -> int:
    """Return ``value`` if it is a positive int (bools rejected); otherwise raise ``error`` (a ``ValueError`` unless
    told) saying ``"<name> must be a positive int, got <value>"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be a positive int, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    """``'a bool'``, ``'an int or None'``, ``'a tuple of floats'``: the type in words, for messages."""
    if hint is type(None):
        return "None"
    if hint is bool:
        return "a bool (True or False)"
    if hint is int:
        return "an int"
    if hint is float:
        return "a number (float)"
    if hint is str:
        return "a str"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a tuple (or list) whose items are each {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _matches(value: object, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(args) == len(value) and all(_matches(item, arg) for item, arg in zip(value, args))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not read: the field's own validation decides


def check_typed_value(name: str, value: object, hint: Any, owner: str | None = None) -> None:
    """Raise a ``ValueError`` ``"<name> must be <type in words>, got <value>"`` when ``value`` is not of the
    type ``hint`` (bool only for bool: ``'no'`` and ``1`` are refused; an int for int; any real number for float;
    a list or tuple for ``tuple[...]``, element by element; unions and None as written)."""
    if _matches(value, hint):
        return
    whose = f" ({owner})" if owner else ""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for arm in arms:  # a list or tuple for a tuple[X, ...] field: name the first item that is not an X
        args = typing.get_args(arm)
        if typing.get_origin(arm) is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if not _matches(item, args[0]):
                    raise ValueError(f"{name}[{i}] must be {_describe(args[0])}, got {item!r} "
                                     f"({type(item).__name__}) in {name}={value!r}{whose}")
    raise ValueError(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__}){whose}")


def check_field_types(instance: object, owner: str | None = None) -> None:
    """:func:`check_typed_value` for every init field of the dataclass ``instance``, from its declared types."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):  # type: ignore[arg-type]
        if field.init and field.name in hints:
            check_typed_value(field.name, getattr(instance, field.name), hints[field.name], owner)


def check_required_parameters(given: Iterable[str], required: list[str], owner: str) -> None:
    """Raise a ``TypeError`` naming the ``required`` parameters missing from ``given`` (after the unknown ones were
    refused by :func:`check_parameter_names`, so a misspelt name is reported as itself, not as a missing one)."""
    missing = [name for name in required if name not in set(given)]
    if missing:
        raise TypeError(f"{owner} needs {', '.join(missing)} (missing required parameter"
                        f"{'s' if len(missing) > 1 else ''})")
