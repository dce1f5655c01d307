"""Reports from benchmark runs: load results, analyse them (scaling laws, crossovers, budget, tables), plot, and
render ``report.md``/``report.html``.

Data flows one way::

    load.py (run folders -> one tidy frame, RunInfo from meta.json)
      -> analyses/ (fit, crossover, budget, tables, overview: frame -> header + rows of text)
      -> plots.py (frame -> PNG files)
      -> sections.py (tables + prose -> blocks) -> render_md.py / render_html.py
    build.py runs the whole chain (``effattn report RUN_DIR...``).

Beside them: series.py (the baseline selector, mode order, names), palette.py (colours, shared with the quality
report), format.py (numbers as text), blocks.py (the block types). The submodules import pandas/matplotlib/seaborn
only inside their functions, so importing this package is cheap.
"""

from efficient_attn.report.analyses.budget import BudgetReach, longest_within_budget
from efficient_attn.report.analyses.crossover import (
    Crossover,
    crossover_polynomial_fit,
    crossover_power,
    measured_crossover,
)
from efficient_attn.report.analyses.fit import PowerFit, fit_power_law
from efficient_attn.report.build import ReportFiles, build_report

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
