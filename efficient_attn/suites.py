"""Benchmark suites: small declarative TOML files in ``bench/`` (contract 3 of the team brief).

Example (``bench/quick.toml``)::

    description = "what this suite answers"
    device = "auto"            # auto | cpu | cuda
    level = "core"             # core | layer | model
    modes = ["fwd", "fwd_bwd"] # fwd | fwd_bwd | train_step
    lengths = [128, 256]
    batch_sizes = [1]
    heads = 4
    head_dim = 64
    dtypes = ["float32"]       # float32 | bfloat16 | float16
    causal = [false]
    min_run_time = 0.5         # optional: seconds blocked_autorange measures each fast cell
    slow_call_s = 1.0          # optional: a warm-up call slower than this -> slow_repeats timed calls
    slow_repeats = 3           # optional
    depth = 2                  # optional: blocks of the backbone at level "model"
    [[variants]]
    key = "full"
    backends = ["naive", "sdpa"]   # optional: default every backend of the variant
    params = {}                    # optional: the variant's config fields
    max_len = { fwd_bwd = 8192 }   # optional: per-mode length cap (longer cells -> skipped_budget, with a note)
    [[peers]]                      # optional; only run with --peers
    name = "hf-bigbird"
    params = { block_size = 64 }

Every key is checked when the suite loads: an unknown key names the nearest valid one; an unregistered variant key,
a backend the variant does not have, or a parameter its config rejects is an error naming the table it is in.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficient_attn.errors import suggest
from efficient_attn.registry import build_config, get_spec

__all__ = [
    "PeerEntry",
    "Suite",
    "SuiteError",
    "VariantEntry",
    "available_suites",
    "load_suite",
    "override_suite",
    "parse_lengths",
    "parse_suite",
    "parse_variant_params",
    "resolve_suite_path",
    "suites_dir",
]

DEVICES = ("auto", "cpu", "cuda")
LEVELS = ("core", "layer", "model")
MODES = ("fwd", "fwd_bwd", "train_step")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


class SuiteError(ValueError):
    """A suite file (or a command-line override of it) is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class VariantEntry:
    """One ``[[variants]]`` table: a registry key, the backends to run, config params and per-mode length caps."""

    key: str
    backends: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    max_len: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerEntry:
    """One ``[[peers]]`` table: a peer name of :mod:`efficient_attn.peers` and its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A whole benchmark suite (see the module docstring for the file format)."""

    name: str
    description: str
    device: str
    level: str
    modes: tuple[str, ...]
    lengths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    heads: int
    head_dim: int
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    variants: tuple[VariantEntry, ...]
    peers: tuple[PeerEntry, ...] = ()
    min_run_time: float = 0.5
    slow_call_s: float = 1.0
    slow_repeats: int = 3
    depth: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PLACEHOLDER_MAX_LEN = 1 << 16
_TOP_KEYS = (
    "description", "device", "level", "modes", "lengths", "batch_sizes", "heads", "head_dim", "dtypes", "causal",
    "variants", "peers", "min_run_time", "slow_call_s", "slow_repeats", "depth",
)
_VARIANT_KEYS = ("key", "backends", "params", "max_len")
_PEER_KEYS = ("name", "params")


def suites_dir() -> Path:
    """``bench/`` next to the package (the repository's suites)."""
    import efficient_attn

    return Path(efficient_attn.__file__).resolve().parents[1] / "bench"


