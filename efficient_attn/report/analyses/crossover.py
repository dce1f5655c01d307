"""Crossover lengths ("efficiency length", Zhang et al. 2023, CAB, arXiv:2210.07661): the length from which a
variant is cheaper than a baseline, and the crossover table of a report.

CAB fits a quadratic to full attention and a line to each variant and solves for the crossing;
:func:`crossover_polynomial_fit` does that (the degree of each fit follows the series' own measured exponent, so
``full:sdpa`` vs ``full:naive`` is not forced onto a line, nor SDPA's linear memory onto a parabola),
:func:`crossover_power` solves two power laws, and :func:`measured_crossover` reads the first measured length from
which the variant wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from efficient_attn.report.analyses.fit import PowerFit, fit_polynomial, fit_power_law, positive_points
from efficient_attn.report.format import length_label
from efficient_attn.report.load import FAILED_TO_FIT
from efficient_attn.report.series import GROUP_KEYS, baseline_mask, display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd


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
    nb, yb = positive_points(n_baseline, y_baseline)
    nv, yv = positive_points(n_variant, y_variant)
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


def _crossovers(
    group: pd.DataFrame, base: pd.DataFrame, column: str
) -> tuple[Crossover | None, Crossover | None, str]:
    """(measured, fitted, reason when fitted is missing) for one series vs one reference."""
    base_ok = base[base["status"] == "ok"]
    base_cost = {int(n): float(v) for n, v in zip(base_ok["seq_len"], base_ok[column])}
    for n in base.loc[base["status"].isin(FAILED_TO_FIT), "seq_len"]:
        base_cost.setdefault(int(n), math.inf)
    ok = group[(group["status"] == "ok") & group[column].notna()]
    var_cost = {int(n): float(v) for n, v in zip(ok["seq_len"], ok[column])}
    base_cost = {n: v for n, v in base_cost.items() if not math.isnan(v)}
    measured = measured_crossover(base_cost, var_cost) if var_cost and base_cost else None
    finite = {n: v for n, v in base_cost.items() if math.isfinite(v)}
    try:
        fitted = crossover_polynomial_fit(list(finite), list(finite.values()), list(var_cost), list(var_cost.values()))
        reason = ""
    except ValueError:
        fitted, reason = None, "too few lengths"
    return measured, fitted, reason


def _measured_text(c: Crossover | None) -> str:
    if c is None:
        return "-"
    if c.verdict == "at" and c.length is not None:
        return f"from {length_label(c.length)}"
    return "not at the longest length" if c.verdict == "never" else c.verdict


FAR_BEYOND = 64  # fitted crossovers past this multiple of the longest measured length are not worth a number


def _fitted_text(c: Crossover, longest: int) -> str:
    if c.verdict == "at" and c.length is not None and c.length > FAR_BEYOND * longest:
        return f"beyond {FAR_BEYOND}x the longest length (effectively never)"
    return c.describe()


def crossover_rows(
    frame: pd.DataFrame, reference: tuple[str, str]
) -> tuple[list[str], list[list[str]], dict[tuple[str, str, str], str]]:
    """Crossover lengths of every series vs ``reference`` (time and memory; measured and CAB-fitted).

    Also returns the fitted time crossovers keyed by ``(run, mode, series)`` for the published-figures table.
    """
    variant, backend = reference
    header = [
        "run",
        "mode",
        "series",
        "faster: measured",
        "faster: fitted (CAB)",
        "smaller: measured",
        "smaller: fitted (CAB)",
    ]
    rows: list[list[str]] = []
    fitted_time: dict[tuple[str, str, str], str] = {}
    is_ref = baseline_mask(frame, variant, backend)
    for (run, condition, level, mode, series), group in mode_sorted(frame[~is_ref]).groupby(GROUP_KEYS, sort=False):
        base = frame[
            is_ref
            & (frame["run"] == run)
            & (frame["condition"] == condition)
            & (frame["level"] == level)
            & (frame["mode"] == mode)
        ]
        if base.empty:
            continue
        t_meas, t_fit, t_why = _crossovers(group, base, "time_ms")
        m_meas, m_fit, m_why = _crossovers(group, base, "peak_mem_bytes")
        longest = int(max(group["seq_len"].max(), base["seq_len"].max()))
        t_fit_text = _fitted_text(t_fit, longest) if t_fit else t_why
        rows.append(
            [
                str(run),
                str(mode),
                display_name(str(condition), str(series)),
                _measured_text(t_meas),
                t_fit_text,
                _measured_text(m_meas),
                _fitted_text(m_fit, longest) if m_fit else m_why,
            ]
        )
        fitted_time[(str(run), str(mode), str(series))] = t_fit_text
    return header, rows, fitted_time
