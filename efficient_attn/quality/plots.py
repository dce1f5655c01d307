"""Charts of a quality run (matplotlib with the Agg backend, selected inside each function).

* :func:`lra_chart` -- the Long Range Arena figure (Tay et al. 2021, arXiv:2011.04006, Fig. 3): x = training steps/s,
  y = accuracy, bubble area = peak training-step memory, one bubble per variant, one panel per task.
* :func:`accuracy_vs_length` -- accuracy (mean +/- std over seeds) against sequence length, per task.
* :func:`error_plot` -- relative error against full attention vs length (random inputs; trained activations).
* :func:`head_similarity_heatmap` -- heads x heads cosine similarity per layer, outputs and attention maps.
* :func:`similarity_vs_heads` -- mean off-diagonal head similarity against the number of heads.
* :func:`state_size_curves` -- zoology's figure (Arora et al. 2023, arXiv:2312.04927, fig. 2): accuracy against each
  variant's capacity knob, one panel per variant, ``full`` as the ceiling band.
* :func:`pairs_curve` -- accuracy against the number of key-value pairs at a fixed knob.
* :func:`heads_figure` -- the heads question: accuracy, head similarity and important heads against head count.

Every function takes tidy pandas frames (the CSVs the suite writes) and a path, and returns the path written.
Colours are fixed per variant key by :func:`efficient_attn.report.palette.variant_colour`, the palette the benchmark
report uses too, so one variant looks the same in every figure of both reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficient_attn.report.palette import SHADES, shade, variant_colour, variant_colours

#: Relative errors below this are drawn at it (exact variants whose pattern covers the sequence reach ~1e-8).
ERROR_FLOOR = 1e-4

__all__ = [
    "lra_chart",
    "accuracy_vs_length",
    "error_plot",
    "head_similarity_heatmap",
    "similarity_vs_heads",
    "state_size_curves",
    "pairs_curve",
    "heads_figure",
]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _summary(results: Any) -> Any:
    """Mean/std over seeds of the ok rows, per (task, variant, seq_len) at the suite's default head count."""
    ok = results[results["status"] == "ok"].copy()
    return (
        ok.groupby(["task", "variant", "seq_len"])
        .agg(
            acc_mean=("accuracy", "mean"),
            acc_std=("accuracy", "std"),
            majority=("majority_accuracy", "mean"),
            sps=("steps_per_s", "mean"),
            peak=("peak_mem_bytes", "mean"),
            seeds=("seed", "nunique"),
        )
        .reset_index()
    )


