"""Longest length within a memory budget, three ways, and the budget table of a report.

Measured (the longest ``ok`` cell), predicted (the longest cell whose ``predicted_mem_bytes``, the harness's
fake-tensor prediction, fits) and extrapolated (the memory power law solved at the budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from efficient_attn.report.analyses.fit import PowerFit, fit_power_law
from efficient_attn.report.analyses.reach import unrun_cells
from efficient_attn.report.format import format_bytes, length_label
from efficient_attn.report.load import ABOVE_MAX_LEN
from efficient_attn.report.series import GROUP_KEYS, display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run


@dataclass(frozen=True)
class BudgetReach:
    """Longest length that fits a memory budget, three ways (None where it cannot be said)."""

    measured: int | None
    predicted: int | None
    extrapolated: float | None
    fit: PowerFit | None


def longest_within_budget(
    lengths: Sequence[int],
    statuses: Sequence[str],
    peak_mem: Sequence[float],
    predicted_mem: Sequence[float],
    budget: float | None,
) -> BudgetReach:
    """How long a sequence fits: measured, by the harness's prediction, and by extrapolating the memory fit.

    ``measured``: the longest ``ok`` cell whose peak memory is within the budget (or any ``ok`` cell when there is
    no budget). ``predicted``: the longest cell whose ``predicted_mem_bytes`` is within the budget.
    ``extrapolated``: the memory power law solved at the budget (None without a budget or a growing fit).
    """
    rows = list(zip(lengths, statuses, peak_mem, predicted_mem, strict=True))
    ok = [(int(n), float(m)) for n, s, m, _ in rows if s == "ok"]
    fitting = [n for n, m in ok if budget is None or not math.isfinite(m) or m <= budget]
    measured = max(fitting) if fitting else None
    predicted_ok = [
        int(n) for n, _, _, p in rows if budget is not None and p is not None and math.isfinite(p) and p <= budget
    ]
    predicted = max(predicted_ok) if predicted_ok else None
    fit = None
    try:
        fit = fit_power_law([n for n, _ in ok], [m for _, m in ok])
    except ValueError:
        fit = None
    extrapolated = fit.solve(budget) if fit is not None and budget is not None else None
    return BudgetReach(measured=measured, predicted=predicted, extrapolated=extrapolated, fit=fit)


def _missing_lengths(frame: pd.DataFrame, runs: list[Run]) -> dict[tuple[str, str, str], list[int]]:
    """Per (run, mode, series): the planned lengths with no row (the run stopped before them)."""
    missing: dict[tuple[str, str, str], list[int]] = {}
    for run in runs:
        part = frame[(frame["run"] == run.label) & ~frame["is_peer"]]
        names = {
            (str(v), str(b)): str(s)
            for v, b, s in part[["variant", "backend_requested", "series"]].itertuples(index=False)
        }
        for cell in unrun_cells(frame, run):
            if cell.above_max_len:
                continue
            series = names.get((cell.variant, cell.backend))
            if series is not None:
                missing.setdefault((run.label, cell.mode, series), []).append(cell.seq_len)
    return missing


def _reach_note(group: pd.DataFrame, measured: int | None, missing: list[int]) -> str:
    """Why the measured reach stops where it does: the longest length tried, the suite's max_len, or a run that
    stopped before its longer lengths (planned cells with no row)."""
    if measured is None:
        return ""
    above = group[group["seq_len"] > measured]
    later_missing = sorted(n for n in missing if n > measured)
    if later_missing:
        return f" (run stopped before {length_label(later_missing[0])}: not measured)"
    if above.empty:
        return " (longest tried)"
    if above["shown_status"].eq(ABOVE_MAX_LEN).all():
        return " (the suite's max_len)"
    return ""


def budget_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Longest length within each run's memory budget: measured, predicted by the harness, extrapolated."""
    budgets = {run.label: run.info.budget_bytes for run in runs}
    missing = _missing_lengths(frame, runs)
    header = ["run", "mode", "series", "budget", "measured (longest ok)", "predicted", "extrapolated (memory fit)"]
    rows = []
    for (run, condition, _level, mode, series), group in mode_sorted(frame).groupby(GROUP_KEYS, sort=False):
        budget = budgets.get(str(run))
        reach = longest_within_budget(
            list(group["seq_len"]),
            list(group["status"]),
            [float(v) for v in group["peak_mem_bytes"]],
            [float(v) for v in group["predicted_mem_bytes"]],
            budget,
        )
        measured = length_label(reach.measured) if reach.measured else "none ran"
        measured += _reach_note(group, reach.measured, missing.get((str(run), str(mode), str(series)), []))
        extrapolated = "-"
        if reach.extrapolated is not None:
            extrapolated = f"~{reach.extrapolated:,.0f}" if reach.extrapolated < 1e9 else ">1e9"
        rows.append(
            [
                str(run),
                str(mode),
                display_name(str(condition), str(series)),
                format_bytes(budget) if budget else "not recorded",
                measured,
                length_label(reach.predicted) if reach.predicted else "-",
                extrapolated,
            ]
        )
    return header, rows
