"""Read benchmark run folders (``results.csv`` + ``meta.json``) into one tidy frame.

Each row of the returned frame is one cell (DESIGN.md "Results"). Columns added here:

``run``        the run's label (given by the caller, else the folder name; made unique)
``series``     what a line in a plot is: ``variant:backend`` (+ ``[params]`` when a variant was run with several
               parameter sets, + `` (peer)`` for peer rows). The colour of a series is keyed by this name.
``condition``  the configuration columns other than length and mode that vary inside the data (causal, dtype,
               batch size, heads, head dim), as a short label; ``""`` when they are all constant.
``shown_status`` the status a report shows: ``status``, except ``above_max_len`` for a ``skipped_budget`` cell whose
               note says the suite's ``max_len`` cut it (it was never tried, so it is not "over budget").
``flops_per_s`` achieved FLOP/s of the FLOPs the backend computes (``flops_computed / time`` when the harness did not
               write it); ``useful_flops_per_s``: ``flops_useful / time`` (only the pairs the pattern needs).

The harness owns the schema (:mod:`efficient_attn.harness.schema`); this module reads columns by name and
tolerates optional ones being absent. From ``meta.json`` it reads the keys the harness writes (``RunFolder`` and
``environment_info``), into :class:`RunInfo`; the whole file stays available as ``Run.meta``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn import vocab
from efficient_attn.harness import schema

if TYPE_CHECKING:
    import pandas as pd

RESULTS_FILE = schema.RESULTS_FILE
META_FILE = schema.META_FILE
REQUIRED_COLUMNS = ("variant", "mode", "seq_len", "status")
NUMERIC_COLUMNS = ("batch_size", "seq_len", "num_heads", "head_dim", "num_kv_heads") + schema.NUMERIC_COLUMNS
TEXT_COLUMNS = ("variant", "params_json", "backend_requested", "backend", "level", "mode", "device", "dtype", "note",
                "packing", "documents")
# Statuses that mean "this length does not fit": the cell is drawn as a marker, and a baseline that failed this
# way counts as infinitely expensive when deciding where a variant overtakes it.
FAILED_TO_FIT = ("oom", "skipped_budget", "skipped_after_oom")
# The harness writes a cell cut by a suite's per-mode ``max_len`` as ``skipped_budget`` (the same status as a cell
# whose predicted memory is over the budget) and tells them apart only by this note prefix
# (:data:`efficient_attn.harness.schema.MAX_LEN_NOTE`); the report shows such a cell as ``above_max_len``, a status of
# its own.
ABOVE_MAX_LEN = "above_max_len"
# Columns that, when they vary inside the data, split cells into separate conditions.
CONDITION_COLUMNS = ("causal", "dtype", "batch_size", "num_heads", "head_dim", "num_kv_heads", "packing")

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _typed(node: dict[str, Any], key: str, kinds: tuple[type, ...], where: str) -> Any:
    """``node[key]`` if present and not null, checked against ``kinds``; None when absent."""
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: key {key!r} holds {value!r}; expected {names}")
    return value


def _section(meta: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = _typed(meta, key, (dict,), where)
    return section if section is not None else {}


def memory_budget(meta: dict[str, Any], where: str = META_FILE) -> float | None:
    """The run's memory budget in bytes: ``budget_bytes`` (written by every finished session), else the suite's
    ``config.budget_gb`` (GiB); None when the run recorded neither (a default budget is written when it ends)."""
    in_bytes = _typed(meta, "budget_bytes", (int, float), where)
    if in_bytes is not None:
        return float(in_bytes)
    in_gib = _typed(_section(meta, "config", where), "budget_gb", (int, float), f"{where} config")
    return float(in_gib) * 2**30 if in_gib is not None else None


def device_memory(meta: dict[str, Any], where: str = META_FILE) -> float | None:
    """The measured device's total memory in bytes (``device_memory_bytes``: RAM on CPU, GPU memory on CUDA)."""
    value = _typed(meta, "device_memory_bytes", (int, float), where)
    return float(value) if value is not None else None


