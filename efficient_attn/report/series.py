"""Which rows of the tidy frame make a series: the baseline selector, the references, the mode order, names.

The baseline (``--baseline VARIANT:BACKEND``, default ``full:naive``) is the series every ratio, crossover and the
LRA-style table is taken against. :func:`baseline_mask` is the one place that says which rows are that series: our
own (not a peer's) rows of ``variant`` whose backend (``series_backend``, ``auto`` resolved) is ``backend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_attn import vocab

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_BASELINE",
    "GROUP_KEYS",
    "SDPA",
    "available_baselines",
    "baseline_mask",
    "display_name",
    "mode_sorted",
    "modes_in_order",
    "parse_series_spec",
    "references",
]

DEFAULT_BASELINE = "full:naive"
#: the second reference every report also compares against (the fused dense kernel)
SDPA = ("full", "sdpa")
#: one series of one run under one condition, level and mode: the unit every analysis and plot line works on
GROUP_KEYS = ["run", "condition", "level", "mode", "series"]


def parse_series_spec(spec: str) -> tuple[str, str]:
    """``"full:naive"`` -> ``("full", "naive")``: the baseline a report compares against."""
    variant, sep, backend = spec.partition(":")
    if not sep or not variant or not backend:
        raise ValueError(f"baseline {spec!r}: expected VARIANT:BACKEND, e.g. 'full:naive' or 'full:sdpa'")
    return variant, backend


def baseline_mask(frame: pd.DataFrame, variant: str, backend: str) -> pd.Series:
    """True for the rows of the reference series ``variant:backend`` (ours, never a peer's)."""
    return (frame["variant"] == variant) & (frame["series_backend"] == backend) & ~frame["is_peer"]


def available_baselines(frame: pd.DataFrame) -> list[str]:
    """Every ``VARIANT:BACKEND`` a report could take as its baseline (our own series, sorted)."""
    ours = frame[~frame["is_peer"]]
    return sorted(set(ours["variant"] + ":" + ours["series_backend"]))


def references(baseline: tuple[str, str]) -> list[tuple[str, str]]:
    """The baseline, then ``full:sdpa`` when it is another series: the references of crossovers and ratio plots."""
    return [baseline] if baseline == SDPA else [baseline, SDPA]


def modes_in_order(modes: object) -> list[str]:
    """The distinct modes of ``modes`` in :data:`efficient_attn.vocab.MODES` order (unknown ones last, as found)."""
    present = list(dict.fromkeys(modes))  # type: ignore[call-overload]
    return [m for m in vocab.MODES if m in present] + [m for m in present if m not in vocab.MODES]


def mode_sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by run, condition and mode, so tables list modes in vocabulary order."""
    rank = {m: i for i, m in enumerate(vocab.MODES)}
    ranked = frame.assign(_m=frame["mode"].map(lambda m: rank.get(m, len(rank))))
    return ranked.sort_values(["run", "condition", "_m"])


def display_name(condition: str, series: str) -> str:
    """A series as a table shows it: ``window:torch`` or ``window:torch (causal)`` when conditions vary."""
    return f"{series} ({condition})" if condition else series
