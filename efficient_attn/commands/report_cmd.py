"""``effattn report RUN_DIR... [--out DIR] [--baseline full:naive]``: plots and a readable report from runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efficient_attn.commands.options import check_out_folder, out_folder, positive_int


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folder(s) written by `effattn bench` (results.csv + meta.json); several are overlaid",
    )
    parser.add_argument(
        "--out",
        type=out_folder(),
        default=None,
        help="output folder (default: the run folder; with several runs: FIRST_RUN_DIR/compare)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="VARIANT:BACKEND",
        help="reference for speed-ups, memory savings, crossovers and the LRA-style table (default: full:naive)",
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="run labels, one per RUN_DIR (default: meta label or folder name)"
    )
    parser.add_argument("--dpi", type=positive_int, default=110, help="resolution of the PNG plots (default: 110)")


def run(args: argparse.Namespace) -> int:
    from efficient_attn.report.series import parse_series_spec
    from efficient_attn.report.build import build_report

    if args.dpi < 30 or args.dpi > 600:
        print(f"effattn report: error: --dpi must be between 30 and 600, got {args.dpi}", file=sys.stderr)
        return 2
    try:
        if args.baseline is not None:
            parse_series_spec(args.baseline)
        if args.out is None:  # the report goes into the (first) run folder: it must be writable, before any work
            first = Path(args.run_dirs[0])
            check_out_folder(first.parent if first.suffix == ".csv" else first, "RUN_DIR (where the report goes)")
        files = build_report(args.run_dirs, args.out, baseline=args.baseline, labels=args.labels, dpi=args.dpi)
    except (ValueError, OSError) as exc:
        print(f"effattn report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files.plots)} plots to {files.markdown.parent}")
    print(f"report: {files.markdown}")
    print(f"report (standalone HTML): {files.html}")
    return 0
