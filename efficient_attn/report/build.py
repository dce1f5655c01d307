"""``effattn report``: load the runs, run the analyses, draw the plots, render ``report.md`` and ``report.html``.

Data flows one way: :mod:`.load` (run folders -> one tidy frame) -> the analyses (:mod:`.analyses`, tables of
text) and :mod:`.plots` (PNG files) -> :mod:`.sections` (blocks) -> :mod:`.render_md` / :mod:`.render_html`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from efficient_attn.report.blocks import Heading
from efficient_attn.report.decode_plots import make_decode_plots
from efficient_attn.report.load import load_runs
from efficient_attn.report.plots import PlotFile, make_plots
from efficient_attn.report.prediction_plot import make_prediction_plots
from efficient_attn.report.render_html import to_html
from efficient_attn.report.render_md import to_markdown
from efficient_attn.report.sections import report_blocks
from efficient_attn.report.series import DEFAULT_BASELINE, available_baselines, baseline_mask, parse_series_spec

__all__ = ["ReportFiles", "build_report"]


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`build_report` wrote."""

    markdown: Path
    html: Path
    plots: list[PlotFile]


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
        labels: run labels, one per folder (default: the folder name).
        dpi: PNG resolution.
    """
    frame, runs = load_runs(list(run_dirs), labels)
    explicit = baseline is not None
    baseline = baseline or DEFAULT_BASELINE
    variant, backend = parse_series_spec(baseline)
    if explicit and not baseline_mask(frame, variant, backend).any():
        available = ", ".join(available_baselines(frame))
        raise ValueError(f"--baseline {baseline!r} is not in these runs; available: {available}")
    if out_dir is None:
        out = runs[0].path if len(runs) == 1 else runs[0].path / "compare"
    else:
        out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(frame, runs, out, baseline=baseline, dpi=dpi)
    decode_plots = make_decode_plots(frame, out, dpi=dpi)
    prediction_plots = make_prediction_plots(frame, out, dpi=dpi)
    blocks = report_blocks(frame, runs, plots, baseline, explicit, decode_plots=decode_plots,
                           prediction_plots=prediction_plots)
    title = blocks[0].text if isinstance(blocks[0], Heading) else "report"
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(to_markdown(blocks, out), encoding="utf-8")
    html_path.write_text(to_html(blocks, title), encoding="utf-8")
    return ReportFiles(markdown=md_path, html=html_path, plots=plots + decode_plots + prediction_plots)
