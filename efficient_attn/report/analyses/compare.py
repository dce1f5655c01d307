"""One run against a reference run of the same suite: which within-run ratios got worse (issue 18's "no regression").

Two run folders (NEW and REF, any schema version) are read together by :func:`~efficient_attn.report.load.load_runs`.
Their cells are matched on the configuration columns (:data:`MATCH_COLUMNS`: the harness's
:data:`~efficient_attn.harness.schema.CONFIG_COLUMNS` except ``device``, which is one value per run, so a CPU run can
still be held against a GPU run, with a warning). Before matching, what older schemas leave empty is read as what it
meant: an empty ``num_kv_heads`` is ``num_heads`` (schema < 3, and every later row without grouped-query heads), empty
``packing``/``documents`` an ordinary cell (schema < 4), and ``params_json`` is compared as JSON, not as text.

For every matched cell and every reference of the report (:func:`~efficient_attn.report.series.references`: the
baseline, default ``full:naive``, then ``full:sdpa``) both runs give a speed-up (reference time / time) and a memory
saving (reference peak / peak) against their *own* reference cell at the same length and mode, computed by the
report's :func:`~efficient_attn.report.analyses.tables.relative_to_baseline` (so by its one baseline selector). The
verdict uses only these within-run ratios: a cell regressed when a speed-up fell by more than ``tolerance`` of REF's
(``new < ref * (1 - tolerance)``), when a memory saving fell by more than ``memory_tolerance``, or when it ran in REF
and did not run in NEW. The absolute-time ratio NEW / REF is shown per cell for information only: the two runs may
come from different machines.

Each matched cell falls in exactly one class (:data:`CLASSES`): ``worse``, ``better`` (some ratio improved beyond its
tolerance and none got worse), ``same``, ``failed-in-one`` (ran in one run only), ``both-failed`` (ran in neither),
``no-ratio`` (ran in both, but no reference ran in both at that length and mode).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from efficient_attn import vocab
from efficient_attn.harness import schema
from efficient_attn.report.analyses.tables import relative_to_baseline
from efficient_attn.report.format import format_bytes, length_label
from efficient_attn.report.load import Run, load_runs
from efficient_attn.report.series import (
    DEFAULT_BASELINE,
    available_baselines,
    baseline_mask,
    display_name,
    parse_series_spec,
    references,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CLASSES",
    "Comparison",
    "MATCH_COLUMNS",
    "NEW",
    "REF",
    "compare_runs",
]

NEW, REF = "NEW", "REF"
#: the columns two cells must agree on to be the same cell (``device`` is one per run: a difference is a warning)
MATCH_COLUMNS: tuple[str, ...] = tuple(c for c in schema.CONFIG_COLUMNS if c != "device")
#: the class of each matched cell, in the order the summary lists them
CLASSES = ("better", "same", "worse", "failed-in-one", "both-failed", "no-ratio")
# relative slack on the tolerance edge, so a change of exactly the tolerance is "same" despite float rounding
_EDGE = 1e-9
_KEY = "_cell"


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_runs`.

    ``cells``: one row per matched cell (key columns, ``series``/``condition`` as the report names them, and per run
    ``status_*``, ``shown_status_*``, ``time_ms_*``, ``peak_mem_bytes_*``, ``series_*`` with suffix ``_new``/``_ref``;
    ``time_ratio`` = NEW / REF, ``peak_ratio`` the same for peak memory, ``noise_*`` = IQR / median of the cell's
    time; ``cls``, one of :data:`CLASSES`). ``ratios``: one row per matched cell and reference
    where both runs have the ratio: ``reference``, ``speedup_new``/``_ref``, ``speed_change`` (new / ref - 1),
    ``speed_verdict``, and the same for ``memory`` (NaN / ``""`` where a run has no memory figure). ``only_new``,
    ``only_ref``: the rows of cells one run lacks.
    """

    new: Run
    ref: Run
    cells: pd.DataFrame
    ratios: pd.DataFrame
    only_new: pd.DataFrame
    only_ref: pd.DataFrame
    references: list[str]
    tolerance: float
    memory_tolerance: float
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """``matched``, each of :data:`CLASSES`, ``only-in-new``, ``only-in-ref``."""
        classes = self.cells["cls"].value_counts() if len(self.cells) else {}
        counts = {"matched": len(self.cells)}
        counts.update({name: int(classes.get(name, 0)) for name in CLASSES})
        counts.update({"only-in-new": len(self.only_new), "only-in-ref": len(self.only_ref)})
        return counts

    @property
    def lost(self) -> pd.DataFrame:
        """Matched cells that ran in REF and did not run in NEW."""
        return self.cells[(self.cells["status_ref"] == "ok") & (self.cells["status_new"] != "ok")]

    @property
    def regressed(self) -> bool:
        """True when a within-run ratio got worse beyond its tolerance or a cell stopped running."""
        return bool((self.cells["cls"] == "worse").any()) or len(self.lost) > 0

    def summary(self) -> str:
        """``matched 80, better 2, same 75, ... -> regressed`` (the last line of the command's output)."""
        text = ", ".join(f"{name} {count}" for name, count in self.counts().items())
        return f"summary: {text} -> {'REGRESSED' if self.regressed else 'no regression'}"

    # ---------------------------------------------------------------- tables of text (header, rows)

    def speed_regressions(self) -> tuple[list[str], list[list[str]]]:
        """The speed-ups that fell by more than the tolerance."""
        header = ["mode", "series", "length", "against", "speed-up REF", "speed-up NEW", "change", "time NEW/REF",
                  "timing noise REF / NEW (IQR / median)"]
        worse = self._ratio_rows(self.ratios[self.ratios["speed_verdict"] == "worse"])
        rows = [[*self._where(r), r["reference"], _x(r["speedup_ref"]), _x(r["speedup_new"]),
                 _pct(r["speed_change"]), _x(r["time_ratio"]), f"{_share(r['noise_ref'])} / {_share(r['noise_new'])}"]
                for _, r in worse.iterrows()]
        return header, rows

    def memory_regressions(self) -> tuple[list[str], list[list[str]]]:
        """The memory savings that fell by more than the memory tolerance."""
        header = ["mode", "series", "length", "against", "memory saving REF", "memory saving NEW", "change",
                  "peak NEW/REF"]
        worse = self._ratio_rows(self.ratios[self.ratios["memory_verdict"] == "worse"])
        rows = [[*self._where(r), r["reference"], _x(r["memory_ref"]), _x(r["memory_new"]),
                 _pct(r["memory_change"]), _x(r["peak_ratio"])] for _, r in worse.iterrows()]
        return header, rows

    def status_changes(self) -> tuple[list[str], list[list[str]]]:
        """Matched cells whose status differs between the runs, and what that means for the verdict."""
        header = ["mode", "series", "length", "status REF", "status NEW", "meaning"]
        changed = self.cells[self.cells["shown_status_new"] != self.cells["shown_status_ref"]]
        rows = []
        for _, cell in changed.iterrows():
            if cell["status_ref"] == "ok":
                meaning = "regression: ran in REF, not in NEW"
            elif cell["status_new"] == "ok":
                meaning = "improvement: runs in NEW, did not in REF"
            else:
                meaning = "did not run in either"
            rows.append([*self._where(cell), cell["shown_status_ref"], cell["shown_status_new"], meaning])
        return header, rows

    def cell_table(self) -> tuple[list[str], list[list[str]]]:
        """Every matched cell: its speed-up and memory saving against each reference, REF -> NEW, the absolute time
        ratio NEW / REF (informational) and its class."""
        header = ["mode", "series", "length", "status"]
        for reference in self.references:
            header += [f"speed-up vs {reference} (REF -> NEW)", f"memory saving vs {reference} (REF -> NEW)"]
        header += ["time NEW/REF (info)", "class"]
        by_cell = {(key, r["reference"]): r for key, r in zip(self.ratios[_KEY], self.ratios.to_dict("records"))}
        rows = []
        for _, cell in self.cells.iterrows():
            status = cell["shown_status_ref"]
            if cell["shown_status_new"] != status:
                status = f"{status} -> {cell['shown_status_new']}"
            row = [*self._where(cell), status]
            for reference in self.references:
                ratio = by_cell.get((cell[_KEY], reference))
                if ratio is None:
                    row += ["-", "-"]
                    continue
                row.append(_change_text(ratio["speedup_ref"], ratio["speedup_new"], ratio["speed_change"]))
                row.append(_change_text(ratio["memory_ref"], ratio["memory_new"], ratio["memory_change"]))
            row += [_x(cell["time_ratio"]), cell["cls"]]
            rows.append(row)
        return header, rows

    def unmatched_table(self) -> tuple[list[str], list[list[str]]]:
        """The cells only one run has."""
        header = ["only in", "mode", "series", "length", "status"]
        rows = []
        for label, frame in ((NEW, self.only_new), (REF, self.only_ref)):
            for _, cell in frame.iterrows():
                rows.append([label, *self._where(cell, suffix=""), cell["shown_status"]])
        return header, rows

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _where(row: pd.Series, suffix: str = "_new") -> list[str]:
        series = display_name(str(row[f"condition{suffix}"]), str(row[f"series{suffix}"]))
        if suffix and row["series_ref"] != row["series_new"]:
            series += f" (REF: {row['series_ref']})"
        return [str(row["mode"]), series, length_label(row["seq_len"])]

    def _ratio_rows(self, ratios: pd.DataFrame) -> pd.DataFrame:
        """Ratio rows with the cell's names and absolute ratios beside them, in the cells' order."""
        columns = [_KEY, "mode", "seq_len", "series_new", "series_ref", "condition_new", "time_ratio", "peak_ratio",
                   "noise_new", "noise_ref", "_order"]
        merged = ratios.merge(self.cells[columns], on=_KEY, how="left")
        return merged.sort_values(["_order", "reference"], kind="stable")