def lra_chart(results: Any, path: str | Path, *, seq_len: int | None = None) -> Path:
    """Speed (x), accuracy (y), memory (bubble area) per variant, one panel per task, at ``seq_len`` (default:
    the longest length in the results). ``results``: the suite's results frame at one head count."""
    plt = _plt()
    summary = _summary(results)
    if summary.empty:
        raise ValueError("lra_chart: no ok rows to plot")
    seq_len = int(summary["seq_len"].max()) if seq_len is None else seq_len
    summary = summary[summary["seq_len"] == seq_len]
    tasks = sorted(summary["task"].unique())
    colors = variant_colours(list(summary["variant"].unique()))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 5.6), squeeze=False, layout="constrained")
    peak_max = float(summary["peak"].max())
    for ax, task in zip(axes[0], tasks):
        part = summary[summary["task"] == task].sort_values("sps")
        for index, (_, r) in enumerate(part.iterrows()):
            area = 60 + 1200 * float(r["peak"]) / peak_max
            ax.scatter(r["sps"], 100 * r["acc_mean"], s=area, color=colors[r["variant"]], alpha=0.55,
                       edgecolors="black", linewidths=0.6, label=f"{r['variant']}: {_bytes(r['peak'])}")
            offset = 10 if index % 2 == 0 else -14  # alternate above/below so neighbours do not collide
            ax.annotate(r["variant"], (r["sps"], 100 * r["acc_mean"]), textcoords="offset points",
                        xytext=(0, offset), ha="center", va="center", fontsize=7)
        ax.axhline(100 * part["majority"].mean(), color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xlabel("training speed (steps/s, CPU)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task}, n = {seq_len}", fontsize=10)
        ax.margins(x=0.15, y=0.2)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, markerscale=0.3,
                  title="variant: peak memory of one training step (bubble area)", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Speed vs accuracy vs memory (LRA-style)", fontsize=11)
    return _save(fig, path)


def accuracy_vs_length(results: Any, path: str | Path) -> Path:
    """Accuracy (mean +/- std over seeds) against sequence length, one line per variant, one panel per task."""
    plt = _plt()
    summary = _summary(results)
    if summary.empty:
        raise ValueError("accuracy_vs_length: no ok rows to plot")
    tasks = sorted(summary["task"].unique())
    colors = variant_colours(list(summary["variant"].unique()))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 5.0), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        part = summary[summary["task"] == task]
        for variant, g in part.groupby("variant"):
            g = g.sort_values("seq_len")
            ax.errorbar(g["seq_len"], 100 * g["acc_mean"], yerr=100 * g["acc_std"].fillna(0), marker="o",
                        capsize=3, color=colors[variant], label=variant)
        maj = part.groupby("seq_len")["majority"].mean()
        ax.plot(maj.index, 100 * maj.values, color="grey", linestyle="--", label="majority class")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part["seq_len"].unique()), [str(n) for n in sorted(part["seq_len"].unique())])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task}: accuracy vs length (mean ± std over seeds)", fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def error_plot(errors: Any, path: str | Path) -> Path:
    """Relative error vs length: left panel random inputs, right panel trained activations (mean over layers)."""
    plt = _plt()
    ok = errors[(errors["status"] == "ok") & (errors["variant"] != "full")]
    if ok.empty:
        raise ValueError("error_plot: no ok non-full rows to plot")
    colors = variant_colours(list(ok["variant"].unique()))
    sources = [s for s in ("random", "trained") if s in set(ok["source"])]
    fig, axes = plt.subplots(1, len(sources), figsize=(6.0 * len(sources), 5.4), squeeze=False,
                             layout="constrained")
    styles = {"recall": "-", "listops": "--"}
    for ax, source in zip(axes[0], sources):
        part = ok[ok["source"] == source]
        group_cols = ["variant"] if source == "random" else ["variant", "task"]
        for keys, g in part.groupby(group_cols):
            keys = keys if isinstance(keys, tuple) else (keys,)
            g = g.groupby("seq_len")["rel_error"].mean().clip(lower=ERROR_FLOOR)
            label = keys[0] if source == "random" else f"{keys[0]} ({keys[1]})"
            linestyle = "-" if source == "random" else styles.get(keys[1], ":")
            ax.plot(g.index, g.values, marker="o", linestyle=linestyle, color=colors[keys[0]], label=label)
        ax.set_xscale("log", base=2)
        lengths = sorted(part["seq_len"].unique())
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(f"relative error ||y - y_full|| / ||y_full|| (floor {ERROR_FLOOR:g})")
        title = "random Gaussian q, k, v" if source == "random" else "q, k, v of trained models (mean over layers)"
        ax.set_title(f"error vs full attention: {title}", fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax.grid(alpha=0.3, which="major")
    return _save(fig, path)


def head_similarity_heatmap(diversity: Any, path: str | Path, *, title: str) -> Path:
    """Heads x heads cosine similarity, one column per layer, rows for outputs and (where defined) maps.
    ``diversity``: rows of one model (columns layer, kind, head_i, head_j, cosine)."""
    plt = _plt()
    if diversity.empty:
        raise ValueError("head_similarity_heatmap: no rows")
    kinds = [k for k in ("output", "map") if k in set(diversity["kind"])]
    layers = sorted(diversity["layer"].unique())
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.4 * len(layers) + 1.4, 3.2 * len(kinds) + 0.5),
                             squeeze=False, layout="constrained")
    image = None
    for r, kind in enumerate(kinds):
        for c, layer in enumerate(layers):
            part = diversity[(diversity["kind"] == kind) & (diversity["layer"] == layer)]
            matrix = part.pivot(index="head_i", columns="head_j", values="cosine")
            ax = axes[r][c]
            image = ax.imshow(matrix.values, vmin=-1, vmax=1, cmap="RdBu_r")
            h = matrix.shape[0]
            ax.set_xticks(range(h))
            ax.set_yticks(range(h))
            ax.set_xlabel("head")
            ax.set_ylabel("head")
            ax.set_title(f"layer {layer}: {'outputs' if kind == 'output' else 'attention maps'}", fontsize=9)
            if h <= 8:
                for i in range(h):
                    for j in range(h):
                        value = matrix.values[i, j]
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(value) > 0.6 else "black")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    return _save(fig, path)


def similarity_vs_heads(summary: Any, path: str | Path, *, title: str, variant: str = "full") -> Path:
    """Mean off-diagonal head similarity vs number of heads. ``summary`` columns: num_heads, layer, kind, mean_cos.

    Lines are in ``variant``'s colour (one shade per layer, solid for outputs, dashed for maps), so no line borrows
    the colour of another variant."""
    plt = _plt()
    if summary.empty:
        raise ValueError("similarity_vs_heads: no rows")
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    layers = sorted(summary["layer"].unique())
    hue = variant_colour(variant)
    for (kind, layer), g in summary.groupby(["kind", "layer"]):
        g = g.sort_values("num_heads")
        colour = shade(hue, SHADES[layers.index(layer) % len(SHADES)])
        ax.plot(g["num_heads"], g["mean_cos"], marker="o" if kind == "output" else "s", color=colour,
                linestyle="-" if kind == "output" else "--",
                label=f"{'outputs' if kind == 'output' else 'attention maps'}, layer {layer}")
    heads = sorted(summary["num_heads"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(heads, [str(h) for h in heads])
    ax.set_xlabel("number of heads (model width fixed)")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _percent_axis(ax: Any, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.1f}%)")
    ax.set_ylim(-3, 105)
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)


