"""The sections of a benchmark report, as blocks: each analysis's table with the prose that says how to read it.

The analyses (:mod:`efficient_attn.report.analyses`) compute; this module only orders and explains them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_attn.report.analyses.budget import budget_rows
from efficient_attn.report.analyses.crossover import crossover_rows
from efficient_attn.report.analyses.decode import bandwidth_rows, decode_exponent_rows, peer_rows, split_rows
from efficient_attn.report.analyses.fit import scaling_rows
from efficient_attn.report.analyses.reach import extrapolation_rows, prediction_rows, unrun_cells
from efficient_attn.report.analyses.packing import packing_rows
from efficient_attn.report.analyses.overview import NOISY_IQR, environment_rows, noise_rows, status_rows
from efficient_attn.report.analyses.tables import PUBLISHED_NOTE, lra_table, published_table, run_comparison_rows
from efficient_attn.report.blocks import Block, Bullets, Heading, Image, Para, Table
from efficient_attn.report.format import length_label
from efficient_attn.report.series import baseline_mask, parse_series_spec, references

if TYPE_CHECKING:
    import pandas as pd

    from efficient_attn.report.load import Run
    from efficient_attn.report.plots import PlotFile

__all__ = ["decode_blocks", "report_blocks"]

#: the context from which full decode is compared with the bandwidth bound (shorter steps are overhead-bound)
BOUND_FROM = 16384


def decode_blocks(frame: pd.DataFrame, plots: list[PlotFile]) -> list[Block]:
    """The decode section (issue 13): plots, exponents, the prefill/decode split, the bandwidth bound, the peer."""
    blocks: list[Block] = [
        Heading(2, "Decode"),
        Para("A decode row is one new token per sequence against a cache holding `seq_len` tokens (the context), "
             "filled with random keys and values; its time is the median of single-token steps, tokens/s is the "
             "batch over that time, and its cache bytes are exact (capacity included). A prefill row is one call "
             "over the prompt into a fresh cache."),
    ]
    for plot in plots:
        blocks.append(Image(plot.path, plot.title, plot.caption))
    blocks.append(Heading(3, "Decode scaling with the context"))
    blocks.append(Para("Log-log slope of the step time and of the cache bytes against the context: a window or a "
                       "recurrent state should be near 0 (constant per token), full attention near 1 (each step "
                       "reads the whole cache). At short contexts fixed per-step overheads flatten every slope."))
    blocks.append(Table(*decode_exponent_rows(frame)))
    blocks.append(Heading(3, "Prefill / decode split"))
    header, rows = split_rows(frame)
    blocks.append(Para("At each prompt length where both ran: the prefill call, its cost per prompt token, the cache "
                       "it leaves, and one decode step at that context. The last column is how many prefill tokens "
                       "one decode step (per sequence) costs: decode pays per token what prefill amortises."))
    blocks.append(Table(header, rows) if rows else Para("No prompt length has both a prefill and a decode row."))
    blocks.append(Heading(3, "Full decode against the memory-bandwidth bound"))
    header, rows = bandwidth_rows(frame, min_context=BOUND_FROM)
    blocks.append(Para(f"From {BOUND_FROM // 1024}K tokens: the bound is the keys and values a step must read (2 x "
                       "batch x key/value heads x context x head_dim x bytes) over the copy bandwidth recorded in the "
                       "same run (bytes read plus written by a large tensor copy with the same threads)."))
    blocks.append(Table(header, rows) if rows else Para(f"No full decode row at {BOUND_FROM // 1024}K or more "
                                                        "with a recorded bandwidth."))
    header, rows = peer_rows(frame)
    if rows:
        blocks.append(Heading(3, "Ours against the transformers decode peer"))
        blocks.append(Para("`hf-llama-decode` (transformers' LlamaAttention, DynamicCache, sdpa) against our `full`; "
                           "its Mistral sliding-window twin against our `window` of the same window. Above 1x the "
                           "peer is slower. The peer's cache bytes are the key and value tensors its cache layers "
                           "hold."))
        blocks.append(Table(header, rows))
    return blocks


def reach_blocks(frame: pd.DataFrame, runs: list[Run], plots: list[PlotFile]) -> list[Block]:
    """What a partial run did not reach, the predicted beside the measured memory, and the extrapolated times."""
    blocks: list[Block] = []
    unrun = []
    for run in runs:
        cells = unrun_cells(frame, run)
        by_series: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for cell in cells:
            pending, capped = by_series.setdefault((f"{cell.variant}:{cell.backend}", cell.mode), ([], []))
            (capped if cell.above_max_len else pending).append(length_label(cell.seq_len))
        for (series, mode), (pending, capped) in by_series.items():
            if pending:
                line = f"{run.label}, {series}, {mode} at {', '.join(pending)}"
                unrun.append(line + (f" (and above max_len: {', '.join(capped)})" if capped else ""))
    if unrun:
        blocks.append(Para("Planned by the suite but not run (no row: the run stopped before them; resume it with "
                           "the same `effattn bench` command and `--out`):"))
        blocks.append(Bullets(unrun))

    blocks.append(Heading(2, "Predicted beside measured memory"))
    blocks.append(Para("The harness predicts each cell's peak before running it (a fake-tensor trace of one call, "
                       "`predicted_mem_bytes`), and skips cells predicted over the budget. Measured / predicted "
                       "above 1 means the prediction was low. Cells that were not measured keep their prediction "
                       "alone; a cell cut by the suite's max_len is never traced, so it has neither number. On "
                       "CPU both numbers count tensor bytes of the same first call (the measured one with a "
                       "storage tracker), so a ratio of 1.00 says the trace allocated what the real call did; "
                       "the process's RSS is not predicted."))
    for plot in plots:
        blocks.append(Image(plot.path, plot.title, plot.caption))
    header, rows = prediction_rows(frame)
    blocks.append(Table(header, rows) if rows else Para("No cell recorded a predicted or a measured peak."))

    blocks.append(Heading(2, "Extrapolated times (not measured)"))
    blocks.append(Para("Where a series stops before its run's longest length (above max_len, over budget, or not "
                       "run), its time there extrapolated from the power law fitted over its own measured lengths "
                       "(the 'fit over' column; at least 3 lengths). These are estimates, not measurements, and are "
                       "kept out of every other table and plot; fixed overheads at the short end of the fit bias "
                       "the exponent low."))
    header, rows = extrapolation_rows(frame, runs)
    blocks.append(Table(header, rows) if rows else Para("Every series with at least 3 measured lengths reached its "
                                                        "run's longest length: nothing to extrapolate."))
    return blocks


def report_blocks(
    frame: pd.DataFrame, runs: list[Run], plots: list[PlotFile], baseline: str, baseline_explicit: bool,
    *, decode_plots: list[PlotFile] | None = None, prediction_plots: list[PlotFile] | None = None,
) -> list[Block]:
    """Every section of the report as blocks (rendered to Markdown and HTML alike); a decode section when the runs
    hold decode rows."""
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
    blocks.append(Para("The whole configuration of each run (the suite, every variant's parameters, the timing "
                       "settings, each session) is in its `meta.json`."))

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

    if (frame["mode"] == "decode").any():
        blocks += decode_blocks(frame, decode_plots or [])
    if frame["packing"].ne("").any():
        blocks.append(Heading(2, "Packed documents"))
        blocks.append(Para("The same documents three ways: *packed* into one sequence (`document_ids`: each document "
                           "attends only to itself), *padded* to the longest in a batch (a key padding mask), and "
                           "*alone*, one call per document (the sum of their times: what the documents cost by "
                           "themselves). Every row is batch 1 with `seq_len` = the total tokens."))
        blocks.append(Table(*packing_rows(frame)))

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
    efficiency: dict[tuple[str, str, str], str] = {}
    for variant, backend in references((base_variant, base_backend)):
        present = baseline_mask(frame, variant, backend).any()
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
    blocks += reach_blocks(frame, runs, prediction_plots or [])

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
    if baseline_mask(frame, base_variant, base_backend).any():
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
