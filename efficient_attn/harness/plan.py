"""Cells from a suite: what one benchmark measurement is (:class:`Cell`) and the order a sweep runs them in.

Cells are ``variants x backends x key/value heads x modes x causal x dtypes x batch sizes x lengths`` (lengths
innermost, ascending), then ``peers x modes x ...`` when peers are included, every one at the suite's level. A suite
with ``documents`` has no lengths: its cells are ``... x dtypes x packings`` (``packed``, ``padded``, ``alone``), each
of batch 1 and ``seq_len`` = the documents' total.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any

from efficient_attn.harness.runfolder import format_value
from efficient_attn.harness.schema import CONFIG_COLUMNS
from efficient_attn.harness.suite import Suite

__all__ = ["PACKINGS", "Cell", "PlannedCell", "params_to_json", "plan_cells"]

#: how a suite's documents run (see :mod:`efficient_attn.harness.schema`): one packed sequence, a padded batch, each
#: document alone
PACKINGS: tuple[str, ...] = ("packed", "padded", "alone")


def params_to_json(params: dict[str, Any]) -> str:
    """Canonical JSON of a parameter dict (sorted keys, no spaces): the ``params_json`` column."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Cell:
    """One benchmark measurement's configuration: exactly the configuration columns of its row.

    Shapes: the core runs on q ``(batch_size, num_heads, seq_len, head_dim)`` and k, v ``(batch_size, kv_heads,
    seq_len, head_dim)`` (``kv_heads`` = ``num_kv_heads``, None = ``num_heads``); layer and model levels on
    ``(batch_size, seq_len, num_heads * head_dim)`` activations or ``(batch_size, seq_len)`` tokens.
    """

    variant: str
    params_json: str
    backend_requested: str
    level: str
    mode: str
    causal: bool
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    num_heads: int
    head_dim: int
    is_peer: bool = False
    num_kv_heads: int | None = None
    #: packed documents (schema 4): ``packed`` | ``padded`` | ``alone``, and the comma-separated document lengths
    packing: str | None = None
    documents: str | None = None

    @property
    def document_lengths(self) -> tuple[int, ...]:
        """The lengths of the packed documents (empty for an ordinary cell)."""
        return tuple(int(n) for n in self.documents.split(",")) if self.documents else ()

    @property
    def kv_heads(self) -> int:
        """Key/value heads the cell runs with (``num_heads`` unless grouped)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def key(self) -> tuple[str, ...]:
        """The cell key as its configuration columns are written in the CSV."""
        return tuple(format_value(getattr(self, c)) for c in CONFIG_COLUMNS)

    def label(self) -> str:
        """Short human description, for progress bars and messages."""
        causal = " causal" if self.causal else ""
        kv = "" if self.num_kv_heads is None else f" kv={self.num_kv_heads}"
        packed = "" if self.packing is None else f" {self.packing} ({len(self.document_lengths)} documents)"
        return (
            f"{self.variant}/{self.backend_requested} {self.level} {self.mode}{causal} n={self.seq_len} "
            f"b={self.batch_size} {self.dtype}{kv}{packed}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PlannedCell:
    """A cell plus what the suite says about it that is not part of its key."""

    cell: Cell
    cap: int | None = None  # the suite's max_len for this cell's mode

    @property
    def group(self) -> tuple[str, ...]:
        """The cell key without ``seq_len``: an OOM skips the longer lengths of the same group."""
        return tuple(v for c, v in zip(CONFIG_COLUMNS, self.cell.key()) if c != "seq_len")


def plan_cells(suite: Suite, device: str, *, include_peers: bool = False) -> list[PlannedCell]:
    """All cells of ``suite`` on ``device`` (resolved: ``cpu`` or ``cuda``), lengths ascending within each group.

    The one place that orders cells: the sweep, the dry run and ``effattn predict`` all take this order.
    """
    # (name, params, backend, is_peer, per-mode caps) for every variant entry's backends, then every peer
    sources = [(e.key, e.params, backend, False, e.max_len) for e in suite.variants for backend in e.backends]
    if include_peers:
        sources += [(p.name, p.params, "peer", True, {}) for p in suite.peers]
    kv_heads = suite.kv_heads or (None,)
    planned = []
    for name, params, backend, is_peer, caps in sources:
        params_json = params_to_json(params)
        if suite.documents:
            documents = ",".join(str(n) for n in suite.documents)
            for kv, mode, causal, dtype, packing in itertools.product(
                kv_heads, suite.modes, suite.causal, suite.dtypes, PACKINGS
            ):
                cell = Cell(name, params_json, backend, suite.level, mode, causal, device, dtype, 1,
                            sum(suite.documents), suite.heads, suite.head_dim, is_peer, kv, packing, documents)
                planned.append(PlannedCell(cell, caps.get(mode)))
            continue
        for kv, mode, causal, dtype, batch, length in itertools.product(
            kv_heads, suite.modes, suite.causal, suite.dtypes, suite.batch_sizes, suite.lengths
        ):
            cell = Cell(name, params_json, backend, suite.level, mode, causal, device, dtype, batch, length,
                        suite.heads, suite.head_dim, is_peer, kv)
            planned.append(PlannedCell(cell, caps.get(mode)))
    return planned
