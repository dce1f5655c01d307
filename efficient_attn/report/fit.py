"""Fits over a series' cost-vs-length curve: scaling exponents, crossover lengths, longest length in budget.

- Scaling exponent: the slope ``p`` of ``log cost = log c + p log n`` over the measured lengths (least squares),
  with its coefficient of determination ``R^2``. Full attention's time tends to 2, a linear-cost variant's to 1;
  fixed overheads pull small-length slopes below the asymptote, so the fitted range is always reported.
- Crossover ("efficiency length", Koh et al. 2023, CAB, arXiv:2210.07661): the length from which a variant is
  cheaper than a baseline. CAB fits a quadratic to full attention and a line to each variant and solves for the
  crossing; :func:`crossover_polynomial_fit` does that (the degree of each fit follows the series' own measured
  exponent, so ``full:sdpa`` vs ``full:naive`` is not forced onto a line, nor SDPA's linear memory onto a
  parabola), :func:`crossover_power` solves two
  power laws, and :func:`measured_crossover` reads the first measured length from which the variant wins.
- Longest length within a memory budget: measured (the longest ``ok`` cell), predicted (the longest cell whose
  ``predicted_mem_bytes`` fits) and extrapolated (the memory power law solved at the budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


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


def _clean(n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    n_arr, y_arr = _clean(n, y)
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


@dataclass(frozen=True)
class Crossover:
    """Where a variant's cost drops below a baseline's.

    ``verdict``: ``"at"`` (cheaper for every n >= ``length``), ``"always"`` (cheaper at every positive length the
    model covers), ``"never"`` (not cheaper at large n), ``"poor fit"`` (a fitted cost that falls with n).
    ``extrapolated`` says the length lies outside the lengths
    both series were measured at.
    """

    verdict: str
    length: float | None = None
    extrapolated: bool = False

    def describe(self) -> str:
        """Human-readable: ``"3,045"``, ``"3,045 (extrapolated)"``, ``"always"``, ``"never"``."""
        if self.verdict != "at" or self.length is None:
            return self.verdict
        text = f"{self.length:,.0f}"
        return f"{text} (extrapolated)" if self.extrapolated else text


def _crossing_of_difference(diff: np.poly1d) -> Crossover:
    """``diff(n) = baseline(n) - variant(n)``; the variant is cheaper where it is positive."""
    coeffs = np.trim_zeros(np.asarray(diff.coeffs, dtype=float), "f")
    if coeffs.size == 0:
        return Crossover("never")
    if coeffs[0] <= 0:  # the sign of the leading term decides large n
        return Crossover("never")
    roots = np.roots(coeffs) if coeffs.size > 1 else np.array([])
    real = [float(r.real) for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)) and r.real > 0]
    if not real:
        return Crossover("always")
    return Crossover("at", max(real))


def crossover_power(baseline: PowerFit, variant: PowerFit) -> Crossover:
    """Solve ``c_b n^p_b = c_v n^p_v``: ``n* = (c_v / c_b) ** (1 / (p_b - p_v))``.

    The variant wins for ``n > n*`` when its exponent is smaller; equal exponents give ``always``/``never`` from the
    coefficients.
    """
    dp = baseline.exponent - variant.exponent
    if abs(dp) < 1e-9:
        return Crossover("always" if variant.coefficient < baseline.coefficient else "never")
    if dp < 0:
        return Crossover("never")
    length = (variant.coefficient / baseline.coefficient) ** (1.0 / dp)
    lo, hi = max(baseline.n_min, variant.n_min), min(baseline.n_max, variant.n_max)
    return Crossover("at", float(length), extrapolated=not lo <= length <= hi)


def fit_polynomial(
    n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, degree: int, *, relative: bool = True
) -> np.poly1d:
    """Least-squares polynomial ``y ~= sum a_k n^k`` of ``degree`` (1 or 2).

    ``relative=True`` weights residuals by ``1 / y`` so short lengths (small costs) count as much as long ones;
    CAB fitted unweighted, which lets the longest length decide everything.
    """
    if degree not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {degree}")
    n_arr, y_arr = _clean(n, y)
    if np.unique(n_arr).size < degree + 1:
        raise ValueError(f"a degree-{degree} fit needs at least {degree + 1} distinct lengths; got {n_arr.size}")
    weights = 1.0 / y_arr if relative else None
    return np.poly1d(np.polyfit(n_arr, y_arr, degree, w=weights))


def _degree_for(n: np.ndarray, y: np.ndarray) -> int:
    """2 for a series that grows faster than n^1.5 over its range, else 1."""
    return 2 if fit_power_law(n, y).exponent > 1.5 else 1


def crossover_polynomial_fit(
    n_baseline: Sequence[float] | np.ndarray,
    y_baseline: Sequence[float] | np.ndarray,
    n_variant: Sequence[float] | np.ndarray,
    y_variant: Sequence[float] | np.ndarray,
    *,
    baseline_degree: int | None = None,
    variant_degree: int | None = None,
) -> Crossover:
    """CAB's efficiency length: a quadratic fitted to the (quadratic) baseline, a line to the variant, solved.

    A degree left ``None`` is chosen from the series' own log-log slope (2 above 1.5, else 1), so a linear
    baseline (SDPA's memory) gets a line and a quadratic variant (``full:sdpa`` vs ``full:naive``) a quadratic.
    Each fit needs two more distinct lengths than its degree (one degree of freedom left to be a fit at all);
    fewer raise ``ValueError``. A fit whose leading coefficient is not positive (the cost would shrink at long
    lengths: noise) gives the verdict ``"poor fit"``.
    """
    nb, yb = _clean(n_baseline, y_baseline)
    nv, yv = _clean(n_variant, y_variant)
    degrees = []
    for n_arr, y_arr, given, name in ((nb, yb, baseline_degree, "baseline"), (nv, yv, variant_degree, "variant")):
        degree = given if given is not None else _degree_for(n_arr, y_arr)
        if np.unique(n_arr).size < degree + 2:
            raise ValueError(
                f"{name}: a degree-{degree} crossover fit needs at least {degree + 2} distinct lengths; "
                f"got {np.unique(n_arr).size}"
            )
        degrees.append(degree)
    base = fit_polynomial(nb, yb, degrees[0])
    var = fit_polynomial(nv, yv, degrees[1])
    if base.coeffs[0] <= 0 or var.coeffs[0] <= 0:
        return Crossover("poor fit")
    result = _crossing_of_difference(base - var)
    if result.verdict == "at" and result.length is not None:
        lo, hi = max(nb.min(), nv.min()), min(nb.max(), nv.max())
        result = Crossover("at", result.length, extrapolated=not lo <= result.length <= hi)
    return result


def measured_crossover(baseline: Mapping[int, float], variant: Mapping[int, float]) -> Crossover:
    """The first measured length from which the variant is cheaper at every longer measured length.

    Args:
        baseline: length -> cost; ``math.inf`` for a length the baseline could not run (oom / over budget),
            which the variant then wins if it ran.
        variant: length -> cost of the variant's ``ok`` cells.
    Only lengths present in both count. ``never`` when the variant is not cheaper at the longest one.
    """
    common = sorted(set(baseline) & set(variant))
    common = [n for n in common if math.isfinite(variant[n]) and not math.isnan(baseline[n])]
    if not common:
        return Crossover("never")
    wins = [variant[n] < baseline[n] for n in common]
    if not wins[-1]:
        return Crossover("never")
    first = len(wins)  # start of the final run of wins (0 when the variant is cheaper everywhere compared)
    while first > 0 and wins[first - 1]:
        first -= 1
    return Crossover("at", float(common[first]))


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
