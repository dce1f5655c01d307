"""Command-line changes to a loaded suite: lengths such as ``1k:16k``, parameters such as
``window.window_size=128``, and every option of ``effattn bench`` / ``effattn predict`` that replaces a suite value.

Each override goes through the same checks as the suite file (:mod:`efficient_attn.harness.suite`), so an option is
as strictly checked as the TOML key it replaces.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from efficient_attn.errors import require_positive_int
from efficient_attn.harness.suite import (
    Suite,
    SuiteError,
    VariantEntry,
    check_unique,
    choice_list,
    positive_float,
    validate_variant,
)
from efficient_attn.registry import get_spec
from efficient_attn.vocab import DEVICES, DTYPE_NAMES, LEVELS, MODES

__all__ = ["override_suite", "parse_lengths", "parse_variant_params"]

_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def _parse_length(text: str, option: str = "--lengths") -> int:
    raw = text.strip().lower()
    factor = 1
    if raw and raw[-1] in _SUFFIXES:
        factor, raw = _SUFFIXES[raw[-1]], raw[:-1]
    try:
        value = int(raw) * factor
    except ValueError:
        raise SuiteError(f"{option}: {text!r} is not a length (e.g. 1024, 4k, 1m)") from None
    if value <= 0:
        raise SuiteError(f"{option}: lengths must be positive; got {text!r}")
    return value


def parse_lengths(text: str, option: str = "--lengths") -> tuple[int, ...]:
    """``"1024,2048"`` -> (1024, 2048); ``"1k:16k"`` -> LOW, 2 LOW, 4 LOW, ... up to HIGH (1024, 2048, ..., 16384);
    items may mix both. A range must end exactly at HIGH (``3000:5000`` would give only 3000: refused, with the
    lengths it would give and how to write what was meant). ``option`` names the option in errors.

    Raises:
        SuiteError: a malformed item (names it and shows the accepted forms).
    """
    lengths: set[int] = set()
    for item in text.split(","):
        if not item.strip():
            continue
        if ":" in item:
            low_text, high_text = item.split(":", 1)
            low, high = _parse_length(low_text, option), _parse_length(high_text, option)
            if low > high:
                raise SuiteError(f"{option}: range {item!r} goes down; write LOW:HIGH, e.g. 1k:16k")
            steps = [low]
            while steps[-1] * 2 <= high:
                steps.append(steps[-1] * 2)
            if steps[-1] != high:
                raise SuiteError(
                    f"{option}: range {item!r} doubles from {low} and does not reach {high} (it would give "
                    f"{', '.join(map(str, steps))}); end it at {steps[-1]} or {steps[-1] * 2}, or list the lengths "
                    f"with commas (e.g. {low},{high})"
                )
            lengths.update(steps)
        else:
            lengths.add(_parse_length(item, option))
    if not lengths:
        raise SuiteError(f"{option}: no lengths in {text!r} (e.g. 1024,2048 or 1k:16k)")
    return tuple(sorted(lengths))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["window.window_size=128", 'bigbird={"block_size": 32}']`` -> ``{"window": {...}, "bigbird": {...}}``.

    Values are JSON when they parse as JSON (numbers, booleans, lists), else strings.
    """
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise SuiteError(f"--variant-params: {item!r} must be KEY.FIELD=VALUE or KEY=JSON-object")
        left, right = item.split("=", 1)
        if "." in left:
            key, field_name = left.split(".", 1)
            result.setdefault(key, {})[field_name] = _parse_value(right)
        else:
            try:
                table = json.loads(right)
            except json.JSONDecodeError as error:
                raise SuiteError(f"--variant-params: {item!r}: the value after {left}= is not JSON ({error})") from None
            if not isinstance(table, dict):
                raise SuiteError(f"--variant-params: {item!r}: expected a JSON object of config fields")
            result.setdefault(left, {}).update(table)
    return result


def _filter_backends(entries: list[VariantEntry], wanted: list[str]) -> list[VariantEntry]:
    """Per variant key: each entry keeps its own backends that are wanted (with its caps); a wanted backend that no
    entry of the key lists (``auto`` included) gets a new entry, uncapped, with the key's first entry's params."""
    result: list[VariantEntry] = []
    for key in dict.fromkeys(e.key for e in entries):
        spec = get_spec(key)
        same = [e for e in entries if e.key == key]
        valid = [b for b in wanted if b == "auto" or b in spec.backends]
        if not valid:
            raise SuiteError(f"--backends: variant {key!r} has none of {', '.join(wanted)}; "
                             f"its backends: auto, {', '.join(spec.backends)}")
        for entry in same:
            kept = tuple(b for b in entry.backends if b in valid)
            if kept:
                result.append(dataclasses.replace(entry, backends=kept))
        listed = {b for e in same for b in e.backends}
        new = tuple(b for b in valid if b not in listed)
        if new:
            result.append(VariantEntry(key=key, backends=new, params=dict(same[0].params)))
    return result


