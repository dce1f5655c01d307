"""Benchmark suites: small declarative TOML files in ``bench/`` (contract 3 of the team brief).

Example (``bench/quick.toml``)::

    description = "what this suite answers"
    device = "auto"            # auto | cpu | cuda
    level = "core"             # core | layer | model | hf
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
    depth = 2                  # optional: blocks of the backbone at level "model" (decoder layers at "hf")
    kv_heads = [4, 2, 1]       # optional: key/value heads (grouped-query attention), each dividing heads
    decode_steps = 32          # optional: timed single-token steps of a decode cell
    threads = 1                # optional: torch threads of the cells (--threads wins)
    documents = [256, 1024]    # optional, instead of lengths: packed documents (or { count, min, max, seed })
    [[variants]]
    key = "full"
    backends = ["naive", "sdpa"]   # optional: default every backend of the variant
    params = {}                    # optional: the variant's config fields
    max_len = { fwd_bwd = 8192 }   # optional: per-mode length cap (longer cells -> skipped_budget, with a note)
    [[peers]]                      # optional; only run with --peers
    name = "hf-bigbird"
    params = { block_size = 64 }

At level ``hf`` the peers are transformers' own implementations (``transformers-sdpa``, ``transformers-eager``,
``transformers-flex_attention``), which run at that level only.

Every key is checked when the suite loads: an unknown key names the nearest valid one; an unregistered variant key,
a backend the variant does not have, or a parameter its config rejects is an error naming the table it is in.
Command-line changes to a loaded suite are :mod:`efficient_attn.harness.overrides`. :func:`read_toml`,
:func:`check_keys` and :func:`choice_list` are the checks every TOML file of the project goes through (the quality
suite's too).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficient_attn.errors import did_you_mean, require_positive_int, unknown_name_error
from efficient_attn.registry import build_config, get_spec
from efficient_attn.vocab import DEVICES, DTYPE_NAMES, LEVELS, MODES

__all__ = [
    "PeerEntry",
    "Suite",
    "SuiteError",
    "VariantEntry",
    "available_suites",
    "check_keys",
    "check_unique",
    "choice_list",
    "document_lengths",
    "load_suite",
    "parse_suite",
    "positive_float",
    "positive_int_list",
    "read_toml",
    "resolve_suite_path",
    "suites_dir",
    "validate_variant",
]


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
    #: key/value heads to run (each a cell dimension); empty = ``heads`` only (the ``num_kv_heads`` column empty)
    kv_heads: tuple[int, ...] = ()
    #: timed single-token steps of each decode cell (after a fixed warm-up)
    decode_steps: int = 32
    #: torch threads the cells run with (None: the process's; ``--threads`` on the command line wins)
    threads: int | None = None
    #: packed documents: their lengths (empty: an ordinary suite); see :func:`document_lengths`
    documents: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PLACEHOLDER_MAX_LEN = 1 << 16
#: config fields every cell sets itself (a value in a variant's params would clash), and where they come from
RESERVED_PARAMS = {
    "causal": "the suite's `causal` list (on the command line: --causal)",
    "backend": "the variant's `backends` (on the command line: --backends)",
    "dim": "`heads` x `head_dim` (on the command line: --heads, --head-dim)",
    "num_heads": "`heads` (on the command line: --heads)",
}
_TOP_KEYS = (
    "description", "device", "level", "modes", "lengths", "batch_sizes", "heads", "head_dim", "dtypes", "causal",
    "variants", "peers", "min_run_time", "slow_call_s", "slow_repeats", "depth", "kv_heads", "decode_steps", "threads",
    "documents",
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
    if candidate.is_dir():
        raise SuiteError(f"suite {candidate} is a folder; give a suite TOML file or the name of one in {suites_dir()} "
                         f"({', '.join(available_suites())})")
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise SuiteError(f"suite file {candidate} does not exist")
        return candidate
    path = suites_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise unknown_name_error("suite", str(name_or_path), available_suites(), f"available in {suites_dir()}",
                                 error=SuiteError)
    return path


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file at ``path``; ``SuiteError`` naming the file for a syntax error."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(f"{path}: invalid TOML: {error}") from None


def check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """``SuiteError`` for the first key of ``table`` not in ``allowed``, with the nearest one and the allowed list."""
    for key in table:
        if key not in allowed:
            raise SuiteError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed, n=1)} "
                             f"(allowed: {', '.join(allowed)})")


def choice_list(value: Any, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    """``value`` (a name or a non-empty list of names) as a tuple, each checked against ``allowed`` and listed once."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: expected a non-empty list of {', '.join(allowed)}; got {value!r}")
    for item in value:
        if item not in allowed:
            raise SuiteError(f"{where}: {item!r} is not allowed{did_you_mean(str(item), allowed, n=1)} "
                             f"(allowed: {', '.join(allowed)})")
    twice = sorted({item for item in value if value.count(item) > 1})
    if twice:
        raise SuiteError(f"{where}: {', '.join(repr(t) for t in twice)} listed twice; list each once")
    return tuple(value)


