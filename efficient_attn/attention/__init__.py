"""Attention variants. Importing this package registers the built-in variants with the registry.

One module per variant; add a new variant's import below (the import registers it). ``efficient_attn/__init__.py``
imports this package, so the built-ins are registered whenever anything in ``efficient_attn`` is imported; the
registry itself never imports it (imports go downward only: registry -> attention).
"""

from efficient_attn.attention import full  # noqa: F401  (registers "full")
from efficient_attn.attention import window  # noqa: F401  (registers "window")
from efficient_attn.attention import bigbird  # noqa: F401  (registers "bigbird")
from efficient_attn.attention import longformer  # noqa: F401  (registers "longformer")
from efficient_attn.attention import linformer  # noqa: F401  (registers "linformer")
from efficient_attn.attention import nystrom  # noqa: F401  (registers "nystrom")
from efficient_attn.attention import performer  # noqa: F401  (registers "performer")
from efficient_attn.attention import linear  # noqa: F401  (registers "linear")
from efficient_attn.attention import retention  # noqa: F401  (registers "retention")
from efficient_attn.attention import moba  # noqa: F401  (registers "moba")
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.errors import BackendUnavailableError

__all__ = ["Attention", "AttentionConfig", "BackendUnavailableError"]
