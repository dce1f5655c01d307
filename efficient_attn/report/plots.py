"""PNG plots of a benchmark's results: cost vs sequence length on log-log axes.

Conventions kept in every plot of one report:

- one colour per series (:func:`efficient_attn.report.palette.series_palette`: the variant's colour, the same as
  in the quality report; backends and parameter sets of one variant are shades of its hue; a peer takes the hue
  of the variant it implements);
- peers (other libraries, layer level) are dashed with hollow markers; several runs differ by line style and
  marker shape, named in the legend;
- cells that did not run are not dropped: they are marked along the bottom of the panel at their length
  (``X`` oom, ``v`` over budget, ``x`` skipped after an oom, ``D`` unsupported, ``*`` error), and in ratio plots a
  ``^`` along the top marks a length where the variant ran but the baseline did not fit.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so no global backend is switched and
nothing is imported before a plot is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn.report.load import ABOVE_MAX_LEN
from efficient_attn.report.format import format_bytes, format_ms, format_si, format_x, length_label
from efficient_attn.report.palette import BACKEND_ORDER, VARIANT_COLOURS, series_palette
from efficient_attn.report.series import DEFAULT_BASELINE, modes_in_order, parse_series_spec, references

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

    from efficient_attn.report.load import Run

MODE_TITLE = {"fwd": "forward", "fwd_bwd": "forward + backward", "train_step": "training step",
              "prefill": "prompt into a fresh cache", "decode": "one token per sequence; length = context"}
STATUS_MARKERS = {
    "oom": ("X", "oom"),
    "skipped_budget": ("v", "over budget"),
    ABOVE_MAX_LEN: (">", "above max_len"),
    "skipped_after_oom": ("x", "skipped after oom"),
    "unsupported": ("D", "unsupported"),
    "error": ("*", "error"),
}
RUN_STYLES = (("-", "o"), (":", "s"), ("-.", "^"), ((0, (6, 2, 1, 2, 1, 2)), "D"))
PEER_STYLES = ("--", (0, (3, 1, 1, 1)), (0, (8, 3)), (0, (1, 3)))


@dataclass(frozen=True)
class PlotFile:
    """One written figure: a short kind (``latency``), its title, its path and a one-line caption."""

    kind: str
    title: str
    path: Path
    caption: str


def _series_order(frame: pd.DataFrame) -> list[str]:
    table = frame[["series", "variant", "is_peer", "series_backend"]].drop_duplicates("series")
    known = list(VARIANT_COLOURS)

    def key(row: Any) -> tuple:
        variant_rank = known.index(row.variant) if row.variant in known else len(known)
        backend_rank = BACKEND_ORDER.index(row.series_backend) if row.series_backend in BACKEND_ORDER else 99
        return (bool(row.is_peer), variant_rank, row.variant, backend_rank, row.series)

    return [row.series for row in sorted(table.itertuples(index=False), key=key)]


def _line_style(run_index: int, is_peer: bool) -> tuple[Any, str]:
    linestyle, marker = RUN_STYLES[run_index % len(RUN_STYLES)]
    if is_peer:
        linestyle = PEER_STYLES[run_index % len(PEER_STYLES)]
    return linestyle, marker


def _setting_text(frame: pd.DataFrame) -> str:
    """The configuration shared by every cell, for a subtitle: ``cpu, float32, batch 1, 4 heads, head_dim 64``."""
    parts = []
    for column, fmt in (
        ("device", str),
        ("dtype", str),
        ("batch_size", lambda v: f"batch {int(v)}"),
        ("num_heads", lambda v: f"{int(v)} heads"),
        ("head_dim", lambda v: f"head_dim {int(v)}"),
        ("causal", lambda v: "causal" if v else "non-causal"),
    ):
        values = frame[column].dropna().unique() if column in frame.columns else []
        values = [v for v in values if v != ""]
        if len(values) == 1:
            parts.append(fmt(values[0]))
    levels = sorted(set(frame.loc[~frame["is_peer"], "level"]) - {""})
    if len(levels) == 1:
        parts.append(f"{levels[0]} level (peers: layer)" if frame["is_peer"].any() else f"{levels[0]} level")
    return ", ".join(parts)


def _format_axes(
    ax: Axes, lengths: list[int], yfmt: Callable[[float], str], label_range: tuple[float, float] | None = None
) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    lo, hi = min(lengths), max(lengths)
    ticks = [2**k for k in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(hi))) + 1)]
    if sum(lo <= t <= hi for t in ticks) < 2:  # lengths that are not powers of two, or a single length
        ticks = sorted(set(lengths))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: length_label(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo / 1.25, hi * 1.25)
    ymin, ymax = ax.get_ylim()
    decades = math.log10(ymax / ymin) if ymin > 0 and ymax > ymin else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 2.2 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=15))
    lo_label, hi_label = label_range or (0.0, math.inf)

    def label(v: float, _pos: int) -> str:
        # no value labels inside the strips of status marks
        return yfmt(v) if lo_label / 1.001 <= v <= hi_label * 1.001 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.5)


SLOT = 0.04  # height of one row of status markers, as a fraction of the axes


def _strip_y(slot: int, top: bool) -> float:
    return 1.0 - 0.035 - SLOT * slot if top else 0.035 + SLOT * slot


def _row_limits(values: list[float], bottom_slots: int, top_slots: int) -> tuple[float, float]:
    """Log-scale y limits holding ``values`` with empty strips below/above for the status markers."""
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if not finite:
        return 1.0, 10.0
    lo, hi = math.log10(min(finite)), math.log10(max(finite))
    span = max(hi - lo, 0.3)
    fb = 0.06 + (SLOT * bottom_slots + 0.02 if bottom_slots else 0.0)
    ft = 0.06 + (SLOT * top_slots + 0.02 if top_slots else 0.0)
    total = span / (1.0 - fb - ft)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    return 10 ** (lo - fb * total), 10 ** (hi + ft * total)


def _strip_edges(ylim: tuple[float, float], bottom: int, top: int) -> tuple[float, float]:
    """The y values where the bottom strip ends and the top strip begins (everything between is data)."""
    lo, hi = math.log10(ylim[0]), math.log10(ylim[1])
    b = SLOT * bottom + 0.02 if bottom else 0.0
    t = SLOT * top + 0.02 if top else 0.0
    return 10 ** (lo + b * (hi - lo)), 10 ** (hi - t * (hi - lo))


def _shade_strips(ax: Axes, bottom: int, top: int) -> None:
    from matplotlib.patches import Rectangle

    for y0, height in ((0.0, SLOT * bottom + 0.02 if bottom else 0.0), (1.0 - SLOT * top - 0.02, SLOT * top + 0.02)):
        if height > 0.02 and (y0 == 0.0 or top):
            ax.add_patch(
                Rectangle((0, y0), 1, height, transform=ax.transAxes, color="0.5", alpha=0.08, lw=0, zorder=0)
            )


def _mark(ax: Axes, x: float, row_slot: int, marker: str, colour: str, top: bool, hollow: bool = False) -> None:
    ax.plot(
        [x],
        [_strip_y(row_slot, top)],
        marker=marker,
        color=colour,
        markerfacecolor="white" if hollow else colour,
        markersize=7,
        markeredgewidth=1.6,
        linestyle="none",
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
    )


@dataclass
class _PanelResult:
    marked: set[str]
    drawn: set[str]
    values: list[float]
    bottom_slots: int
    top_slots: int


def _draw_panel(
    ax: Axes,
    panel: pd.DataFrame,
    value: str,
    palette: dict[str, str],
    run_index: dict[str, int],
    order: list[str],
    base_failed_col: str | None,
) -> _PanelResult:
    """Lines for ``ok`` cells (median over repeats), markers for the others."""
    result = _PanelResult(set(), set(), [], 0, 0)
    bottom_slots: dict[tuple[str, str], int] = {}
    top_slots: dict[tuple[str, int], str] = {}
    for series in order:
        for run, rows in panel[panel["series"] == series].groupby("run", sort=False):
            colour = palette[series]
            is_peer = bool(rows["is_peer"].iloc[0])
            linestyle, marker = _line_style(run_index[str(run)], is_peer)
            ok = rows[(rows["status"] == "ok") & rows[value].notna() & (rows[value] > 0)]
            if not ok.empty:
                curve = ok.groupby("seq_len")[value].median().sort_index()
                ax.plot(
                    curve.index.to_numpy(),
                    curve.to_numpy(),
                    color=colour,
                    linestyle=linestyle,
                    marker=marker,
                    markersize=5,
                    markerfacecolor="white" if is_peer else colour,
                    markeredgecolor=colour,
                    linewidth=1.6,
                )
                result.values += [float(v) for v in curve]
                result.drawn.add(series)
            failed = rows[rows["status"] != "ok"]
            if not failed.empty:  # marked by the status a report shows (a max_len cut is not "over budget")
                # one strip row per series; a later run's marks sit a little to the right, hollow
                slot = bottom_slots.setdefault((series, ""), len(bottom_slots))
                k = run_index[str(run)]
                for status, cells in failed.groupby("shown_status", sort=False):
                    symbol = STATUS_MARKERS[str(status)][0]
                    for n in sorted(set(cells["seq_len"])):
                        _mark(ax, n * 1.07**k, slot, symbol, colour, top=False, hollow=k > 0)
                    result.marked.add(str(status))
                result.drawn.add(series)
            if base_failed_col is not None:
                for n, status in rows.loc[rows[base_failed_col], ["seq_len", "base_status"]].itertuples(index=False):
                    top_slots.setdefault((str(run), int(n)), str(status))
    # one grey mark per length (and run) where the reference did not fit but variants ran: it is a fact about
    # the reference, so it is not repeated per series
    runs_with_marks = sorted({run for run, _ in top_slots}, key=lambda r: run_index[r])
    labelled = set()  # (run, status): a run of marks with one status is labelled once, left of its first mark
    for (run, n), status in sorted(top_slots.items(), key=lambda item: item[0][1]):
        slot = runs_with_marks.index(run)
        _mark(ax, n, slot, "^", "0.35", top=True)
        if (run, status) in labelled:
            continue
        labelled.add((run, status))
        label = f"reference {STATUS_MARKERS[status][1]}" if status in STATUS_MARKERS else "reference failed"
        ax.text(
            n / 1.12,
            _strip_y(slot, True),
            label + (f" ({run})" if len(run_index) > 1 else ""),
            transform=ax.get_xaxis_transform(),
            ha="right",
            va="center",
            fontsize=7.5,
            color="0.3",
        )
    if top_slots:
        result.marked.add("base_failed")
    result.bottom_slots, result.top_slots = len(bottom_slots), len(runs_with_marks)
    return result


def _legend_handles(
    order: list[str],
    palette: dict[str, str],
    runs: list[str],
    has_peers: bool,
    marked: set[str],
    extra: list[Any],
) -> list[Any]:
    from matplotlib.lines import Line2D

    handles: list[Any] = [Line2D([], [], color=palette[s], linewidth=2.2, label=s) for s in order]
    if len(runs) > 1:
        handles.append(Line2D([], [], linestyle="none", label=" "))
        for i, run in enumerate(runs):
            linestyle, marker = _line_style(i, False)
            handles.append(Line2D([], [], color="0.3", linestyle=linestyle, marker=marker, label=f"run: {run}"))
    if has_peers:
        handles.append(
            Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white", label="peer library")
        )
    if marked:
        handles.append(Line2D([], [], linestyle="none", label=" "))
        for status, (symbol, text) in STATUS_MARKERS.items():
            if status in marked:
                handles.append(Line2D([], [], color="0.3", marker=symbol, linestyle="none", label=f"{text} (cell)"))
        if len(runs) > 1 and marked - {"base_failed"}:
            handles.append(
                Line2D(
                    [], [], color="0.3", marker="X", markerfacecolor="white", linestyle="none", label="hollow: later run"
                )
            )
        if "base_failed" in marked:
            handles.append(Line2D([], [], color="0.35", marker="^", linestyle="none", label="reference did not fit"))
    return handles + extra


def _figure(nrows: int, ncols: int, dpi: int, legend_rows: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = max(3.4 * nrows + 0.8, 0.2 * legend_rows + 1.0)
    fig = Figure(figsize=(3.9 * ncols + 2.9, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey="row")
    return fig, axes


def _metric_figure(
    frame: pd.DataFrame,
    value: str,
    ylabel: str,
    yfmt: Callable[[float], str],
    title: str,
    path: Path,
    palette: dict[str, str],
    runs: list[str],
    dpi: int,
    hlines: list[tuple[float, str, str, Any]] | None = None,
    rows: list[tuple[str, pd.DataFrame, str | None]] | None = None,
    parity: bool = False,
) -> None:
    """Panels: one column per mode; ``rows`` = ``(row title, frame, base_failed column)`` (default: one row)."""
    import seaborn as sns
    from matplotlib.lines import Line2D

    rows = rows or [("", frame, None)]
    modes = modes_in_order(frame["mode"])
    order = [s for s in _series_order(frame) if s in set().union(*(set(r[1]["series"]) for r in rows))]
    run_index = {run: i for i, run in enumerate(runs)}
    lengths = sorted(set(frame["seq_len"]))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.05):
        legend_rows = len(order) + len(runs) + 8
        fig, axes = _figure(len(rows), len(modes), dpi, legend_rows)
        marked: set[str] = set()
        drawn: set[str] = set()
        extra: list[Any] = []
        for r, (row_title, data, base_failed_col) in enumerate(rows):
            row_values: list[float] = [1.0] if parity else []
            row_values += [y for y, *_ in hlines or []]
            bottom = top = 0
            for c, mode in enumerate(modes):
                ax = axes[r][c]
                ax.set_yscale("log")
                panel = data[data["mode"] == mode]
                res = _draw_panel(ax, panel, value, palette, run_index, order, base_failed_col)
                marked |= res.marked
                drawn |= res.drawn
                row_values += res.values
                bottom, top = max(bottom, res.bottom_slots), max(top, res.top_slots)
                if parity:
                    ax.axhline(1.0, color="0.45", linewidth=1.0, linestyle="-", zorder=1)
                for y, label, colour, linestyle in hlines or []:
                    ax.axhline(y, color=colour, linewidth=1.2, linestyle=linestyle, zorder=1)
                    if r == 0 and c == 0:
                        extra.append(Line2D([], [], color=colour, linestyle=linestyle, label=label))
                if not res.values:
                    ax.text(0.5, 0.62, "no cell ran", transform=ax.transAxes, ha="center", color="0.4")
                head = f"{mode} ({MODE_TITLE[mode]})" if mode in MODE_TITLE else mode
                ax.set_title(f"{row_title}: {head}" if row_title else head, fontsize=10)
                ax.set_xlabel("sequence length (tokens)" if r == len(rows) - 1 else "")
                ax.set_ylabel(ylabel if c == 0 else "")
            ylim = _row_limits(row_values, bottom, top)
            axes[r][0].set_ylim(*ylim)
            strip_lo, strip_hi = _strip_edges(ylim, bottom, top)
            for c in range(len(modes)):
                _format_axes(axes[r][c], lengths, yfmt, (strip_lo, strip_hi))
                _shade_strips(axes[r][c], bottom, top)
        if parity:
            extra.append(Line2D([], [], color="0.45", linewidth=1.0, label="parity (1x)"))
        shown = [s for s in order if s in drawn]
        has_peers = bool(frame.loc[frame["series"].isin(shown), "is_peer"].any())
        handles = _legend_handles(shown, palette, runs, has_peers, marked, extra)
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8.5)
        setting = _setting_text(frame)
        fig.suptitle(f"{title}\n{setting}" if setting else title, fontsize=11)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def _memory_lines(runs: list[Run]) -> list[tuple[float, str, str, Any]]:
    lines = []
    several = len(runs) > 1
    for i, run in enumerate(runs):
        prefix = f"{run.label}: " if several else ""
        budget = run.info.budget_bytes
        if budget is not None:
            lines.append((budget, f"{prefix}memory budget ({format_bytes(budget)})", "#c0392b", (0, (5, 2 + i))))
        total = run.info.device_memory_bytes
        if total is not None and (budget is None or abs(total - budget) > 1e-6 * total):
            lines.append((total, f"{prefix}device memory ({format_bytes(total)})", "#7b241c", (0, (1, 1 + i))))
    return lines


def make_plots(
    frame: pd.DataFrame,
    runs: list[Run],
    out_dir: str | Path,
    *,
    baseline: str = DEFAULT_BASELINE,
    dpi: int = 110,
) -> list[PlotFile]:
    """Write every plot of a report into ``out_dir``; one set per condition when conditions vary.

    Plots: latency, peak memory (with each run's budget and device memory as lines), throughput (tokens/s),
    speed-up and memory saving vs ``baseline`` and vs ``full:sdpa``, achieved useful FLOP/s.
    """
    from efficient_attn.report.analyses.tables import relative_to_baseline

    base_variant, base_backend = parse_series_spec(baseline)
    out = Path(out_dir)
    palette = series_palette(frame)
    labels = [run.label for run in runs]
    written: list[PlotFile] = []
    for condition, data in frame.groupby("condition", sort=False):
        suffix = "" if not condition else "__" + "".join(ch if ch.isalnum() else "_" for ch in condition).strip("_")
        cond_title = f" [{condition}]" if condition else ""

        def target(kind: str, suffix: str = suffix) -> Path:
            return out / f"{kind}{suffix}.png"

        specs = [
            ("latency", "time_ms", "median time per call", format_ms, "Latency vs sequence length", None),
            (
                "memory",
                "peak_mem_bytes",
                "peak memory",
                format_bytes,
                "Peak memory vs sequence length",
                _memory_lines(runs),
            ),
            (
                "throughput",
                "tokens_per_s",
                "tokens / s",
                lambda v: format_si(v, ""),
                "Throughput vs sequence length",
                None,
            ),
        ]
        for kind, value, ylabel, yfmt, title, hlines in specs:
            path = target(kind)
            _metric_figure(data, value, ylabel, yfmt, title + cond_title, path, palette, labels, dpi, hlines)
            written.append(PlotFile(kind, title + cond_title, path, _CAPTIONS[kind]))
        flop_rows = [
            (label, data.assign(rate=data[column]), None)
            for label, column in (("computed FLOPs", "flops_per_s"), ("useful FLOPs", "useful_flops_per_s"))
            if data.loc[data["status"] == "ok", column].notna().any()
        ]
        if flop_rows:  # nothing to draw when the harness recorded no FLOP counts
            title = "Achieved FLOP/s (FLOPs per call / time)"
            path = target("flops")
            _metric_figure(
                data, "rate", "FLOP/s", lambda v: format_si(v, "FLOP/s"), title + cond_title, path, palette, labels, dpi,
                rows=flop_rows,
            )
            written.append(PlotFile("flops", title + cond_title, path, _CAPTIONS["flops"]))
        ratio_rows_t, ratio_rows_m = [], []
        for variant, backend in references((base_variant, base_backend)):
            rel = relative_to_baseline(data, variant, backend)
            rel = rel[rel["base_status"] != ""]
            if rel.empty:
                continue
            ratio_rows_t.append((f"vs {variant}:{backend}", rel, "base_failed"))
            ratio_rows_m.append((f"vs {variant}:{backend}", rel, "base_failed"))
        for kind, value, ylabel, title, rows in (
            ("speedup", "speedup", "speed-up (x, higher = faster)", "Speed-up vs reference", ratio_rows_t),
            (
                "memory_ratio",
                "memory_saving",
                "memory saving (x, higher = smaller)",
                "Memory saving vs reference",
                ratio_rows_m,
            ),
        ):
            if not rows:
                continue
            path = target(kind)
            ratio_frame = rows[0][1] if len(rows) == 1 else _concat([r[1] for r in rows])
            _metric_figure(
                ratio_frame,
                value,
                ylabel,
                format_x,
                title + cond_title,
                path,
                palette,
                labels,
                dpi,
                rows=rows,
                parity=True,
            )
            written.append(PlotFile(kind, title + cond_title, path, _CAPTIONS[kind]))
    return written


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


_CAPTIONS = {
    "latency": "Median time per call; lower is better. Marks along the bottom: cells that did not run.",
    "memory": "Peak memory per call (tensor bytes on CPU, allocator peak on CUDA); red lines: budget / device memory.",
    "throughput": "Tokens processed per second (batch x length / time); higher is better.",
    "flops": "Computed FLOPs (what the backend really does) and useful FLOPs (the pairs the pattern needs, QK^T and "
    "PV) per second; a backend that computes more than it needs (a dense mask) has a high computed but a low "
    "useful rate. Series without FLOP counts are not drawn.",
    "speedup": "Reference time / variant time at each length; above 1x the variant is faster. "
    "Grey triangles along the top: lengths where the reference did not fit but the variants marked there ran.",
    "memory_ratio": "Reference peak memory / variant peak memory; above 1x the variant is smaller. "
    "Grey triangles along the top: the reference did not fit at that length.",
}
