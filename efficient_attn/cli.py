"""The ``effattn`` command: ``list``, ``bench``, ``predict``, ``report``, ``compare``, ``quality``, ``status``.

Each subcommand lives in its own module under ``efficient_attn.commands`` with two functions,
``configure(parser)`` and ``run(args) -> int``. Building the parser imports every subcommand module (each adds its
own options), so every ``effattn`` call imports all seven, and with them the package (torch, the registry and the
built-in variants). What only running a subcommand needs (the harness, the report with pandas and matplotlib, the
quality suite) is imported inside its ``run``: ``effattn list`` or ``effattn bench --help`` loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from efficient_attn.commands.options import CommandParser, UsageError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("efficient_attn.commands.list_cmd", "list the registered attention variants"),
    "bench": ("efficient_attn.commands.bench_cmd", "run or resume a benchmark suite (time, memory, FLOPs per cell)"),
    "predict": ("efficient_attn.commands.predict_cmd", "predict peak memory without allocating; longest length that fits"),
    "report": ("efficient_attn.commands.report_cmd", "plots and a readable report (md, html) from benchmark runs"),
    "compare": ("efficient_attn.commands.compare_cmd", "a run against a reference run: which ratios got worse"),
    "quality": ("efficient_attn.commands.quality_cmd", "train variants on long-range tasks; error, head diversity"),
    "status": ("efficient_attn.commands.status_cmd", "where a run's cells are (done, running, pending, failed); collects"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="effattn", description="Efficient attention variants: list them, benchmark them, report on them."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:  # one line, status 2 (commands/options.py)
        print(error, file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`effattn list | head`): not an error of ours; silence the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the shell's status for SIGPIPE
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