def positive_int_list(value: Any, where: str) -> tuple[int, ...]:
    """``value`` (a positive int or a non-empty list of them) as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: expected a non-empty list of positive integers; got {value!r}")
    return tuple(require_positive_int(f"{where}[{i}]", v, error=SuiteError) for i, v in enumerate(value))


def positive_float(value: Any, where: str) -> float:
    """``value`` as a float; ``SuiteError`` unless it is a positive finite number (bools, inf and nan rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SuiteError(f"{where}: expected a positive finite number; got {value!r}")
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
    chosen = choice_list(backends if backends is not None else list(spec.backends), allowed_backends,
                          f"{where}.backends (variant {key!r})")
    if not isinstance(params, dict):
        raise SuiteError(f"{where}.params: expected a table of config fields; got {params!r}")
    for name, instead in RESERVED_PARAMS.items():
        if name in params:
            raise SuiteError(f"{where}.params: {name!r} is not a variant parameter here: every cell sets it from "
                             f"{instead}")
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
        choice_list([mode], MODES, f"{where}.max_len")
        require_positive_int(f"{where}.max_len.{mode}", cap, error=SuiteError)
    return VariantEntry(key=key, backends=chosen, params=dict(params), max_len=dict(max_len))


def parse_suite(data: dict[str, Any], name: str, where: str | None = None) -> Suite:
    """Validate a parsed TOML table and build the :class:`Suite`."""
    where = where or name
    check_keys(data, _TOP_KEYS, where)
    documents = document_lengths(data["documents"], f"{where}: documents") if data.get("documents") else ()
    if documents:
        for key, instead in (("lengths", "the documents' total"), ("batch_sizes", "1 (padded: one row per document)")):
            if key in data:
                raise SuiteError(f"{where}: a suite with documents has no {key!r}: every cell's is {instead}")
        data = {**data, "lengths": [sum(documents)], "batch_sizes": [1]}
    for required in ("lengths",):
        if required not in data:
            raise SuiteError(f"{where}: missing required key {required!r}")
    if "variants" not in data and "peers" not in data:
        raise SuiteError(f"{where}: needs at least one [[variants]] (or [[peers]]) table")
    device = data.get("device", "auto")
    choice_list([device], DEVICES, f"{where}: device")
    level = data.get("level", "core")
    choice_list([level], LEVELS, f"{where}: level")
    heads = require_positive_int(f"{where}: heads", data.get("heads", 4), error=SuiteError)
    head_dim = require_positive_int(f"{where}: head_dim", data.get("head_dim", 64), error=SuiteError)
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
        check_keys(entry, _VARIANT_KEYS, at)
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
        check_keys(entry, _PEER_KEYS, at)
        if not isinstance(entry.get("name"), str):
            raise SuiteError(f"{at}: missing 'name' (a peer of efficient_attn.peers)")
        if not isinstance(entry.get("params", {}), dict):
            raise SuiteError(f"{at}.params: expected a table")
        _check_peer_name(entry["name"], f"{at}.name", level)
        peers.append(PeerEntry(name=entry["name"], params=dict(entry.get("params", {}))))
    check_unique(variants, where)
    kv_heads: tuple[int, ...] = ()
    if data.get("kv_heads", []) != []:  # [] (how a suite without kv_heads is stored in meta.json) = heads only
        kv_heads = positive_int_list(data["kv_heads"], f"{where}: kv_heads")
        valid = [h for h in range(1, heads + 1) if heads % h == 0]
        bad = [h for h in kv_heads if h not in valid]
        if bad:
            raise SuiteError(f"{where}: kv_heads {bad[0]} does not divide heads={heads}; valid values: "
                             f"{', '.join(map(str, valid))}")
    return Suite(
        name=name,
        description=str(data.get("description", "")),
        device=device,
        level=level,
        modes=choice_list(data.get("modes", ["fwd"]), MODES, f"{where}: modes"),
        lengths=tuple(sorted(set(positive_int_list(data["lengths"], f"{where}: lengths")))),
        batch_sizes=positive_int_list(data.get("batch_sizes", [1]), f"{where}: batch_sizes"),
        heads=heads,
        head_dim=head_dim,
        dtypes=choice_list(data.get("dtypes", ["float32"]), DTYPE_NAMES, f"{where}: dtypes"),
        causal=tuple(causal),
        variants=tuple(variants),
        peers=tuple(peers),
        min_run_time=positive_float(data.get("min_run_time", 0.5), f"{where}: min_run_time"),
        slow_call_s=positive_float(data.get("slow_call_s", 1.0), f"{where}: slow_call_s"),
        slow_repeats=require_positive_int(f"{where}: slow_repeats", data.get("slow_repeats", 3), error=SuiteError),
        depth=require_positive_int(f"{where}: depth", data.get("depth", 2), error=SuiteError),
        kv_heads=kv_heads,
        decode_steps=require_positive_int(f"{where}: decode_steps", data.get("decode_steps", 32), error=SuiteError),
        threads=(None if data.get("threads") is None
                 else require_positive_int(f"{where}: threads", data["threads"], error=SuiteError)),
        documents=documents,
    )


_DOCUMENT_KEYS = ("count", "min", "max", "seed", "multiple")


def document_lengths(value: Any, where: str) -> tuple[int, ...]:
    """The ``documents`` key: a list of positive lengths, or a seeded draw ``{ count = 16, min = 256, max = 4096,
    seed = 0, multiple = 1 }``: ``count`` lengths log-uniform between ``min`` and ``max``, each rounded to a
    ``multiple`` (the same lengths for the same table, on every machine: Python's own generator)."""
    import random

    if isinstance(value, dict):
        check_keys(value, _DOCUMENT_KEYS, where)
        missing = [k for k in ("count", "min", "max") if k not in value]
        if missing:
            raise SuiteError(f"{where}: a drawn document set needs {', '.join(missing)} (keys: count, min, max, seed, "
                             "multiple)")
        count, low, high = (require_positive_int(f"{where}.{k}", value[k], error=SuiteError) for k in ("count", "min",
                                                                                                    "max"))
        multiple = require_positive_int(f"{where}.multiple", value.get("multiple", 1), error=SuiteError)
        seed = value.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SuiteError(f"{where}.seed: expected an integer; got {seed!r}")
        if low > high:
            raise SuiteError(f"{where}: min={low} is above max={high}")
        rng = random.Random(seed)
        lengths = []
        for _ in range(count):
            n = math.exp(rng.uniform(math.log(low), math.log(high)))
            lengths.append(max(multiple, min(high, round(n / multiple) * multiple)))
        return tuple(lengths)
    return positive_int_list(value, where)


def _check_peer_name(name: str, where: str, level: str) -> None:
    """An unknown peer, or one of another level, is an error when the suite loads (not a traceback when its first
    cell runs). At level ``hf`` the peers are transformers' own implementations
    (:data:`efficient_attn.peers.TRANSFORMERS_PEERS`), and they run at that level only."""
    from efficient_attn.peers import TRANSFORMERS_PEERS, list_peers  # lazy: the peers' imports stay out of loading

    hf_peers = list(TRANSFORMERS_PEERS)
    if level == "hf":
        if name not in hf_peers:
            known = unknown_name_error("peer", name, hf_peers, "peers").args[0]
            raise SuiteError(f"{where}: at level 'hf' the peers are transformers' own implementations "
                             f"({', '.join(hf_peers)}); {known}")
        return
    if name in hf_peers:
        raise SuiteError(f"{where}: peer {name!r} (transformers' own attention implementation) runs at level 'hf' "
                         f"only, not at this suite's level {level!r}")
    if name not in list_peers():
        raise SuiteError(f"{where}: {unknown_name_error('peer', name, list_peers(), 'peers').args[0]}")


def check_unique(variants: tuple[VariantEntry, ...] | list[VariantEntry], where: str) -> None:
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
    return parse_suite(read_toml(path), name=path.stem, where=str(path))
