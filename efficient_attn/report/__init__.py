"""Reports from benchmark runs: load results, fit scaling laws and crossovers, plot, write report.md/.html.

Entry point: :func:`efficient_attn.report.render.build_report` (``effattn report RUN_DIR...``). The submodules
import pandas/matplotlib/seaborn only inside their functions, so importing this package is cheap.
"""

from efficient_attn.report.fit import (
    BudgetReach,
    Crossover,
    PowerFit,
    crossover_polynomial_fit,
    crossover_power,
    fit_power_law,
    longest_within_budget,
    measured_crossover,
)
from efficient_attn.report.render import ReportFiles, build_report

__all__ = [
    "BudgetReach",
    "Crossover",
    "PowerFit",
    "ReportFiles",
    "build_report",
    "crossover_polynomial_fit",
    "crossover_power",
    "fit_power_law",
    "longest_within_budget",
    "measured_crossover",
]
