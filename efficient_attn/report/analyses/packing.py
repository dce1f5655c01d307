"""Packed documents (issue 12): packed, padded and alone side by side for each series and mode.

A suite with ``documents`` runs each variant three ways on the same documents (see
:mod:`efficient_attn.harness.schema`): ``packed`` (one sequence, ``document_ids``), ``padded`` (one row per document,
padded to the longest, with a key padding mask) and ``alone`` (each document by itself, one after the other). The
table puts their times and peak memories together, with packed / alone and padded / alone: packing pays off when
packed stays near alone (the documents' own cost) while padded pays for the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_attn.report.format import format_bytes, format_ms

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["packing_rows"]

PACKINGS = ("packed", "padded", "alone")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "-"


def packing_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """One row per run, series, mode and causal flag that ran packed cells."""
    header = ["run", "series", "mode", "documents", "packed", "padded", "alone", "packed / alone", "padded / alone",
              "peak packed", "peak padded", "peak alone"]
    data = frame[frame["packing"].isin(PACKINGS)]
    rows = []
    keys = ["run", "series", "mode", "causal", "documents"]
    for (run, series, mode, causal, documents), group in data.groupby(keys, sort=False):
        by = {p: group[group["packing"] == p] for p in PACKINGS}

        def value(packing: str, column: str) -> float:
            part = by[packing]
            part = part[part["status"] == "ok"]
            return float(part[column].iloc[0]) if not part.empty else float("nan")

        def shown(packing: str, column: str, fmt) -> str:  # noqa: ANN001 - a formatter
            v = value(packing, column)
            if v == v:
                return fmt(v)
            status = by[packing]["status"]
            return status.iloc[0] if not status.empty else "-"

        lengths = [int(n) for n in str(documents).split(",") if n]
        what = f"{len(lengths)} ({sum(lengths)} tokens, {min(lengths)}-{max(lengths)})" if lengths else "-"
        rows.append([
            str(run), str(series), f"{mode}{' causal' if causal else ''}", what,
            *(shown(p, "time_ms", format_ms) for p in PACKINGS),
            _ratio(value("packed", "time_ms"), value("alone", "time_ms")),
            _ratio(value("padded", "time_ms"), value("alone", "time_ms")),
            *(shown(p, "peak_mem_bytes", format_bytes) for p in PACKINGS),
        ])
    return header, rows
