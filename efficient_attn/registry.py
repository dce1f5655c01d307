"""The attention registry: one decorator to register a variant, one builder to create it by key.

Every variant is a module class (a subclass of :class:`efficient_attn.attention.base.Attention`) paired with a
typed config dataclass (a subclass of :class:`efficient_attn.attention.base.AttentionConfig`). Because configs are
dataclasses, a misspelt parameter is a ``TypeError`` that names it, and a bad value is a ``ValueError`` raised by the
config's own validation.

The registry is the ground floor of the package: it imports only the leaf module :mod:`efficient_attn.errors`,
never the variants (``efficient_attn.attention``) or anything above them. Registering is the variants' job: each
variant module applies :func:`register_attention` to its class when it is imported, and the decorator hands the
class its :class:`AttentionSpec` (``cls.spec``), so a module never looks itself up here.

Which variants are listed: :func:`list_attentions` and :func:`get_spec` see what has been registered so far. The
built-in variants are always registered before any caller can reach this module, because Python imports the package
``efficient_attn`` (whose ``__init__`` imports ``efficient_attn.attention``, which registers them) before any of its
submodules, ``efficient_attn.registry`` included. So ``import efficient_attn.registry as r; r.list_attentions()``
lists the built-ins; only code that runs while the package itself is still being imported (a variant module calling
``list_attentions()`` at import time) would see a partial list.

Example::

    import efficient_attn as ea
    ea.list_attentions()                    # ['bigbird', 'full', ...]
    attn = ea.build_attention("full", dim=256, num_heads=4, causal=True)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from efficient_attn.errors import check_parameter_names, check_required_parameters, unknown_name_error

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from efficient_attn.attention.base import Attention, AttentionConfig

__all__ = [
    "AttentionSpec",
    "register_attention",
    "build_attention",
    "build_config",
    "list_attentions",
    "get_spec",
]


@dataclass(frozen=True)
class AttentionSpec:
    """What a registered variant is and what it can do.

    Attributes:
        key: registry key, e.g. ``"window"``.
        module_cls: the ``Attention`` subclass (registration sets ``module_cls.spec`` to this spec).
        config_cls: its config dataclass.
        description: one line, naming the paper.
        paper: short citation, e.g. ``"Beltagy et al. 2020, arXiv:2004.05150"``.
        complexity: cost in sequence length, e.g. ``"O(n^2)"``, ``"O(n*w)"``, ``"O(n*k)"``.
        supports_causal: whether ``causal=True`` is allowed.
        supports_key_padding: whether ``key_padding_mask`` is honoured.
        backends: explicit backend names (``"auto"`` is always accepted in addition).
        exact: True when the variant computes softmax attention exactly over a pattern (full, sparse);
            False for approximations (low-rank, kernel).
        length_multiple: inputs are padded internally to a multiple of this (1 = none); see the module's padding report.
        max_len_field: name of the config field that bounds the sequence length (``None`` = unbounded).
    """

    key: str
    module_cls: type
    config_cls: type
    description: str
    paper: str
    complexity: str
    supports_causal: bool = True
    supports_key_padding: bool = True
    backends: tuple[str, ...] = ("naive",)
    exact: bool = True
    length_multiple: int = 1
    max_len_field: str | None = None

    @property
    def has_pattern(self) -> bool:
        """Exact pattern variants expose ``dense_mask(seq_len)``."""
        return self.exact


_REGISTRY: dict[str, AttentionSpec] = {}

T = TypeVar("T")


def register_attention(
    key: str,
    config_cls: type,
    *,
    description: str,
    paper: str,
    complexity: str,
    backends: tuple[str, ...],
    supports_causal: bool = True,
    supports_key_padding: bool = True,
    exact: bool = True,
    length_multiple: int = 1,
    max_len_field: str | None = None,
) -> Callable[[type[T]], type[T]]:
    """Class decorator that registers an attention module under ``key``.

    Raises:
        ValueError: the key is already registered, or ``config_cls`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"config_cls for {key!r} must be a dataclass, got {config_cls!r}")
    if "auto" in backends:
        raise ValueError(f"backends for {key!r} must list explicit backends only; 'auto' is implied")

    def decorator(module_cls: type[T]) -> type[T]:
        if key in _REGISTRY:
            raise ValueError(
                f"attention key {key!r} is already registered (by {_REGISTRY[key].module_cls.__qualname__})"
            )
        spec = AttentionSpec(
            key=key,
            module_cls=module_cls,
            config_cls=config_cls,
            description=description,
            paper=paper,
            complexity=complexity,
            supports_causal=supports_causal,
            supports_key_padding=supports_key_padding,
            backends=tuple(backends),
            exact=exact,
            length_multiple=length_multiple,
            max_len_field=max_len_field,
        )
        _REGISTRY[key] = spec
        # The class carries its own spec, so an instance never has to look itself up in the registry.
        module_cls.spec = spec  # type: ignore[attr-defined]
        module_cls.spec_key = key  # type: ignore[attr-defined]
        return module_cls

    return decorator


def list_attentions(pattern: str | None = None) -> list[str]:
    """Sorted registry keys, optionally filtered by a glob ``pattern`` (e.g. ``"*former"``).

    Lists what has been registered: the built-in variants (registered by importing ``efficient_attn``, which any
    import of this module does first; see the module docstring) and any variant registered since.
    """
    keys = sorted(_REGISTRY)
    if pattern is not None:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    return keys


def get_spec(key: str) -> AttentionSpec:
    """The :class:`AttentionSpec` of ``key``; ``KeyError`` naming the nearest keys when unknown."""
    if not isinstance(key, str):
        raise TypeError(f"attention key must be a str, got {type(key).__name__}")
    try:
        return _REGISTRY[key]
    except KeyError:
        raise unknown_name_error("attention key", key, sorted(_REGISTRY), "registered") from None


def build_config(key: str, **fields: Any) -> "AttentionConfig":
    """Create the config dataclass of ``key`` from keyword fields.

    Raises:
        KeyError: unknown key.
        TypeError: a field the config does not have (names it, suggests the nearest, lists the allowed ones).
        ValueError: a value the config rejects.
    """
    spec = get_spec(key)
    init_fields = [f for f in dataclasses.fields(spec.config_cls) if f.init]
    allowed = [f.name for f in init_fields]
    check_parameter_names(fields, allowed, f"attention {key!r}")
    required = [f.name for f in init_fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    check_required_parameters(fields, required, f"attention {key!r}")
    return spec.config_cls(**fields)


def build_attention(
    key: str,
    *,
    dim: int | None = None,
    num_heads: int | None = None,
    causal: bool = False,
    backend: str = "auto",
    **params: Any,
) -> "Attention":
    """Build the attention module registered under ``key``.

    Args:
        key: registry key (see :func:`list_attentions`).
        dim: model width (required); must be divisible by ``num_heads``.
        num_heads: number of heads (required).
        causal: mask future keys (only for variants whose spec says ``supports_causal``).
        backend: ``"auto"`` or one of the spec's backends.
        **params: the variant's own config fields (e.g. ``window_size``); a misspelt name is a ``TypeError`` that
            names it and its nearest spelling (``num_head``: did you mean ``num_heads``), checked before a
            missing ``dim`` / ``num_heads`` is reported (which is why they default to None here).

    Returns:
        An ``nn.Module``: ``forward(x)`` maps ``(batch, seq, dim)`` to ``(batch, seq, dim)``.
    """
    required = {name: value for name, value in (("dim", dim), ("num_heads", num_heads)) if value is not None}
    config = build_config(key, **required, causal=causal, backend=backend, **params)
    return get_spec(key).module_cls(config)
