"""``effattn quality``: train every variant on the synthetic long-range tasks, measure its error against full
attention and its head diversity, and write a report.

Example::

    effattn quality --out runs/quality                       # the default suite, bench/quality/default.toml
    effattn quality --tasks recall --variants full window --lengths 256 --seeds 1 --steps 50 --out /tmp/q
    effattn quality --executor slurm --slurm-time 60 --out runs/quality   # every training cell an array task

Re-running with the same ``--out`` resumes: finished cells are skipped, metrics and the report are rebuilt. With
``--executor local|slurm`` the cells train in parallel tasks (``--threads`` each); metrics and the report follow
in this process once every cell has its row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from efficient_attn.commands.executor_options import add_executor_options, executor_from_args
from efficient_attn.commands.options import UniqueItems, out_folder, positive_float, positive_int

DEFAULT_SUITE = Path(__file__).resolve().parents[2] / "bench" / "quality" / "default.toml"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=str(DEFAULT_SUITE), help="quality suite TOML (default: bench/quality/default.toml)")
    parser.add_argument("--tasks", nargs="+", action=UniqueItems, default=None, help="tasks to run (mqar, recall, listops); default: the suite's")
    parser.add_argument("--variants", nargs="+", action=UniqueItems, default=None, help="registry keys; default: the suite's")
    parser.add_argument("--lengths", nargs="+", type=positive_int, action=UniqueItems, default=None, help="sequence lengths; default: the suite's")
    parser.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (0..N-1); default: the suite's")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per cell; default: the suite's")
    parser.add_argument(
        "--budget-s", type=positive_float, default=None, help="optional wall-clock cap per cell in seconds (machine-dependent)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads (default 1: the small backbone gains little from more, and on a shared CPU "
        "2 threads ran up to 30x slower than 1)",
    )
    parser.add_argument("--no-metrics", action="store_true", help="skip approximation error and head diversity")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--out", type=out_folder(), default=None, help="run folder (default: runs/quality-<UTC time>)")
    add_executor_options(parser, threads=False)  # --threads above is the threads per cell for every executor


def run(args: argparse.Namespace) -> int:
    """Exit status: 0, 2 for a bad option, suite or run folder (one line on stderr), 130 when interrupted."""
    import torch

    from efficient_attn.commands.options import check_out_folder
    from efficient_attn.harness.runfolder import RunFolderBusyError
    from efficient_attn.quality.report import write_report
    from efficient_attn.quality.suite import load_suite, open_run_folder, plan_cells, run_metrics, run_suite

    try:
        suite = load_suite(
            args.suite,
            tasks=args.tasks,
            variants=args.variants,
            lengths=args.lengths,
            seeds=args.seeds,
            steps=args.steps,
            budget_s=args.budget_s,
        )
        out = check_out_folder(args.out or f"runs/quality-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        executor = executor_from_args(args)
        # a bad meta.json, another training setup or another writer is refused before any training
        open_run_folder(out, suite).close()
    except KeyError as error:  # the registry's unknown key, with the nearest ones
        print(f"effattn quality: error: {error.args[0]}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RunFolderBusyError) as error:
        print(f"effattn quality: error: {error}", file=sys.stderr)
        return 2
    if suite.unused_params():
        print(f"note: params given for variants not in this run (unused): {', '.join(suite.unused_params())}")
    if suite.dropped_heads_sweep:
        print(f"note: {suite.dropped_heads_sweep}")
    torch.set_num_threads(args.threads)
    cells = plan_cells(suite)
    print(f"quality: {len(cells)} cells ({len(suite.tasks)} tasks x {len(suite.variants)} variants x "
          f"{len(suite.lengths)} lengths x {suite.seeds} seeds"
          f"{f' + {len(suite.curves)} curves' if suite.curves else ''}{' + heads sweep' if suite.heads_sweep else ''}) "
          f"-> {out}")
    started = time.perf_counter()
    try:
        results = run_suite(suite, out, progress=not args.no_progress, executor=executor)
        if executor.detach:
            print(f"submitted; collect with the same command again (metrics and the report follow when every cell "
                  f"has its row)\nresults: {results}")
            return 0
        if not args.no_metrics:
            run_metrics(suite, out, progress=not args.no_progress)
        report = write_report(out, num_heads=suite.train.num_heads)
    except (RunFolderBusyError, ValueError) as error:  # another writer took the folder; an executor that cannot run
        print(f"effattn quality: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\neffattn quality: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"results: {results}\nreport:  {report}\nwall:    {time.perf_counter() - started:.1f} s")
    return 0
