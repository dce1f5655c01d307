"""FLOP counts: what the backend computes (counted from the ops it dispatches) and what the pattern needs (analytic).

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, einsums and the CUDA SDPA kernels exactly, but counts
**0** for the CPU fused SDPA op ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward; this module
supplies both formulas (the same conventions torch uses for its CUDA SDPA ops):

* forward: ``Q K^T`` and ``P V``, ``2 * b*h*n_q*n_k*d`` each: ``4 * b*h*n_q*n_k*d`` (not reduced for causal masking,
  like torch's own SDPA formulas: the kernel skips only whole masked blocks);
* backward: the scores are recomputed and four more matmuls run: ``2.5x`` the forward.

It cannot count FlexAttention (a compiled higher-order op): :func:`count_flops` reports ``None`` there unless an
analytic count is supplied by the caller.

Useful FLOPs (``flops_useful``) come from the variant's ``useful_flops(batch, seq_len)``: the forward FLOPs of the
(query, key) pairs the pattern scores. For ``fwd_bwd`` and ``train_step`` the harness multiplies them by 3, the usual
convention (backward ~ 2x forward; Kaplan et al. 2020, arXiv:2001.08361, section 2.1).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "BACKWARD_FACTOR",
    "FLOP_FORMULAS",
    "count_flops",
    "flop_counter",
    "sdpa_cpu_backward_flops",
    "sdpa_cpu_forward_flops",
    "useful_flops_for_mode",
]

#: useful FLOPs of forward+backward = this times the forward's (backward ~ 2x forward).
BACKWARD_FACTOR = 3

aten = torch.ops.aten


def sdpa_cpu_forward_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *args: Any,
    out_shape: Any = None, **kwargs: Any,
) -> int:
    """``4 * b * h * n_q * n_k * d`` for q ``(b, h, n_q, d)``, k ``(b, h, n_k, d)``, v ``(b, h, n_k, d_v)``."""
    b, h, n_q, d = query_shape
    n_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * b * h * n_q * n_k * d + 2 * b * h * n_q * n_k * d_v


def sdpa_cpu_backward_flops(
    grad_out_shape: tuple[int, ...], query_shape: tuple[int, ...], key_shape: tuple[int, ...],
    value_shape: tuple[int, ...], *args: Any, out_shape: Any = None, **kwargs: Any,
) -> int:
    """Backward of the CPU flash kernel: recompute ``Q K^T`` (2bhnmd), then dP, dV, dQ, dK (2bhnmd each)."""
    b, h, n_q, d = query_shape
    n_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * b * h * n_q * n_k * d * 3 + 2 * b * h * n_q * n_k * d_v * 2


#: Formulas FlopCounterMode lacks; keyed by op overload packet as its registry is.
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU fused SDPA op and its backward."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` dispatches (matmuls, einsums, SDPA; element-wise ops count 0, as in torch)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def useful_flops_for_mode(forward_flops: int, mode: str) -> int:
    """Useful FLOPs of one call in ``mode``: the forward count (``prefill`` is a forward over the prompt), times
    :data:`BACKWARD_FACTOR` with a backward. ``decode`` has no sequence count (a step's pairs are its cache's)."""
    if mode in ("fwd", "prefill"):
        return forward_flops
    if mode in ("fwd_bwd", "train_step"):
        return BACKWARD_FACTOR * forward_flops
    raise ValueError(f"mode must be one of fwd, fwd_bwd, train_step, prefill; got {mode!r}")
