"""Small parameters for the causal variants in the prefix, decode and generation tests.

Block, chunk and window sizes are a few tokens, so tens of tokens cross many blocks, chunks and window edges (and
lengths that are not multiples of them exercise the padding).
"""

from __future__ import annotations

import torch

import efficient_attn as ea
from helpers import build_for_test

CAUSAL_PARAMS = {
    "full": {},
    "window": {"window_size": 5},
    "bigbird": {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1},
    "longformer": {"window_size": 4, "global_tokens": 2},
    "performer": {"num_features": 32, "chunk_size": 8},
    "linear": {"chunk_size": 8},
    "retention": {"chunk_size": 8},
    "moba": {"block_size": 4, "top_k": 3},
}


def causal_keys() -> list[str]:
    """Every registered variant that can be causal (the test fails when one is missing from CAUSAL_PARAMS)."""
    return [key for key in ea.list_attentions() if ea.get_spec(key).supports_causal]


def cpu_backends(key: str, dtype: torch.dtype) -> list[str]:
    """The explicit backends of ``key`` that run forward on CPU in ``dtype``."""
    cls = ea.get_spec(key).module_cls
    return [b for b in ea.get_spec(key).backends
            if cls.unavailable_reason(b, torch.device("cpu"), False, dtype) is None]


def build_causal(key: str, **params):
    """The variant with :data:`CAUSAL_PARAMS`, causal, float64, eval mode."""
    return build_for_test(key, causal=True, **{**CAUSAL_PARAMS[key], **params}).double().eval()
