"""Small transformers models built from a config with random weights (no downloads), shared by the tests, the decode
benchmark's transformers peer and the ``hf`` benchmark level.

:func:`build_hf_llama` builds a Llama-shaped decoder (Touvron et al. 2023, arXiv:2302.13971: RMSNorm, RoPE, SwiGLU,
GQA) whose attention is ``attn_implementation``: one of transformers' own (``"sdpa"``, ``"eager"``,
``"flex_attention"``) or a name from :func:`efficient_attn.integrations.hf.register_hf`. The same ``seed`` gives the
same weights whatever the implementation, so two builds differ only in their attention.
"""

from __future__ import annotations

import torch
from torch import nn

from efficient_attn.integrations.hf import check_hf_model

from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
)

__all__ = ["build_hf_llama", "llama_config"]


def llama_config(
    *,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 1024,
    vocab: int = 256,
    max_positions: int = 1 << 17,
    attn_implementation: str = "sdpa",
    sliding_window: int | None = None,
) -> LlamaConfig | MistralConfig:
    """A ``LlamaConfig`` of the given shape (``kv_heads`` None = ``heads``, i.e. no GQA).

    ``sliding_window=w`` gives a ``MistralConfig`` instead (the same architecture plus a causal sliding window of
    ``w`` keys, the query itself included: our ``window_size = w - 1``).
    """
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
    known = ["eager", *AttentionInterface().valid_keys()]
    if attn_implementation not in known:
        raise ValueError(
            f"unknown attn_implementation {attn_implementation!r}; known now: {', '.join(known)} "
            "(register ours first with efficient_attn.integrations.hf.register_hf)"
        )
    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        attn_implementation=attn_implementation,
    )
    if sliding_window is not None:
        return MistralConfig(**shape, sliding_window=sliding_window)
    return LlamaConfig(**shape)


def build_hf_llama(
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 1024,
    vocab: int = 256,
    attn_implementation: str = "sdpa",
    *,
    lm_head: bool = False,
    max_positions: int = 1 << 17,
    sliding_window: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A ``LlamaModel`` (``lm_head=True``: ``LlamaForCausalLM``) with random weights from ``seed``, in eval mode;
    with ``sliding_window`` a ``MistralModel`` / ``MistralForCausalLM`` (see :func:`llama_config`).

    Returns:
        The model; ``model(input_ids)`` takes ``(batch, seq)`` token ids.

    Raises:
        ValueError: an unknown ``attn_implementation`` (ours must be registered first).
    """
    config = llama_config(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_positions=max_positions,
        attn_implementation=attn_implementation,
        sliding_window=sliding_window,
    )
    if sliding_window is None:
        cls = LlamaForCausalLM if lm_head else LlamaModel
    else:
        cls = MistralForCausalLM if lm_head else MistralModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return check_hf_model(model.to(device=device, dtype=dtype).eval())
