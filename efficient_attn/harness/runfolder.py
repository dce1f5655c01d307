"""A run folder: one tidy table (``results.csv``) and its ``meta.json``, created or resumed, never lying.

Every tidy table of the project goes through :class:`RunFolder`: the benchmark (key columns
:data:`~efficient_attn.harness.schema.CONFIG_COLUMNS`, columns :data:`~efficient_attn.harness.schema.ALL_COLUMNS`) and
the quality suite (its own key and result columns). The folder knows nothing about what the columns mean.

* ``results.csv``: one row per cell; the key columns together identify the cell, a key is written at most once. Each
  row is written, flushed and fsync'ed as its cell ends, so a Ctrl-C or a kill loses at most the cell that was
  running: a half-written last line (the process died while writing it) is cut off when the folder is opened again,
  and its cell runs again.
* ``meta.json``: the run's configuration (``config``), the environment
  (:func:`~efficient_attn.harness.host.environment_info`), the sessions (one per run or resume: start time, wall time,
  cells run, interrupted or not) and their totals. Opening a folder that holds another configuration is a
  :class:`ConfigMismatchError` naming the keys that differ; ``fixed`` narrows the check to the keys a resume may not
  change (the quality suite may add seeds or variants to a run, not change its training setup).
* **One writer process**: a :class:`RunFolder` holds an OS file lock (``flock`` on ``.lock`` in the folder) for as
  long as it is open; the kernel releases it when the process ends, however it ends. Another process that opens the
  folder to write gets a :class:`RunFolderBusyError` naming the holder (pid, host, since when); within one process
  the folders share the lock. Readers (``report``, ``status``) take no lock.
* **Shards** (``shards/*.json``): a cell measured elsewhere (a Slurm array task, a local subprocess) writes its row to
  a shard of its own (:func:`write_shard`: written whole, fsync'ed, then renamed into place); the lock holder merges
  shards into ``results.csv`` (:meth:`RunFolder.merge_shards`). A shard is checked (JSON whole, same columns, same
  config, a planned cell) and moved to ``shards/merged``, ``shards/duplicate`` or ``shards/rejected``; a key is
  appended at most once, so a task that ran twice, a merge interrupted between append and move, or a merge rerun
  never duplicates a row. A row the executor wrote for a task that ended without a result (``replaceable``) is
  replaced, atomically, by the shard of a later attempt.
* **Older schemas** stay readable: a ``results.csv`` whose header is one of the ``older_columns`` the owner names (an
  earlier version of its columns) is rewritten once, atomically, with the new columns empty.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from efficient_attn.harness.schema import META_FILE, RESULTS_FILE

__all__ = [
    "LOCK_FILE",
    "SHARDS_DIR",
    "ConfigMismatchError",
    "MergeResult",
    "RunFolder",
    "RunFolderBusyError",
    "Session",
    "config_id",
    "csv_line",
    "duplicate_keys",
    "format_value",
    "lock_holder",
    "read_rows",
    "write_shard",
]

#: the lock file and the shard folder inside a run folder
LOCK_FILE = ".lock"
SHARDS_DIR = "shards"


def format_value(value: Any) -> str:
    """How one value is written in the CSV: bools ``true``/``false``, None and NaN empty, floats with 6 digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        return f"{value:.6g}"
    return str(value)


