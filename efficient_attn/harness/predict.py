"""Predict a cell's peak memory without allocating it: fake tensors plus the storage tracker.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every op computes only metadata (shapes, dtypes, strides) and
returns tensors whose storages have real sizes but no memory; :class:`efficient_attn.measure.storage.StorageTracker`
counts those storages exactly as it counts real ones. The module and its inputs are built inside the fake mode
(parameters included); a module whose construction cannot run under it is built for real and its parameters and
buffers are converted to fake tensors.

Fake tensors live on the CPU here, whatever device the cell will run on. The ``meta`` device is *not* used: SDPA on
meta takes the math path and predicts the full score matrix (131 GB at 64K tokens instead of ~65 MB).

The workload is called twice: the first call's peak includes one-time state (caches, the optimizer's state) and is
what the harness measures (its instrumented call is the warm-up); the second is the steady state. :class:`Prediction`
keeps both. The harness's precheck (:func:`efficient_attn.harness.cell.precheck`) compares the prediction with the
memory budget before a cell runs; ``effattn predict`` searches the longest length that fits
(:func:`longest_fitting_length`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from efficient_attn.harness import workloads
from efficient_attn.harness.plan import Cell
from efficient_attn.measure.storage import StorageTracker

__all__ = ["Prediction", "longest_fitting_length", "predict_cell"]


@dataclass(frozen=True)
class Prediction:
    """Predicted memory of one cell, in bytes.

    Attributes:
        peak_bytes: peak of a steady-state (second) call above what existed before it.
        first_call_bytes: peak of the first call (one-time state included): compare with ``peak_mem_bytes``.
        setup_bytes: parameters, buffers and inputs (alive before and during every call).
    """

    peak_bytes: int
    first_call_bytes: int
    setup_bytes: int

    @property
    def total_bytes(self) -> int:
        """What must fit in memory: setup plus the larger of the two call peaks (the budget check uses this)."""
        return self.setup_bytes + max(self.peak_bytes, self.first_call_bytes)


def _fakeify(module: nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of ``module`` with a fake tensor of the same metadata."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(mode.from_tensor(param.detach()), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = mode.from_tensor(buf)


def predict_cell(cell: Cell, *, seed: int = 0, depth: int = 2, vocab_size: int = 256) -> Prediction:
    """Predicted peak memory of ``cell`` (bytes), computed on CPU fake tensors; nothing of its size is allocated.

    Raises:
        whatever building or running the workload raises (e.g. a data-dependent op fake tensors cannot run).
    """
    cpu_cell = replace(cell, device="cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        with StorageTracker() as setup:
            try:
                work = workloads.build_workload(cpu_cell, seed=seed, depth=depth, vocab_size=vocab_size)
            except (RuntimeError, NotImplementedError, TypeError) as fake_error:
                # built for real (outside the fake mode), then converted; the inputs are built fake again
                with unset_fake_temporarily():
                    torch.manual_seed(seed)
                    try:
                        module, attentions = workloads.build_cell_module(cpu_cell, depth=depth, vocab_size=vocab_size)
                    except Exception:
                        raise fake_error from None
                _fakeify(module, mode)
                work = workloads.build_workload(
                    cpu_cell, seed=seed, depth=depth, vocab_size=vocab_size, built=(module, attentions)
                )
        setup_bytes = setup.current_bytes
        with StorageTracker() as first:
            work.run()
        with StorageTracker() as steady:
            work.run()
    return Prediction(peak_bytes=steady.peak_bytes, first_call_bytes=first.peak_bytes, setup_bytes=setup_bytes)


def longest_fitting_length(
    cell: Cell,
    budget_bytes: int,
    *,
    start: int = 1024,
    limit: int = 1 << 22,
    multiple: int = 256,
    seed: int = 0,
) -> tuple[int | None, dict[int, Prediction]]:
    """The longest ``seq_len`` (a multiple of ``multiple``, at most ``limit``) whose predicted total fits
    ``budget_bytes``: doubling from ``start``, then bisection between the last fit and the first miss.

    Returns:
        ``(length or None if even start does not fit, the predictions made by length)``.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    if start % multiple:
        raise ValueError(f"start={start} must be a multiple of multiple={multiple}")
    made: dict[int, Prediction] = {}

    def fits(length: int) -> bool:
        made[length] = predict_cell(replace(cell, seq_len=length), seed=seed)
        return made[length].total_bytes <= budget_bytes

    if not fits(start):
        return None, made
    good, bad = start, None
    while good < limit:
        nxt = min(good * 2, limit)
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
            break
    if bad is None:
        return good, made
    while bad - good > multiple:
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, made
