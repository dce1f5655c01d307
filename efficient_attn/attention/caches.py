"""Decode caches: what a causal attention remembers between incremental calls (one job: hold and check state).

A cache is made by the module that will use it (``attn.new_cache(batch, device=..., dtype=..., max_len=None)``) and
passed to ``attn.attend(q, k, v, cache=cache)`` or ``attn(x, cache=cache)``: each call appends the new tokens' keys
and values (or folds them into a state) and returns the new queries' outputs, equal to the causal full-sequence
result at those positions. The variant files hold the step logic; this module holds the storage:

* :class:`KVCache`: every key and value so far, ``(batch, kv_heads, length, head_dim)``; growing (capacity grows by
  a quarter when full, so appending is amortised O(1) per token) or static (``max_len`` preallocated; a step past it
  is an error). Used by ``full``, ``bigbird`` and ``moba``.
* :class:`RollingKVCache`: a ring buffer of the last ``capacity`` keys and values (Mistral's rolling cache, Jiang et
  al. 2023, arXiv:2310.06825): ``window`` keeps ``window_size + 1``, bytes constant in the context.
* :class:`GlobalRollingCache`: Longformer's global tokens plus a rolling buffer.
* :class:`StateCache`: a recurrent state of constant size (``performer``, ``linear``, ``retention``; Katharopoulos
  et al. 2020, arXiv:2006.16236, section 3.4).

Every cache knows its owner (the module's identity), batch, dtype and device, and :meth:`Cache.check` refuses a
mismatch by name. ``length`` is the number of tokens appended so far (padding included: positions are slots);
``nbytes`` is the exact number of bytes of the tensors it holds (capacity included). Key padding: the cache keeps
a bool ``real`` per slot (False = padding, never attended), so left-padded batches decode correctly.
Shapes: keys and values ``(batch, kv_heads, seq, head_dim)``; ``real`` ``(batch, seq)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Cache", "GlobalRollingCache", "KVCache", "RollingKVCache", "StateCache"]


@dataclass(eq=False)
class Cache:
    """What every cache shares: its owner and the shape it was made for, and its length.

    Attributes:
        owner: ``id`` of the module that made it (a cache belongs to one module: one layer of one model).
        owner_name: the owner's registry key, for messages.
        batch, kv_heads, head_dim: the shape of the keys and values it accepts.
        dtype, device: of the tensors it holds.
        max_len: the most tokens it may hold (None = unbounded).
        length: tokens appended so far.
    """

    owner: int
    owner_name: str
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_len: int | None = None
    length: int = 0
    #: Small variant-specific tensors (e.g. MoBA's recent queries and block selection), counted in ``nbytes``.
    extra: dict = field(default_factory=dict)
    #: Where non-finite keys or values were appended (cleaned to 0 in the cache): positions ``(m,)`` and which
    #: ``(batch, kv_heads, m)``; None while every token was finite. Set by ``Attention``; see ``_remember_nonfinite``.
    nonfinite: tuple[Tensor, Tensor] | None = None

    def tensors(self) -> list[Tensor]:
        """The tensors the cache holds (what ``nbytes`` counts)."""
        marks = list(self.nonfinite) if self.nonfinite is not None else []
        return [t for t in self.extra.values() if isinstance(t, Tensor)] + marks

    @property
    def nbytes(self) -> int:
        """Exact bytes of the tensors the cache holds (allocated capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def check(self, module_id: int, module_name: str, q: Tensor, k: Tensor) -> None:
        """Refuse a call this cache cannot serve, naming what is wrong (owner, batch, heads, dtype, device, length)."""
        if module_id != self.owner:
            raise ValueError(
                f"this cache was made by another module (attention {self.owner_name!r}, id {self.owner}); each "
                f"attention module (each layer) needs its own cache from its new_cache(), got module "
                f"{module_name!r} id {module_id}"
            )
        if q.shape[0] != self.batch:
            raise ValueError(f"cache was made for batch {self.batch}, got a batch of {q.shape[0]}")
        if k.shape[1] != self.kv_heads or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"cache holds {self.kv_heads} key/value heads of dim {self.head_dim}, got keys of shape "
                f"{tuple(k.shape)}"
            )
        if q.dtype != self.dtype or k.dtype != self.dtype:
            raise ValueError(f"cache dtype is {self.dtype}, got q {q.dtype} and k {k.dtype}; make the cache with "
                             f"new_cache(..., dtype={q.dtype})")
        if q.device != self.device:
            raise ValueError(f"cache is on {self.device}, got inputs on {q.device}; make the cache with "
                             f"new_cache(..., device={str(q.device)!r})")
        new = q.shape[-2]
        if self.max_len is not None and self.length + new > self.max_len:
            raise ValueError(
                f"cache overflow: it holds {self.length} of max_len={self.max_len} tokens and cannot take {new} "
                f"more; make it with a larger max_len (or max_len=None to grow)"
            )