def available_suites() -> list[str]:
    """Names of the suites in :func:`suites_dir`."""
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A suite name (``"default"`` -> ``bench/default.toml``) or a path to a TOML file.

    Raises:
        SuiteError: no such suite (names the nearest and lists the available ones).
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise SuiteError(f"suite file {candidate} does not exist")
        return candidate
    path = suites_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        names = available_suites()
        near = suggest(str(name_or_path), names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SuiteError(f"unknown suite {str(name_or_path)!r}{hint} (available in {suites_dir()}: {', '.join(names)})")
    return path


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            near = suggest(key, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SuiteError(f"{where}: unknown key {key!r}{hint} (allowed: {', '.join(allowed)})")


def _choice_list(value: Any, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: expected a non-empty list of {', '.join(allowed)}; got {value!r}")
    for item in value:
        if item not in allowed:
            near = suggest(str(item), allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SuiteError(f"{where}: {item!r} is not allowed{hint} (allowed: {', '.join(allowed)})")
    return tuple(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SuiteError(f"{where}: expected a positive integer; got {value!r}")
    return value


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: expected a non-empty list of positive integers; got {value!r}")
    return tuple(_positive_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def _positive_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SuiteError(f"{where}: expected a positive number; got {value!r}")
    return float(value)


def validate_variant(key: str, backends: Any, params: Any, max_len: Any, *, heads: int, head_dim: int,
                     where: str) -> VariantEntry:
    """Check one variant entry against the registry; ``SuiteError`` naming ``where`` when it is wrong."""
    if not isinstance(key, str):
        raise SuiteError(f"{where}.key: expected a registry key string; got {key!r}")
    try:
        spec = get_spec(key)
    except KeyError as error:
        raise SuiteError(f"{where}.key: {error.args[0]}") from None
    allowed_backends = ("auto", *spec.backends)
    chosen = _choice_list(backends if backends is not None else list(spec.backends), allowed_backends,
                          f"{where}.backends (variant {key!r})")
    if not isinstance(params, dict):
        raise SuiteError(f"{where}.params: expected a table of config fields; got {params!r}")
    check_params = dict(params)
    if spec.max_len_field is not None and spec.max_len_field not in check_params:
        check_params[spec.max_len_field] = _PLACEHOLDER_MAX_LEN  # the harness sets it to each cell's seq_len
    try:
        build_config(key, dim=heads * head_dim, num_heads=heads, **check_params)
    except (TypeError, ValueError) as error:
        raise SuiteError(f"{where}.params: {error}") from None
    if not isinstance(max_len, dict):
        raise SuiteError(f"{where}.max_len: expected a table mode -> length, e.g. {{ fwd_bwd = 8192 }}; got {max_len!r}")
    for mode, cap in max_len.items():
        _choice_list([mode], MODES, f"{where}.max_len")
        _positive_int(cap, f"{where}.max_len.{mode}")
    return VariantEntry(key=key, backends=chosen, params=dict(params), max_len=dict(max_len))


def parse_suite(data: dict[str, Any], name: str, where: str | None = None) -> Suite:
    """Validate a parsed TOML table and build the :class:`Suite`."""
    where = where or name
    _check_keys(data, _TOP_KEYS, where)
    for required in ("lengths",):
        if required not in data:
            raise SuiteError(f"{where}: missing required key {required!r}")
    if "variants" not in data and "peers" not in data:
        raise SuiteError(f"{where}: needs at least one [[variants]] (or [[peers]]) table")
    device = data.get("device", "auto")
    _choice_list([device], DEVICES, f"{where}: device")
    level = data.get("level", "core")
    _choice_list([level], LEVELS, f"{where}: level")
    heads = _positive_int(data.get("heads", 4), f"{where}: heads")
    head_dim = _positive_int(data.get("head_dim", 64), f"{where}: head_dim")
    causal = data.get("causal", [False])
    if isinstance(causal, bool):
        causal = [causal]
    if not isinstance(causal, list) or not causal or not all(isinstance(c, bool) for c in causal):
        raise SuiteError(f"{where}: causal must be a list of booleans, e.g. [false] or [false, true]; got {causal!r}")
    variants = []
    raw_variants = data.get("variants", [])
    if not isinstance(raw_variants, list):
        raise SuiteError(f"{where}: variants must be an array of tables ([[variants]])")
    for i, entry in enumerate(raw_variants):
        at = f"{where}: variants[{i}]"
        if not isinstance(entry, dict):
            raise SuiteError(f"{at}: expected a table")
        _check_keys(entry, _VARIANT_KEYS, at)
        if "key" not in entry:
            raise SuiteError(f"{at}: missing 'key' (a registry key)")
        variants.append(
            validate_variant(entry["key"], entry.get("backends"), entry.get("params", {}), entry.get("max_len", {}),
                             heads=heads, head_dim=head_dim, where=at)
        )
    peers = []
    raw_peers = data.get("peers", [])
    if not isinstance(raw_peers, list):
        raise SuiteError(f"{where}: peers must be an array of tables ([[peers]])")
    for i, entry in enumerate(raw_peers):
        at = f"{where}: peers[{i}]"
        if not isinstance(entry, dict):
            raise SuiteError(f"{at}: expected a table")
        _check_keys(entry, _PEER_KEYS, at)
        if not isinstance(entry.get("name"), str):
            raise SuiteError(f"{at}: missing 'name' (a peer of efficient_attn.peers)")
        if not isinstance(entry.get("params", {}), dict):
            raise SuiteError(f"{at}.params: expected a table")
        peers.append(PeerEntry(name=entry["name"], params=dict(entry.get("params", {}))))
    _check_unique(variants, where)
    return Suite(
        name=name,
        description=str(data.get("description", "")),
        device=device,
        level=level,
        modes=_choice_list(data.get("modes", ["fwd"]), MODES, f"{where}: modes"),
        lengths=tuple(sorted(set(_int_list(data["lengths"], f"{where}: lengths")))),
        batch_sizes=_int_list(data.get("batch_sizes", [1]), f"{where}: batch_sizes"),
        heads=heads,
        head_dim=head_dim,
        dtypes=_choice_list(data.get("dtypes", ["float32"]), DTYPE_NAMES, f"{where}: dtypes"),
        causal=tuple(causal),
        variants=tuple(variants),
        peers=tuple(peers),
        min_run_time=_positive_float(data.get("min_run_time", 0.5), f"{where}: min_run_time"),
        slow_call_s=_positive_float(data.get("slow_call_s", 1.0), f"{where}: slow_call_s"),
        slow_repeats=_positive_int(data.get("slow_repeats", 3), f"{where}: slow_repeats"),
        depth=_positive_int(data.get("depth", 2), f"{where}: depth"),
    )


def _check_unique(variants: tuple[VariantEntry, ...] | list[VariantEntry], where: str) -> None:
    """Two entries must not produce the same cells (same key, backend and params)."""
    seen: dict[tuple[str, str, str], int] = {}
    for i, entry in enumerate(variants):
        params = repr(sorted(entry.params.items()))
        for backend in entry.backends:
            mark = (entry.key, backend, params)
            if mark in seen:
                raise SuiteError(f"{where}: variants[{seen[mark]}] and variants[{i}] both run {entry.key!r} with "
                                 f"backend {backend!r} and the same params; merge them or change the params")
            seen[mark] = i


def load_suite(name_or_path: str | Path) -> Suite:
    """Load and validate a suite by name (``bench/<name>.toml``) or path.

    Raises:
        SuiteError: missing file, TOML syntax error, or an invalid key or value (named, with the nearest valid one).
    """
    path = resolve_suite_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(f"{path}: invalid TOML: {error}") from None
    return parse_suite(data, name=path.stem, where=str(path))


# ------------------------------------------------------------------------------------ command-line overrides
_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def _parse_length(text: str) -> int:
    raw = text.strip().lower()
    factor = 1
    if raw and raw[-1] in _SUFFIXES:
        factor, raw = _SUFFIXES[raw[-1]], raw[:-1]
    try:
        value = int(raw) * factor
    except ValueError:
        raise SuiteError(f"--lengths: {text!r} is not a length (e.g. 1024, 4k, 1m)") from None
    if value <= 0:
        raise SuiteError(f"--lengths: lengths must be positive; got {text!r}")
    return value


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"1024,2048"`` -> (1024, 2048); ``"1k:16k"`` -> powers of two from 1024 to 16384; items may mix both.

    Raises:
        SuiteError: a malformed item (names it and shows the accepted forms).
    """
    lengths: set[int] = set()
    for item in text.split(","):
        if not item.strip():
            continue
        if ":" in item:
            low_text, high_text = item.split(":", 1)
            low, high = _parse_length(low_text), _parse_length(high_text)
            if low > high:
                raise SuiteError(f"--lengths: range {item!r} goes down; write LOW:HIGH, e.g. 1k:16k")
            value = low
            while value <= high:
                lengths.add(value)
                value *= 2
        else:
            lengths.add(_parse_length(item))
    if not lengths:
        raise SuiteError(f"--lengths: no lengths in {text!r} (e.g. 1024,2048 or 1k:16k)")
    return tuple(sorted(lengths))


def _parse_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["window.window_size=128", 'bigbird={"block_size": 32}']`` -> ``{"window": {...}, "bigbird": {...}}``.

    Values are JSON when they parse as JSON (numbers, booleans, lists), else strings.
    """
    import json

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


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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
        data["modes"] = _choice_list(_split(modes), MODES, "--modes")
    if level is not None:
        data["level"] = _choice_list([level], LEVELS, "--level")[0]
    if causal is not None:
        data["causal"] = (causal,)
    if device is not None:
        data["device"] = _choice_list([device], DEVICES, "--device")[0]
    if dtypes is not None:
        data["dtypes"] = _choice_list(_split(dtypes), DTYPE_NAMES, "--dtype")
    if batch_sizes is not None:
        try:
            data["batch_sizes"] = tuple(_positive_int(int(b), "--batch-size") for b in _split(batch_sizes))
        except ValueError as error:
            raise SuiteError(f"--batch-size: expected positive integers, e.g. 1,4; got {batch_sizes!r}") from error
    if heads is not None:
        data["heads"] = _positive_int(heads, "--heads")
    if head_dim is not None:
        data["head_dim"] = _positive_int(head_dim, "--head-dim")
    if min_run_time is not None:
        data["min_run_time"] = _positive_float(min_run_time, "--min-run-time")
    new_heads = data.get("heads", suite.heads)
    new_head_dim = data.get("head_dim", suite.head_dim)
    entries = list(suite.variants)
    if variants is not None:
        by_key: dict[str, list[VariantEntry]] = {}
        for entry in entries:
            by_key.setdefault(entry.key, []).append(entry)
        entries = []
        for key in _split(variants):
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
    wanted_backends = _split(backends) if backends is not None else None
    if wanted_backends is not None:
        entries = _filter_backends(entries, wanted_backends)
    checked = []
    for entry in entries:
        params = {**entry.params, **overrides.get(entry.key, {})}
        checked.append(validate_variant(entry.key, list(entry.backends), params, dict(entry.max_len),
                                        heads=new_heads, head_dim=new_head_dim, where=f"variant {entry.key!r}"))
    data["variants"] = tuple(checked)
    _check_unique(data["variants"], "after the command-line options")
    return dataclasses.replace(suite, **data)
