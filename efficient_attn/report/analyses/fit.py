"""Fits over a series' cost-vs-length curve, and the scaling-exponent table.

- Scaling exponent: the slope ``p`` of ``log cost = log c + p log n`` over the measured lengths (least squares),
  with its coefficient of determination ``R^2``. Full attention's time tends to 2, a linear-cost variant's to 1;
  fixed overheads pull small-length slopes below the asymptote, so the fitted range is always reported.
- :func:`fit_polynomial`: the weighted polynomial fits the CAB crossover (:mod:`.crossover`) solves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from efficient_attn.report.format import length_label
from efficient_attn.report.series import GROUP_KEYS, display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class PowerFit:
    """``cost ~= coefficient * n ** exponent`` fitted in log-log space over ``n_min..n_max``."""

    exponent: float
    coefficient: float
    r2: float
    n_points: int
    n_min: int
    n_max: int

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        """Cost predicted at length ``n``."""
        return self.coefficient * np.power(n, self.exponent)

    def solve(self, cost: float) -> float | None:
        """The length at which the fitted cost reaches ``cost`` (None when the cost does not grow with n)."""
        if self.exponent <= 1e-6:
            return None
        return float((cost / self.coefficient) ** (1.0 / self.exponent))


def positive_points(
    n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The points with finite, positive length and cost (cells that did not run are NaN and drop out)."""
    n_arr = np.asarray(n, dtype=float)
    y_arr = np.asarray(y, dtype=float)
    if n_arr.shape != y_arr.shape or n_arr.ndim != 1:
        raise ValueError(f"lengths and costs must be 1-D and the same length; got {n_arr.shape} and {y_arr.shape}")
    keep = np.isfinite(n_arr) & np.isfinite(y_arr) & (n_arr > 0) & (y_arr > 0)
    return n_arr[keep], y_arr[keep]


def fit_power_law(n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> PowerFit:
    """Least-squares fit of ``log y = log c + p log n``.

    Non-finite and non-positive points are dropped (cells that did not run). Several measurements at one length
    all count. Raises ``ValueError`` when fewer than two distinct lengths remain.
    """
    n_arr, y_arr = positive_points(n, y)
    if np.unique(n_arr).size < 2:
        raise ValueError(f"a power-law fit needs at least two distinct lengths with positive costs; got {n_arr.size}")
    log_n, log_y = np.log(n_arr), np.log(y_arr)
    slope, intercept = np.polyfit(log_n, log_y, 1)
    residual = log_y - (intercept + slope * log_n)
    total = log_y - log_y.mean()
    ss_tot = float(total @ total)
    r2 = 1.0 - float(residual @ residual) / ss_tot if ss_tot > 0 else 1.0
    return PowerFit(
        exponent=float(slope),
        coefficient=float(math.exp(intercept)),
        r2=r2,
        n_points=int(n_arr.size),
        n_min=int(n_arr.min()),
        n_max=int(n_arr.max()),
    )


def fit_polynomial(
    n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, degree: int, *, relative: bool = True
) -> np.poly1d:
    """Least-squares polynomial ``y ~= sum a_k n^k`` of ``degree`` (1 or 2).

    ``relative=True`` weights residuals by ``1 / y`` so short lengths (small costs) count as much as long ones;
    CAB fitted unweighted, which lets the longest length decide everything.
    """
    if degree not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {degree}")
    n_arr, y_arr = positive_points(n, y)
    if np.unique(n_arr).size < degree + 1:
        raise ValueError(f"a degree-{degree} fit needs at least {degree + 1} distinct lengths; got {n_arr.size}")
    weights = 1.0 / y_arr if relative else None
    return np.poly1d(np.polyfit(n_arr, y_arr, degree, w=weights))


def _fit_text(lengths: Any, values: Any) -> str:
    try:
        fit = fit_power_law(lengths, values)
    except ValueError:
        return "too few points"
    return (
        f"{fit.exponent:.2f} (R²={fit.r2:.3f}, "
        f"{length_label(fit.n_min)}-{length_label(fit.n_max)}, {fit.n_points} pts)"
    )


def scaling_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Per series and mode: log-log slope of time and of peak memory over the ``ok`` cells, with R² and range."""
    header = ["run", "mode", "series", "time exponent", "memory exponent"]
    rows = []
    for (run, condition, _level, mode, series), group in mode_sorted(frame).groupby(GROUP_KEYS, sort=False):
        ok = group[group["status"] == "ok"]
        rows.append(
            [
                str(run),
                str(mode),
                display_name(str(condition), str(series)),
                _fit_text(ok["seq_len"], ok["time_ms"]),
                _fit_text(ok["seq_len"], ok["peak_mem_bytes"]),
            ]
        )
    return header, rows
