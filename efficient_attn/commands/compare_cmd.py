"""``effattn compare NEW_RUN REF_RUN [--tolerance 10%] [--memory-tolerance 2%] [--baseline full:naive]``: did a change
make any within-run ratio worse? (:mod:`efficient_attn.report.analyses.compare`).

Example::

    effattn bench --out runs/after                       # the default suite, after the change
    effattn compare runs/after reports/default-cpu       # against the committed reference run

Prints Markdown on stdout: the speed-ups and memory savings that got worse, the cells whose status changed, every
matched cell (with the absolute time ratio NEW / REF, for information), and a last ``summary:`` line. Warnings (the
runs differ in suite, device, threads...) go to stderr as well.

It is a command of its own, not ``effattn report compare``: ``report`` takes any number of run folders as positional
arguments, so a ``compare`` word there would be read as a folder (one that ``report`` itself writes for several
runs), and it writes files where this one answers a question with an exit status.

Exit status: 0 no regression; 1 something regressed (a ratio worse beyond its tolerance, or a cell that ran in REF
and did not run in NEW); 2 bad input (a missing folder, not a run folder, a damaged file, a bad option).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from efficient_attn.report.analyses.compare import Comparison
    from efficient_attn.report.blocks import Block

PROG = "effattn compare"
#: a speed-up may fall this much (relative to REF's) before it counts as worse: CPU timings of one cell vary by a few
#: percent between runs on a shared machine
DEFAULT_TOLERANCE = 0.10
#: the same for a memory saving: CPU peaks are exact tensor bytes (any change is a real change); the margin is for
#: CUDA allocator rounding
DEFAULT_MEMORY_TOLERANCE = 0.02


def tolerance(text: str) -> float:
    """``10%`` or ``0.1``: a fraction in ``[0, 1)``; a bare number of 1 or more is refused (``10`` is not 10%)."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a percentage such as 10%, got {text!r}") \
            from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite fraction or percentage, got {text!r}")
    if percent:
        value /= 100.0
    elif value >= 1.0:
        raise argparse.ArgumentTypeError(f"got {text!r}: a bare number is a fraction in [0, 1); for a percentage "
                                         f"write it with %, e.g. {raw}%")
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a tolerance from 0 up to (not including) 100%, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("new_run", metavar="NEW_RUN", help="the run to check (a folder written by `effattn bench`)")
    parser.add_argument("ref_run", metavar="REF_RUN", help="the reference run, e.g. reports/default-cpu")
    parser.add_argument(
        "--tolerance",
        type=tolerance,
        default=DEFAULT_TOLERANCE,
        metavar="FRACTION",
        help=f"how far a speed-up may fall below REF's before it is a regression: 10%% or 0.1 "
        f"(default: {DEFAULT_TOLERANCE:.0%}%)",
    )
    parser.add_argument(
        "--memory-tolerance",
        type=tolerance,
        default=DEFAULT_MEMORY_TOLERANCE,
        metavar="FRACTION",
        help=f"the same for a memory saving (default: {DEFAULT_MEMORY_TOLERANCE:.0%}%; CPU peaks are exact "
        "tensor bytes)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="VARIANT:BACKEND",
        help="reference of the speed-ups, as in `effattn report` (default: full:naive; full:sdpa is always added)",
    )


def _blocks(result: Comparison) -> list[Block]:
    """The command's output as report blocks (rendered by the report's Markdown renderer)."""
    from efficient_attn.report.blocks import Heading, Para, Table

    tol, mem_tol = f"{result.tolerance:.3g}", f"{result.memory_tolerance:.3g}"
    against = ", ".join(f"`{r}`" for r in result.references) or "no reference (none is in both runs)"
    blocks: list[Block] = [
        Heading(1, "Run comparison"),
        Para(f"NEW: `{result.new.path}`. REF: `{result.ref.path}`. Against: {against}."),
        Para(
            "The verdict uses only within-run ratios: each run's speed-up (reference time / time) and memory saving "
            "(reference peak / peak) against its own reference cell at the same length and mode. A cell regressed "
            f"when a speed-up fell by more than {result.tolerance:.0%} of REF's (tolerance {tol}), a memory saving by "
            f"more than {result.memory_tolerance:.0%} ({mem_tol}), or it ran in REF and did not run in NEW. "
            "Time NEW/REF is absolute and informational only: the runs may come from different machines. The timing "
            "noise of a flagged cell (IQR / median in each run) says how far its time spread: a change not much "
            "larger than that may be noise, so rerun before believing it."
        ),
    ]
    if result.warnings:
        blocks.append(Para("**Warnings:** " + "; ".join(result.warnings) + "."))
    sections = [
        ("Speed-ups that got worse", result.speed_regressions(), "No speed-up got worse beyond the tolerance."),
        ("Memory savings that got worse", result.memory_regressions(), "No memory saving got worse beyond the "
                                                                       "tolerance."),
        ("Status changes", result.status_changes(), "No matched cell changed status."),
        ("Cells in one run only", result.unmatched_table(), "Every cell is in both runs."),
        ("Every matched cell", result.cell_table(), "No cell is in both runs."),
    ]
    for title, (header, rows), empty in sections:
        blocks.append(Heading(2, title))
        blocks.append(Table(header, rows) if rows else Para(empty))
    blocks.append(Para(result.summary()))
    return blocks


def run(args: argparse.Namespace) -> int:
    from efficient_attn.report.analyses.compare import compare_runs
    from efficient_attn.report.render_md import to_markdown

    from efficient_attn.report.load import results_path

    for label, path in (("NEW_RUN", args.new_run), ("REF_RUN", args.ref_run)):
        problem = "does not exist" if not Path(path).exists() else None
        if problem is None and not results_path(path).is_file():
            problem = f"is not a run folder (no {results_path(path).name} in it)"
        if problem:
            print(f"{PROG}: error: {label} {path} {problem}; give a folder written by `effattn bench --out` "
                  "(results.csv + meta.json) or its results.csv", file=sys.stderr)
            return 2
    try:
        result = compare_runs(args.new_run, args.ref_run, baseline=args.baseline, tolerance=args.tolerance,
                              memory_tolerance=args.memory_tolerance)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(to_markdown(_blocks(result), Path(".")).rstrip())
    return 1 if result.regressed else 0
