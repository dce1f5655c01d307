"""``effattn predict``: predicted peak memory per cell without allocating it, and per variant the longest length that
fits a budget (fake tensors + the storage tracker; see :mod:`efficient_attn.harness.predict`).

Example::

    effattn predict --variants full,window --lengths 65536,131072 --budget-gb 16

Predictions use CPU fake tensors whatever ``--device`` says; on CUDA, fused kernels' internal workspaces are not
counted.
"""

from __future__ import annotations

import argparse
import sys

from efficient_attn.commands.bench_cmd import add_cell_options

_DEFAULT_LENGTHS = "65536,131072"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="default", help="suite whose variants, params and shapes are the "
                        "defaults (default: default)")
    add_cell_options(parser)
    parser.add_argument("--max-search", default="1m", help="longest length the search tries (default 1m)")
    parser.set_defaults(lengths=None)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from efficient_attn.commands.bench_cmd import suite_from_args
    from efficient_attn.commands.list_cmd import format_table
    from efficient_attn.harness.cell import precheck, static_status
    from efficient_attn.harness.host import budget_bytes, resolve_device
    from efficient_attn.harness.overrides import parse_lengths
    from efficient_attn.harness.plan import PlannedCell, plan_cells
    from efficient_attn.harness.predict import longest_fitting_length
    from efficient_attn.harness.suite import SuiteError
    from efficient_attn.registry import get_spec

    try:
        if args.lengths is None:
            args.lengths = _DEFAULT_LENGTHS
        if args.modes is None:
            args.modes = "fwd"
        suite = suite_from_args(args, args.suite)
        device = resolve_device(suite.device)
        limit = parse_lengths(args.max_search)[-1]
    except (SuiteError, ValueError) as error:
        print(f"effattn predict: error: {error}", file=sys.stderr)
        return 2
    budget = budget_bytes(args.budget_gb, device)
    rows, groups = [], {}
    for planned in plan_cells(suite, device):
        cell = planned.cell
        groups.setdefault(planned.group, cell)
        # the suite's per-mode max_len is a choice of the suite, not a limit of the memory: predict beyond it
        check = precheck(replace(planned, cap=None), budget_bytes=budget, depth=suite.depth)
        pred = check.prediction
        if pred is None:
            shown = f"{check.status}: {check.note}" if check.status is not None else check.note
            rows.append([cell.label(), "", "", shown])
            continue
        fits = "fits" if pred.total_bytes <= budget else "over budget"
        rows.append([cell.label(), f"{pred.peak_bytes / 2**30:.3f}", f"{pred.total_bytes / 2**30:.3f}", fits])
    print(format_table(rows, ["cell", "peak GiB", "with setup GiB", "vs budget"]))
    print(f"\nbudget {budget / 2**30:.2f} GiB; longest length that fits (doubling from 1024, then bisection):")
    longest = []
    for cell in groups.values():
        if static_status(PlannedCell(cell)) is not None:
            continue
        multiple = max(256, get_spec(cell.variant).length_multiple) if not cell.is_peer else 256
        start = max(1024 // multiple, 1) * multiple
        try:
            length, _ = longest_fitting_length(cell, budget, start=start, limit=limit, multiple=multiple)
        except Exception as error:  # noqa: BLE001 - reported per variant
            longest.append([cell.variant, cell.backend_requested, cell.mode, f"not predicted: {error}"[:120]])
            continue
        shown = "< " + str(start) if length is None else (f">= {length}" if length >= limit else str(length))
        longest.append([cell.variant, cell.backend_requested, cell.mode, shown])
    print(format_table(longest, ["variant", "backend", "mode", "longest seq_len"]))
    return 0
