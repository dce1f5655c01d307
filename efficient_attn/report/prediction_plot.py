"""PNG of predicted beside measured peak memory (issue 18 item 3): per mode, each series' measured peak (solid,
filled markers) and the harness's fake-tensor prediction (``predicted_mem_bytes``; dotted, hollow markers), so a
reader sees where the predictor is off and what it says at lengths that were not measured.

Same conventions as :mod:`efficient_attn.report.plots` (one colour per series, Agg canvas, nothing imported before
a plot is asked for). One figure per run; none when no cell has a prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from efficient_attn.report.format import format_bytes
from efficient_attn.report.palette import series_palette
from efficient_attn.report.plots import PlotFile, _format_axes, _series_order
from efficient_attn.report.series import modes_in_order

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["make_prediction_plots"]

CAPTION = ("Peak memory per call: measured (solid, filled) and the harness's prediction before the cell ran "
           "(dotted, hollow). A dotted point without a solid one is a cell that was not measured (over budget, "
           "above max_len): the prediction alone.")
TITLE = "Predicted vs measured peak memory"


def make_prediction_plots(frame: pd.DataFrame, out_dir: str | Path, *, dpi: int = 110) -> list[PlotFile]:
    """One ``memory_predicted.png`` per run and condition holding predictions (``__runN`` suffixed when several
    runs, ``__<condition>`` when conditions vary, as the other plots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    out = Path(out_dir)
    written: list[PlotFile] = []
    several = frame["run"].nunique() > 1
    runs = list(frame["run"].unique())
    for (run, condition), data in frame.groupby(["run", "condition"], sort=False):
        if not data["predicted_mem_bytes"].gt(0).any():
            continue
        palette, order = series_palette(data), _series_order(data)
        modes = modes_in_order(data["mode"].unique())
        fig = Figure(figsize=(4.4 * len(modes) + 3.2, 4.4), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(modes), squeeze=False, sharey=True)[0]
        lengths = sorted(int(n) for n in data["seq_len"].unique())
        shown: list[str] = []
        for ax, mode in zip(axes, modes, strict=True):
            panel = data[data["mode"] == mode]
            ax.set_yscale("log")
            for series in order:
                rows = panel[panel["series"] == series].sort_values("seq_len")
                colour = palette.get(series, "0.3")
                measured = rows[(rows["status"] == "ok") & rows["peak_mem_bytes"].gt(0)]
                predicted = rows[rows["predicted_mem_bytes"].gt(0)]
                if not measured.empty:
                    ax.plot(measured["seq_len"], measured["peak_mem_bytes"], color=colour, marker="o",
                            markersize=5, linewidth=1.6)
                if not predicted.empty:
                    ax.plot(predicted["seq_len"], predicted["predicted_mem_bytes"], color=colour, marker="o",
                            markersize=9, markerfacecolor="none", linestyle=":", linewidth=1.4)
                if (not measured.empty or not predicted.empty) and series not in shown:
                    shown.append(series)
            ax.set_title(str(mode), fontsize=10)
            ax.set_xlabel("sequence length (tokens)")
            _format_axes(ax, lengths, format_bytes)
        axes[0].set_ylabel("peak memory per call")
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: format_bytes(v)))
        handles = [Line2D([], [], color=palette.get(s, "0.3"), marker="o", label=s) for s in shown]
        handles += [
            Line2D([], [], color="0.3", marker="o", label="measured"),
            Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle=":", label="predicted"),
        ]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8.5)
        labels = ([str(run)] if several else []) + ([str(condition)] if condition else [])
        tag = f" [{', '.join(labels)}]" if labels else ""
        fig.suptitle(TITLE + tag, fontsize=11)
        suffix = f"__run{runs.index(run) + 1}" if several else ""
        if condition:  # the same file-name rule as the other plots (one figure per condition)
            suffix += "__" + "".join(ch if ch.isalnum() else "_" for ch in str(condition)).strip("_")
        path = out / f"memory_predicted{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        written.append(PlotFile("memory_predicted", TITLE + tag, path, CAPTION))
    return written
