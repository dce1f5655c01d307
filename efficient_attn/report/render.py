"""Assemble the report: analyses of the results as tables, the plots, written as ``report.md`` and a standalone
``report.html`` (images embedded as base64) from one list of blocks, so the two never say different things.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass

import numpy as np
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn.report.fit import (
    Crossover,
    crossover_polynomial_fit,
    fit_power_law,
    longest_within_budget,
    measured_crossover,
)
from efficient_attn.report.load import FAILED_TO_FIT, STATUSES, load_runs, memory_budget, parse_series_spec
from efficient_attn.report.plots import PlotFile, format_bytes, length_label, make_plots
from efficient_attn.report.tables import PUBLISHED_NOTE, lra_table, published_table

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run

NOISY_IQR = 0.2  # relative IQR above which a timing is called noisy


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str
    caption: str


Block = Heading | Para | Table | Bullets | Image


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`build_report` wrote."""

    markdown: Path
    html: Path
    plots: list[PlotFile]


# ---------------------------------------------------------------- analyses


def _group_keys(frame: pd.DataFrame) -> list[str]:
    return ["run", "condition", "level", "mode", "series"]


def _mode_sorted(frame: pd.DataFrame) -> pd.DataFrame:
    from efficient_attn.report.plots import MODE_ORDER

    rank = {m: i for i, m in enumerate(MODE_ORDER)}
    return frame.assign(_m=frame["mode"].map(lambda m: rank.get(m, 99))).sort_values(["run", "condition", "_m"])


def _name(condition: str, series: str) -> str:
    return f"{series} ({condition})" if condition else series


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
    for (run, condition, _level, mode, series), group in _mode_sorted(frame).groupby(_group_keys(frame), sort=False):
        ok = group[group["status"] == "ok"]
        rows.append(
            [
                str(run),
                str(mode),
                _name(str(condition), str(series)),
                _fit_text(ok["seq_len"], ok["time_ms"]),
                _fit_text(ok["seq_len"], ok["peak_mem_bytes"]),
            ]
        )
    return header, rows


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
    is_ref = (frame["variant"] == variant) & (frame["series_backend"] == backend) & ~frame["is_peer"]
    for (run, condition, level, mode, series), group in _mode_sorted(frame[~is_ref]).groupby(
        _group_keys(frame), sort=False
    ):
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
                _name(str(condition), str(series)),
                _measured_text(t_meas),
                t_fit_text,
                _measured_text(m_meas),
                _fitted_text(m_fit, longest) if m_fit else m_why,
            ]
        )
        fitted_time[(str(run), str(mode), str(series))] = t_fit_text
    return header, rows, fitted_time


def budget_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Longest length within each run's memory budget: measured, predicted by the harness, extrapolated."""
    budgets = {run.label: memory_budget(run.meta) for run in runs}
    header = ["run", "mode", "series", "budget", "measured (longest ok)", "predicted", "extrapolated (memory fit)"]
    rows = []
    for (run, condition, _level, mode, series), group in _mode_sorted(frame).groupby(_group_keys(frame), sort=False):
        budget = budgets.get(str(run))
        reach = longest_within_budget(
            list(group["seq_len"]),
            list(group["status"]),
            [float(v) for v in group["peak_mem_bytes"]],
            [float(v) for v in group["predicted_mem_bytes"]],
            budget,
        )
        measured = length_label(reach.measured) if reach.measured else "none ran"
        longest = int(group["seq_len"].max())
        if reach.measured == longest and group.loc[group["seq_len"] == longest, "status"].eq("ok").all():
            measured += " (longest tried)"
        extrapolated = "-"
        if reach.extrapolated is not None:
            extrapolated = f"~{reach.extrapolated:,.0f}" if reach.extrapolated < 1e9 else ">1e9"
        rows.append(
            [
                str(run),
                str(mode),
                _name(str(condition), str(series)),
                format_bytes(budget) if budget else "not recorded",
                measured,
                length_label(reach.predicted) if reach.predicted else "-",
                extrapolated,
            ]
        )
    return header, rows


