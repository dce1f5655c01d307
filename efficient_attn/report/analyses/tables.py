"""Comparisons: ratios against a baseline, the LRA-style and published-figures tables, and runs against each other.

Published figures (measured on other hardware, with other models and settings; shown for orientation only):

- Tay et al. 2021, "Long Range Arena", arXiv:2011.04006, Table 2 (TPU v3, byte-level text, batch 32): speed
  relative to the vanilla Transformer at 1K/2K/3K/4K, peak memory at 4K.
- Wang et al. 2020, "Linformer", arXiv:2006.04768, Table 3 (V100, inference): time and memory saved at n=16384.
- Xiong et al. 2021, "Nystromformer", arXiv:2102.03902, Table 1 (n=8192): memory and time saved.
- Zhang et al. 2023, "CAB: Comprehensive Attention Benchmarking", arXiv:2210.07661: efficiency lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from efficient_attn.report.format import length_label
from efficient_attn.report.load import ABOVE_MAX_LEN, FAILED_TO_FIT
from efficient_attn.report.series import baseline_mask, display_name, mode_sorted

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run

LRA_LENGTHS = (1024, 2048, 4096)
PUBLISHED_NOTE = "published, other hardware"

# LRA Table 2: speed-up vs vanilla at 1K, 2K, 3K, 4K.
LRA_SPEED: dict[str, tuple[float, float, float, float]] = {
    "Local": (1.1, 1.7, 3.2, 5.3),
    "Linformer": (1.2, 1.9, 3.7, 5.5),
    "BigBird": (0.9, 0.8, 1.2, 1.1),
    "Performer": (1.2, 1.9, 3.8, 5.7),
}
LRA_SPEED_LENGTHS = (1024, 2048, 3072, 4096)
# LRA Table 2: peak memory at 4K, GB.
LRA_MEMORY_4K_GB: dict[str, float] = {"Transformer": 9.48, "Local": 1.37, "Linformer": 0.99, "BigBird": 2.88}
# Our registry key -> the LRA row it corresponds to.
LRA_NAME: dict[str, str] = {"window": "Local", "linformer": "Linformer", "bigbird": "BigBird", "performer": "Performer"}


@dataclass(frozen=True)
class PublishedFigure:
    """One published "X times faster / smaller at length n" figure, and which of our variants it matches."""

    source: str
    hardware: str
    method: str
    ours: tuple[str, ...]
    seq_len: int | None
    speedup: float | None = None
    memory_saving: float | None = None
    efficiency_length: int | None = None


PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("Linformer Table 3", "V100, inference", "Linformer k=128", ("linformer",), 16384, 8.6, 56.0),
    PublishedFigure("Linformer Table 3", "V100, inference", "Linformer k=256", ("linformer",), 16384, 7.8, 48.0),
    PublishedFigure("Nystromformer Table 1", "1080Ti", "Linformer-256", ("linformer",), 8192, 13.8, 16.1),
    PublishedFigure("Nystromformer Table 1", "1080Ti", "Longformer-257", ("window", "longformer"), 8192, 4.3, 22.5),
    PublishedFigure("CAB", "GPU", "Performer", ("performer",), None, efficiency_length=2361),
    PublishedFigure("CAB", "GPU", "Nystromformer", ("nystrom",), None, efficiency_length=3045),
    PublishedFigure("CAB", "GPU", "local", ("window",), None, efficiency_length=4195),
)


def relative_to_baseline(frame: pd.DataFrame, variant: str, backend: str) -> pd.DataFrame:
    """Every cell next to the baseline's cell of the same run, condition, level, mode and length.

    Adds ``speedup`` (baseline time / time: above 1 = faster), ``memory_saving`` (baseline peak memory / peak
    memory: above 1 = smaller), ``base_status`` (empty where the baseline has no such cell) and ``base_failed``
    (the cell ran but the baseline did not fit: oom / over budget). The baseline's own rows are left out. Peers are
    compared only where the baseline was measured at their level (``layer``), never core against layer.
    """
    import pandas as pd

    keys = ["run", "condition", "level", "mode", "seq_len"]
    is_base = baseline_mask(frame, variant, backend)
    base = frame[is_base]
    if base.empty:
        return frame.iloc[0:0].assign(speedup=[], memory_saving=[], base_status=[], base_failed=[])
    # one baseline cell per key (several parameter sets of the baseline: the first listed)
    base = base.groupby(keys, sort=False, as_index=False).agg(
        base_time_ms=("time_ms", "median"),
        base_mem_bytes=("peak_mem_bytes", "median"),
        base_status=("shown_status", "first"),
    )
    others = frame[~is_base]
    merged = others.merge(base, on=keys, how="left")
    merged["base_status"] = merged["base_status"].fillna("")
    merged["speedup"] = merged["base_time_ms"] / merged["time_ms"]
    merged["memory_saving"] = merged["base_mem_bytes"] / merged["peak_mem_bytes"]
    merged["base_failed"] = (merged["status"] == "ok") & merged["base_status"].isin((*FAILED_TO_FIT, ABOVE_MAX_LEN))
    return pd.DataFrame(merged)


def _fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _cell_text(rel: pd.DataFrame, column: str, seq_len: int) -> str:
    """Our ratio at ``seq_len`` for one series: ``2.10x``, ``inf (baseline oom)``, ``oom``, ``-``."""
    rows = rel[rel["seq_len"] == seq_len]
    if rows.empty:
        return "-"
    row = rows.iloc[0]
    if row["status"] != "ok":
        return str(row["shown_status"])
    if bool(row["base_failed"]):
        return f"baseline {row['base_status']}"
    return _fmt_ratio(float(row[column]))


def lra_table(frame: pd.DataFrame, variant: str, backend: str) -> tuple[list[str], list[list[str]]]:
    """LRA-style table: our speed-up and memory saving at 1K/2K/4K vs the baseline, LRA's published beside.

    Returns ``(header, rows)``; one row per run, condition, mode and series (peers and the baseline excluded).
    """
    rel = relative_to_baseline(frame, variant, backend)
    header = [
        "run",
        "mode",
        "series",
        *[f"speed {n // 1024}K" for n in LRA_LENGTHS],
        *[f"memory {n // 1024}K" for n in LRA_LENGTHS],
        f"LRA speed 1K/2K/4K ({PUBLISHED_NOTE}: TPU v3)",
        f"LRA memory 4K ({PUBLISHED_NOTE}: TPU v3)",
    ]
    rows: list[list[str]] = []
    if rel.empty:
        return header, rows
    rel = rel[~rel["is_peer"]]
    for (run, condition, mode, series), group in rel.groupby(["run", "condition", "mode", "series"], sort=False):
        name = display_name(str(condition), str(series))
        lra = LRA_NAME.get(str(group["variant"].iloc[0]))
        if lra is not None:
            speeds = LRA_SPEED[lra]
            published_speed = " / ".join(f"{speeds[LRA_SPEED_LENGTHS.index(n)]:.1f}x" for n in LRA_LENGTHS)
            gb = LRA_MEMORY_4K_GB.get(lra)
            vanilla = LRA_MEMORY_4K_GB["Transformer"]
            published_mem = f"{gb:.2f} GB vs {vanilla:.2f} GB ({vanilla / gb:.1f}x)" if gb else "-"
            published_speed = f"{lra}: {published_speed}"
        else:
            published_speed, published_mem = "-", "-"
        rows.append(
            [
                str(run),
                str(mode),
                name,
                *[_cell_text(group, "speedup", n) for n in LRA_LENGTHS],
                *[_cell_text(group, "memory_saving", n) for n in LRA_LENGTHS],
                published_speed,
                published_mem,
            ]
        )
    return header, rows


def published_table(
    frame: pd.DataFrame, variant: str, backend: str, efficiency_lengths: dict[tuple[str, str, str], str]
) -> tuple[list[str], list[list[str]]]:
    """Linformer, Nystromformer and CAB figures beside ours at the same length (or our efficiency length).

    ``efficiency_lengths`` maps ``(run, mode, series)`` to our fitted crossover text vs the baseline.
    """
    rel = relative_to_baseline(frame, variant, backend)
    header = ["source (" + PUBLISHED_NOTE + ")", "hardware", "method", "n", "published", "ours: run, series", "ours"]
    rows: list[list[str]] = []
    for fig in PUBLISHED:
        if fig.efficiency_length is not None:
            published = f"efficiency length {fig.efficiency_length:,}"
        else:
            published = f"{fig.speedup}x time, {fig.memory_saving}x memory"
        n_text = f"{fig.seq_len:,}" if fig.seq_len else "-"
        matches = [] if rel.empty else rel[rel["variant"].isin(fig.ours) & ~rel["is_peer"]]
        found = False
        if len(matches):
            for (run, series), group in matches.groupby(["run", "series"], sort=False):
                parts = []
                for mode, mode_rows in group.groupby("mode", sort=False):
                    if fig.efficiency_length is not None:
                        text = efficiency_lengths.get((str(run), str(mode), str(series)))
                        if text:
                            parts.append(f"{mode}: efficiency length {text}")
                    else:
                        time = _cell_text(mode_rows, "speedup", int(fig.seq_len or 0))
                        mem = _cell_text(mode_rows, "memory_saving", int(fig.seq_len or 0))
                        if time == mem and time.startswith("baseline"):
                            parts.append(f"{mode}: {time}")
                        elif time != "-" or mem != "-":
                            parts.append(f"{mode}: {time} time, {mem} memory")
                if parts:
                    found = True
                    ours = f"{run}, {series}"
                    rows.append([fig.source, fig.hardware, fig.method, n_text, published, ours, "; ".join(parts)])
        if not found:
            rows.append([fig.source, fig.hardware, fig.method, n_text, published, "-", "not measured in these runs"])
    return header, rows


def run_comparison_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Each later run against the first (before vs after, CPU vs GPU): time and memory ratios per series and mode.

    ``first / later``: above 1x the later run is faster (smaller). Given at the longest length both ran, and as
    the geometric mean over every length both ran.
    """
    header = ["series", "mode", "runs (first / later)", "lengths both ran", "time ratio", "memory ratio"]
    rows: list[list[str]] = []
    if len(runs) < 2:
        return header, rows
    ok = frame[frame["status"] == "ok"]
    keys = ["condition", "level", "mode", "series", "seq_len"]
    first = ok[ok["run"] == runs[0].label].groupby(keys)[["time_ms", "peak_mem_bytes"]].median()
    for later in runs[1:]:
        other = ok[ok["run"] == later.label].groupby(keys)[["time_ms", "peak_mem_bytes"]].median()
        both = first.reset_index().merge(other.reset_index(), on=keys, how="inner", suffixes=("_a", "_b"))
        for (condition, _level, mode, series), group in mode_sorted(both.assign(run="")).groupby(
            ["condition", "level", "mode", "series"], sort=False
        ):
            group = group.sort_values("seq_len")
            texts = []
            for column in ("time_ms", "peak_mem_bytes"):
                ratio = (group[f"{column}_a"] / group[f"{column}_b"]).dropna()
                ratio = ratio[ratio > 0]
                if ratio.empty:
                    texts.append("-")
                    continue
                geo = math.exp(float(np.log(ratio).mean()))
                texts.append(f"{ratio.iloc[-1]:.2f}x at {length_label(group['seq_len'].iloc[-1])} (mean {geo:.2f}x)")
            lengths = f"{length_label(group['seq_len'].min())}-{length_label(group['seq_len'].max())} ({len(group)})"
            rows.append(
                [display_name(str(condition), str(series)), str(mode), f"{runs[0].label} / {later.label}", lengths, *texts]
            )
    return header, rows
