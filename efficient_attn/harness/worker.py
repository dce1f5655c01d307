"""Measure one cell in a fresh ``python`` process (``effattn bench --isolate``): peak RSS is only meaningful there.

The parent (:func:`measure_isolated`) sends the cell as JSON on stdin to ``python -m efficient_attn.harness.worker``;
the child runs :func:`efficient_attn.harness.cell.measure_cell` with the RSS probe and prints one result line. A child
killed by SIGKILL (on CPU, most likely the kernel's OOM killer) is an ``oom``; any other death an ``error`` with the
tail of its stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

import torch

from efficient_attn.harness.cell import Timing, classify, measure_cell
from efficient_attn.harness.plan import Cell

__all__ = ["measure_isolated"]

_RESULT_MARK = "EFFATTN_CELL_RESULT "


def measure_isolated(cell: Cell, *, timing: Timing, seed: int = 0, depth: int = 2) -> dict[str, Any]:
    """:func:`~efficient_attn.harness.cell.measure_cell` in a fresh process (peak RSS measured there); returns its
    measured columns, or ``{"_status": ..., "note": ...}`` when it failed."""
    request = {
        "cell": cell.to_dict(), "timing": dataclasses.asdict(timing), "seed": seed, "depth": depth,
        "threads": torch.get_num_threads(),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "efficient_attn.harness.worker"], input=json.dumps(request),
        capture_output=True, text=True, check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    if proc.returncode == -signal.SIGKILL:
        return {"_status": "oom", "note": "the cell's process was killed by SIGKILL (the kernel's OOM killer?)"}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"_status": "error", "note": f"isolated cell process exited with {proc.returncode}: {tail}"[:500]}


def _worker_main() -> int:
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    cell = Cell(**request["cell"])
    try:
        result = measure_cell(cell, timing=Timing(**request["timing"]), seed=request["seed"], depth=request["depth"],
                              rss=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes a recorded status
        status, note = classify(error)
        result = {"_status": status, "note": note}
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # one cell: request on stdin, result line on stdout
    if sys.argv[1:]:
        print("usage: python -m efficient_attn.harness.worker < request.json  (internal: runs one cell for "
              "--isolate)", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_worker_main())