def _grown(capacity: int, needed: int) -> int:
    """The next capacity for ``needed`` slots: a quarter more than now, whole multiples of 64."""
    return max(needed, math.ceil(capacity * 1.25 / 64) * 64)


@dataclass(eq=False)
class KVCache(Cache):
    """Every key and value so far (see the module docstring); ``static`` preallocates ``max_len`` slots."""

    keys: Tensor = field(default=None)  # type: ignore[assignment]
    values: Tensor = field(default=None)  # type: ignore[assignment]
    real: Tensor = field(default=None)  # type: ignore[assignment]
    #: False once a padded token was appended (decode then needs a key mask).
    all_real: bool = True

    def __post_init__(self) -> None:
        capacity = self.max_len if self.max_len is not None else 0
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        real = torch.zeros(self.batch, capacity, dtype=torch.bool, device=self.device)
        if self.keys is not None and self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
            real[:, : self.length] = self.real[:, : self.length]
        self.keys, self.values, self.real = keys, values, real

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> list[Tensor]:
        return [self.keys, self.values, self.real, *super().tensors()]

    def append(self, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        """Write ``k``, ``v`` ``(batch, kv_heads, new, head_dim)`` and ``real`` ``(batch, new)`` (None = all real)."""
        start, new = self.length, k.shape[2]
        if start + new > self.capacity:
            self._allocate(_grown(self.capacity, start + new))
        self.keys[:, :, start : start + new] = k
        self.values[:, :, start : start + new] = v
        self.real[:, start : start + new] = True if real is None else real
        if real is not None and not bool(real.all()):
            self.all_real = False
        self.length = start + new

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(keys, values, real)`` of the tokens so far (views, no copy)."""
        n = self.length
        return self.keys[:, :, :n], self.values[:, :, :n], self.real[:, :n]


@dataclass(eq=False)
class RollingKVCache(Cache):
    """A ring buffer of the last ``capacity`` tokens: slot ``p % capacity`` holds position ``p``.

    Attributes:
        capacity: slots in the ring (``window_size + 1`` for a window).
        positions: long ``(capacity,)``: the position each slot holds (-1 = empty).
    """

    capacity: int = 1
    keys: Tensor = field(default=None)  # type: ignore[assignment]
    values: Tensor = field(default=None)  # type: ignore[assignment]
    real: Tensor = field(default=None)  # type: ignore[assignment]
    positions: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        shape = (self.batch, self.kv_heads, self.capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.real = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=self.device)
        self.positions = torch.full((self.capacity,), -1, dtype=torch.long, device=self.device)

    def tensors(self) -> list[Tensor]:
        return [self.keys, self.values, self.real, self.positions, *super().tensors()]

    def append(self, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        """Write the new tokens; only the last ``capacity`` of them stay."""
        new = k.shape[2]
        keep = min(new, self.capacity)
        pos = torch.arange(self.length + new - keep, self.length + new, device=self.device)
        slots = pos % self.capacity
        self.keys[:, :, slots] = k[:, :, new - keep :]
        self.values[:, :, slots] = v[:, :, new - keep :]
        self.real[:, slots] = True if real is None else real[:, new - keep :]
        self.positions[slots] = pos
        self.length += new


@dataclass(eq=False)
class GlobalRollingCache(Cache):
    """Longformer: the global tokens' keys and values (``global_positions``, filled as they arrive) plus a ring of
    the last ``window_size + 1`` tokens."""

    global_positions: tuple[int, ...] = ()
    capacity: int = 1
    ring: RollingKVCache = field(default=None)  # type: ignore[assignment]
    globals: KVCache = field(default=None)  # type: ignore[assignment]
    #: Positions of the global tokens held so far (in ``globals``' order).
    global_held: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        common = dict(owner=self.owner, owner_name=self.owner_name, batch=self.batch, kv_heads=self.kv_heads,
                      head_dim=self.head_dim, dtype=self.dtype, device=self.device)
        self.ring = RollingKVCache(**common, capacity=self.capacity)
        self.globals = KVCache(**common, max_len=len(self.global_positions))

    def tensors(self) -> list[Tensor]:
        return self.ring.tensors() + self.globals.tensors() + super().tensors()

    def append(self, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        pos = range(self.length, self.length + k.shape[2])
        glob = [i for i, p in enumerate(pos) if p in self.global_positions]
        if glob:
            index = torch.tensor(glob, device=self.device)
            self.globals.append(k[:, :, index], v[:, :, index], None if real is None else real[:, index])
            self.global_held.extend(pos[i] for i in glob)
        self.ring.append(k, v, real)
        self.length += k.shape[2]


@dataclass(eq=False)
class StateCache(Cache):
    """A recurrent state of constant size: ``state`` is whatever the variant's step function carries (a tensor or a
    tuple of tensors), plus optional ``extra`` tensors (e.g. Performer's running key maximum)."""

    state: object = None

    def tensors(self) -> list[Tensor]:
        held = list(self.state) if isinstance(self.state, tuple) else [self.state]
        return [t for t in held if isinstance(t, Tensor)] + super().tensors()
