"""The attention contract every variant implements, and the config fields every variant shares.

A variant is ``projections + core``:

* ``forward(x, key_padding_mask=None, *, positions=None, document_ids=None, context=None)``:
  ``(batch, seq, dim) -> (batch, seq, dim)``; the QKV projection (``num_heads`` query heads, ``num_kv_heads`` key and
  value heads), rotary positions on q and k when ``config.rope``, the core, and an output projection. With
  ``context`` ``(batch, ctx_len, dim)`` keys and values come from it (encoder-decoder attention).
* ``attend(q, k, v, key_padding_mask=None, *, document_ids=None, cross=None)``: the core with no projections.
  q is ``(batch, heads, q_len, head_dim)``, k and v ``(batch, kv_heads, kv_len, head_dim)`` (grouped-query attention
  when ``kv_heads < heads``: query head ``i`` uses key/value head ``i // (heads // kv_heads)``, Ainslie et al. 2023,
  arXiv:2305.13245); the output has q's shape. It resolves the backend (``auto`` or the configured one), records it
  in ``last_backend``, and calls ``_attend_<backend>(q, k, v, key_padding_mask)``. ``q_len != kv_len`` is
  encoder-decoder attention (variants with ``supports_cross_attention``). ``document_ids`` packs documents: each
  is attended exactly as if it were alone (see :meth:`Attention.attend`).

Incremental decoding (causal variants): ``cache = attn.new_cache(batch, device=..., dtype=..., max_len=None)``, then
``attend(q, k, v, cache=cache)`` (or ``forward(x, cache=cache)``) with the new tokens only: a prefill chunk of any
length, then single tokens. The cache (:mod:`efficient_attn.attention.caches`) keeps what the pattern needs; each
call returns the new queries' outputs, equal to the causal full-sequence result at those positions. A first chunk
into an empty cache runs the ordinary backend over the chunk and fills the cache (``_cache_fill``); later tokens run
the variant's ``_decode_step`` one token at a time. Variants that cannot decode say why
(``decode_unsupported_reason``).

``key_padding_mask`` is bool ``(batch, seq)`` with True = real token. A query with no allowed key (all of its keys
are padding, or masked by the pattern) yields zeros, never NaN.

Non-finite inputs (one rule for every variant and backend, enforced here, not in the kernels): a NaN or infinite
query gives a NaN output row; a non-finite key or value gives NaN exactly in the rows whose pattern includes that
token (causal, window, globals, random blocks, the selection, packed documents), and a padded one reaches nobody;
every other row is unchanged. ``attend`` checks with one reduction pass; only when something is non-finite does it
run the backend on cleaned inputs and mark the rows (:meth:`Attention._nonfinite_reach`). Decode caches hold the
cleaned tokens and remember where the bad ones were.

Subclasses implement ``_attend_<name>`` for each backend listed in their registry spec, and ``auto_backend``.
Exact pattern variants also implement ``dense_mask(seq_len)`` and ``num_pairs(seq_len)``. What a variant supports
beyond the plain core (grouped key/value heads, ALiBi, packing, cross-attention) is declared by the class attributes
read by :func:`capabilities`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from efficient_attn.attention import packing
from efficient_attn.attention import positions as positional
from efficient_attn.errors import (
    BackendUnavailableError,
    check_field_types,
    require_positive_int,
    unknown_name_error,
)
from efficient_attn.registry import get_spec, list_attentions

from efficient_attn.attention.caches import Cache

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
        num_kv_heads: key/value heads (None = ``num_heads``); must divide ``num_heads``. Fewer than ``num_heads`` is
            grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245), 1 is multi-query attention (Shazeer
            2019, arXiv:1911.02150): ``num_heads / num_kv_heads`` query heads share each key/value head.
        alibi: add ALiBi's per-head linear distance penalty to the scores (Press et al. 2022, arXiv:2108.12409);
            only the exact variants' backends listed in their ``alibi_backends`` support it.
        rope: rotate q and k by rotary position embeddings in ``forward`` (Su et al. 2021, arXiv:2104.09864);
            needs an even ``head_dim``.
        rope_base: RoPE's frequency base (10000 in the paper).
    """

    dim: int
    num_heads: int
    causal: bool = False
    backend: str = AUTO
    dropout: float = 0.0
    bias: bool = True
    num_kv_heads: int | None = None
    alibi: bool = False
    rope: bool = False
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        # every field is also checked against its declared type, after all the specific checks (see
        # _with_field_types: they name allowed values, which the generic check cannot)
        require_positive_int("dim", self.dim)
        require_positive_int("num_heads", self.num_heads)
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must divide dim={self.dim} "
                f"(e.g. num_heads in {[h for h in range(1, 17) if self.dim % h == 0]})"
            )
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_shape_fields()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__post_init__" in cls.__dict__:
            cls.__post_init__ = _with_field_types(cls.__dict__["__post_init__"])

    def _check_shape_fields(self) -> None:
        """Validate (and resolve) ``num_kv_heads``, ``alibi``, ``rope`` and ``rope_base``."""
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        valid = [h for h in range(1, self.num_heads + 1) if self.num_heads % h == 0]
        kv = self.num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv not in valid:
            raise ValueError(
                f"num_kv_heads must divide num_heads={self.num_heads}, got {kv!r}; valid values: "
                f"{', '.join(map(str, valid))} (1 = multi-query attention)"
            )
        for name in ("alibi", "rope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        base = self.rope_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"rope_base must be a number > 1, got {base!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim  # type: ignore[operator]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _with_field_types(post_init):
    """Wrap a config's ``__post_init__`` so that every field is checked against its declared type
    (:func:`~efficient_attn.errors.check_field_types`: a bool field takes a bool only, a float field a number, ...)
    for every variant without code of its own: after the variant's specific checks (whose messages name the allowed
    values) when they pass, and instead of the raw ``TypeError`` a value of the wrong type made them raise."""

    @functools.wraps(post_init)
    def checked(self) -> None:
        try:
            post_init(self)
        except TypeError:
            check_field_types(self, type(self).__name__)  # a clear ValueError naming the field, if that was it
            raise
        if type(self).__post_init__ is checked:  # once, in the most derived config's __post_init__
            check_field_types(self, type(self).__name__)

    return checked


AttentionConfig.__post_init__ = _with_field_types(AttentionConfig.__post_init__)  # type: ignore[method-assign]


class Attention(nn.Module):
    """Base class of every registered variant (see the module docstring for the contract)."""

    #: The registry entry of the class, set by ``@register_attention`` (with ``spec_key``, its key).
    spec: ClassVar[AttentionSpec]
    spec_key: ClassVar[str]
    #: Why this variant cannot be causal (used in the error message when ``supports_causal`` is False).
    causal_unsupported_reason: ClassVar[str] = "this variant does not support causal masking"
    #: Whether k, v may have fewer heads than q (``num_kv_heads < num_heads``) without being repeated in memory.
    supports_gqa: ClassVar[bool] = False
    #: Backends that add ALiBi's bias (``config.alibi``); empty = the variant has no ALiBi.
    alibi_backends: ClassVar[tuple[str, ...]] = ()
    #: Backends that take one Python step per token (``linear`` and ``retention``'s ``recurrent``): the harness
    #: predicts their memory from short fake runs and says on their rows that they are for checking and decoding.
    sequential_backends: ClassVar[tuple[str, ...]] = ()
    #: Why ALiBi is not defined for this variant (used when ``alibi_backends`` is empty).
    alibi_unsupported_reason: ClassVar[str] = "ALiBi biases individual query-key scores, which this variant never forms"
    #: Whether ``attend(..., document_ids=...)`` is accepted (the default runs each document alone, see ``attend``).
    supports_packing: ClassVar[bool] = True
    #: Backends that accept ``document_ids`` (None = every backend).
    packing_backends: ClassVar[tuple[str, ...] | None] = None
    #: Whether q may have a different length than k and v (encoder-decoder attention).
    supports_cross_attention: ClassVar[bool] = False
    #: Why cross-attention is not defined for this variant.
    cross_unsupported_reason: ClassVar[str] = "its pattern is defined on one sequence (query i and key j index the same tokens)"
    #: Whether each query's output depends on that query alone (not on the other queries). False for Nystrom, whose
    #: query landmarks average the queries: as a decoder's cross-attention it would break the decoder's causality.
    queries_independent: ClassVar[bool] = True
    #: Why this variant cannot decode incrementally with a cache (None = it can: it implements ``_new_cache`` and
    #: ``_decode_step``).
    decode_unsupported_reason: ClassVar[str | None] = "it has no incremental decoding (no cache) yet"
    #: Set while a packed call runs its second and later documents: variants that redraw per call skip the redraw.
    _redraw_frozen: bool = False
    #: Whether the running ``attend`` call is cross-attention (read by variants that treat it differently).
    _call_is_cross: bool = False
    #: Set while the non-finite reach rerun runs (see ``_nonfinite_reach``): dropout and ALiBi are off.
    _reaching: bool = False
    #: Whether every earlier token of a decode cache is in the pattern of the newest query (full and the recurrent
    #: states); None = read it from ``mask_mod`` when the variant has one, else True.
    decode_reaches_all_earlier: ClassVar[bool | None] = None

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
        self._check_capabilities()
        self.qkv = nn.Linear(config.dim, config.dim + 2 * config.kv_dim, bias=config.bias)
        self.out = nn.Linear(config.dim, config.dim, bias=config.bias)
        #: The backend the last ``attend`` call ran (what ``auto`` resolved to).
        self.last_backend: str | None = None
        #: The internal sequence length the last ``attend`` call computed on (>= seq when the variant pads).
        self.last_padded_len: int | None = None

    # ----------------------------------------------------------------------------------------------- public API
    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        context: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``: QKV projection, RoPE (``config.rope``), :meth:`attend`, output.

        Args:
            x: ``(batch, seq, dim)``.
            key_padding_mask: bool ``(batch, kv_len)``, True = real key (kv_len = ctx_len with ``context``).
            positions: int ``(batch, seq)`` token positions for RoPE; default ``0, 1, ...`` per row, restarting at
                every document when ``document_ids`` is given (a cache would pass ``t, t + 1, ...``).
            document_ids: int ``(batch, seq)``, non-decreasing: packed documents, each attended alone.
            context: ``(batch, ctx_len, dim)``: keys and values come from it (encoder-decoder attention; no RoPE).
            cache: decode incrementally (see :meth:`attend`): ``x`` holds the new tokens only, ``key_padding_mask``
                is ``(batch, seq)`` for them, and RoPE positions default to ``cache.length, cache.length + 1, ...``.
        """
        cfg = self.config
        if cache is not None and context is not None:
            raise ValueError("a decode cache is for causal self-attention; it cannot be used with context")
        if not isinstance(x, Tensor):
            raise TypeError(f"expected x as a tensor (batch, seq, {cfg.dim}), got a {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"expected x of shape (batch, seq, {cfg.dim}), got {tuple(x.shape)}")
        if context is None:
            q, kv = self.qkv(x).split([cfg.dim, 2 * cfg.kv_dim], dim=-1)
        else:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cfg.dim:
                raise ValueError(
                    f"expected context of shape ({x.shape[0]}, ctx_len, {cfg.dim}), got {tuple(context.shape)}"
                )
            if document_ids is not None or positions is not None:
                raise ValueError("document_ids and positions are for self-attention, not with context")
            weight, bias = self.qkv.weight, self.qkv.bias
            q = nn.functional.linear(x, weight[: cfg.dim], None if bias is None else bias[: cfg.dim])
            kv = nn.functional.linear(context, weight[cfg.dim :], None if bias is None else bias[cfg.dim :])
        q = rearrange(q, "b n (h d) -> b h n d", h=cfg.num_heads)
        k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=cfg.num_kv_heads)
        if cfg.rope:
            if context is not None:
                raise ValueError("rope rotates q and k of one sequence; it is not defined for cross-attention")
            if positions is None and cache is not None:
                positions = (cache.length + torch.arange(x.shape[1], device=x.device)).expand(x.shape[0], -1)
            elif positions is None:
                positions = positional.default_positions(x.shape[0], x.shape[1], document_ids, x.device)
            positional.check_positions(positions, x.shape[0], x.shape[1])
            q, k = positional.apply_rope(q, positions, cfg.rope_base), positional.apply_rope(k, positions, cfg.rope_base)
        elif positions is not None:
            raise ValueError("positions are only used by rope (config.rope=False here)")
        o = self.attend(q, k, v, key_padding_mask=key_padding_mask, document_ids=document_ids,
                        cross=context is not None, cache=cache)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        cross: bool | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """The core: q ``(batch, heads, q_len, head_dim)``, k and v ``(batch, kv_heads, kv_len, head_dim)`` -> q's shape.

        Args:
            key_padding_mask: bool ``(batch, kv_len)``, True = real key.
            document_ids: int ``(batch, seq)``, non-decreasing along the sequence: which packed document each token
                belongs to. Each document is attended exactly as if it were alone (its own positions from 0, its own
                pattern, causal within itself); the default does it with one call per document, documents of equal
                length batched into one call, so the cost follows the documents, not the packed length.
            cross: whether q comes from another sequence than k, v (encoder-decoder attention); None = whenever
                ``q_len != kv_len``. Variants that treat the key padding mask as the query padding too in
                self-attention (Nystrom's landmarks) read it.
            cache: from :meth:`new_cache`: q, k, v are the new tokens only (``key_padding_mask`` ``(batch, new)``
                for them); their keys and values are appended and the new queries' outputs returned.
        """
        if cache is not None:
            return self._attend_cached(q, k, v, key_padding_mask, cache, document_ids, cross)
        self._check_inputs(q, k, v, key_padding_mask)
        is_cross = q.shape[-2] != k.shape[-2] if cross is None else bool(cross)
        if is_cross:
            self._check_cross()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = self.resolve_backend(q.device, needs_grad, seq_len=q.shape[-2], dtype=q.dtype)
        self.last_backend = backend
        self.last_padded_len = q.shape[-2]
        self._call_is_cross = is_cross
        if document_ids is not None:
            if is_cross:
                raise ValueError("document_ids packs documents of one sequence; it cannot be used with cross-attention")
            self._check_document_ids(document_ids, q)
            if self.config.backend == AUTO and self.packing_backends and backend not in self.packing_backends:
                # auto picked a backend that cannot pack (e.g. flex for a pattern anchored at the row start)
                backend = next(
                    (b for b in self.packing_backends
                     if self.unavailable_reason(b, q.device, needs_grad, q.dtype) is None), backend
                )
                self.last_backend = backend
            self._check_packing(backend)
        if not all_finite(q, k, v):
            return self._attend_nonfinite(backend, q, k, v, key_padding_mask, document_ids)
        return self._dispatch(backend, q, k, v, key_padding_mask, document_ids)

    def _dispatch(
        self, backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        document_ids: Tensor | None, fn=None,
    ) -> Tensor:
        """Run ``_attend_<backend>`` (or ``fn(q, k, v, key_padding_mask)``), once per document when packed."""
        if document_ids is None:
            return (fn or getattr(self, f"_attend_{backend}"))(q, k, v, key_padding_mask)
        if fn is None:
            native = getattr(self, f"_attend_{backend}_packed", None)
            if native is not None:
                return native(q, k, v, key_padding_mask, document_ids)
            fn = getattr(self, f"_attend_{backend}")
        return packing.attend_per_document(fn, q, k, v, key_padding_mask, document_ids, self)

    # ------------------------------------------------------------------------------------- non-finite inputs
    def _attend_nonfinite(
        self, backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        document_ids: Tensor | None,
    ) -> Tensor:
        """``attend`` when q, k or v holds a NaN or an infinity: the rule every variant and backend follows.

        A non-finite query makes its own output row NaN; a non-finite key or value makes NaN exactly the output rows
        whose pattern includes that token (:meth:`_nonfinite_reach`), and a padded token reaches nobody. Every other
        row is the variant's output on the cleaned inputs (non-finite entries set to 0), so no kernel ever sees a
        NaN: ``0 x NaN`` in a masked product, a NaN key in a gathered block or a compiled kernel's NaN handling
        cannot spread it, hide it or change other rows.
        """
        bad_q = ~torch.isfinite(q).all(-1)  # (b, h, q_len)
        bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (b, kv_heads, kv_len)
        q, k, v = (_cleaned(t) for t in (q, k, v))
        out = self._dispatch(backend, q, k, v, key_padding_mask, document_ids)
        with torch.no_grad(), self._reach_run():
            reached = self._nonfinite_reach(backend, q.detach(), k.detach(), bad_q, bad_kv, key_padding_mask,
                                            document_ids)
        return out.masked_fill(reached[..., None], math.nan)

    def _nonfinite_reach(
        self, backend: str, q: Tensor, k: Tensor, bad_q: Tensor, bad_kv: Tensor, key_padding_mask: Tensor | None,
        document_ids: Tensor | None,
    ) -> Tensor:
        """Bool ``(batch, heads, q_len)``: the output rows a non-finite token reaches.

        ``q``, ``k`` are the cleaned inputs, ``bad_q`` ``(batch, heads, q_len)`` and ``bad_kv`` ``(batch, kv_heads,
        kv_len)`` mark the non-finite tokens. The default reruns the same backend with ``q = k = 0`` (uniform
        weights over each row's pattern, so no weight underflows) and ``v`` = the indicator of bad keys: a row
        whose output is > 0 has a bad token in its pattern (causal, window, globals, random blocks, padding,
        documents). No ``n x n`` tensor; dropout, ALiBi and redraws are off for the rerun. Variants whose pattern is
        not a function of positions, or whose weights vanish at q = k = 0, override it (often with
        :meth:`_structural_reach`).
        """
        indicator = bad_kv[..., None].to(q.dtype).expand(k.shape).contiguous()
        seen = self._dispatch(backend, torch.zeros_like(q), torch.zeros_like(k), indicator, key_padding_mask,
                              document_ids)
        return bad_q | (seen[..., 0] > 0)

    def _structural_reach(
        self, backend: str, bad_q: Tensor, bad_kv: Tensor, key_padding_mask: Tensor | None,
        document_ids: Tensor | None, *, causal: bool, queries_mix: bool = False,
    ) -> Tensor:
        """The reach of a pattern that mixes every real key (``causal``: every real key at or before the row),
        within each document; ``queries_mix``: a bad real query reaches every row of its head too (Nystrom's query
        landmarks). Same arguments and result as :meth:`_nonfinite_reach`, O(n) work."""
        group = bad_q.shape[1] // bad_kv.shape[1]
        cross = bad_q.shape[-1] != bad_kv.shape[-1]

        def reach(qi: Tensor, ki: Tensor, vi: Tensor, mask: Tensor | None) -> Tensor:
            bad = vi[..., 0] > 0
            if mask is not None:
                bad = bad & mask[:, None, :]
            bad = bad.repeat_interleave(group, dim=1)  # (b, heads, kv_len): small bools
            if causal:
                seen = bad.cumsum(-1) > 0
            else:
                seen = bad.any(-1, keepdim=True).expand(*bad.shape[:2], qi.shape[-2])
            if queries_mix:
                bad_rows = qi[..., 0] > 0
                if mask is not None and not cross:
                    bad_rows = bad_rows & mask[:, None, :]
                seen = seen | bad_rows.any(-1, keepdim=True)
            return seen[..., None].to(qi.dtype)

        as_float = (bad_q[..., None].double(), bad_kv[..., None].double())
        seen = self._dispatch(backend, as_float[0], as_float[1], as_float[1], key_padding_mask, document_ids,
                              fn=reach)
        return bad_q | (seen[..., 0] > 0)

    @contextlib.contextmanager
    def _reach_run(self):
        """While a reach rerun runs: no dropout, no ALiBi, no redraw of random features or plans."""
        before = self._redraw_frozen, self._reaching
        self._redraw_frozen, self._reaching = True, True
        try:
            yield
        finally:
            self._redraw_frozen, self._reaching = before

    # ------------------------------------------------------------------------------------------------ decoding
    def new_cache(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> Cache:
        """An empty decode cache for ``batch`` sequences (see the module docstring).

        Args:
            device, dtype: of the cached tensors (default: the module's parameters').
            max_len: the most tokens it will hold: preallocated where the cache grows with the context (``full``'s
                static cache), a bound everywhere (a step past it is an error); None = unbounded.

        Raises:
            ValueError: the module is not causal, or the variant cannot decode (with the reason).
        """
        self._check_decodable()
        require_positive_int("batch", batch)
        if max_len is not None:
            require_positive_int("max_len", max_len)
        param = next(iter(self.parameters()), None)
        device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.get_default_dtype())
        cfg = self.config
        return self._new_cache(
            dict(owner=id(self), owner_name=self.spec_key, batch=batch, kv_heads=cfg.num_kv_heads,
                 head_dim=cfg.head_dim, dtype=dtype, device=device, max_len=max_len)
        )

    def _check_decodable(self) -> None:
        if self.decode_unsupported_reason is not None:
            raise ValueError(f"attention {self.spec_key!r} cannot decode incrementally: {self.decode_unsupported_reason}")
        if not self.config.causal:
            raise ValueError(
                f"decoding needs causal attention: this {self.spec_key!r} module has causal=False (a non-causal "
                "output at t depends on later tokens, which a decoder has not seen); build it with causal=True"
            )

    def _new_cache(self, common: dict) -> Cache:
        """The variant's empty cache from the shared fields ``common`` (owner, batch, heads, dtype, device, max_len)."""
        raise NotImplementedError

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, cache: Cache,
        document_ids: Tensor | None, cross: bool | None,
    ) -> Tensor:
        self._check_decodable()
        if document_ids is not None or cross:
            raise ValueError("a decode cache is for causal self-attention: no document_ids, no cross-attention")
        if not isinstance(cache, Cache):
            raise TypeError(f"cache must come from new_cache(), got {type(cache).__name__}")
        self._check_inputs(q, k, v, None)
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"with a cache, q, k and v hold the same new tokens; got {q.shape[-2]} queries and "
                             f"{k.shape[-2]} keys")
        if key_padding_mask is not None:
            expected = (q.shape[0], q.shape[-2])
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"with a cache, key_padding_mask is bool (batch, new tokens) = {expected}, True = real; got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
        cache.check(id(self), self.spec_key, q, k)
        bad_q = None
        if not all_finite(q, k, v):  # clean the new tokens and remember the bad ones (see _attend_nonfinite)
            bad_q, bad_kv = self._remember_nonfinite(cache, q, k, v, key_padding_mask)
            if cache.length == 0:
                out = self.attend(q, k, v, key_padding_mask)  # the chunk follows the rule of attend itself
            q, k, v = (_cleaned(t) for t in (q, k, v))
            if cache.length == 0:
                self._cache_fill(cache, q, k, v, key_padding_mask)
                return out
        if cache.length == 0:
            out = self.attend(q, k, v, key_padding_mask)
            self._cache_fill(cache, q, k, v, key_padding_mask)
            return out
        outs = []
        for t in range(q.shape[-2]):
            real_t = None if key_padding_mask is None else key_padding_mask[:, t : t + 1]
            pos = cache.length
            out = self._decode_step(cache, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], real_t)
            reached = self._decode_reached(cache, pos)
            if bad_q is not None:
                reached = bad_q[:, :, t] if reached is None else reached | bad_q[:, :, t]
            outs.append(out if reached is None else out.masked_fill(reached[..., None, None], math.nan))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def _remember_nonfinite(
        self, cache: Cache, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Mark the non-finite new tokens: returns ``bad_q`` ``(batch, heads, new)`` and ``bad_kv`` ``(batch,
        kv_heads, new)``, and records the positions of bad real keys/values in ``cache.nonfinite`` (positions
        ``(m,)``, which heads ``(batch, kv_heads, m)``), so a decode step costs nothing while none was seen and
        O(m) after (one entry in all when every earlier token stays in the pattern)."""
        bad_q = ~torch.isfinite(q).all(-1)
        bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
        if key_padding_mask is not None:
            bad_kv = bad_kv & key_padding_mask[:, None, :]
        index = bad_kv.any(1).any(0).nonzero()[:, 0]
        if index.numel():
            positions, heads = cache.length + index, bad_kv[..., index]
            if cache.nonfinite is not None:
                positions = torch.cat([cache.nonfinite[0], positions])
                heads = torch.cat([cache.nonfinite[1], heads], dim=-1)
            if self._reaches_all_earlier():
                positions, heads = positions.min(dim=0, keepdim=True).values, heads.any(-1, keepdim=True)
            cache.nonfinite = (positions, heads)
        return bad_q, bad_kv

    def _reaches_all_earlier(self) -> bool:
        if self.decode_reaches_all_earlier is not None:
            return self.decode_reaches_all_earlier
        return not hasattr(self, "mask_mod")

    def _decode_reached(self, cache: Cache, t: int) -> Tensor | None:
        """Bool ``(batch, heads)``: whether the query at position ``t`` sees a remembered bad token (None: none)."""
        if cache.nonfinite is None:
            return None
        positions, heads = cache.nonfinite
        group = self.config.num_heads // heads.shape[1]
        seen = heads.repeat_interleave(group, dim=1) & self._decode_reach(cache, t, positions)
        return seen.any(-1)

    def _decode_reach(self, cache: Cache, t: int, positions: Tensor) -> Tensor:
        """Bool broadcastable to ``(batch, heads, m)``: which earlier ``positions`` the query at ``t`` attends to.
        The default reads the pattern's ``mask_mod`` at length ``t + 1`` (causal patterns are prefix consistent), or
        every earlier token; variants with a data-dependent pattern override it."""
        if self._reaches_all_earlier():
            return positions <= t
        mod = self.mask_mod(t + 1, positions.device)  # type: ignore[attr-defined]
        pattern = getattr(self, "pattern", None)
        heads = torch.arange(getattr(pattern, "mask_heads", 1), device=positions.device)[:, None]
        query = torch.tensor(t, device=positions.device)
        return (mod(0, heads, query, positions[None, :]) & (positions <= t))[None]

    def fill_cache(
        self, cache: Cache, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> None:
        """Put a first chunk of ``n`` tokens into an empty ``cache`` without computing its outputs (what a prefill
        leaves behind; benchmarks fill caches with random keys and values this way). Shapes as :meth:`attend`."""
        self._check_decodable()
        if not isinstance(cache, Cache):
            raise TypeError(f"cache must come from new_cache(), got {type(cache).__name__}")
        if cache.length:
            raise ValueError(f"fill_cache fills an empty cache; this one holds {cache.length} tokens")
        self._check_inputs(q, k, v, key_padding_mask)
        cache.check(id(self), self.spec_key, q, k)
        if not all_finite(q, k, v):
            self._remember_nonfinite(cache, q, k, v, key_padding_mask)
            q, k, v = (_cleaned(t) for t in (q, k, v))
        self._cache_fill(cache, q, k, v, key_padding_mask)

    def _cache_fill(self, cache: Cache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        """Put a first chunk (its outputs already computed by the backend) into an empty cache."""
        cache.append(k, v, real)  # type: ignore[attr-defined]

    def _decode_step(self, cache: Cache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        """One new token: q ``(batch, heads, 1, head_dim)``, k, v ``(batch, kv_heads, 1, head_dim)``, ``real``
        ``(batch, 1)`` or None; appends it to ``cache`` and returns its output ``(batch, heads, 1, head_dim)``."""
        raise NotImplementedError

    def _decode_bias(self, q: Tensor, query_pos: int, key_pos: Tensor) -> Tensor | None:
        """ALiBi ``(1, heads, 1, keys)`` for one query at ``query_pos`` against keys at ``key_pos``, or None."""
        slopes = self._alibi_slopes(q)
        if slopes is None:
            return None
        return positional.alibi_bias(slopes, torch.tensor(query_pos, device=q.device), key_pos)[None, :, None]

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
        self._check_alibi(backend)
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

    def _alibi_slopes(self, q: Tensor) -> Tensor | None:
        """``(heads,)`` ALiBi slopes in q's dtype and device, or None when ``config.alibi`` is off."""
        if not self.config.alibi or self._reaching:
            return None
        return positional.slopes_tensor(self.config.num_heads, q.device, q.dtype)

    def _alibi_dense(self, q: Tensor) -> Tensor | None:
        """The dense ``(heads, n, n)`` ALiBi bias for the ``naive`` backends (O(n^2): the oracle only), or None."""
        slopes = self._alibi_slopes(q)
        if slopes is None:
            return None
        idx = torch.arange(q.shape[-2], device=q.device)
        return positional.alibi_bias(slopes, idx[:, None], idx[None, :])

    def _alibi_score_mod(self, q: Tensor):
        """FlexAttention ``score_mod`` adding ALiBi (one closure per device, so compiled kernels are reused), or None."""
        if not self.config.alibi or self._reaching:
            return None
        cache = self.__dict__.setdefault("_score_mods", {})
        key = str(q.device)
        if key not in cache:
            slopes = positional.slopes_tensor(self.config.num_heads, q.device, torch.float32)

            def alibi_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return score - slopes[h] * (q_idx - kv_idx).abs()

            cache[key] = alibi_score
        return cache[key]

    def _parameter_dtype(self) -> torch.dtype | None:
        for param in self.parameters():
            return param.dtype
        return None

    @property
    def dropout_p(self) -> float:
        """Attention dropout in effect now (0 in eval mode)."""
        return self.config.dropout if self.training and not self._reaching else 0.0

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items() if k not in ("dim", "num_heads"))
        return f"key={self.spec_key!r}, dim={self.config.dim}, num_heads={self.config.num_heads}, {fields}"

    # --------------------------------------------------------------------------------------------- validation
    def _check_capabilities(self) -> None:
        """Config fields the variant cannot honour are refused when the module is built (named, with the reason)."""
        cfg = self.config
        if cfg.num_kv_heads != cfg.num_heads and not self.supports_gqa:
            raise ValueError(
                f"attention {self.spec_key!r} does not support grouped key/value heads yet "
                f"(num_kv_heads={cfg.num_kv_heads} < num_heads={cfg.num_heads}); variants that do: "
                f"{', '.join(variants_supporting('gqa'))}"
            )
        if cfg.alibi:
            if not self.alibi_backends:
                raise ValueError(
                    f"alibi is not supported by attention {self.spec_key!r}: {self.alibi_unsupported_reason}; "
                    f"variants that support it: {', '.join(variants_supporting('alibi'))}"
                )
            if cfg.backend != AUTO:
                self._check_alibi(cfg.backend)

    def _check_alibi(self, backend: str) -> None:
        if self.config.alibi and backend not in self.alibi_backends:
            raise ValueError(
                f"backend {backend!r} of attention {self.spec_key!r} cannot add ALiBi: "
                f"{ALIBI_REFUSALS.get(backend, 'it has no ALiBi bias')}; backends with ALiBi: "
                f"{', '.join(self.alibi_backends)}"
            )

    def _check_cross(self) -> None:
        if not self.supports_cross_attention:
            raise ValueError(
                f"attention {self.spec_key!r} does not support cross-attention (query length != key length): "
                f"{self.cross_unsupported_reason}; variants that do: {', '.join(variants_supporting('cross'))}"
            )
        if self.config.causal:
            raise ValueError(
                f"attention {self.spec_key!r} with causal=True needs one sequence; cross-attention (query length != "
                "key length) has no causal order between decoder queries and encoder keys: use causal=False"
            )
        if self.config.alibi:
            raise ValueError("alibi penalises distances within one sequence; it is not defined for cross-attention")

    def _check_packing(self, backend: str) -> None:
        if not self.supports_packing:
            raise ValueError(
                f"attention {self.spec_key!r} does not support packed documents (document_ids); variants that do: "
                f"{', '.join(variants_supporting('packing'))}"
            )
        if self.packing_backends is not None and backend not in self.packing_backends:
            raise ValueError(
                f"backend {backend!r} of attention {self.spec_key!r} does not support packed documents "
                f"(document_ids); use one of: {', '.join(self.packing_backends)}"
            )

    def _check_document_ids(self, document_ids: Tensor, q: Tensor) -> None:
        expected = (q.shape[0], q.shape[-2])
        packing.check_document_ids(document_ids, expected)

    def _check_inputs(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
        """Refuse inputs no backend can take, before any backend work (one message per mistake, the same for every
        backend): non-tensors, mixed dtypes or devices, wrong shapes or heads, empty batch or sequence, a key
        padding mask that is not a bool ``(batch, kv_len)`` tensor."""
        cfg = self.config
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"attend expects q, k, v as tensors (batch, heads, seq, head_dim); {name} is a "
                                f"{type(t).__name__}")
        if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
            raise ValueError(
                f"q, k and v must share one dtype and one device; got dtypes {q.dtype}, {k.dtype}, {v.dtype} and "
                f"devices {q.device}, {k.device}, {v.device} (convert them with .to(...) first)"
            )
        if not q.is_floating_point():
            raise ValueError(f"q, k and v must be floating point, got {q.dtype}")
        if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
            raise TypeError(
                "key_padding_mask must be a bool tensor of shape (batch, kv_len) with True = real token, got a "
                f"{type(key_padding_mask).__name__} (e.g. torch.tensor(mask, dtype=torch.bool))"
            )
        if key_padding_mask is not None and key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q, k, v on {q.device}")
        if q.dim() == 4 and k.dim() == 4 and (0 in (q.shape[0], q.shape[-2], k.shape[-2])):
            raise ValueError(
                "attend needs a non-empty batch and sequence: got q of shape (batch, heads, q_len, head_dim) = "
                f"{tuple(q.shape)} and k, v of shape {tuple(k.shape)}"
            )
        if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
            raise ValueError(
                "attend expects q (batch, heads, q_len, head_dim) and k, v of one shape (batch, kv_heads, kv_len, "
                f"head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] != cfg.num_heads:
            raise ValueError(f"attend expects {cfg.num_heads} query heads (config.num_heads), got {q.shape[1]}")
        if k.shape[1] != cfg.num_kv_heads:
            raise ValueError(
                f"attend expects {cfg.num_kv_heads} key/value heads (config.num_kv_heads), got {k.shape[1]}"
            )
        if key_padding_mask is not None:
            if not self.spec.supports_key_padding:
                raise ValueError(f"attention {self.spec_key!r} does not support key_padding_mask")
            expected = (k.shape[0], k.shape[2])
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must be bool of shape (batch, kv_len) = {expected} with True = real token, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of ``tensors`` is finite: one reading pass each (their sums, which a NaN or an infinity
    always makes non-finite), nothing allocated but scalars, one host sync. A sum that overflows only sends the call
    down the non-finite path, which finds nothing to clean: slower, never wrong. True without looking for tensors
    that hold no data (fake or meta tensors of a memory prediction) and while ``torch.compile`` traces."""
    first = tensors[0]
    if first.device.type == "meta" or is_fake(first) or torch.compiler.is_compiling():
        return True
    with torch.no_grad():
        total = sum(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors)
    return bool(torch.isfinite(total))


def _cleaned(t: Tensor) -> Tensor:
    """``t`` with its NaN and infinities set to 0 (differentiable: the finite entries keep their gradient)."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


#: Why a backend without ALiBi cannot add it (for the error message).
ALIBI_REFUSALS = {
    "sdpa": "scaled_dot_product_attention takes a bias only as a dense (q_len, kv_len) tensor, and no efficient "
    "variant builds an n x n tensor outside 'naive'",
    "xformers": "this backend passes xFormers only structural masks, never a dense bias",
}

#: Capability names of :func:`capabilities` and what they mean.
CAPABILITIES = {
    "gqa": "grouped/multi-query key-value heads (num_kv_heads < num_heads)",
    "alibi": "ALiBi distance bias (alibi=True)",
    "packing": "packed documents (document_ids)",
    "cross": "cross-attention (query length != key length)",
}


def capabilities(module_cls: type) -> dict[str, object]:
    """What a variant supports beyond the plain core: ``{"gqa": bool, "alibi": backends, "packing": bool or backends,
    "cross": bool}`` (read from the class attributes of :class:`Attention`)."""
    packing_backends = getattr(module_cls, "packing_backends", None)
    supports_packing = getattr(module_cls, "supports_packing", False)
    return {
        "gqa": bool(getattr(module_cls, "supports_gqa", False)),
        "alibi": tuple(getattr(module_cls, "alibi_backends", ())),
        "packing": (tuple(packing_backends) if packing_backends is not None else True) if supports_packing else False,
        "cross": bool(getattr(module_cls, "supports_cross_attention", False)),
    }


def variants_supporting(capability: str) -> list[str]:
    """Registered keys whose variant supports ``capability`` (a key of :data:`CAPABILITIES`)."""
    if capability not in CAPABILITIES:
        raise KeyError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    return [key for key in list_attentions() if capabilities(get_spec(key).module_cls)[capability]]