def _split(text: str, option: str | None = None) -> list[str]:
    """The comma-separated items of ``text``; with ``option``, an item given twice is an error naming it."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if option is not None:
        twice = sorted({t for t in items if items.count(t) > 1})
        if twice:
            raise SuiteError(f"{option}: {', '.join(repr(t) for t in twice)} listed twice; list each once")
    return items


def override_suite(
    suite: Suite,
    *,
    variants: str | None = None,
    backends: str | None = None,
    lengths: str | None = None,
    modes: str | None = None,
    level: str | None = None,
    causal: bool | None = None,
    device: str | None = None,
    dtypes: str | None = None,
    batch_sizes: str | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    variant_params: list[str] | None = None,
    min_run_time: float | None = None,
) -> Suite:
    """``suite`` with command-line options applied (each given option replaces the suite's value).

    ``variants`` (comma-separated keys) selects the suite's entries with those keys and adds entries with every
    backend for keys the suite does not list; ``backends`` keeps, for every variant, the listed backends it has
    (``auto`` is always allowed) and is an error for a variant left with none; ``variant_params`` sets config fields
    (see :func:`parse_variant_params`).

    Raises:
        SuiteError: a bad option (names it, with the allowed values).
    """
    data: dict[str, Any] = {}
    if lengths is not None:
        data["lengths"] = parse_lengths(lengths)
    if modes is not None:
        data["modes"] = choice_list(_split(modes), MODES, "--modes")
    if level is not None:
        data["level"] = choice_list([level], LEVELS, "--level")[0]
    if causal is not None:
        data["causal"] = (causal,)
    if device is not None:
        data["device"] = choice_list([device], DEVICES, "--device")[0]
    if dtypes is not None:
        data["dtypes"] = choice_list(_split(dtypes), DTYPE_NAMES, "--dtype")
    if batch_sizes is not None:
        items = _split(batch_sizes, "--batch-size")
        try:
            data["batch_sizes"] = tuple(require_positive_int("--batch-size", int(b), error=SuiteError) for b in items)
        except ValueError as error:
            raise SuiteError(f"--batch-size: expected positive integers, e.g. 1,4; got {batch_sizes!r}") from error
    if heads is not None:
        data["heads"] = require_positive_int("--heads", heads, error=SuiteError)
    if head_dim is not None:
        data["head_dim"] = require_positive_int("--head-dim", head_dim, error=SuiteError)
    if min_run_time is not None:
        data["min_run_time"] = positive_float(min_run_time, "--min-run-time")
    new_heads = data.get("heads", suite.heads)
    new_head_dim = data.get("head_dim", suite.head_dim)
    entries = list(suite.variants)
    if variants is not None:
        by_key: dict[str, list[VariantEntry]] = {}
        for entry in entries:
            by_key.setdefault(entry.key, []).append(entry)
        entries = []
        for key in _split(variants, "--variants"):
            if key in by_key:
                entries.extend(by_key[key])
            else:
                try:
                    spec = get_spec(key)
                except KeyError as error:
                    raise SuiteError(f"--variants: {error.args[0]}") from None
                entries.append(VariantEntry(key=key, backends=tuple(spec.backends)))
    overrides = parse_variant_params(variant_params or [])
    unknown = [k for k in overrides if k not in {e.key for e in entries}]
    if unknown:
        raise SuiteError(f"--variant-params: {', '.join(unknown)} not among the variants of this run "
                         f"({', '.join(e.key for e in entries)})")
    wanted_backends = _split(backends, "--backends") if backends is not None else None
    if wanted_backends is not None:
        entries = _filter_backends(entries, wanted_backends)
    checked = []
    for entry in entries:
        params = {**entry.params, **overrides.get(entry.key, {})}
        checked.append(validate_variant(entry.key, list(entry.backends), params, dict(entry.max_len),
                                        heads=new_heads, head_dim=new_head_dim, where=f"variant {entry.key!r}"))
    data["variants"] = tuple(checked)
    check_unique(data["variants"], "after the command-line options")
    return dataclasses.replace(suite, **data)
