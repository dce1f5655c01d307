"""``effattn bench [SUITE]``: run (or resume) a benchmark suite into a run folder; see :mod:`efficient_attn.harness.sweep`.

Examples::

    effattn bench                                   # the `default` suite on the best device, into runs/default-<time>/
    effattn bench quick --out /tmp/q                # a named suite (bench/quick.toml) or a path to a TOML file
    effattn bench --variants full,window --lengths 1k:16k --modes fwd --causal
    effattn bench --variant-params window.window_size=128 --variant-params 'bigbird={"block_size": 32}'
    effattn bench --dry-run                         # the cells, their predicted memory and status; runs nothing

    effattn bench --executor slurm --slurm-partition gpu --slurm-time 30 --out runs/big   # one job array
    effattn bench --executor local --max-parallel 4 --threads 2                          # parallel subprocesses

Options given on the command line replace the suite's values. Rerunning with the same ``--out`` resumes: finished
cells are kept, the rest run; a different configuration for the same folder is refused, and so is a folder another
process is writing. With ``--executor local|slurm`` a rerun also collects the tasks an earlier invocation submitted
(waiting for the live ones) and resubmits the cells that have neither a row nor a live task, plus those whose task
was killed by the scheduler. Exit status: 0, 1 when a cell ended in ``error``, 2 for bad options, a config mismatch
or a busy folder, 130 when interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from efficient_attn.commands.executor_options import add_executor_options, executor_from_args
from efficient_attn.commands.list_cmd import format_table
from efficient_attn.commands.options import nonnegative_int, out_folder, positive_float, positive_int
from efficient_attn.vocab import DEVICES, DTYPE_NAMES, LEVELS, MODES

if TYPE_CHECKING:
    from efficient_attn.harness.plan import PlannedCell
    from efficient_attn.harness.suite import Suite


def add_cell_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``bench`` and ``predict`` that shape the cells."""
    parser.add_argument("--variants", help="comma-separated registry keys (default: the suite's)")
    parser.add_argument("--backends", help="comma-separated backends to run for every variant that has them (auto "
                        "for all); a suite entry's max_len stays with its own backends")
    parser.add_argument("--lengths", help="e.g. 1024,2048 or 1k:16k (a range LOW:HIGH doubles from LOW and must end at HIGH: 1k,2k,...,16k); suffixes k and m")
    parser.add_argument("--modes", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--level", choices=LEVELS, help="core: attend(q,k,v); layer: with "
                        "projections; model: the backbone; hf: a transformers LlamaModel")
    parser.add_argument("--causal", action="store_true", default=None, help="causal cells only")
    parser.add_argument("--device", choices=DEVICES, help="default: the suite's (auto = cuda if "
                        "available)")
    parser.add_argument("--dtype", help=f"comma-separated: {', '.join(DTYPE_NAMES)}")
    parser.add_argument("--batch-size", help="comma-separated batch sizes")
    parser.add_argument("--heads", type=positive_int, help="number of heads")
    parser.add_argument("--head-dim", type=positive_int, help="head dimension")
    parser.add_argument(
        "--variant-params", action="append", default=[], metavar="KEY.FIELD=VALUE",
        help="set a variant's config field, e.g. window.window_size=128 (VALUE is JSON when it parses), or "
             "KEY=JSON-object; repeatable",
    )
    parser.add_argument("--budget-gb", type=positive_float, help="memory budget in GiB (default: 80%% of free RAM or GPU "
                        "memory)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default="default", help="suite name in bench/ or a TOML path "
                        "(default: default)")
    add_cell_options(parser)
    parser.add_argument("--isolate", action="store_true", help="measure each cell in its own process "
                        "(adds peak_rss_bytes; slower)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells with predicted memory and status; "
                        "run nothing")
    parser.add_argument("--peers", action="store_true", help="also run the suite's [[peers]] (at the suite's level, where the peer supports it)")
    parser.add_argument("--out", type=out_folder(), help="run folder (default: runs/<suite>-<timestamp>/); an existing "
                        "one is resumed")
    parser.add_argument("--min-run-time", type=positive_float, help="seconds of timed runs per fast cell (default: the "
                        "suite's)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of parameters and inputs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_executor_options(parser)


def suite_from_args(args: argparse.Namespace, suite_name: str) -> Suite:
    """Load the suite and apply the command-line overrides."""
    from efficient_attn.harness.overrides import override_suite
    from efficient_attn.harness.suite import load_suite

    suite = load_suite(suite_name)
    return override_suite(
        suite, variants=args.variants, backends=args.backends, lengths=args.lengths, modes=args.modes,
        level=args.level, causal=args.causal, device=args.device, dtypes=args.dtype, batch_sizes=args.batch_size,
        heads=args.heads, head_dim=args.head_dim, variant_params=args.variant_params,
        min_run_time=getattr(args, "min_run_time", None),
    )


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _print_plan(plan: list[tuple[PlannedCell, int | None, str, str]]) -> None:
    rows = [[p.cell.label(), _mib(pred), status, note] for p, pred, status, note in plan]
    print(format_table(rows, ["cell", "predicted MiB", "status", "note"]))
    counts: dict[str, int] = {}
    for _, _, status, _ in plan:
        counts[status] = counts.get(status, 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + " (dry run: nothing was run)")


_SHORT = {"oom": "OOM", "skipped_budget": "budget", "skipped_after_oom": "after-oom", "unsupported": "n/a",
          "error": "ERROR"}


def summary_table(rows: list[dict[str, str]]) -> str:
    """Median time (ms) per group and length, or the status where a cell did not run."""
    lengths = sorted({int(r["seq_len"]) for r in rows})
    params_seen: dict[str, set[str]] = {}
    for r in rows:
        params_seen.setdefault(r["variant"], set()).add(r["params_json"])
    groups: dict[tuple[str, ...], dict[int, str]] = {}
    for r in rows:
        causal = " causal" if r["causal"] == "true" else ""
        # params only where one variant ran with several (the CSV has them all)
        name = r["variant"] + (r["params_json"] if len(params_seen[r["variant"]]) > 1 else "")
        packed = f" {r['packing']}" if r.get("packing") else ""  # packed / padded / alone are three rows
        group = (name, r["backend_requested"], f"{r['level']} {r['mode']}{causal}{packed}",
                 f"{r['dtype']} b{r['batch_size']}")
        cell = f"{float(r['time_ms']):.1f}" if r["status"] == "ok" else _SHORT.get(r["status"], r["status"])
        groups.setdefault(group, {})[int(r["seq_len"])] = cell
    header = ["variant", "backend", "what", "dtype", *[str(n) for n in lengths]]
    table = [[*g, *[groups[g].get(n, "") for n in lengths]] for g in groups]
    return "median time per call (ms) by sequence length\n" + format_table(table, header)


def run(args: argparse.Namespace) -> int:
    from efficient_attn.harness.runfolder import ConfigMismatchError, RunFolderBusyError
    from efficient_attn.harness.suite import SuiteError
    from efficient_attn.harness.sweep import dry_run, run_sweep

    try:
        suite = suite_from_args(args, args.suite)
        executor = executor_from_args(args)
        if executor.threads is None and suite.threads is not None:
            executor = dataclasses.replace(executor, threads=suite.threads)  # the suite's threads; --threads wins
        if args.dry_run:
            plan = dry_run(suite, device=args.device, include_peers=args.peers, budget_gb=args.budget_gb,
                           out_dir=args.out, seed=args.seed)
            _print_plan(plan)
            return 0
        out = args.out or Path("runs") / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"effattn bench: suite {suite.name!r} -> {out}", file=sys.stderr)
        common = dict(device=args.device, include_peers=args.peers, isolate=args.isolate, budget_gb=args.budget_gb,
                      seed=args.seed, progress=not args.no_progress)
        if executor.parallel:
            from efficient_attn.harness.executors.driver import run_sweep_parallel

            result = run_sweep_parallel(suite, out, executor, **common)
        else:
            result = run_sweep(suite, out, threads=executor.threads, **common)
    except (SuiteError, ConfigMismatchError, RunFolderBusyError, ValueError, OSError) as error:
        print(f"effattn bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\neffattn bench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result.unfinished:
        print(f"effattn bench: {result.unfinished} cells not finished yet ({result.live_tasks} tasks pending or "
              f"running); collect with `effattn status {out}` or run the same command again", file=sys.stderr)
    if not result.rows:
        return 0
    print(summary_table(result.rows))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()))
    print(
        f"\n{len(result.rows)} cells ({counts}); this session ran {result.cells_run}, kept "
        f"{result.cells_skipped_resumed} finished ones; wall {result.wall_s:.1f} s, timed windows "
        f"{result.timed_window_s:.1f} s\nresults: {result.folder / 'results.csv'}  meta: {result.folder / 'meta.json'}"
    )
    return 1 if result.statuses.get("error") else 0