@dataclass(frozen=True)
class RunInfo:
    """What a report shows of a run's ``meta.json``, read by the keys the harness writes.

    The harness's ``RunFolder`` writes ``schema_version``, ``config`` (the suite as run), ``environment``
    (``environment_info``: versions, CPU/GPU, threads, commit), ``sessions`` and, from the latest session,
    ``budget_bytes``, ``device_memory_bytes``, ``wall_s`` and ``timed_window_s``. A key that is absent reads as
    None (a run folder written by hand, or killed before its first session ended); a key of the wrong type is a
    ``ValueError`` naming it.
    """

    suite: str | None = None
    device: str | None = None
    device_name: str | None = None
    cpu_model: str | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    efficient_attn: str | None = None
    libraries: dict[str, str | None] = field(default_factory=dict)
    platform: str | None = None
    git_commit: str | None = None
    budget_bytes: float | None = None
    device_memory_bytes: float | None = None
    wall_s: float | None = None
    timed_window_s: float | None = None
    sessions: int = 0
    interrupted: bool = False
    schema_version: int | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: Path | str = META_FILE) -> RunInfo:
        """Read the harness's keys from a loaded ``meta.json`` (``where`` names it in errors)."""
        where = str(where)
        config = _section(meta, "config", where)
        env = _section(meta, "environment", where)
        env_where = f"{where} environment"
        sessions = _typed(meta, "sessions", (list,), where) or []
        libraries = _section(env, "libraries", env_where)
        text = (str,)
        return cls(
            suite=_typed(config, "name", text, f"{where} config"),
            device=_typed(config, "device", text, f"{where} config"),
            device_name=_typed(env, "device_name", text, env_where),
            cpu_model=_typed(env, "cpu_model", text, env_where),
            cpu_count=_typed(env, "cpu_count", (int,), env_where),
            torch_threads=_typed(env, "torch_threads", (int,), env_where),
            python=_typed(env, "python", text, env_where),
            torch=_typed(env, "torch", text, env_where),
            cuda=_typed(env, "cuda", text, env_where),
            efficient_attn=_typed(env, "efficient_attn", text, env_where),
            libraries={str(k): None if v is None else str(v) for k, v in libraries.items()},
            platform=_typed(env, "platform", text, env_where),
            git_commit=_typed(env, "git_commit", text, env_where),
            budget_bytes=memory_budget(meta, where),
            device_memory_bytes=device_memory(meta, where),
            wall_s=_typed(meta, "wall_s", (int, float), where),
            timed_window_s=_typed(meta, "timed_window_s", (int, float), where),
            sessions=len(sessions),
            interrupted=any(isinstance(s, dict) and bool(s.get("interrupted")) for s in sessions),
            schema_version=_typed(meta, "schema_version", (int,), where),
        )


@dataclass
class Run:
    """One run folder: its label, its path, its meta.json (``{}`` if absent), what a report shows of that meta,
    and its raw results frame."""

    label: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    info: RunInfo = field(default_factory=RunInfo)
    results: pd.DataFrame | None = None


def _to_bool(value: object, column: str, source: Path) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN: an empty cell
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source}: column {column!r} holds {value!r}; expected a boolean (true/false/1/0)")


def results_path(run_dir: str | Path) -> Path:
    """The results CSV of a run folder (a path to the CSV itself is accepted too)."""
    path = Path(run_dir)
    if path.is_file() and path.suffix == ".csv":
        return path
    return path / RESULTS_FILE


