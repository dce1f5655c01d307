"""``effattn predict``: predicted peak memory per cell without allocating it, and per variant the longest length that
fits a budget (fake tensors + the storage tracker; see :mod:`efficient_attn.harness.predict`).

Example::

    effattn predict --variants full,window --lengths 65536,131072 --budget-gb 16

Predictions use CPU fake tensors whatever ``--device`` says; on CUDA, fused kernels' internal workspaces are not
counted. Lengths up to ``--fake-max-len`` are run on fake tensors; longer ones (and the search beyond it) are
extrapolated from fake runs at doubling lengths, so any length answers in seconds; the ``how`` column says which,
and the fit behind each extrapolated figure is listed with the check it passed (or failed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from efficient_attn.commands.bench_cmd import add_cell_options
from efficient_attn.commands.options import length

if TYPE_CHECKING:
    from efficient_attn.harness.plan import Cell
    from efficient_attn.harness.predict import Estimate

_DEFAULT_LENGTHS = "65536,131072"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="default", help="suite whose variants, params and shapes are the "
                        "defaults (default: default)")
    add_cell_options(parser)
    parser.add_argument("--max-search", type=length, default="1m", help="longest length the search tries "
                        "(default 1m; any length is fast: long ones are extrapolated)")
    parser.add_argument("--fake-max-len", type=length, default="32k", help="longest length run on fake tensors "
                        "(default 32k); longer ones are extrapolated from fake runs at doubling lengths up to it")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(lengths=None)


def _how(estimate: Estimate) -> str:
    if estimate.growth is None:
        return "fake run"
    return "extrapolated" + ("" if estimate.growth.verified else " (unverified)")


def run(args: argparse.Namespace) -> int:
    from efficient_attn.commands.bench_cmd import suite_from_args
    from efficient_attn.commands.list_cmd import format_table
    from efficient_attn.harness.cell import static_status
    from efficient_attn.harness.host import budget_bytes, resolve_device
    from efficient_attn.harness.plan import PlannedCell, plan_cells
    from efficient_attn.harness.predict import Predictor, longest_fitting_length
    from efficient_attn.harness.suite import SuiteError
    from efficient_attn.registry import get_spec

    try:
        if args.lengths is None:
            args.lengths = _DEFAULT_LENGTHS
        if args.modes is None:
            args.modes = "fwd"
        suite = suite_from_args(args, args.suite)
        device = resolve_device(suite.device)
    except (SuiteError, ValueError) as error:
        print(f"effattn predict: error: {error}", file=sys.stderr)
        return 2
    budget = budget_bytes(args.budget_gb, device)

    def progress(cell: Cell, n: int) -> None:
        if not args.no_progress:
            print(f"predict: {cell.label().replace(f'n={cell.seq_len} ', '')}: fake run at n={n}", file=sys.stderr,
                  flush=True)

    predictor = Predictor(fake_max_len=args.fake_max_len, depth=suite.depth, on_sample=progress)
    rows, groups, growths = [], {}, {}
    try:
        for planned in plan_cells(suite, device):
            cell = planned.cell
            groups.setdefault(planned.group, cell)
            # the suite's per-mode max_len is a choice of the suite, not a limit of the memory: predict beyond it
            static = static_status(replace(planned, cap=None))
            if static is not None:
                rows.append([cell.label(), "", "", f"{static[0]}: {static[1]}", ""])
                continue
            try:
                estimate = predictor.predict(cell)
            except Exception as error:  # noqa: BLE001 - reported per cell, the others are still predicted
                rows.append([cell.label(), "", "", f"not predicted: {type(error).__name__}: {error}"[:120], ""])
                continue
            pred = estimate.prediction
            if estimate.growth is not None:
                growths[cell.label().replace(f"n={cell.seq_len} ", "")] = estimate.growth
            fits = "fits" if pred.total_bytes <= budget else "over budget"
            rows.append([cell.label(), f"{pred.peak_bytes / 2**30:.3f}", f"{pred.total_bytes / 2**30:.3f}", fits,
                         _how(estimate)])
        print(format_table(rows, ["cell", "peak GiB", "with setup GiB", "vs budget", "how"]))
        print(f"\nbudget {budget / 2**30:.2f} GiB; longest length that fits (doubling from 1024, then bisection):")
        longest = []
        for cell in groups.values():
            if static_status(PlannedCell(cell)) is not None:
                continue
            multiple = max(256, get_spec(cell.variant).length_multiple) if not cell.is_peer else 256
            start = max(1024 // multiple, 1) * multiple
            try:
                found, made = longest_fitting_length(cell, budget, start=start, limit=args.max_search,
                                                     multiple=multiple, predictor=predictor)
            except Exception as error:  # noqa: BLE001 - reported per variant
                longest.append([cell.variant, cell.backend_requested, cell.mode, "", f"not predicted: {error}"[:120]])
                continue
            if found is None:
                shown, how = f"< {start}", _how(made[start])
            else:
                shown = f">= {found}" if found >= args.max_search else str(found)
                how = _how(made[found])
                if made[found].growth is not None:
                    growths[cell.label().replace(f"n={cell.seq_len} ", "")] = made[found].growth
            longest.append([cell.variant, cell.backend_requested, cell.mode, how, shown])
    except KeyboardInterrupt:
        print("\neffattn predict: interrupted", file=sys.stderr)
        return 130
    print(format_table(longest, ["variant", "backend", "mode", "how", "longest seq_len"]))
    print(f"\nhow: 'fake run' = the workload run at that length on fake tensors (exact storage sizes, nothing "
          f"allocated); 'extrapolated' = beyond --fake-max-len {args.fake_max_len}, each figure from a polynomial "
          "in seq_len fitted to fake runs of the same cell and checked against one more (below); 'unverified' = "
          "that check failed, treat the figure as a rough guess")
    for label, growth in growths.items():
        print(f"  {label}: {growth.describe()}")
    return 0
