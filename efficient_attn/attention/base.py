"""The attention contract every variant implements, and the config fields every variant shares.

A variant is ``projections + core``:

* ``forward(x, key_padding_mask=None)``: ``(batch, seq, dim) -> (batch, seq, dim)``; a fused QKV projection, the core,
  and an output projection.
* ``attend(q, k, v, key_padding_mask=None)``: ``(batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim)``; the core
  with no projections. It resolves the backend (``auto`` or the configured one), records it in ``last_backend``, and
  calls ``_attend_<backend>``.

``key_padding_mask`` is bool ``(batch, seq)`` with True = real token. A query with no allowed key (all of its keys
are padding, or masked by the pattern) yields zeros, never NaN.

Subclasses implement ``_attend_<name>`` for each backend listed in their registry spec, and ``auto_backend``.
Exact pattern variants also implement ``dense_mask(seq_len)`` and ``num_pairs(seq_len)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from efficient_attn.errors import BackendUnavailableError, require_positive_int, unknown_name_error

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from efficient_attn.registry import AttentionSpec

AUTO = "auto"


@dataclass(kw_only=True)
class AttentionConfig:
    """Fields shared by every variant.

    Attributes:
        dim: model width (input and output of ``forward``).
        num_heads: number of heads; must divide ``dim``.
        causal: query i may only attend to keys j <= i.
        backend: ``"auto"`` or an explicit backend of the variant.
        dropout: dropout probability on attention weights (training mode only). Backends that never form the
            weights explicitly apply it where they can; see each variant.
        bias: whether the QKV and output projections have a bias.
    """

    dim: int
    num_heads: int
    causal: bool = False
    backend: str = AUTO
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        require_positive_int("dim", self.dim)
        require_positive_int("num_heads", self.num_heads)
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must divide dim={self.dim} "
                f"(e.g. num_heads in {[h for h in range(1, 17) if self.dim % h == 0]})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Attention(nn.Module):
    """Base class of every registered variant (see the module docstring for the contract)."""

    #: The registry entry of the class, set by ``@register_attention`` (with ``spec_key``, its key).
    spec: ClassVar[AttentionSpec]
    spec_key: ClassVar[str]
    #: Why this variant cannot be causal (used in the error message when ``supports_causal`` is False).
    causal_unsupported_reason: ClassVar[str] = "this variant does not support causal masking"

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        spec = getattr(type(self), "spec", None)
        if spec is None:
            raise TypeError(
                f"{type(self).__name__} is not a registered attention; decorate it with @register_attention"
            )
        if not isinstance(config, spec.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {spec.config_cls.__name__}, got {type(config).__name__}")
        allowed_backends = [AUTO, *spec.backends]
        if config.backend not in allowed_backends:
            raise unknown_name_error(
                "backend", config.backend, allowed_backends, "allowed", ValueError, owner=f"attention {spec.key!r}"
            )
        if config.causal and not spec.supports_causal:
            raise ValueError(f"attention {spec.key!r} cannot be causal: {self.causal_unsupported_reason}")
        self.config = config
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)
        self.out = nn.Linear(config.dim, config.dim, bias=config.bias)
        #: The backend the last ``attend`` call ran (what ``auto`` resolved to).
        self.last_backend: str | None = None
        #: The internal sequence length the last ``attend`` call computed on (>= seq when the variant pads).
        self.last_padded_len: int | None = None

    # ----------------------------------------------------------------------------------------------- public API
    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``: QKV projection, :meth:`attend`, output projection."""
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"expected x of shape (batch, seq, {self.config.dim}), got {tuple(x.shape)}")
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.config.num_heads)
        o = self.attend(q, k, v, key_padding_mask=key_padding_mask)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The core: ``(batch, heads, seq, head_dim)`` q, k, v -> output of the same shape."""
        self._check_inputs(q, k, v, key_padding_mask)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = self.resolve_backend(q.device, needs_grad, seq_len=q.shape[-2], dtype=q.dtype)
        self.last_backend = backend
        self.last_padded_len = q.shape[-2]
        return getattr(self, f"_attend_{backend}")(q, k, v, key_padding_mask)

    def resolve_backend(
        self,
        device: torch.device | str,
        needs_grad: bool,
        *,
        seq_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> str:
        """The backend ``attend`` will run for an input of ``seq_len`` tokens and ``dtype`` on ``device``.

        ``seq_len`` and ``dtype`` default to unknown (``auto`` then skips choices that depend on them; the dtype
        falls back to the module's parameters'). The harness calls this before a cell runs, with the cell's shape.

        Raises:
            BackendUnavailableError: a backend that cannot run here, with the reason.
        """
        device = torch.device(device)
        dtype = dtype if dtype is not None else self._parameter_dtype()
        backend = self.config.backend
        if backend == AUTO:
            backend = self.auto_backend(device, needs_grad, seq_len=seq_len, dtype=dtype)
        reason = self.unavailable_reason(backend, device, needs_grad, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} of attention {self.spec_key!r}: {reason}")
        return backend

    def auto_backend(
        self, device: torch.device, needs_grad: bool, *, seq_len: int | None = None, dtype: torch.dtype | None = None
    ) -> str:
        """The backend ``auto`` picks on ``device`` (for backward too when ``needs_grad``). Override per variant."""
        return self.spec.backends[0]

    @classmethod
    def unavailable_reason(
        cls, backend: str, device: torch.device, needs_grad: bool, dtype: torch.dtype | None = None
    ) -> str | None:
        """Why ``backend`` cannot run on ``device`` (None when it can). Override for device- or mode-bound backends.

        ``needs_grad`` asks about backward as well (e.g. a forward-only kernel returns its reason then); ``dtype``
        (None = any) about the input's dtype (e.g. a kernel without float64).
        """
        return None

    def _parameter_dtype(self) -> torch.dtype | None:
        for param in self.parameters():
            return param.dtype
        return None

    @property
    def dropout_p(self) -> float:
        """Attention dropout in effect now (0 in eval mode)."""
        return self.config.dropout if self.training else 0.0

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items() if k not in ("dim", "num_heads"))
        return f"key={self.spec_key!r}, dim={self.config.dim}, num_heads={self.config.num_heads}, {fields}"

    # --------------------------------------------------------------------------------------------- validation
    def _check_inputs(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
        if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
            raise ValueError(
                "attend expects q, k, v of one shape (batch, heads, seq, head_dim); got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] != self.config.num_heads:
            raise ValueError(f"attend expects {self.config.num_heads} heads (config.num_heads), got {q.shape[1]}")
        if key_padding_mask is not None:
            if not self.spec.supports_key_padding:
                raise ValueError(f"attention {self.spec_key!r} does not support key_padding_mask")
            expected = (q.shape[0], q.shape[2])
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must be bool of shape (batch, seq) = {expected} with True = real token, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
