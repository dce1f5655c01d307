"""Error classes and the checks every validator shares. A leaf module: it imports nothing from the package.

One way to say each kind of mistake, used by the registry, the attention configs, the suites, the CLI and the peers:

* :func:`unknown_name_error`: an unknown name (key, suite, peer, option value) with the nearest valid names;
* :func:`check_parameter_names`: unknown keyword parameters, each with its nearest spelling, and the allowed list;
* :func:`require_positive_int`: a positive int (bools rejected);
* :func:`did_you_mean`: the hint itself, for errors of other classes.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "BackendUnavailableError",
    "check_parameter_names",
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
