"""How far each series got, and what is said about the lengths it did not reach (issue 18 item 3).

Three tables, each kept apart from the measured numbers:

- :func:`prediction_rows`: the harness's predicted peak (``predicted_mem_bytes``, a fake-tensor trace) beside the
  measured peak and their ratio, per series x mode x length; cells that were not measured (over budget, above
  ``max_len``) keep their prediction alone.
- :func:`extrapolation_rows`: a time extrapolated from the series' fitted power law (:func:`fit_power_law`) at the
  run's lengths it did not measure, labelled with the lengths the fit spans. Never mixed into measured numbers.
- :func:`unrun_cells`: the cells a run's suite planned (``meta.json`` ``config``) that have no row (an interrupted
  run), so a partial run reads as partial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from efficient_attn.report.analyses.fit import PowerFit, fit_power_law
from efficient_attn.report.format import format_bytes, format_ms, length_label
from efficient_attn.report.series import GROUP_KEYS, display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run

__all__ = ["PlannedCell", "extrapolation_rows", "fit_span", "planned_cells", "prediction_rows", "unrun_cells"]

#: the fewest measured lengths a time extrapolation is fitted over
MIN_FIT_POINTS = 3

STATUS_TEXT = {
    "ok": "measured",
    "skipped_budget": "over budget",
    "above_max_len": "above max_len",
    "skipped_after_oom": "skipped after oom",
}


def status_text(shown_status: str) -> str:
    """How a table names a cell's (shown) status."""
    return STATUS_TEXT.get(shown_status, shown_status)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def prediction_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Predicted beside measured peak memory for every cell with either, and measured / predicted.

    A ratio above 1 means the prediction was low (the cell used more than predicted). Cells not measured keep
    their prediction and show their status; cells with neither number (unsupported, error without a prediction)
    are left out.
    """
    header = ["run", "mode", "series", "length", "cell", "predicted peak", "measured peak", "measured / predicted"]
    rows = []
    for (run, condition, _level, mode, series), group in mode_sorted(frame).groupby(GROUP_KEYS, sort=False):
        for _, cell in group.sort_values("seq_len").iterrows():
            predicted = _finite(cell["predicted_mem_bytes"])
            measured = _finite(cell["peak_mem_bytes"]) if cell["status"] == "ok" else None
            if predicted is None and measured is None:
                continue
            ratio = f"{measured / predicted:.2f}" if predicted and measured is not None else "-"
            rows.append([
                str(run), str(mode), display_name(str(condition), str(series)), length_label(int(cell["seq_len"])),
                status_text(str(cell["shown_status"])),
                format_bytes(predicted) if predicted is not None else "-",
                format_bytes(measured) if measured is not None else "-",
                ratio,
            ])
    return header, rows


def fit_span(fit: PowerFit) -> str:
    """``16K..128K`` : the lengths a fit spans."""
    return f"{length_label(fit.n_min)}..{length_label(fit.n_max)}"


def _run_lengths(run: Run | None, frame: pd.DataFrame) -> list[int]:
    """The lengths a run's suite asked for (``config.lengths``), else the lengths in its rows."""
    config = run.meta.get("config") if run is not None else None
    lengths = config.get("lengths") if isinstance(config, dict) else None
    if isinstance(lengths, list) and lengths and all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        return sorted(set(lengths))
    return sorted(set(int(n) for n in frame["seq_len"]))


def extrapolation_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """A time extrapolated from each series' fitted power law to the run's lengths it did not measure.

    For every series x mode whose longest measured length is below the run's longest length: the power law fitted
    over its measured (``ok``) lengths (at least :data:`MIN_FIT_POINTS`), evaluated at each longer length of the
    run, with the cell's status there (above max_len, over budget, not run). Only times are extrapolated; the
    memory at those lengths is the harness's prediction (:func:`prediction_rows`).
    """
    by_label = {run.label: run for run in runs}
    header = ["run", "mode", "series", "length", "cell", "fit over", "time exponent", "time, extrapolated"]
    rows = []
    for (run, condition, _level, mode, series), group in mode_sorted(frame).groupby(GROUP_KEYS, sort=False):
        ok = group[(group["status"] == "ok") & group["time_ms"].notna()]
        if ok["seq_len"].nunique() < MIN_FIT_POINTS:
            continue
        lengths = _run_lengths(by_label.get(str(run)), frame[frame["run"] == run])
        longest = int(ok["seq_len"].max())
        beyond = [n for n in lengths if n > longest]
        if not beyond:
            continue
        try:
            fit = fit_power_law(list(ok["seq_len"]), list(ok["time_ms"]))
        except ValueError:
            continue
        for n in beyond:
            there = group[group["seq_len"] == n]
            cell = status_text(str(there["shown_status"].iloc[0])) if not there.empty else "not run"
            rows.append([
                str(run), str(mode), display_name(str(condition), str(series)), length_label(n), cell,
                f"{fit_span(fit)} ({fit.n_points} pts, R²={fit.r2:.3f})", f"{fit.exponent:.2f}",
                f"~{format_ms(float(fit.predict(n)))} (extrapolated, fit over {fit_span(fit)})",
            ])
    return header, rows


@dataclass(frozen=True)
class PlannedCell:
    """One cell a suite planned: the variant key, the backend asked for, the mode and the length."""

    variant: str
    backend: str
    mode: str
    seq_len: int
    above_max_len: bool = False  # the suite's per-mode max_len cuts it (it would get a row, never a measurement)


def planned_cells(run: Run) -> list[PlannedCell]:
    """The core-variant cells of a run's suite (``meta.json`` ``config``: variants x backends x modes x lengths);
    empty when the meta has no such config. Peers and the other configuration axes are not expanded: a cell
    counts as planned for a variant, backend, mode and length."""
    config = run.meta.get("config")
    if not isinstance(config, dict):
        return []
    variants, modes, lengths = config.get("variants"), config.get("modes"), config.get("lengths")
    if not (isinstance(variants, list) and isinstance(modes, list) and isinstance(lengths, list)):
        return []
    cells = []
    for entry in variants:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        backends = entry.get("backends") if isinstance(entry.get("backends"), list) else ["auto"]
        caps = entry.get("max_len") if isinstance(entry.get("max_len"), dict) else {}
        for backend in backends:
            for mode in modes:
                cap = caps.get(mode)
                for n in lengths:
                    above = isinstance(cap, int) and int(n) > cap
                    cells.append(PlannedCell(entry["key"], str(backend), str(mode), int(n), above))
    return cells


def unrun_cells(frame: pd.DataFrame, run: Run) -> list[PlannedCell]:
    """The planned cells of ``run`` (:func:`planned_cells`) with no row in ``frame``: what an interrupted run left."""
    part = frame[(frame["run"] == run.label) & ~frame["is_peer"]]
    have = {
        (str(v), str(b), str(m), int(n))
        for v, b, m, n in part[["variant", "backend_requested", "mode", "seq_len"]].itertuples(index=False)
    }
    return [c for c in planned_cells(run) if (c.variant, c.backend, c.mode, c.seq_len) not in have]
