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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from efficient_attn.harness.schema import META_FILE, RESULTS_FILE

__all__ = ["ConfigMismatchError", "RunFolder", "Session", "csv_line", "format_value", "read_rows"]


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


class ConfigMismatchError(ValueError):
    """The run folder holds a run with a different configuration (or a table with other columns)."""


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

    Raises:
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
                "schema_version": schema_version,
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
        upgrade = tuple(header) != self.columns
        older = self.meta.get("schema_version", self.schema_version) < self.schema_version
        if upgrade and not (older and set(header) < set(self.columns)):
            raise ConfigMismatchError(
                f"{self.csv_path} has columns {header}, not this version's schema; choose another --out"
            )
        damaged: list[tuple[int, list[str]]] = []
        kept: list[list[str]] = []
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
            row = {c: row.get(c, "") for c in self.columns}  # an older schema's rows: new columns empty
            kept.append([row[c] for c in self.columns])
            self.finished[self.key(row)] = row
        if damaged:
            self._set_aside(damaged, kept)
        elif upgrade:
            # an older schema (its columns a subset of this one's): rewrite the table with this version's header
            self._rewrite(kept)
        if upgrade:
            self.meta["schema_version"] = self.schema_version
            self._write_meta()

    def _rewrite(self, kept: list[list[str]]) -> None:
        """Replace ``results.csv`` by this version's header and ``kept`` rows (atomically)."""
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(csv_line(self.columns))
            for values in kept:
                handle.write(csv_line(values))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.csv_path)

    def _set_aside(self, damaged: list[tuple[int, list[str]]], kept: list[list[str]]) -> None:
        """Move damaged rows out of ``results.csv`` (into ``results.damaged.csv``) so every reader can read it; their
        cells run again. Says so on stderr."""
        aside = self.path / (Path(RESULTS_FILE).stem + ".damaged.csv")
        with open(aside, "a", newline="", encoding="utf-8") as handle:
            for _line, values in damaged:
                handle.write(csv_line(values))
        self._rewrite(kept)
        lines = ", ".join(str(line) for line, _ in damaged)
        print(f"note: {self.csv_path}: line(s) {lines} damaged (not {len(self.columns)} fields); moved to {aside}, "
              "their cells run again", file=sys.stderr)

    def append(self, row: dict[str, str]) -> None:
        """Append one row (every column, values already formatted) and flush and fsync it to disk.

        Raises:
            ValueError: a column missing or unknown, or a key already in the table.
        """
        if set(row) != set(self.columns):
            missing = [c for c in self.columns if c not in row]
            unknown = [c for c in row if c not in self.columns]
            raise ValueError(f"row does not match the columns of {self.csv_path}: missing {missing}, unknown {unknown}")
        key = self.key(row)
        if key in self.finished:
            raise ValueError(f"cell {key} is already in {self.csv_path}; it must not be written twice")
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            handle.write(csv_line(row[c] for c in self.columns))
            handle.flush()
            os.fsync(handle.fileno())
        self.finished[key] = row

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
                             budget_bytes=session.budget_bytes, device_memory_bytes=session.device_memory_bytes)

    def end_session(self, *, started: str, wall_s: float, cells_run: int, interrupted: bool = False,
                    timed_window_s: float | None = None, budget_bytes: int | None = None,
                    device_memory_bytes: int | None = None) -> None:
        """Record one session (a run or a resume) and update the totals in ``meta.json``.

        The benchmark also gives ``timed_window_s`` (the sum of its cells' timed windows), ``budget_bytes`` (the
        memory budget in force) and ``device_memory_bytes`` (total RAM or GPU memory): stored per session and, for
        the last two, from the latest session at the top level, where the report reads them.
        """
        session: dict[str, Any] = {
            "started": started, "wall_s": round(wall_s, 3), "cells_run": cells_run, "interrupted": interrupted,
        }
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
