"""efficient-attn: efficient attention variants for PyTorch behind one registry, with length-scaling benchmarks.

Quick start::

    import efficient_attn as ea
    ea.list_attentions()
    attn = ea.build_attention("full", dim=256, num_heads=4)
    model = ea.build_model("full", task="lm", vocab_size=256, dim=256, depth=4, num_heads=4, max_len=4096)
"""

# Importing the attention package registers the built-in variants. Python runs this file before any submodule of
# the package, so ``efficient_attn.registry`` lists the built-ins however it was imported (see its docstring).
import efficient_attn.attention  # noqa: F401  (registers the built-in variants)
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.errors import BackendUnavailableError
from efficient_attn.model import ModelConfig, TransformerModel, build_model
from efficient_attn.registry import (
    AttentionSpec,
    build_attention,
    build_config,
    get_spec,
    list_attentions,
    register_attention,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionSpec",
    "BackendUnavailableError",
    "ModelConfig",
    "TransformerModel",
    "build_attention",
    "build_config",
    "build_model",
    "get_spec",
    "list_attentions",
    "register_attention",
]