def csv_line(values: Iterable[str]) -> str:
    """One CSV record, newline included, exactly as :meth:`RunFolder.append` writes it."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(list(values))
    return buffer.getvalue()


@dataclass
class Session:
    """One run or resume of a folder: its loop fills in the counts, :meth:`RunFolder.session` records it at the end.

    ``timed_window_s``, ``budget_bytes`` and ``device_memory_bytes`` are the benchmark's (see
    :meth:`RunFolder.end_session`); None is not recorded.
    """

    started: str
    cells_run: int = 0
    timed_window_s: float | None = None
    budget_bytes: int | None = None
    device_memory_bytes: int | None = None
    executor: dict[str, Any] | None = None


class ConfigMismatchError(ValueError):
    """The run folder holds a run with a different configuration (or a table with other columns)."""


class RunFolderBusyError(RuntimeError):
    """Another process holds the run folder's lock (it is writing there)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_holder(path: Path) -> dict[str, Any] | None:
    """Who last took the lock of run folder ``path`` (``pid``, ``host``, ``since``), as it wrote it; None if nobody
    did. Says nothing about whether it still holds it (only trying the lock does)."""
    try:
        return json.loads((Path(path) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


#: the run folders whose lock this process holds: real path -> [descriptor, holders]
_HELD: dict[str, list[int]] = {}


class _FolderLock:
    """The writing process's lock on a run folder: an exclusive ``flock`` on ``<folder>/.lock``, with the holder's pid,
    host and start time written into the file. One lock per process: a second :class:`RunFolder` of the same folder
    in the same process shares it (the descriptor closes, dropping the lock, when the last one is released)."""

    def __init__(self, folder: Path) -> None:
        self.name = os.path.realpath(folder / LOCK_FILE)
        self._held = False
        if self.name in _HELD:
            _HELD[self.name][1] += 1
            self._held = True
            return
        fd = os.open(self.name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = lock_holder(folder) or {}
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            raise RunFolderBusyError(
                f"{folder} is being written by {who} (since {holder.get('since', '?')}): wait for it to finish, "
                "or choose another --out"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _HELD[self.name] = [fd, 1]
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        entry = _HELD[self.name]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.name]
            os.close(entry[0])  # closing the descriptor drops the flock

    def __del__(self) -> None:
        self.release()


def config_id(config: dict[str, Any]) -> str:
    """A short fingerprint of a run's configuration: shards carry it, so a shard of another run is refused."""
    canonical = json.dumps(json.loads(json.dumps(config)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_shard(folder: Path, row: dict[str, str], *, config: str, columns: tuple[str, ...], name: str,
                extra: dict[str, Any] | None = None) -> Path:
    """Write one row as a shard of run folder ``folder``: whole, fsync'ed, then renamed into ``shards/``.

    Args:
        folder: the run folder.
        row: the complete row (column -> formatted value).
        config: the run's :func:`config_id`.
        columns: the run's columns, in order (checked again at the merge).
        name: a file name unique to this attempt (e.g. the cell's hash, the job id and the pid).
        extra: anything else to keep with the row (timings of the task); not merged.

    Returns:
        The shard's path.
    """
    shards = Path(folder) / SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    payload = {"config_id": config, "columns": list(columns), "row": row, "extra": extra or {}}
    final = shards / f"{name}.json"
    tmp = shards / f".{name}.json.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(shards)
    return final


@dataclass
class MergeResult:
    """What one :meth:`RunFolder.merge_shards` did: rows appended or replaced, shards dropped and why."""

    merged: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    rejected: dict[Path, str] = field(default_factory=dict)


def _diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class RunFolder:
    """``results.csv`` + ``meta.json`` in ``path``, created or resumed.

    Example::

        folder = RunFolder(Path("runs/x"), config, columns=ALL_COLUMNS, key_columns=CONFIG_COLUMNS,
                           schema_version=SCHEMA_VERSION)
        with folder.session() as session:                # recorded in meta.json when the block ends
            if folder.key(row) not in folder.finished: folder.append(row); session.cells_run += 1

    Args:
        path: the folder (created when missing).
        config: the run's configuration, stored in ``meta.json`` (JSON-serialisable).
        columns: the CSV header, in order.
        key_columns: the columns (a subset of ``columns``) that identify a row.
        schema_version: the version of these columns, recorded in a new ``meta.json``.
        fixed: the keys of ``config`` a resume must match; None (the default): all of them. When a resume may change
            the others, ``meta.json`` keeps the latest session's config.
        totals: session fields whose sum over the sessions is kept at the top level of ``meta.json``.
        environment: recorded in a new ``meta.json`` (default :func:`~efficient_attn.harness.host.environment_info`
            for ``config["device"]``, else ``cpu``).
        older_columns: the headers of earlier schema versions (each a subsequence of ``columns``): a table with one
            of them is rewritten once, atomically, with the new columns empty (and ``schema_version`` updated).
        lock: take the folder's lock (the default; only a writer opens a :class:`RunFolder`). Released by
            :meth:`close` (or leaving a ``with`` block) and, whatever happens, when the process ends.

    Raises:
        RunFolderBusyError: another process holds the folder's lock.
        ConfigMismatchError: the folder holds a run with another config, or a ``results.csv`` with other columns.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        *,
        columns: tuple[str, ...],
        key_columns: tuple[str, ...],
        schema_version: int,
        fixed: tuple[str, ...] | None = None,
        totals: tuple[str, ...] = ("wall_s",),
        environment: dict[str, Any] | None = None,
        lock: bool = True,
        older_columns: tuple[tuple[str, ...], ...] = (),
    ) -> None:
        missing = [c for c in key_columns if c not in columns]
        if missing:
            raise ValueError(f"key columns {missing} are not among the columns {list(columns)}")
        self.path = Path(path)
        self.csv_path = self.path / RESULTS_FILE
        self.meta_path = self.path / META_FILE
        self.columns = tuple(columns)
        self.key_columns = tuple(key_columns)
        self.totals = tuple(totals)
        self.config = json.loads(json.dumps(config))  # normalise (tuples -> lists) like a reload would
        self.schema_version = schema_version
        self.path.mkdir(parents=True, exist_ok=True)
        self._fixed = fixed
        self.older_columns = tuple(tuple(c) for c in older_columns)
        for old in self.older_columns:
            # an earlier version: its columns in this order (the ones it lacks, key columns too, are read as empty)
            if [c for c in self.columns if c in old] != list(old):
                raise ValueError(f"older columns {list(old)} are not an earlier version of {list(columns)}")
        self.schema_version = schema_version
        self._lock = _FolderLock(self.path) if lock else None
        try:
            self._open(fixed, environment)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (idempotent); the rows and ``meta.json`` are already on disk."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config_id(self) -> str:
        """The :func:`config_id` of this run (what its shards must carry): of the keys a resume may not change."""
        config = self.meta.get("config", self.config)
        if self._fixed is not None:
            config = {k: config.get(k) for k in self._fixed}
        return config_id(config)

    def _open(self, fixed: tuple[str, ...] | None, environment: dict[str, Any] | None) -> None:
        if self.meta_path.exists():
            self.meta = self._read_meta()
            self._check_config(fixed)
            if fixed is not None and self.meta["config"] != self.config:
                self.meta["config"] = self.config
                self._write_meta()
        else:
            self._refuse_rows_without_meta()
            if environment is None:
                from efficient_attn.harness.host import environment_info

                environment = environment_info(self.config.get("device", "cpu"))
            self.meta = {
                "schema_version": self.schema_version,
                "config": self.config,
                "environment": environment,
                "sessions": [],
                **{name: 0.0 for name in self.totals},
            }
            self._write_meta()
        #: rows already in results.csv, by key
        self.finished: dict[tuple[str, ...], dict[str, str]] = {}
        self._load_csv()

    def _read_meta(self) -> dict[str, Any]:
        """``meta.json`` as a dict; ``ConfigMismatchError`` naming the file when it is not JSON or not an object."""
        fix = ("restore it from a copy, or move the folder aside and choose another --out (without its meta.json "
               "the rows' configuration cannot be checked)")
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigMismatchError(f"{self.meta_path} is not valid JSON ({error}); {fix}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict) \
                or not isinstance(meta.get("sessions", []), list):
            raise ConfigMismatchError(f"{self.meta_path} is not a run record (a JSON object with 'config' and "
                                      f"'sessions'); {fix}")
        meta.setdefault("sessions", [])
        return meta

    def _refuse_rows_without_meta(self) -> None:
        """Rows without a ``meta.json`` cannot be told to belong to this configuration: refuse to add to them."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        if lines > 1:
            raise ConfigMismatchError(
                f"{self.path} holds {lines - 1} row(s) in {RESULTS_FILE} but no {META_FILE}, so their configuration "
                f"cannot be checked against this run; restore {META_FILE}, or choose another --out"
            )

    def _check_config(self, fixed: tuple[str, ...] | None) -> None:
        old = self.meta.get("config", {})
        names = sorted(set(old) | set(self.config)) if fixed is None else list(fixed)
        old_part = {k: old.get(k) for k in names}
        new_part = {k: self.config.get(k) for k in names}
        if old_part != new_part:
            diff = _diff_keys(old_part, new_part)
            details = "; ".join(f"{k}: {old.get(k)!r} there, {self.config.get(k)!r} now" for k in diff[:5])
            raise ConfigMismatchError(
                f"{self.path} already holds a run with a different config ({details}); "
                "resume it with the same suite and options, or choose another --out"
            )

    def key(self, row: dict[str, str]) -> tuple[str, ...]:
        """The key of a row (its key columns' values, as written)."""
        return tuple(row[c] for c in self.key_columns)

    # ------------------------------------------------------------------------------------------------ csv
    def _write_header(self) -> None:
        with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
            handle.write(csv_line(self.columns))

    def _load_csv(self) -> None:
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            self._write_header()
            return
        raw = self.csv_path.read_bytes()
        if not raw.endswith(b"\n"):
            # the process died while writing the last row: cut the partial line so its cell runs again
            cut = raw.rfind(b"\n") + 1
            with open(self.csv_path, "r+b") as handle:
                handle.truncate(cut)
            raw = raw[:cut]
        reader = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline=""))
        header = next(reader, None)
        if header is None:
            self._write_header()
            return
        header = tuple(header)
        upgrade = header != self.columns
        if upgrade and header not in self.older_columns:
            raise ConfigMismatchError(
                f"{self.csv_path} has columns {list(header)}, not this version's schema; choose another --out"
            )
        damaged: list[tuple[int, list[str]]] = []
        kept: list[dict[str, str]] = []
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error:
                damaged.append((line, []))
                continue
            if len(values) != len(header):
                damaged.append((line, values))  # never written whole (or edited): its cell runs again
                continue
            row = dict(zip(header, values))
            row = {c: row.get(c, "") for c in self.columns}  # an older schema's rows gain the new columns, empty
            kept.append(row)
            self.finished[self.key(row)] = row
        if damaged:
            self._set_aside(damaged, header)
        if damaged or upgrade:
            self._rewrite(kept)
        if upgrade and self.meta.get("schema_version") != self.schema_version:
            self.meta["schema_version_was"] = self.meta.get("schema_version")
            self.meta["schema_version"] = self.schema_version
            self._write_meta()

    def _set_aside(self, damaged: list[tuple[int, list[str]]], header: tuple[str, ...]) -> None:
        """Move damaged rows out of ``results.csv`` (into ``results.damaged.csv``) so every reader can read it; their
        cells run again. Says so on stderr. (The caller rewrites ``results.csv`` without them.)"""
        aside = self.path / (Path(RESULTS_FILE).stem + ".damaged.csv")
        with open(aside, "a", newline="", encoding="utf-8") as handle:
            for _line, values in damaged:
                handle.write(csv_line(values))
        lines = ", ".join(str(line) for line, _ in damaged)
        print(f"note: {self.csv_path}: line(s) {lines} damaged (not {len(header)} fields); moved to {aside}, "
              "their cells run again", file=sys.stderr)

    def _rewrite(self, rows: Iterable[dict[str, str]] | None = None) -> None:
        """Write the table (``rows``, default one per key) to a temporary file, fsync it and rename it over
        ``results.csv`` (atomic)."""
        rows = list(self.finished.values()) if rows is None else list(rows)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(csv_line(self.columns))
            for row in rows:
                handle.write(csv_line(row[c] for c in self.columns))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.csv_path)
        _fsync_dir(self.path)

    def append(self, row: dict[str, str]) -> None:
        """Append one row (every column, values already formatted) and flush and fsync it to disk.

        Raises:
            ValueError: a column missing or unknown, or a key already in the table.
        """
        self._check_row(row)
        key = self.key(row)
        if key in self.finished:
            raise ValueError(f"cell {key} is already in {self.csv_path}; it must not be written twice")
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            handle.write(csv_line(row[c] for c in self.columns))
            handle.flush()
            os.fsync(handle.fileno())
        self.finished[key] = row

    def _check_row(self, row: dict[str, str]) -> None:
        if set(row) != set(self.columns):
            missing = [c for c in self.columns if c not in row]
            unknown = [c for c in row if c not in self.columns]
            raise ValueError(f"row does not match the columns of {self.csv_path}: missing {missing}, unknown {unknown}")

    def replace(self, row: dict[str, str]) -> None:
        """Put ``row`` in place of the row with the same key (or append it), rewriting the table atomically."""
        self._check_row(row)
        key = self.key(row)
        if key not in self.finished:
            self.append(row)
            return
        self.finished[key] = dict(row)
        self._rewrite()

    def merge_shards(self, *, allowed: set[tuple[str, ...]] | None = None,
                     replaceable: Callable[[dict[str, str]], bool] | None = None) -> MergeResult:
        """Merge the shards in ``shards/`` into ``results.csv`` (the caller holds the lock: it opened the folder).

        A shard is merged when it is whole JSON, has this run's columns and :attr:`config_id`, and its key is in
        ``allowed`` (default: any). Its key is appended when new; when the table already has that key, the shard is a
        duplicate (dropped) unless ``replaceable(existing_row)`` says the existing row is a placeholder (a task that
        ended without a result), which the shard then replaces. Every shard looked at is moved out of the way
        (``merged/``, ``duplicate/``, ``rejected/`` with a ``.why`` file), after its row is on disk.
        """
        shards = self.path / SHARDS_DIR
        result = MergeResult()
        if not shards.is_dir():
            return result
        for shard in sorted(shards.glob("*.json")):
            reason, row = self._read_shard(shard, allowed)
            if reason is not None:
                result.rejected[shard] = reason
                self._move_shard(shard, "rejected", why=reason)
                continue
            key = self.key(row)
            existing = self.finished.get(key)
            if existing is None:
                self.append(row)
            elif replaceable is not None and replaceable(existing) and existing != row:
                self.replace(row)
            else:
                result.duplicates.append(shard)
                self._move_shard(shard, "duplicate")
                continue
            result.merged.append(row)
            self._move_shard(shard, "merged")
        return result

    def _read_shard(self, shard: Path, allowed: set[tuple[str, ...]] | None) -> tuple[str | None, dict[str, str]]:
        try:
            payload = json.loads(shard.read_text(encoding="utf-8"))
            row = payload["row"]
            columns, shard_config = tuple(payload["columns"]), payload["config_id"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"not a whole shard ({type(error).__name__}: {error})", {}
        if columns != self.columns or not isinstance(row, dict) or set(row) != set(self.columns):
            return "its columns are not this run's", {}
        if not all(isinstance(v, str) for v in row.values()):
            return "its values are not formatted strings", {}
        if shard_config != self.config_id:
            return f"it belongs to another configuration (config_id {shard_config}, this run {self.config_id})", {}
        if allowed is not None and self.key(row) not in allowed:
            return "its cell is not one of this run's cells", {}
        return None, row

    def _move_shard(self, shard: Path, where: str, why: str | None = None) -> None:
        target = shard.parent / where
        target.mkdir(exist_ok=True)
        if why is not None:
            (target / (shard.name + ".why")).write_text(why + "\n")
        os.replace(shard, target / shard.name)
        os.utime(target / shard.name)  # the mtime says when it was merged (the scheduling overhead reads it)

    def rows(self) -> list[dict[str, str]]:
        """Every row of the table, in file order (old and new)."""
        return list(self.finished.values())

    # ----------------------------------------------------------------------------------------------- meta
    def _write_meta(self) -> None:
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.meta_path)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Record the session run inside the ``with`` block (wall time, what the block counted in the
        :class:`Session`, whether a ``KeyboardInterrupt`` ended it) when the block ends, however it ends."""
        session = Session(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        t0 = time.perf_counter()
        interrupted = False
        try:
            yield session
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.end_session(started=session.started, wall_s=time.perf_counter() - t0, cells_run=session.cells_run,
                             interrupted=interrupted, timed_window_s=session.timed_window_s,
                             budget_bytes=session.budget_bytes, device_memory_bytes=session.device_memory_bytes,
                             executor=session.executor)

    def end_session(self, *, started: str, wall_s: float, cells_run: int, interrupted: bool = False,
                    timed_window_s: float | None = None, budget_bytes: int | None = None,
                    device_memory_bytes: int | None = None, executor: dict[str, Any] | None = None) -> None:
        """Record one session (a run or a resume) and update the totals in ``meta.json``.

        The benchmark also gives ``timed_window_s`` (the sum of its cells' timed windows), ``budget_bytes`` (the
        memory budget in force) and ``device_memory_bytes`` (total RAM or GPU memory): stored per session and, for
        the last two, from the latest session at the top level, where the report reads them. ``executor`` (how the
        session ran its cells: ``inline``, ``local``, ``slurm`` and their parameters) is recorded with the session,
        outside ``config``: a run started inline may be finished on a cluster.
        """
        session: dict[str, Any] = {
            "started": started, "wall_s": round(wall_s, 3), "cells_run": cells_run, "interrupted": interrupted,
        }
        if executor is not None:
            session["executor"] = executor
        if timed_window_s is not None:
            session["timed_window_s"] = round(timed_window_s, 3)
        for name, value in (("budget_bytes", budget_bytes), ("device_memory_bytes", device_memory_bytes)):
            if value is not None:
                session[name] = value
                self.meta[name] = value
        self.meta["sessions"].append(session)
        for name in self.totals:
            self.meta[name] = round(sum(s.get(name, 0.0) for s in self.meta["sessions"]), 3)
        self._write_meta()


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` (complete rows only; ``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if None not in row.values()]


def duplicate_keys(rows: Iterable[dict[str, str]], key_columns: tuple[str, ...]) -> dict[tuple[str, ...], int]:
    """The keys that occur more than once in ``rows``, with their counts (``{}`` for a sound table).

    A table written through :class:`RunFolder` has none (a key is appended once, one writer at a time); a table from
    before the lock, or edited by hand, may. For a benchmark run folder:
    ``duplicate_keys(read_rows(run / RESULTS_FILE), CONFIG_COLUMNS)``.
    """
    counts: dict[tuple[str, ...], int] = {}
    for row in rows:
        key = tuple(row.get(c, "") for c in key_columns)
        counts[key] = counts.get(key, 0) + 1
    return {key: n for key, n in counts.items() if n > 1}
