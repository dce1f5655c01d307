"""The ``hf`` benchmark level: a Hugging Face transformers Llama-shaped decoder with our attention or its own.

A cell at level ``hf`` runs ``LlamaModel`` (Touvron et al. 2023, arXiv:2302.13971; no LM head) built by
:func:`efficient_attn.integrations.hf_models.build_hf_llama` from a config with random weights, its shape taken from the
cell: ``hidden = num_heads * head_dim``, ``num_heads`` attention heads, ``num_kv_heads`` key/value heads (GQA),
intermediate ``4 * hidden``, vocabulary 256, ``layers`` decoder layers (2 by default). Its attention is

* one of our variants, ``cell.variant`` a registry key: registered with the cell's params (and backend) by
  :func:`efficient_attn.integrations.hf.register_hf` under :func:`implementation_name` (``efficient_attn:<key>`` plus
  the params, so two parameter sets never share a name); or
* one of transformers' own implementations, ``cell.variant`` a peer name of :data:`TRANSFORMERS_PEERS`
  (``transformers-sdpa``, ``transformers-eager``, ``transformers-flex_attention``).

Tokens ``(batch_size, seq_len)`` come from ``seed``; the forward is ``model(tokens, use_cache=False)``, no cache on
either side (a forward that is not continued), and returns the last hidden state ``(batch, seq, hidden)``, which the
harness's modes sum (and backpropagate). The model is causal whatever the attention: cells must be causal.

Everything transformers is imported on use, so importing the harness never imports transformers.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

import torch
from torch import Tensor, nn

from efficient_attn.harness.plan import Cell
# transformers' own implementations the level compares against, and their peer names (defined with the other peers)
from efficient_attn.peers import TRANSFORMERS_IMPLEMENTATIONS, TRANSFORMERS_PEERS

__all__ = [
    "HF_LEVEL",
    "attention_modules_for",
    "TRANSFORMERS_IMPLEMENTATIONS",
    "TRANSFORMERS_PEERS",
    "build_hf_parts",
    "hf_row_info",
    "hf_unsupported_reason",
    "implementation_name",
    "model_shape",
]

#: The level name this module serves (``cell.level``).
HF_LEVEL = "hf"
#: The model's vocabulary (token ids are drawn from it).
VOCAB_SIZE = 256


def model_shape(cell: Cell, *, layers: int = 2, vocab_size: int = VOCAB_SIZE) -> dict:
    """The :func:`build_hf_llama` shape arguments for ``cell``: hidden ``num_heads * head_dim``, MLP ``4 * hidden``."""
    return dict(
        layers=layers,
        hidden=cell.dim,
        heads=cell.num_heads,
        kv_heads=cell.num_kv_heads,
        intermediate=4 * cell.dim,
        vocab=vocab_size,
    )


def _is_transformers(cell: Cell) -> bool:
    return cell.variant in TRANSFORMERS_PEERS


def _our_params(cell: Cell) -> dict:
    params = dict(cell.params)
    if cell.backend_requested != "auto":
        params["backend"] = cell.backend_requested
    return params


def implementation_name(cell: Cell) -> str:
    """The ``attn_implementation`` of ``cell``: transformers' own name for a :data:`TRANSFORMERS_PEERS` peer, else
    ``efficient_attn:<key>`` with the params, sorted (``efficient_attn:window(window_size=256)``).

    Raises:
        ValueError: a peer name that is not one of transformers' implementations.
    """
    if _is_transformers(cell):
        return TRANSFORMERS_PEERS[cell.variant]
    if cell.is_peer:
        raise ValueError(
            f"peer {cell.variant!r} does not run at level 'hf'; its peers are transformers' own implementations: "
            f"{', '.join(TRANSFORMERS_PEERS)}"
        )
    params = _our_params(cell)
    spelled = ",".join(f"{field}={params[field]!r}" for field in sorted(params))
    return f"efficient_attn:{cell.variant}" + (f"({spelled})" if params else "")


def hf_unsupported_reason(cell: Cell) -> str | None:
    """Why ``cell`` cannot run at level ``hf``, decided without building (for the harness's static checks), or None.

    A Llama decoder is causal; a transformers implementation is a peer; flex_attention has no backward on CPU.
    """
    if cell.level != HF_LEVEL:
        return f"level {cell.level!r} is not {HF_LEVEL!r}"
    if not cell.causal:
        return "level 'hf' runs a causal decoder (LlamaModel): causal = [true]"
    if _is_transformers(cell):
        if cell.params:
            return f"{cell.variant} takes no params (got {sorted(cell.params)})"
        if cell.variant == "transformers-flex_attention" and cell.device == "cpu" and cell.mode != "fwd":
            return "transformers' flex_attention has no backward on CPU"
    elif cell.is_peer:
        return f"peer {cell.variant!r} does not run at level 'hf' (peers there: {', '.join(TRANSFORMERS_PEERS)})"
    return None


def _register(cell: Cell) -> str:
    """Register ``cell``'s variant of ours (or check transformers' name) and return the ``attn_implementation``."""
    name = implementation_name(cell)
    if not _is_transformers(cell):
        from efficient_attn.integrations.hf import register_hf

        register_hf(cell.variant, name=name, **_our_params(cell))
    return name


def build_hf_parts(
    cell: Cell,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
) -> tuple[nn.Module, Callable[[], Tensor], list[Tensor]]:
    """``(module, forward, leaves)`` of an ``hf`` cell: the LlamaModel, a callable returning its last hidden state
    ``(batch_size, seq_len, hidden)`` for fixed tokens, and its trainable parameters.

    The model's ``max_position_embeddings`` is the cell's ``seq_len`` (what a length-bounded variant sizes itself by).

    Raises:
        ValueError: a cell this level cannot run (:func:`hf_unsupported_reason`); our registry's and
            ``register_hf``'s errors for a bad key or parameter.
        ImportError: transformers is not installed.
    """
    reason = hf_unsupported_reason(cell)
    if reason is not None:
        raise ValueError(f"cell {cell.label()}: {reason}")
    from efficient_attn.integrations.hf_models import build_hf_llama

    name = _register(cell)
    model = build_hf_llama(
        **model_shape(cell, layers=layers, vocab_size=vocab_size),
        attn_implementation=name,
        max_positions=cell.seq_len,
        seed=seed,
        dtype=dtype,
        device=device,
    )
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (cell.batch_size, cell.seq_len), generator=generator).to(device)

    def forward() -> Tensor:
        return model(tokens, use_cache=False).last_hidden_state

    leaves = [p for p in model.parameters() if p.requires_grad]
    return model, forward, leaves


def hf_row_info(cell: Cell) -> dict[str, str]:
    """What an ``hf`` row records beyond its configuration: ``transformers_version`` (installed) and
    ``attn_implementation`` (:func:`implementation_name`)."""
    return {
        "transformers_version": importlib.metadata.version("transformers"),
        "attn_implementation": implementation_name(cell),
    }


def attention_modules_for(cell: Cell) -> list[nn.Module]:
    """Our attention modules that ``cell``'s registration has built so far (after a first forward; to read
    ``last_backend``), shared by every model of that registration; empty for transformers' implementations."""
    if _is_transformers(cell):
        return []
    from efficient_attn.integrations.hf import attention_modules

    return attention_modules(implementation_name(cell))
