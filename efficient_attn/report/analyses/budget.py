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
from efficient_attn.report.format import format_bytes, length_label
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


def budget_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Longest length within each run's memory budget: measured, predicted by the harness, extrapolated."""
    budgets = {run.label: run.info.budget_bytes for run in runs}
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
        longest = int(group["seq_len"].max())
        if reach.measured == longest and group.loc[group["seq_len"] == longest, "status"].eq("ok").all():
            measured += " (longest tried)"
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