def _x(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 10:
        return f"{value:.1f}x"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _share(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0%}"


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.1%}"


def _change_text(ref: float, new: float, change: float) -> str:
    if not (math.isfinite(ref) and math.isfinite(new)):
        return "-"
    return f"{_x(ref)} -> {_x(new)} ({_pct(change)})"


def _verdict(change: float, tolerance: float) -> str:
    """``worse`` / ``better`` / ``same`` for a relative change (new / ref - 1) of a higher-is-better ratio."""
    if not math.isfinite(change):
        return ""
    slack = tolerance + _EDGE
    return "worse" if change < -slack else "better" if change > slack else "same"


def _canonical_params(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return text


def _number_text(value: float) -> str:
    if value != value:  # NaN: empty in the CSV
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _cell_keys(frame: pd.DataFrame) -> pd.Series:
    """One text key per row from :data:`MATCH_COLUMNS`, with what older schemas leave empty read as it meant."""
    parts = frame[list(MATCH_COLUMNS)].copy()
    parts["num_kv_heads"] = parts["num_kv_heads"].where(parts["num_kv_heads"].notna(), parts["num_heads"])
    parts["params_json"] = parts["params_json"].map(_canonical_params)
    parts["backend_requested"] = parts["backend_requested"].where(parts["backend_requested"] != "", frame["backend"])
    for column in ("batch_size", "seq_len", "num_heads", "head_dim", "num_kv_heads"):
        parts[column] = parts[column].map(_number_text)
    return parts.astype(str).agg("\x1f".join, axis=1)


def _check_one_row_per_cell(part: pd.DataFrame, run: Run) -> None:
    twice = part[part.duplicated(_KEY, keep=False)]
    if len(twice):
        row = twice.iloc[0]
        raise ValueError(
            f"{run.path}: {len(twice)} rows are the same cell once empty columns of older schemas are filled in "
            f"(e.g. {row['variant']}:{row['backend_requested']} {row['mode']} at {row['seq_len']}; one row leaves "
            "num_kv_heads empty, another gives it equal to num_heads): keep one row per cell"
        )


def _run_warnings(new: Run, ref: Run) -> list[str]:
    """What differs between the runs' records that makes them less comparable (never a refusal)."""
    warnings = []
    for run in (new, ref):
        if not run.meta:
            label = NEW if run is new else REF
            warnings.append(f"{label} ({run.path}) has no meta.json: its suite and device are not checked")
    checks = [
        ("suite", "suite"),
        ("device", "device"),
        ("device_name", "device model"),
        ("cpu_model", "CPU"),
        ("cpu_count", "CPU count"),
        ("torch_threads", "torch threads"),
        ("torch", "torch version"),
        ("budget_bytes", "memory budget"),
    ]
    for attribute, what in checks:
        a, b = getattr(new.info, attribute), getattr(ref.info, attribute)
        if a is not None and b is not None and a != b:
            if attribute == "budget_bytes":
                a, b = format_bytes(a), format_bytes(b)
            warnings.append(f"the runs differ in {what}: NEW {a}, REF {b}")
    return warnings


def _match(parts: dict[str, pd.DataFrame], new: Run, ref: Run) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(cells, only_new, only_ref)``: the cells of both runs side by side (suffixes ``_new``, ``_ref``), in report
    order, with the absolute ratios NEW / REF; and the rows of the cells one run lacks."""
    import numpy as np

    kept = [_KEY, *MATCH_COLUMNS, "_mode_rank"]
    measured = ["status", "shown_status", "time_ms", "time_iqr_ms", "peak_mem_bytes", "series", "condition"]
    cells = parts[NEW][kept + measured].merge(parts[REF][[_KEY, *measured]], on=_KEY, suffixes=("_new", "_ref"))
    if cells.empty:
        raise ValueError(
            f"no cell of NEW ({new.path}, {len(parts[NEW])} cells) matches a cell of REF ({ref.path}, "
            f"{len(parts[REF])} cells) on {', '.join(MATCH_COLUMNS)}: nothing to compare; give two runs of one suite"
        )
    cells = cells.sort_values(["_mode_rank", "condition_new", "series_new", "seq_len"], kind="stable")
    cells = cells.reset_index(drop=True)
    cells["_order"] = np.arange(len(cells))
    cells["time_ratio"] = cells["time_ms_new"] / cells["time_ms_ref"]
    cells["peak_ratio"] = cells["peak_mem_bytes_new"] / cells["peak_mem_bytes_ref"]
    for suffix in ("_new", "_ref"):
        cells[f"noise{suffix}"] = cells[f"time_iqr_ms{suffix}"] / cells[f"time_ms{suffix}"]
    order = ["_mode_rank", "series", "seq_len"]
    only_new = parts[NEW][~parts[NEW][_KEY].isin(parts[REF][_KEY])].sort_values(order)
    only_ref = parts[REF][~parts[REF][_KEY].isin(parts[NEW][_KEY])].sort_values(order)
    return cells, only_new, only_ref


def _ratios(frame: pd.DataFrame, parts: dict[str, pd.DataFrame], cells: pd.DataFrame,
            refs: list[tuple[str, str]], warnings: list[str]) -> tuple[list[str], pd.DataFrame]:
    """``(names, ratios)``: the references in both runs, and each matched cell's speed-up and memory saving against
    each of them in both runs (rows where both speed-ups exist), with their relative changes. A reference missing
    from a run is a warning appended to ``warnings``."""
    import numpy as np
    import pandas as pd

    names, found = [], []
    for variant, backend in refs:
        name = f"{variant}:{backend}"
        present = [label for label in (NEW, REF) if baseline_mask(parts[label], variant, backend).any()]
        if len(present) < 2:
            where = "in neither run" if not present else f"not in {NEW if REF in present else REF}"
            warnings.append(f"the reference {name} is {where}: no ratios against it")
            continue
        names.append(name)
        rel = relative_to_baseline(frame, variant, backend)  # the report's ratios, by its one baseline selector
        columns = [_KEY, "speedup", "memory_saving"]
        both = rel[rel["run"] == NEW][columns].merge(rel[rel["run"] == REF][columns], on=_KEY,
                                                     suffixes=("_new", "_ref"))
        both = both.rename(columns={"memory_saving_new": "memory_new", "memory_saving_ref": "memory_ref"})
        finite = np.isfinite(both[["speedup_new", "speedup_ref"]]).all(axis=1)
        both = both[finite & both[_KEY].isin(cells[_KEY])].copy()
        both.insert(1, "reference", name)
        found.append(both)
    columns = [_KEY, "reference", "speedup_new", "speedup_ref", "memory_new", "memory_ref"]
    ratios = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)
    ratios["speed_change"] = (ratios["speedup_new"] / ratios["speedup_ref"] - 1.0).astype(float)
    ratios["memory_change"] = (ratios["memory_new"] / ratios["memory_ref"] - 1.0).astype(float)
    return names, ratios


def _classes(cells: pd.DataFrame, ratios: pd.DataFrame) -> list[str]:
    """The class (:data:`CLASSES`) of each matched cell, from its statuses and its ratios' verdicts."""
    verdicts: dict[str, set[str]] = {}
    for key, speed, memory in zip(ratios[_KEY], ratios["speed_verdict"], ratios["memory_verdict"], strict=True):
        verdicts.setdefault(key, set()).update(v for v in (speed, memory) if v)
    classes = []
    for key, status_new, status_ref in zip(cells[_KEY], cells["status_new"], cells["status_ref"], strict=True):
        found = verdicts.get(key, set())
        if (status_new == "ok") != (status_ref == "ok"):
            classes.append("failed-in-one")
        elif status_new != "ok":
            classes.append("both-failed")
        elif not found:
            classes.append("no-ratio")
        else:
            classes.append("worse" if "worse" in found else "better" if "better" in found else "same")
    return classes


def compare_runs(
    new_dir: str | Path,
    ref_dir: str | Path,
    *,
    baseline: str | None = None,
    tolerance: float,
    memory_tolerance: float,
) -> Comparison:
    """Match the cells of two run folders and compare their within-run ratios (module docstring).

    Args:
        new_dir, ref_dir: run folders (``results.csv`` + ``meta.json``) or their ``results.csv``.
        baseline: ``VARIANT:BACKEND`` the speed-ups are taken against (with ``full:sdpa``, as in the report); default
            ``full:naive``. An explicit baseline in neither run is a ``ValueError`` listing the ones there are.
        tolerance, memory_tolerance: how far (a fraction of REF's value, in ``[0, 1)``) a speed-up or a memory
            saving may fall before the cell counts as worse; the same margin upwards counts as better (the command's
            defaults: ``effattn compare --help``).
    Raises:
        FileNotFoundError, ValueError: a folder that is not a run folder, a damaged file, a bad argument, two runs
            without a cell in common (nothing would be compared, and a check that compares nothing must not pass).
    """
    for name, value in (("tolerance", tolerance), ("memory_tolerance", memory_tolerance)):
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{name} must be a fraction in [0, 1) (0.1 = 10%), got {value!r}")
    explicit = baseline is not None
    base_variant, base_backend = parse_series_spec(baseline or DEFAULT_BASELINE)
    frame, (new, ref) = load_runs([new_dir, ref_dir], labels=[NEW, REF])
    warnings = _run_warnings(new, ref)
    if explicit and not baseline_mask(frame, base_variant, base_backend).any():
        available = ", ".join(available_baselines(frame))
        raise ValueError(f"--baseline {baseline!r} is in neither run; available: {available}")

    frame[_KEY] = _cell_keys(frame)
    rank = {m: i for i, m in enumerate(vocab.MODES)}
    frame["_mode_rank"] = frame["mode"].map(lambda m: rank.get(m, len(rank)))
    parts = {label: frame[frame["run"] == label] for label in (NEW, REF)}
    for label, run in ((NEW, new), (REF, ref)):
        _check_one_row_per_cell(parts[label], run)

    cells, only_new, only_ref = _match(parts, new, ref)
    reference_names, ratios = _ratios(frame, parts, cells, references((base_variant, base_backend)), warnings)
    ratios["speed_verdict"] = [_verdict(c, tolerance) for c in ratios["speed_change"]]
    ratios["memory_verdict"] = [_verdict(c, memory_tolerance) for c in ratios["memory_change"]]
    cells["cls"] = _classes(cells, ratios)
    return Comparison(new=new, ref=ref, cells=cells, ratios=ratios, only_new=only_new, only_ref=only_ref,
                      references=reference_names, tolerance=tolerance, memory_tolerance=memory_tolerance,
                      warnings=warnings)
