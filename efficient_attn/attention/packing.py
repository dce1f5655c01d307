"""Packed variable-length batches: several documents in one row, each attended exactly as if it were alone.

``document_ids`` is an int ``(batch, seq)`` tensor, non-decreasing along the sequence; a change of id starts a new
document (positions restart at 0 there). :func:`attend_per_document` is the generic execution every variant gets:
every document runs on views of its own rows (documents of one length share one call, stacked along the batch), the
variant's backend runs on each as on ordinary short sequences, and the outputs are concatenated back in order. So
patterns, global tokens, random plans, padding multiples and low-rank projections are each document's own, and the
cost follows the documents, never the packed length. Backends with a cheaper native path (FlexAttention composing a
document mask with the pattern) define ``_attend_<backend>_packed`` instead.

Shapes: q ``(batch, heads, seq, head_dim)``, k and v ``(batch, kv_heads, seq, head_dim)``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor

from efficient_attn.attention.positions import has_values, reading_values

__all__ = ["attend_per_document", "check_document_ids", "document_segments", "same_document"]


def check_document_ids(document_ids: object, expected: tuple[int, int]) -> None:
    """``ValueError`` saying what is expected unless ``document_ids`` is an int ``expected``-shaped tensor,
    non-decreasing along the sequence.

    The order check reads values: skipped for fake and meta tensors (:func:`has_values`; type and shape are still
    checked), and done on the real values of a real tensor inside a ``FakeTensorMode``."""
    what = f"document_ids must be an int tensor of shape (batch, seq) = {expected}, non-decreasing along seq"
    if not isinstance(document_ids, Tensor):
        raise ValueError(f"{what}; got {type(document_ids).__name__}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"{what}; got dtype {document_ids.dtype}")
    if tuple(document_ids.shape) != expected:
        raise ValueError(f"{what}; got shape {tuple(document_ids.shape)}")
    if document_ids.shape[-1] <= 1 or not has_values(document_ids):
        return
    with reading_values():
        decrease = document_ids[:, 1:] < document_ids[:, :-1]
        if bool(decrease.any()):
            row, col = decrease.nonzero()[0].tolist()
            raise ValueError(
                f"{what}; got a decrease in row {row} at position {col + 1} "
                f"({int(document_ids[row, col])} -> {int(document_ids[row, col + 1])})"
            )


def document_segments(document_ids: Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every document, in order.

    The boundaries are values, so a fake or meta ``document_ids`` (which has none) is a ``ValueError``; a real one is
    read even inside a ``FakeTensorMode``, so the memory predictor runs a packed cell with fake q, k, v and real ids.
    """
    if not has_values(document_ids):
        raise ValueError(
            "document_ids is a fake or meta tensor: the document boundaries are its values, which a packed attend "
            "needs to split the documents; pass a real tensor (build it outside the FakeTensorMode; q, k, v may be fake)"
        )
    batch, n = document_ids.shape
    with reading_values():
        ids = document_ids.cpu()
        starts = torch.ones(batch, n, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        rows = starts.tolist()
    segments = []
    for row, row_starts in enumerate(rows):
        begin = [i for i, s in enumerate(row_starts) if s] + [n]
        segments += [(row, a, b - a) for a, b in zip(begin[:-1], begin[1:])]
    return segments


def same_document(document_ids: Tensor) -> Callable:
    """FlexAttention ``mask_mod`` that is True where query and key lie in the same document."""

    def document_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return document_mask


def attend_per_document(
    attend_fn: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    document_ids: Tensor,
    module: object | None = None,
) -> Tensor:
    """Run ``attend_fn(q, k, v, key_padding_mask)`` on every document alone; returns q's shape.

    A document whose length no other document shares runs on views of its rows (nothing copied); documents of
    equal length run in one call, stacked along the batch. The outputs are concatenated back in packed order.
    ``module`` (the variant) gets ``_redraw_frozen = True`` after the first call, so a variant that redraws random
    features or plans per call draws once per packed call, as it would for one unpacked batch.
    """
    batch, _, n, _ = q.shape
    segments = document_segments(document_ids)
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for row, start, length in segments:
        groups[length].append((row, start))
    outputs: dict[tuple[int, int], Tensor] = {}
    frozen_before = getattr(module, "_redraw_frozen", False)
    try:
        for length, members in sorted(groups.items()):
            def rows(t: Tensor) -> Tensor:  # (g, heads, length, d): a view for one document, a copy for several
                parts = [t[r:r + 1, :, s:s + length] for r, s in members]
                return parts[0] if len(parts) == 1 else torch.cat(parts)

            mask = None
            if key_padding_mask is not None:
                mask = torch.cat([key_padding_mask[r:r + 1, s:s + length] for r, s in members])
            out = attend_fn(rows(q), rows(k), rows(v), mask)  # (g, heads, length, d)
            if module is not None:
                module._redraw_frozen = True
            for i, member in enumerate(members):
                outputs[member] = out[i:i + 1]
    finally:
        if module is not None:
            module._redraw_frozen = frozen_before
            module.last_padded_len = n
    per_row = [[] for _ in range(batch)]
    for row, start, _length in segments:
        per_row[row].append(outputs[(row, start)])
    packed = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=2) for parts in per_row]
    return packed[0] if batch == 1 else torch.cat(packed)
