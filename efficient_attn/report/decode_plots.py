"""PNG plots of decode rows (issue 13): per-token latency and cache bytes against the context (log-log, one panel
per batch size, full's bandwidth bound drawn in), and tokens/s against the batch at a few contexts.

Same conventions as :mod:`efficient_attn.report.plots`: one colour per series (:func:`series_palette`), peers
dashed with hollow markers; figures on the Agg canvas, nothing imported before a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from efficient_attn.report.analyses.decode import is_full_decoder, decode_rows, kv_read_bytes
from efficient_attn.report.format import format_bytes, format_ms, format_si, length_label
from efficient_attn.report.palette import series_palette
from efficient_attn.report.plots import PlotFile, _format_axes, _series_order

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["make_decode_plots"]

CAPTIONS = {
    "decode_latency": "Median time of one decode step (one new token per sequence) against the context it attends to; "
    "lower is better. Black dotted: full attention's bandwidth bound (its keys and values read once at the copy "
    "bandwidth recorded in the same run).",
    "decode_cache": "Exact bytes of the decode cache at each context (capacity included): a growing key/value cache "
    "rises with the context, a rolling window and a recurrent state stay flat.",
    "decode_batch": "New tokens per second (batch / step time) against the batch size, at a few contexts.",
}


def _figure(ncols: int, dpi: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols + 3.2, 4.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False, sharey=True)[0]


def _lines(ax: Any, data: pd.DataFrame, x: str, y: str, order: list[str], palette: dict[str, str]) -> None:
    for series in order:
        group = data[data["series"] == series].sort_values(x)
        if group.empty:
            continue
        peer = bool(group["is_peer"].iloc[0])
        colour = palette.get(series, "0.3")
        ax.plot(group[x], group[y], linestyle="--" if peer else "-", marker="o", color=colour,
                markerfacecolor="white" if peer else colour, label=series, linewidth=1.6, markersize=4.5)


def _finish(fig: Any, axes: Any, title: str, path: Path) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    seen: dict[str, Any] = dict(zip(labels, handles))
    for ax in axes[1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", frameon=False, fontsize=8.5)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _per_batch(data: pd.DataFrame, value: str, ylabel: str, yfmt: Callable[[float], str], title: str, path: Path,
               dpi: int, bound: bool) -> None:
    from matplotlib.ticker import FuncFormatter

    palette, order = series_palette(data), _series_order(data)
    batches = sorted(int(b) for b in data["batch_size"].unique())
    fig, axes = _figure(len(batches), dpi)
    lengths = sorted(int(n) for n in data["seq_len"].unique())
    for ax, batch in zip(axes, batches):
        panel = data[data["batch_size"] == batch]
        ax.set_yscale("log")
        _lines(ax, panel, "seq_len", value, order, palette)
        if bound:
            full = panel[[is_full_decoder(r) and not r["is_peer"] for _, r in panel.iterrows()]].sort_values("seq_len")
            if not full.empty:
                bound_ms = [1e3 * kv_read_bytes(r) / float(r["bandwidth_bytes_per_s"]) for _, r in full.iterrows()]
                ax.plot(full["seq_len"], bound_ms, linestyle=":", color="black", linewidth=1.4,
                        label="full: bandwidth bound")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xlabel("context (tokens in the cache)")
        _format_axes(ax, lengths, yfmt)
    axes[0].set_ylabel(ylabel)
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: yfmt(v)))
    _finish(fig, axes, title, path)


def _per_context(data: pd.DataFrame, path: Path, dpi: int) -> bool:
    palette, order = series_palette(data), _series_order(data)
    lengths = sorted(int(n) for n in data["seq_len"].unique())
    picks = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
    if data["batch_size"].nunique() < 2:
        return False
    fig, axes = _figure(len(picks), dpi)
    batches = sorted(int(b) for b in data["batch_size"].unique())
    for ax, n in zip(axes, picks):
        panel = data[data["seq_len"] == n]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _lines(ax, panel, "batch_size", "tokens_per_s", order, palette)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"context {length_label(n)}", fontsize=10)
        ax.set_xlabel("batch size (sequences decoding at once)")
        ax.grid(True, which="major", alpha=0.5)
    axes[0].set_ylabel("new tokens / s")
    from matplotlib.ticker import FuncFormatter

    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: format_si(v, "")))
    _finish(fig, axes, "Decode throughput vs batch", path)
    return True


def make_decode_plots(frame: pd.DataFrame, out_dir: str | Path, *, dpi: int = 110) -> list[PlotFile]:
    """The decode plots of ``frame`` (none when it has no decode row that ran), one set per run."""
    out = Path(out_dir)
    written: list[PlotFile] = []
    data = decode_rows(frame)
    for i, (run, part) in enumerate(data.groupby("run", sort=False)):
        suffix = "" if data["run"].nunique() == 1 else f"__run{i + 1}"
        tag = "" if not suffix else f" [{run}]"
        specs = [
            ("decode_latency", "time_ms", "time per decode step", format_ms, "Decode: time per token vs context", True),
            ("decode_cache", "cache_bytes", "cache bytes", format_bytes, "Decode: cache bytes vs context", False),
        ]
        for kind, value, ylabel, yfmt, title, bound in specs:
            path = out / f"{kind}{suffix}.png"
            _per_batch(part, value, ylabel, yfmt, title + tag, path, dpi, bound)
            written.append(PlotFile(kind, title + tag, path, CAPTIONS[kind]))
        path = out / f"decode_batch{suffix}.png"
        if _per_context(part, path, dpi):
            written.append(PlotFile("decode_batch", "Decode throughput vs batch" + tag, path, CAPTIONS["decode_batch"]))
    return written