def _log2_ticks(ax: Any, values: list[Any]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def state_size_curves(points: Any, path: str | Path, *, ceiling: tuple[float, float] | None,
                      chance: float | None = None, title: str = "") -> Path:
    """Accuracy (mean +/- std over seeds, every seed as a dot) against each variant's knob, one panel per variant.

    ``points`` columns: variant, param, value, mean, std, n, accuracies (a list per row); ``ceiling``: ``full``'s
    (mean, std) at the same task, drawn as a black band in every panel."""
    plt = _plt()
    if points.empty:
        raise ValueError("state_size_curves: no points")
    variants = list(dict.fromkeys(points["variant"]))
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 7.0), 3.8 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    for ax, variant in zip(axes.flat, variants):
        part = points[points["variant"] == variant].sort_values("value")
        colour = variant_colour(variant)
        if ceiling is not None:
            mean, std = ceiling
            ax.axhline(100 * mean, color=variant_colour("full"), linewidth=1.5, label=f"full (ceiling) {100 * mean:.1f}%")
            if std == std:  # not NaN
                ax.axhspan(100 * (mean - std), 100 * min(mean + std, 1.0), color=variant_colour("full"), alpha=0.12)
        ax.errorbar(part["value"], 100 * part["mean"], yerr=100 * part["std"].fillna(0), marker="o", capsize=3,
                    color=colour, label=f"{variant} (mean ± std)")
        for _, r in part.iterrows():
            ax.scatter([r["value"]] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], s=12, color=colour,
                       alpha=0.45, zorder=3)
        _log2_ticks(ax, sorted(part["value"].unique()))
        _percent_axis(ax, chance)
        ax.set_xlabel(f"{part['param'].iloc[0]} (log scale)")
        low, high = int(part["n"].min()), int(part["n"].max())
        ax.set_title(f"{variant}: {low if low == high else f'{low}-{high}'} seed{'s' if high > 1 else ''} per point",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "MQAR accuracy vs each variant's state size (dots: single seeds)", fontsize=11)
    return _save(fig, path)


def pairs_curve(points: Any, path: str | Path, *, chance: float | None = None, title: str = "") -> Path:
    """Accuracy (mean +/- std over seeds) against the number of pairs, one line per variant (label: its params)."""
    plt = _plt()
    if points.empty:
        raise ValueError("pairs_curve: no points")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    for label, part in points.groupby("label", sort=False):
        part = part.sort_values("value")
        variant = part["variant"].iloc[0]
        ax.errorbar(part["value"], 100 * part["mean"], yerr=100 * part["std"].fillna(0), marker="o", capsize=3,
                    color=variant_colour(variant), label=label,
                    linestyle="-" if variant == "full" else "--")
    _log2_ticks(ax, sorted(points["value"].unique()))
    _percent_axis(ax, chance)
    ax.set_xlabel(f"{points['param'].iloc[0]} (log scale)")
    ax.set_title(title or "MQAR accuracy vs number of key-value pairs (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def heads_figure(summary: Any, path: str | Path, *, variant: str = "full", stall: int | None = None) -> Path:
    """Two panels against the number of heads: accuracy (mean +/- std over seeds) and the mean pairwise cosine of
    head outputs and attention maps (mean over seeds), with the number of important heads annotated.

    ``summary`` columns: num_heads, acc_mean, acc_std, output_cosine, map_cosine, important_heads."""
    plt = _plt()
    if summary.empty:
        raise ValueError("heads_figure: no rows")
    summary = summary.sort_values("num_heads")
    heads = [int(h) for h in summary["num_heads"]]
    hue = variant_colour(variant)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.2), layout="constrained")
    left.errorbar(heads, 100 * summary["acc_mean"], yerr=100 * summary["acc_std"].fillna(0), marker="o", capsize=3,
                  color=hue, label="accuracy (mean ± std)")
    for h, acc, imp in zip(heads, summary["acc_mean"], summary["important_heads"]):
        left.annotate(f"{imp:.1f} important", (h, 100 * acc), textcoords="offset points", xytext=(0, 9),
                      ha="center", fontsize=7)
    if stall is not None:
        left.axvline(stall, color="grey", linestyle="--", linewidth=1, label=f"stops improving: {stall} heads")
    _log2_ticks(left, heads)
    _percent_axis(left, None)
    left.set_ylim(-3, 112)  # room for the labels above 100%
    left.set_xlabel("number of heads (width fixed)")
    left.set_title(f"{variant}: accuracy; heads costing > 1 point when removed", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    right.plot(heads, summary["output_cosine"], marker="o", color=hue, label="head outputs")
    right.plot(heads, summary["map_cosine"], marker="s", linestyle="--", color=shade(hue, SHADES[1]),
               label="attention maps")
    _log2_ticks(right, heads)
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("number of heads (width fixed)")
    right.set_ylabel("mean pairwise cosine (over layers, seeds)")
    right.set_title("how similar the heads are (1 head: no pair)", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return _save(fig, path)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _save(fig: Any, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