def status_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Counts of each status per run and series, and the notes of every cell that did not run."""
    present = [s for s in STATUSES if (frame["status"] == s).any()]
    header = ["run", "series", *present, "total"]
    rows = []
    for (run, series), group in frame.groupby(["run", "series"], sort=False):
        counts = group["status"].value_counts()
        rows.append([str(run), str(series), *[str(int(counts.get(s, 0))) for s in present], str(len(group))])
    notes = []
    failed = _mode_sorted(frame[frame["status"] != "ok"])
    for (run, condition, mode, series, status, note), group in failed.groupby(
        ["run", "condition", "mode", "series", "status", "note"], sort=False
    ):
        lengths = ", ".join(length_label(n) for n in sorted(set(group["seq_len"])))
        where = f"{run}, {_name(str(condition), str(series))}, {mode} at {lengths}"
        notes.append(f"{where}: **{status}**" + (f" - {note}" if note else ""))
    return header, rows, notes


def noise_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Relative spread of the timings (IQR / median) by length: how far small sizes can be trusted."""
    ok = frame[(frame["status"] == "ok") & frame["time_ms"].notna() & frame["time_iqr_ms"].notna()]
    header = ["run", "length", "cells", "median IQR / median", "worst", f"cells above {NOISY_IQR:.0%}"]
    rows = []
    for (run, n), group in ok.groupby(["run", "seq_len"]):
        rel = group["time_iqr_ms"] / group["time_ms"]
        rows.append(
            [
                str(run),
                length_label(n),
                str(len(rel)),
                f"{rel.median():.1%}",
                f"{rel.max():.1%}",
                str(int((rel > NOISY_IQR).sum())),
            ]
        )
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
        for (condition, _level, mode, series), group in _mode_sorted(both.assign(run="")).groupby(
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
                [_name(str(condition), str(series)), str(mode), f"{runs[0].label} / {later.label}", lengths, *texts]
            )
    return header, rows


def _flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list):
            text = ", ".join(str(v) if not isinstance(v, (dict, list)) else json.dumps(v) for v in value)
            flat[name] = text if len(text) <= 160 else text[:157] + "..."
        else:
            text = str(value)
            if name.endswith("bytes") and isinstance(value, (int, float)) and not isinstance(value, bool):
                text = f"{value:,.0f} ({format_bytes(value)})"
            flat[name] = text if len(text) <= 160 else text[:157] + "..."
    return flat


