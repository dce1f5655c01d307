"""An exact, deterministic count of tensor memory on any device: live storages tracked through dispatch.

``ru_maxrss`` is a process-wide high-water mark and the CPU allocator keeps no peak counter, so on CPU we count
bytes ourselves. A ``TorchDispatchMode`` sees every op output (forward and backward, including tensors autograd
saves); each new storage is recorded with its size and a weakref finalizer removes it when freed. Views share
their base's storage and are counted once.

Storages alive before the context opens (parameters, inputs) are not counted: ``peak_bytes`` is the peak of
*additional* live tensor bytes, which is what a variant's cost in sequence length shows up in.

It also works under ``FakeTensorMode`` (fake tensors carry fake storages with real sizes), which is how the
harness predicts memory at lengths that do not fit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class LargestOutput:
    """The largest single op output seen: its op name, shape and element count."""

    op: str = ""
    shape: tuple[int, ...] = ()
    numel: int = 0


@dataclass
class StorageStats:
    peak_bytes: int = 0
    current_bytes: int = 0
    allocated_bytes: int = 0
    largest_output: LargestOutput = field(default_factory=LargestOutput)


class StorageTracker(TorchDispatchMode):
    """Track live tensor storages created inside the context.

    Example::

        with StorageTracker() as tracker:
            out = attn.attend(q, k, v)
            out.sum().backward()
        tracker.peak_bytes            # peak of live bytes created inside, exact
        tracker.largest_output.numel  # the biggest single tensor any op produced

    Attributes:
        peak_bytes: highest sum of live storage bytes created inside the context.
        current_bytes: bytes still alive (created inside and not yet freed).
        allocated_bytes: total bytes ever allocated inside (a traffic measure).
        largest_output: the op output with the most elements (a view counts with its own shape).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats = StorageStats()
        self._live: dict[int, int] = {}

    # plain attributes for convenience
    @property
    def peak_bytes(self) -> int:
        return self.stats.peak_bytes

    @property
    def current_bytes(self) -> int:
        return self.stats.current_bytes

    @property
    def allocated_bytes(self) -> int:
        return self.stats.allocated_bytes

    @property
    def largest_output(self) -> LargestOutput:
        return self.stats.largest_output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs or {}))[0]
        input_storages = {
            id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor) and _has_storage(t)
        }
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and _has_storage(tensor):
                self._record(tensor, func, input_storages)
        return out

    def _record(self, tensor: torch.Tensor, func, input_storages: set[int]) -> None:
        numel = tensor.numel()
        if numel > self.stats.largest_output.numel:
            self.stats.largest_output = LargestOutput(str(func), tuple(tensor.shape), numel)
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or key in input_storages:
            return  # a view of, or in-place write into, a storage we already know (or one from before)
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.stats.current_bytes += nbytes
        self.stats.allocated_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.current_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        nbytes = self._live.pop(key, 0)
        self.stats.current_bytes -= nbytes


def _has_storage(tensor: torch.Tensor) -> bool:
    # sparse / nested layouts have no single untyped storage; attention never produces them
    return tensor.layout == torch.strided
