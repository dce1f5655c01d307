"""``effattn status RUN``: done / running / pending / failed cells of a benchmark run, with the task ids, from the run
folder and the scheduler; merges what finished when no other process is writing the run
(:mod:`efficient_attn.harness.executors.status`).

Example::

    effattn bench --executor slurm --detach --out runs/big     # submit and return
    effattn status runs/big                                    # later: where the cells are; collects the finished

Exit status: 0; 2 when RUN is not a benchmark run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a benchmark run folder (effattn bench --out)")
    parser.add_argument("--no-collect", action="store_true", help="only look: merge nothing, write nothing")


def run(args: argparse.Namespace) -> int:
    from efficient_attn.harness.executors.status import run_status

    try:
        status = run_status(args.run, collect_now=not args.no_collect)
    except ValueError as error:
        print(f"effattn status: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(status.lines()))
    return 0