def record_lines(csv_path: Path) -> list[int]:
    """The line each data row of ``csv_path`` starts on; ``ValueError`` naming the first damaged row (not as many
    fields as the header) with what to do."""
    import csv

    with open(csv_path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return []
        starts = []
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return starts
            except csv.Error as exc:
                values, problem = None, str(exc)
            if values is None or len(values) != len(header):
                problem = problem if values is None else f"{len(values)} fields, the header has {len(header)}"
                raise ValueError(
                    f"{csv_path} line {line} is a damaged row ({problem}): resume the run (the same `effattn` "
                    f"command and --out) to move it aside and rerun its cell, or delete that line"
                )
            starts.append(line)


def check_unique_cells(frame: pd.DataFrame, csv_path: Path, lines: list[int] | None = None) -> None:
    """``ValueError`` when two rows are the same cell (equal configuration columns): a run folder holds each cell
    once, so two writers or a merged copy wrote it; the message names the lines and the cell."""
    keys = [c for c in schema.CONFIG_COLUMNS if c in frame.columns]
    duplicated = frame.duplicated(subset=keys, keep=False)
    if not duplicated.any():
        return
    first = frame[duplicated].groupby(keys, dropna=False, sort=False).groups
    count = len(first)
    rows = list(next(iter(first.values())))
    where = [lines[i] if lines is not None and i < len(lines) else i + 2 for i in rows]
    cell = frame.iloc[rows[0]]
    label = ", ".join(f"{c}={cell[c]}" for c in ("variant", "backend_requested", "mode", "seq_len") if c in keys)
    raise ValueError(
        f"{csv_path}: {count} cell(s) appear more than once, e.g. lines {', '.join(map(str, where))} ({label}): "
        "a run folder holds each cell once (two runs wrote into it, or files were merged); keep one row per cell, "
        "or report the runs from separate folders"
    )


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read one run folder (or its ``results.csv``); raise ``FileNotFoundError``/``ValueError`` with the fix."""
    import pandas as pd

    csv_path = results_path(run_dir)
    folder = csv_path.parent
    if not csv_path.exists():
        raise FileNotFoundError(
            f"{csv_path} not found: RUN_DIR must be a folder written by `effattn bench --out RUN_DIR` "
            f"(holding {RESULTS_FILE} and {META_FILE}) or a path to a results CSV"
        )
    meta: dict[str, Any] = {}
    meta_path = folder / META_FILE
    if meta_path.exists():
        try:
            with open(meta_path, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is not valid JSON ({exc}); restore it, or delete it to report the rows "
                             "without the run's record") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(loaded).__name__}; restore it, or "
                             "delete it to report the rows without the run's record")
        meta = loaded
    lines = record_lines(csv_path)
    try:
        frame = pd.read_csv(csv_path, keep_default_na=True, na_values=[""], dtype={"params_json": str, "note": str,
                                                                                       "packing": str, "documents": str})
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{csv_path} is empty: the benchmark wrote no cells yet") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required column(s) {missing}; found {list(frame.columns)}")
    check_unique_cells(frame, csv_path, lines)
    if label is None:
        label = folder.resolve().name
    return Run(label=label, path=folder, meta=meta, info=RunInfo.from_meta(meta, meta_path), results=frame)


def _normalise(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Give every optional column a value, coerce types, check statuses."""
    import pandas as pd

    frame = frame.copy()
    for column in NUMERIC_COLUMNS:
        if column not in frame.columns:
            frame[column] = float("nan")
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in TEXT_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
        frame[column] = frame[column].fillna("").astype(str).str.strip()
    for column in ("causal", "is_peer"):
        if column not in frame.columns:
            frame[column] = False
        frame[column] = [_to_bool(v, column, source) for v in frame[column]]
    frame["params_json"] = frame["params_json"].replace("", "{}")
    frame["status"] = frame["status"].fillna("").astype(str).str.strip().str.lower()
    unknown = sorted(set(frame["status"]) - set(vocab.STATUSES))
    if unknown:
        raise ValueError(f"{source}: unknown status value(s) {unknown}; allowed: {', '.join(vocab.STATUSES)}")
    if frame["seq_len"].isna().any():
        raise ValueError(f"{source}: column 'seq_len' has empty or non-numeric values")
    frame["seq_len"] = frame["seq_len"].astype(int)
    frame["shown_status"] = [shown_status(s, n) for s, n in zip(frame["status"], frame["note"], strict=True)]
    ok = frame["status"] == "ok"
    seconds = frame["time_ms"] / 1e3
    tokens = frame["batch_size"].fillna(1) * frame["seq_len"]
    derived_tps = tokens / seconds
    frame["tokens_per_s"] = frame["tokens_per_s"].where(frame["tokens_per_s"].notna(), derived_tps)
    # The harness's flops_per_s is computed FLOPs / time (hardware view); the useful rate (pairs the pattern
    # needs / time) is derived here. Both are plotted.
    derived_fps = frame["flops_computed"] / seconds
    frame["flops_per_s"] = frame["flops_per_s"].where(frame["flops_per_s"].notna(), derived_fps)
    frame["useful_flops_per_s"] = frame["flops_useful"] / seconds
    # Numbers of a cell that did not run are meaningless; the harness writes them empty, enforce it here.
    measured = [
        "time_ms",
        "time_iqr_ms",
        "tokens_per_s",
        "peak_mem_bytes",
        "peak_rss_bytes",
        "flops_per_s",
        "useful_flops_per_s",
    ]
    frame.loc[~ok, measured] = float("nan")
    return frame


def shown_status(status: str, note: str) -> str:
    """The status a report shows: ``above_max_len`` for a cell the suite's per-mode ``max_len`` cut (the harness
    writes it ``skipped_budget`` with a note starting :data:`~efficient_attn.harness.schema.MAX_LEN_NOTE`), else ``status`` itself."""
    if status == "skipped_budget" and note.startswith(schema.MAX_LEN_NOTE):
        return ABOVE_MAX_LEN
    return status


def _resolved_backend(frame: pd.DataFrame) -> pd.Series:
    """The backend a series is named by: the requested one, or for ``auto`` the one it resolved to.

    A cell that failed before resolving (empty ``backend``) takes the most common resolved backend of its group,
    so its marker lands on the same series as its neighbours.
    """
    requested = frame["backend_requested"].where(frame["backend_requested"] != "", frame["backend"])
    name = requested.copy()
    auto = requested == "auto"
    if auto.any():
        keys = ["variant", "params_json", "is_peer", "mode"]  # per mode: a decode step has its own "backend"
        common: dict[tuple, str] = {}
        for key, group in frame[auto].groupby(keys, sort=False):
            resolved = [b for b in group["backend"] if b]
            common[key] = Counter(resolved).most_common(1)[0][0] if resolved else "auto"
        for index in frame.index[auto]:
            row = frame.loc[index]
            name[index] = row["backend"] or common[(row["variant"], row["params_json"], row["is_peer"], row["mode"])]
    return name


def short_params(params_json: str) -> str:
    """``{"window_size": 256}`` -> ``window_size=256``; used to tell parameter sets of one variant apart."""
    try:
        params = json.loads(params_json)
    except json.JSONDecodeError:
        return params_json
    if not isinstance(params, dict):
        return str(params)
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


def _series_names(frame: pd.DataFrame) -> pd.Series:
    backend = _resolved_backend(frame)
    several_params = frame.groupby(["variant", "is_peer"])["params_json"].transform("nunique") > 1
    names = []
    for index in frame.index:
        row = frame.loc[index]
        name = row["variant"]
        if backend[index] and backend[index] not in ("peer", row["variant"]):
            name += f":{backend[index]}"
        if several_params[index]:
            name += f"[{short_params(row['params_json']) or 'defaults'}]"
        if row["is_peer"]:
            name += " (peer)"
        names.append(name)
    import pandas as pd

    return pd.Series(names, index=frame.index, dtype=object)


def _condition_labels(frame: pd.DataFrame) -> pd.Series:
    import pandas as pd

    varying = [c for c in CONDITION_COLUMNS if c in frame.columns and frame[c].nunique(dropna=False) > 1]
    if not varying:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    fmt = {
        "causal": lambda v: "causal" if v else "non-causal",
        "dtype": str,
        "batch_size": lambda v: f"batch {int(v)}" if v == v else "batch ?",
        "num_heads": lambda v: f"{int(v)} heads" if v == v else "heads ?",
        "head_dim": lambda v: f"head_dim {int(v)}" if v == v else "head_dim ?",
        "num_kv_heads": lambda v: f"{int(v)} kv heads" if v == v else "kv heads = heads",
        "packing": lambda v: f"documents {v}" if v else "not packed",
    }
    labels = [", ".join(fmt[c](frame.at[i, c]) for c in varying) for i in frame.index]
    return pd.Series(labels, index=frame.index, dtype=object)


def load_runs(run_dirs: list[str | Path], labels: list[str] | None = None) -> tuple[pd.DataFrame, list[Run]]:
    """Read several run folders into one tidy frame (columns of DESIGN.md plus ``run``, ``series``, ``condition``).

    Args:
        run_dirs: run folders (or their ``results.csv``), in the order they should be listed and styled.
        labels: optional run labels, one per folder; default: each meta's label, else the folder name.
    Returns:
        ``(frame, runs)``: the concatenated cells, and the runs (label, path, meta) in input order.
    """
    import pandas as pd

    if not run_dirs:
        raise ValueError("run_dirs: give at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels: got {len(labels)} label(s) for {len(run_dirs)} run folder(s); give one per run")
    runs = [load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    seen: Counter[str] = Counter()
    for run in runs:  # two folders with the same name (runs/a/x, runs/b/x) must still be told apart
        seen[run.label] += 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    frames = []
    for run in runs:
        assert run.results is not None
        part = _normalise(run.results, run.path / RESULTS_FILE)
        part.insert(0, "run", run.label)
        frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    frame["series"] = _series_names(frame)
    frame["series_backend"] = _resolved_backend(frame)
    frame["condition"] = _condition_labels(frame)
    return frame, runs