def environment_rows(frame: pd.DataFrame, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """One column per run: what the data says (device, dtypes, lengths, cells), then every meta.json entry."""
    flats = [_flatten(run.meta) for run in runs]
    derived: list[dict[str, str]] = []
    for run in runs:
        part = frame[frame["run"] == run.label]
        derived.append(
            {
                "folder": str(run.path),
                "cells (ok / total)": f"{int((part['status'] == 'ok').sum())} / {len(part)}",
                "devices": ", ".join(sorted(set(part["device"]) - {""})) or "-",
                "dtypes": ", ".join(sorted(set(part["dtype"]) - {""})) or "-",
                "modes": ", ".join(dict.fromkeys(part["mode"])),
                "lengths": ", ".join(length_label(n) for n in sorted(set(part["seq_len"]))),
            }
        )
    keys = list(derived[0])
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    header = ["", *[run.label for run in runs]]
    rows = [[key, *[(d | f).get(key, "-") for d, f in zip(derived, flats)]] for key in keys]
    return header, rows


# ---------------------------------------------------------------- the report


def report_blocks(
    frame: pd.DataFrame, runs: list[Run], plots: list[PlotFile], baseline: str, baseline_explicit: bool
) -> list[Block]:
    """Every section of the report as blocks (rendered to Markdown and HTML alike)."""
    base_variant, base_backend = parse_series_spec(baseline)
    labels = ", ".join(run.label for run in runs)
    blocks: list[Block] = [
        Heading(1, f"Attention benchmark report: {labels}"),
        Para(
            f"Generated by `effattn report` from {len(frame)} cells in {len(runs)} run(s). Baseline: `{baseline}`. "
            "Lengths are tokens per sequence; times are medians of repeated calls; memory is the peak during one call."
        ),
        Heading(2, "Environment"),
    ]
    blocks.append(Table(*environment_rows(frame, runs)))

    blocks.append(Heading(2, "Plots"))
    if len(runs) > 1:
        blocks.append(Para("Runs are overlaid: each run has its own line style and marker shape (see the legends)."))
    for plot in plots:
        blocks.append(Image(plot.path, plot.title, plot.caption))

    if len(runs) > 1:
        blocks.append(Heading(2, "Run comparison"))
        blocks.append(
            Para(
                f"Each later run against the first ({runs[0].label}): first / later, so above 1x the later run is "
                "faster (smaller). At the longest length both ran, and the geometric mean over all lengths both ran."
            )
        )
        header, rows = run_comparison_rows(frame, runs)
        blocks.append(Table(header, rows) if rows else Para("The runs share no series, mode and length."))

    blocks.append(Heading(2, "Scaling exponents"))
    blocks.append(
        Para(
            "Slope of log cost against log length over the measured lengths (least squares): 2 is quadratic, 1 is "
            "linear. R² near 1 means a clean power law over that range; fixed overheads at short lengths pull the "
            "slope below its asymptotic value."
        )
    )
    blocks.append(Table(*scaling_rows(frame)))

    blocks.append(Heading(2, "Crossover lengths"))
    blocks.append(
        Para(
            "The length from which a variant is faster (or smaller) than a reference. *Measured*: the first measured "
            "length from which it wins at every longer measured length (a reference that ran out of memory or budget "
            "counts as losing). *Fitted (CAB)*: the efficiency length of CAB (Zhang et al. 2023): a quadratic fitted "
            "to the reference, a line to the variant (each fit's degree follows the series' own exponent: 2 above "
            "1.5), solved for the crossing; 'always' = cheaper at every length, 'never' = not cheaper at long "
            "lengths. Each fit needs two more lengths than its degree (4 for a quadratic); 'poor fit' = a fitted "
            "cost that falls with length (noise)."
        )
    )
    references = [(base_variant, base_backend)]
    if references[0] != ("full", "sdpa"):
        references.append(("full", "sdpa"))
    efficiency: dict[tuple[str, str, str], str] = {}
    for variant, backend in references:
        present = (
            (frame["variant"] == variant) & (frame["series_backend"] == backend) & ~frame["is_peer"]
        ).any()
        blocks.append(Heading(3, f"vs {variant}:{backend}"))
        if not present:
            blocks.append(Para(f"`{variant}:{backend}` is not in these runs: no crossover against it."))
            continue
        header, rows, fitted = crossover_rows(frame, (variant, backend))
        if (variant, backend) == (base_variant, base_backend):
            efficiency = fitted
        blocks.append(Table(header, rows) if rows else Para("No other series shares a level and mode with it."))

    blocks.append(Heading(2, "Longest length within the memory budget"))
    blocks.append(
        Para(
            "*Measured*: the longest length that ran with its peak memory inside the budget. *Predicted*: the longest "
            "cell whose predicted memory (the harness's fake-tensor prediction) fits. *Extrapolated*: the fitted "
            "memory power law solved at the budget; far outside the measured range it is only an estimate."
        )
    )
    blocks.append(Table(*budget_rows(frame, runs)))

    blocks.append(Heading(2, "Comparison with published figures"))
    blocks.append(
        Para(
            f"Ours: speed-up = baseline time / time, memory = baseline peak / peak, against `{baseline}` at the same "
            f"length and mode. Columns marked '{PUBLISHED_NOTE}' are copied from the papers: other hardware, other "
            "models and settings, so only the trend is comparable. LRA: Tay et al. 2021, Table 2 (TPU v3, byte-level "
            "text, batch 32; LRA also gives 3K: Local 3.2x, Linformer 3.7x, BigBird 1.2x, Performer 3.8x). Our "
            "`window` is compared with LRA's Local attention."
        )
    )
    base_present = (
        (frame["variant"] == base_variant) & (frame["series_backend"] == base_backend) & ~frame["is_peer"]
    ).any()
    if base_present:
        header, rows = lra_table(frame, base_variant, base_backend)
        blocks.append(Table(header, rows) if rows else Para("No series to compare with the baseline."))
    else:
        note = "" if baseline_explicit else " (the default; choose another with --baseline)"
        blocks.append(Para(f"The baseline `{baseline}`{note} is not in these runs: no LRA-style table."))
    blocks.append(
        Para(
            "Other published figures, with ours at the same length (Linformer: Wang et al. 2020, Table 3; "
            "Nystromformer: Xiong et al. 2021, Table 1; CAB: Zhang et al. 2023 efficiency lengths vs our fitted "
            "time crossover against the baseline)."
        )
    )
    blocks.append(Table(*published_table(frame, base_variant, base_backend, efficiency)))

    blocks.append(Heading(2, "Cell status"))
    header, rows, notes = status_rows(frame)
    blocks.append(Table(header, rows))
    if notes:
        blocks.append(Para("Cells that did not run, and why (they are marked in the plots, not dropped):"))
        blocks.append(Bullets(notes))
    else:
        blocks.append(Para("Every cell ran."))

    blocks.append(Heading(2, "Timing noise"))
    blocks.append(
        Para(
            "Relative interquartile range of the repeated timings. Short sequences take little time, so scheduler and "
            "cache effects dominate: on a shared CPU a 20-80% spread at 1K is common, and ratios and crossovers read "
            "at short lengths are correspondingly uncertain. "
            f"Cells above {NOISY_IQR:.0%} are counted in the last column."
        )
    )
    header, rows = noise_rows(frame)
    blocks.append(Table(header, rows) if rows else Para("The runs recorded no timing spread (time_iqr_ms)."))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    """Markdown with images referenced relative to ``out_dir``."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items]
            lines.append("")
        elif isinstance(block, Image):
            try:
                rel = block.path.resolve().relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                rel = block.path.resolve().as_posix()
            lines += [f"![{block.alt}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", escaped)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    """A standalone HTML page: images embedded as base64 PNG data, no external files."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path | None = None,
    *,
    baseline: str | None = None,
    labels: list[str] | None = None,
    dpi: int = 110,
) -> ReportFiles:
    """Read the runs, write the plots, ``report.md`` and ``report.html`` into ``out_dir``.

    Args:
        run_dirs: one or more run folders (``results.csv`` + ``meta.json``); several are overlaid.
        out_dir: where to write; default: the run folder (one run) or ``<first run>/compare`` (several).
        baseline: ``VARIANT:BACKEND`` every ratio is taken against; default ``full:naive``. An explicit baseline
            absent from the runs is an error; the default one only leaves its sections empty, with a note.
        labels: run labels, one per folder (default: meta label or folder name).
        dpi: PNG resolution.
    """
    frame, runs = load_runs(list(run_dirs), labels)
    explicit = baseline is not None
    baseline = baseline or "full:naive"
    variant, backend = parse_series_spec(baseline)
    present = (frame["variant"] == variant) & (frame["series_backend"] == backend) & ~frame["is_peer"]
    if explicit and not present.any():
        ours = frame[~frame["is_peer"]]
        available = sorted(set(ours["variant"] + ":" + ours["series_backend"]))
        raise ValueError(f"--baseline {baseline!r} is not in these runs; available: {', '.join(available)}")
    if out_dir is None:
        out = runs[0].path if len(runs) == 1 else runs[0].path / "compare"
    else:
        out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(frame, runs, out, baseline=baseline, dpi=dpi)
    blocks = report_blocks(frame, runs, plots, baseline, explicit)
    title = blocks[0].text if isinstance(blocks[0], Heading) else "report"
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(to_markdown(blocks, out), encoding="utf-8")
    html_path.write_text(to_html(blocks, title), encoding="utf-8")
    return ReportFiles(markdown=md_path, html=html_path, plots=plots)
