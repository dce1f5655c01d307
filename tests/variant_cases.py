"""Small, pattern-exercising parameters per variant for the shape tests (GQA, positions, packing, cross-attention).

With the defaults (window 256, block 64, ...) a 40-token test input would be one block of full attention; these keep
every pattern's structure visible at tens of tokens. A variant not listed here runs with its defaults.
"""

from __future__ import annotations

import efficient_attn as ea
from helpers import build_for_test

SMALL_PARAMS = {
    "window": {"window_size": 5},
    "bigbird": {"block_size": 8, "num_random_blocks": 1, "num_global_blocks": 1},
    "longformer": {"window_size": 4, "global_tokens": 2},
    "linformer": {"k": 16},
    "performer": {"num_features": 32},
    "nystrom": {"num_landmarks": 8},
}


def build_small(key: str, **params):
    """``build_for_test`` with :data:`SMALL_PARAMS` (``params`` win), in float64."""
    return build_for_test(key, **{**SMALL_PARAMS.get(key, {}), **params}).double()


def backend_cases(keys=None, *, exclude=()):
    """``(key, backend)`` pairs of every registered variant's explicit backends."""
    for key in keys if keys is not None else ea.list_attentions():
        for backend in ea.get_spec(key).backends:
            if backend not in exclude:
                yield key, backend


def supports_gqa(key: str) -> bool:
    return bool(ea.get_spec(key).module_cls.supports_gqa)


def kv_heads_for(key: str, wanted: int, heads: int = 4) -> int:
    """``wanted`` key/value heads for a variant with grouped heads, else ``heads`` (the variant's tests of its own
    refusal live in test_gqa / test_contract)."""
    return wanted if supports_gqa(key) else heads
