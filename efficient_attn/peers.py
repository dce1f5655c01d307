"""Peers: attention implementations from other libraries, wrapped for side-by-side benchmarks (outside the registry).

A peer is measured at ``layer`` level: it includes its own projections, and its ``forward(x, key_padding_mask=None)``
maps ``(batch, seq, dim) -> (batch, seq, dim)`` like our :class:`efficient_attn.attention.base.Attention`. Peers
whose core is separable also have ``attend(q, k, v, key_padding_mask=None)`` on ``(batch, heads, seq, head_dim)``
for ``core`` level comparisons (``peer_info(name)["levels"]`` lists the levels a peer supports).

The peer packages are optional (``pip install 'efficient-attn[peers]'``) and imported only inside the builders,
never at import time of this module.

Parameter mapping (ours -> theirs), at equal keys per query. The mapping lives in this module only: the builders
below apply it, :data:`PEERS` states it as data (``peer_info(name)["mapping"]``, ``mapping_table()`` renders it),
and this table is its summary (tests/test_peers.py checks the three name the same parameters)::

    peer            level(s)     our parameter             their parameter
    --------------  -----------  ------------------------  -------------------------------------------------------
    local-attention core, layer  window_size=w             LocalAttention(window_size=w, look_backward=1,
                                                           look_forward=1 (0 when causal), exact_windowsize=True,
                                                           autopad=True); keys j with |i-j| <= w (causal:
                                                           0 <= i-j <= w), exactly our `window` pattern
                                 causal                    causal (look_forward=0)
                                 (layer projections)       our own fused qkv Linear(dim, 3 dim) + out Linear(dim, dim)
    hf-longformer   layer        window_size=w             LongformerConfig(attention_window=2w): one-sided w, keys
                                                           |i-j| <= w; no global tokens (attention_mask 0 / -10000)
                                 (layer projections)       its query/key/value Linears + our out Linear(dim, dim)
                                                           (HF's LongformerSelfOutput adds residual+LayerNorm: not
                                                           attention, left out)
    hf-bigbird      layer        block_size=b              BigBirdConfig(block_size=b)
                                 num_random_blocks=r       BigBirdConfig(num_random_blocks=r)
                                 seed                      BigBirdBlockSparseAttention(seed=...) (numpy seed)
                                 num_global_blocks         not a parameter: HF's global blocks are FIXED to the first
                                                           AND the last block (ours: the first num_global_blocks);
                                                           use num_global_blocks=2 in ours for equal keys per query
                                 (window)                  fixed to 3 blocks (own block and one on each side)
                                 (layer projections)       its query/key/value Linears + our out Linear(dim, dim)
    linformer       layer        k                         LinformerSelfAttention(k=k)
                                 max_len (default seq_len) LinformerSelfAttention(seq_len=max_len)
                                 share_kv                  share_kv; NOTE lucidrains then also reuses the key Linear
                                                           for values (V = K), ours shares only E = F: equal only
                                                           when our W_v equals W_k
                                 headwise                  only False: lucidrains shares one E (and F) across heads
                                 num_heads, dim            heads=num_heads, dim=dim, dim_head=dim // num_heads
    hf-llama-decode layer        (full: window_size unset) LlamaAttention of a one-layer build_hf_llama (sdpa,
                                 (decode only)             random weights from seed) + DynamicCache(config)
                                 window_size=w             the Mistral twin: sliding_window = w + 1 (w + 1 keys with
                                                           the query, as our causal window); its DynamicCache keeps
                                                           the last w keys and values
                                 causal                    always True (a decoder)
                                 (positions)               RoPE at the cache's length

Honest notes on the peers (also in ``peer_info(name)["notes"]`` and, per call, in ``module.last_note``):

* hf-bigbird falls back to FULL attention when the input has ``<= (5 + 2 r) * b`` tokens (704 for b=64, r=3),
  exactly as ``BigBirdModel`` does; the wrapper does the same and says so in ``last_note``. In eval mode HF uses no
  random blocks (transformers #23055): build it in train mode (the default) with dropout 0, as the benchmark does.
  At padded lengths 1024, 3072 and 4096 HF uses the paper's old plan, which draws random blocks only among the
  first 1024 tokens (transformers #16566). It reseeds numpy's global generator on every training forward.
* hf-bigbird in transformers 5.x always materialises a dense ``(batch, heads, n, n)`` ``attention_probs`` in its
  block-sparse path (there is no ``output_attentions`` switch any more), so its memory is O(n^2) even though its
  compute is block-sparse; seen with transformers 5.24.0 (``peer_info`` reports the installed version).
* hf-longformer and hf-bigbird need ``seq % 2w == 0`` / ``seq % b == 0``: the wrapper pads with zeros and masks the
  padding, as ``LongformerModel`` / ``BigBirdModel`` do, and records the padded length in ``last_padded_len``.
* local-attention's ``autopad`` pads with zero keys that are NOT masked unless a mask is passed: the wrapper always
  passes one when it pads, so padded keys are never attended. A query whose window holds no real key gets a uniform
  average (local-attention masks with a finite value), where ours returns zeros.
* linformer (lucidrains) has no key padding mask and no causal mode: a mask is a ``ValueError``.
* hf-llama-decode runs ``decode`` cells only. Its ``DynamicCache`` appends by ``torch.cat``, so every step copies the
  whole cache; its cache bytes are the key and value tensors its layers hold after a step.

Papers: Zaheer et al. 2020 (BigBird, arXiv:2007.14062); Beltagy et al. 2020 (Longformer, arXiv:2004.05150);
Wang et al. 2020 (Linformer, arXiv:2006.04768); local windowed attention as in Roy et al. 2021 (Routing Transformer,
arXiv:2003.05997), implemented by lucidrains/local-attention.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from efficient_attn.errors import check_parameter_names, require_positive_int, unknown_name_error

__all__ = [
    "PEERS",
    "PeerAttention",
    "PeerSpec",
    "PeerUnavailableError",
    "TRANSFORMERS_IMPLEMENTATIONS",
    "TRANSFORMERS_PEERS",
    "build_peer",
    "list_peers",
    "mapping_table",
    "peer_info",
]

INSTALL_HINT = "pip install 'efficient-attn[peers]'"


class PeerUnavailableError(RuntimeError):
    """The package a peer wraps is not installed; the message names it and how to install it."""


@dataclass(frozen=True)
class PeerSpec:
    """What a peer is, where it comes from, and how our parameters map onto its own.

    Attributes:
        name: peer key, e.g. ``"hf-bigbird"``.
        distribution: the pip distribution that provides it (for the version and the error message).
        module: the import path checked before building.
        description: one line.
        levels: benchmark levels it can run at (``"layer"`` always; ``"core"`` when it has ``attend``).
        modes: benchmark modes it can run (see :data:`efficient_attn.vocab.MODES`).
        params: allowed parameters and their defaults (``None`` = derived at build time, see ``mapping``).
        mapping: rows of (our parameter, their parameter / behaviour).
        builder: the wrapper class, called with ``dim, num_heads, seq_len, params`` (resolved).
        notes: where its semantics differ from ours.
        check: the peer's own checks of its resolved parameters against ``seq_len`` (raises ``ValueError``), after
            the common ones (names, bools, ints); None when the common ones are all it needs.
    """

    name: str
    distribution: str
    module: str
    description: str
    levels: tuple[str, ...]
    params: dict[str, Any]
    mapping: tuple[tuple[str, str], ...]
    builder: Callable[..., "PeerAttention"] = field(repr=False, compare=False)
    notes: tuple[str, ...] = ()
    check: Callable[[dict[str, Any], int], None] | None = field(default=None, repr=False, compare=False)
    #: benchmark modes it can run (a decode peer: ``decode`` only)
    modes: tuple[str, ...] = ("fwd", "fwd_bwd", "train_step")


# ---------------------------------------------------------------------------------------------------- the base
class PeerAttention(nn.Module):
    """Base of every peer wrapper: ``forward(x, key_padding_mask=None)``, ``(batch, seq, dim) -> (batch, seq, dim)``.

    Attributes:
        peer_name: the peer key.
        params: the resolved parameters (ours, after defaults).
        last_note: what the last forward did that a reader of the results must know (fallback, padding), or None.
        last_padded_len: the sequence length the peer computed on in the last call (>= seq when it pads).
    """

    peer_name: ClassVar[str]

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.seq_len = seq_len
        self.params = dict(params)
        self.last_note: str | None = None
        self.last_padded_len: int | None = None

    def _check_x(self, x: Tensor, key_padding_mask: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"peer {self.peer_name!r} expects x of shape (batch, seq, {self.dim}), got {tuple(x.shape)}"
            )
        if key_padding_mask is not None:
            expected = (x.shape[0], x.shape[1])
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must be bool of shape (batch, seq) = {expected} with True = real token, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )

    def extra_repr(self) -> str:
        return f"peer={self.peer_name!r}, dim={self.dim}, num_heads={self.num_heads}, params={self.params!r}"


def _pad_seq(x: Tensor, key_padding_mask: Tensor | None, multiple: int) -> tuple[Tensor, Tensor, int]:
    """Right-pad ``x`` (batch, seq, dim) with zeros to a multiple; returns (x, mask with padding False, pad)."""
    batch, seq = x.shape[:2]
    pad = (-seq) % multiple
    mask = key_padding_mask
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return x, mask, pad


# ------------------------------------------------------------------------------------------- local-attention
class LocalAttentionPeer(PeerAttention):
    """lucidrains ``local_attention.LocalAttention`` with an exact window of ``w`` keys on each side.

    Core ``attend``: ``(batch, heads, seq, head_dim)`` q, k, v -> same; the layer adds our own fused qkv and output
    projections. Cost O(n * w) (buckets of w queries look at 3 buckets of keys).
    """

    peer_name = "local-attention"

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__(dim=dim, num_heads=num_heads, seq_len=seq_len, params=params)
        from local_attention import LocalAttention

        w = params["window_size"]
        causal = params["causal"]
        self.window_size = w
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.local = LocalAttention(
            window_size=w,
            causal=causal,
            look_backward=1,
            look_forward=0 if causal else 1,
            exact_windowsize=True,
            autopad=True,
            dropout=0.0,
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The core: ``(batch, heads, seq, head_dim)`` -> same."""
        if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"attend expects q, k, v of one shape (batch, heads, seq, head_dim); got {tuple(q.shape)}")
        seq = q.shape[-2]
        padded = math.ceil(seq / self.window_size) * self.window_size
        self.last_padded_len = padded
        mask = key_padding_mask
        if mask is None and padded != seq:
            # autopad appends zero keys that only a mask hides; without it they would take part in the softmax.
            mask = torch.ones(q.shape[0], seq, dtype=torch.bool, device=q.device)
        self.last_note = f"local-attention autopadded {seq} -> {padded}" if padded != seq else None
        return self.local(q, k, v, mask=mask)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``: our qkv projection, the peer's core, our output projection."""
        self._check_x(x, key_padding_mask)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        o = self.attend(q, k, v, key_padding_mask)  # (b, h, n, d)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))


# --------------------------------------------------------------------------------------------- hf-longformer
class HFLongformerPeer(PeerAttention):
    """HF ``LongformerSelfAttention`` (sliding chunks, no global tokens) with random weights, plus an output Linear.

    Beltagy et al. 2020, arXiv:2004.05150. Cost O(n * w); requires seq % 2w == 0, so the input is zero-padded and
    masked as ``LongformerModel`` does.
    """

    peer_name = "hf-longformer"

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__(dim=dim, num_heads=num_heads, seq_len=seq_len, params=params)
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        w = params["window_size"]
        self.window_size = w
        config = LongformerConfig(
            hidden_size=dim,
            num_attention_heads=num_heads,
            num_hidden_layers=1,
            attention_window=[2 * w],
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
            max_position_embeddings=seq_len + 2,
        )
        self.hf_config = config
        self.attn = LongformerSelfAttention(config, layer_id=0)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``."""
        self._check_x(x, key_padding_mask)
        seq = x.shape[1]
        x_p, mask, pad = _pad_seq(x, key_padding_mask, 2 * self.window_size)
        self.last_padded_len = seq + pad
        self.last_note = f"padded {seq} -> {seq + pad} (HF Longformer needs seq % 2w == 0)" if pad else None
        # HF's encoding of the mask: 0 = local attention, -10000 = no attention (+10000 would be global).
        hf_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, -10000.0)
        is_index_masked = ~mask
        is_index_global_attn = torch.zeros_like(mask)
        (y,) = self.attn(
            x_p,
            attention_mask=hf_mask,
            is_index_masked=is_index_masked,
            is_index_global_attn=is_index_global_attn,
            is_global_attn=False,
        )
        return self.out(y[:, :seq])


# ------------------------------------------------------------------------------------------------ hf-bigbird
class HFBigBirdPeer(PeerAttention):
    """HF ``BigBirdBlockSparseAttention`` (block-sparse ITC: 3 window blocks, r random, first+last global) + out Linear.

    Zaheer et al. 2020, arXiv:2007.14062. Built from a ``BigBirdConfig`` with random weights (no downloads),
    ``attention_type="block_sparse"``, dropout 0. Like ``BigBirdModel``, it pads to a multiple of the block and falls
    back to full attention (``BigBirdSelfAttention`` sharing the same q/k/v weights) at ``seq <= (5 + 2r) * b``.
    """

    peer_name = "hf-bigbird"

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__(dim=dim, num_heads=num_heads, seq_len=seq_len, params=params)
        from transformers import BigBirdConfig
        from transformers.models.big_bird.modeling_big_bird import (
            BigBirdBlockSparseAttention,
            BigBirdModel,
            BigBirdSelfAttention,
        )

        self.block_size = params["block_size"]
        self.num_random_blocks = params["num_random_blocks"]
        padded = math.ceil(seq_len / self.block_size) * self.block_size
        config = BigBirdConfig(
            hidden_size=dim,
            num_attention_heads=num_heads,
            num_hidden_layers=1,
            attention_type="block_sparse",
            block_size=self.block_size,
            num_random_blocks=self.num_random_blocks,
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
            max_position_embeddings=max(padded, 4096),
            use_bias=True,
        )
        self.hf_config = config
        self.sparse = BigBirdBlockSparseAttention(config, seed=params["seed"])
        full = BigBirdSelfAttention(config)
        # The fallback path shares the sparse path's projections, as HF's set_attention_type does.
        full.query, full.key, full.value = self.sparse.query, self.sparse.key, self.sparse.value
        self._full = [full]  # not a submodule: its parameters are the sparse module's
        self._create_masks = BigBirdModel.create_masks_for_block_sparse_attn
        self.out = nn.Linear(dim, dim)

    @property
    def fallback_len(self) -> int:
        """At or below this many tokens HF BigBird runs full attention: ``(5 + 2r) * block_size``."""
        return (5 + 2 * self.num_random_blocks) * self.block_size

    def uses_block_sparse(self, seq_len: int) -> bool:
        """Whether an input of ``seq_len`` tokens runs HF's block-sparse path (else its full-attention fallback)."""
        return seq_len > self.fallback_len

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``."""
        self._check_x(x, key_padding_mask)
        seq = x.shape[1]
        notes = []
        if not self.uses_block_sparse(seq):
            self.last_padded_len = seq
            self.last_note = (
                f"HF BigBird fell back to full attention: seq {seq} <= (5 + 2*{self.num_random_blocks}) * "
                f"{self.block_size} = {self.fallback_len}"
            )
            mask = key_padding_mask
            additive = None
            if mask is not None:
                additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
                additive = additive.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]
            full = self._full[0]
            full.train(self.training)
            y = full(x, attention_mask=additive)[0]
            return self.out(y)
        x_p, mask, pad = _pad_seq(x, key_padding_mask, self.block_size)
        padded = seq + pad
        self.last_padded_len = padded
        if pad:
            notes.append(f"padded {seq} -> {padded} (HF BigBird needs seq % block_size == 0)")
        if not self.training:
            notes.append("eval mode: HF BigBird uses no random blocks (transformers #23055)")
        elif padded in (1024, 3072, 4096):
            notes.append(f"HF BigBird's old plan at length {padded} draws random blocks among the first 1024 tokens")
        self.last_note = "; ".join(notes) or None
        blocked, band, from_mask, to_mask = self._create_masks(mask.to(x.dtype), self.block_size)
        y = self.sparse(
            x_p,
            band_mask=band,
            from_mask=from_mask,
            to_mask=to_mask,
            from_blocked_mask=blocked,
            to_blocked_mask=blocked,
        )[0]
        return self.out(y[:, :seq])


# ------------------------------------------------------------------------------------------------- linformer
class LinformerPeer(PeerAttention):
    """lucidrains ``linformer.LinformerSelfAttention``: keys and values projected along the sequence to ``k`` rows.

    Wang et al. 2020, arXiv:2006.04768. Cost O(n * k). No key padding, no causal mode.
    """

    peer_name = "linformer"

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__(dim=dim, num_heads=num_heads, seq_len=seq_len, params=params)
        from linformer import LinformerSelfAttention

        self.max_len = params["max_len"]
        self.attn = LinformerSelfAttention(
            dim,
            seq_len=self.max_len,
            k=params["k"],
            heads=num_heads,
            dim_head=dim // num_heads,
            share_kv=params["share_kv"],
            dropout=0.0,
        )

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``; ``seq <= max_len``."""
        self._check_x(x, key_padding_mask)
        if key_padding_mask is not None:
            raise ValueError("linformer peer (lucidrains) does not support key_padding_mask; pass None")
        if x.shape[1] > self.max_len:
            raise ValueError(f"linformer peer: seq {x.shape[1]} exceeds max_len={self.max_len}")
        self.last_padded_len = x.shape[1]
        self.last_note = None
        return self.attn(x)


def _check_linformer_params(params: dict[str, Any], seq_len: int) -> None:
    """Linformer's projections E, F have ``max_len`` rows, and lucidrains shares one E (and F) across heads."""
    if params["max_len"] < seq_len:
        raise ValueError(f"peer 'linformer': max_len={params['max_len']} is below seq_len={seq_len}")
    if params["headwise"]:
        raise ValueError(
            "peer 'linformer': headwise=True has no counterpart (lucidrains shares one E and F across heads); "
            "allowed: headwise=False"
        )


# ------------------------------------------------------------------------------------------- hf-llama-decode
class HFLlamaDecodePeer(PeerAttention):
    """transformers' own decode of one Llama attention layer: ``LlamaAttention`` of a one-layer decoder from
    :func:`efficient_attn.integrations.hf_models.build_hf_llama` (random weights, ``attn_implementation="sdpa"``),
    its rotary embedding, and a ``DynamicCache`` made from the model's config. With ``window_size=w`` the builder
    makes the Mistral twin (``sliding_window = w + 1``: w + 1 keys, the query included, as our ``window``), whose
    ``DynamicCache`` keeps sliding-window layers (the last ``sliding_window - 1`` keys and values).

    The decode protocol of :mod:`efficient_attn.harness.decoding`: :meth:`new_cache`, :meth:`fill_cache` (random
    keys and values through the cache's own ``update``), ``forward(x, cache=cache)`` (one step: projections, RoPE at
    the cache's length, ``cache.update``, SDPA, output projection) and :meth:`cache_nbytes`: the bytes of the key and
    value tensors every cache layer holds after the last update (a ``DynamicLayer`` concatenates each step, so what
    it holds is exactly the context's keys and values; the step's temporary concatenation is not counted).
    """

    peer_name = "hf-llama-decode"

    def __init__(self, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> None:
        super().__init__(dim=dim, num_heads=num_heads, seq_len=seq_len, params=params)
        from efficient_attn.integrations.hf_models import build_hf_llama

        if params["causal"] is not True:
            raise ValueError("peer 'hf-llama-decode' is a decoder: causal must be True")
        window = params["window_size"]
        self.model = build_hf_llama(
            layers=1, hidden=dim, heads=num_heads, intermediate=4 * dim, attn_implementation="sdpa",
            max_positions=max(2 * seq_len, 4096), sliding_window=None if window is None else window + 1,
            seed=params["seed"],
        )
        self.attn = self.model.layers[0].self_attn
        self.last_padded_len = None

    def new_cache(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  max_len: int | None = None) -> Any:
        """An empty ``DynamicCache`` for this model's config (``batch``, ``device``, ``dtype``, ``max_len``: taken
        when the first keys arrive; the cache grows as transformers' does)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def fill_cache(self, cache: Any, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Put ``k``, ``v`` ``(batch, heads, n, head_dim)`` into the empty ``cache`` (``q`` unused)."""
        cache.update(k, v, 0)

    @staticmethod
    def cache_nbytes(cache: Any) -> int:
        """Bytes of the key and value tensors the cache's layers hold (see the class docstring)."""
        total = 0
        for layer in cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, *, cache: Any = None) -> Tensor:
        self._check_x(x, key_padding_mask)
        if cache is None or key_padding_mask is not None:
            raise ValueError("peer 'hf-llama-decode' runs decode steps only: forward(x, cache=cache) with x "
                             "(batch, 1, dim) and no key_padding_mask")
        if x.shape[1] != 1:
            raise ValueError(f"peer 'hf-llama-decode' steps one token at a time; got {x.shape[1]} tokens")
        start = cache.get_seq_length()
        positions = torch.full((x.shape[0], 1), start, dtype=torch.long, device=x.device)
        embeddings = self.model.rotary_emb(x, positions)
        out, _ = self.attn(x, position_embeddings=embeddings, attention_mask=None, cache=cache)
        self.last_padded_len = x.shape[1]
        return out


# ------------------------------------------------------------------------------------------------ the table
#: transformers' own attention implementations, the peers of benchmark level ``hf``: a whole ``LlamaModel`` built
#: with ``attn_implementation=<impl>`` (:mod:`efficient_attn.harness.hf_workload`), so they are not layer peers of
#: :data:`PEERS` and run at level ``hf`` only
TRANSFORMERS_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flex_attention")
#: how a suite names them (``[[peers]] name = "transformers-sdpa"``): peer name -> ``attn_implementation``
TRANSFORMERS_PEERS: dict[str, str] = {f"transformers-{impl}": impl for impl in TRANSFORMERS_IMPLEMENTATIONS}

PEERS: dict[str, PeerSpec] = {
    "local-attention": PeerSpec(
        name="local-attention",
        distribution="local-attention",
        module="local_attention",
        description="lucidrains local-attention: exact sliding window via buckets + look-around (our `window`)",
        levels=("core", "layer"),
        params={"window_size": 256, "causal": False},
        mapping=(
            ("window_size=w", "LocalAttention(window_size=w, look_backward=1, look_forward=1, exact_windowsize=True)"),
            ("causal=True", "causal=True, look_forward=0 (keys 0 <= i-j <= w, as ours)"),
            ("(length)", "autopad=True, with a mask so padded keys are never attended"),
            ("(projections)", "ours: fused qkv Linear(dim, 3 dim) and out Linear(dim, dim)"),
        ),
        notes=(
            "a query whose window holds no real key gets a uniform average (finite mask value); ours gives zeros",
        ),
        builder=LocalAttentionPeer,
    ),
    "hf-longformer": PeerSpec(
        name="hf-longformer",
        distribution="transformers",
        module="transformers",
        description="HF transformers LongformerSelfAttention, sliding chunks, no global tokens (our `window`)",
        levels=("layer",),
        params={"window_size": 256},
        mapping=(
            ("window_size=w", "LongformerConfig(attention_window=2w): keys |i-j| <= w"),
            ("(length)", "zero-padded to a multiple of 2w and masked, as LongformerModel does"),
            ("(projections)", "its query/key/value Linears (global ones unused) + our out Linear(dim, dim)"),
        ),
        notes=("HF's LongformerSelfOutput (residual + LayerNorm) is not attention and is left out",),
        builder=HFLongformerPeer,
    ),
    "hf-bigbird": PeerSpec(
        name="hf-bigbird",
        distribution="transformers",
        module="transformers",
        description="HF transformers BigBirdBlockSparseAttention (ITC), random weights, train mode, dropout 0",
        levels=("layer",),
        params={"block_size": 64, "num_random_blocks": 3, "seed": 0},
        mapping=(
            ("block_size=b", "BigBirdConfig(block_size=b)"),
            ("num_random_blocks=r", "BigBirdConfig(num_random_blocks=r)"),
            ("seed", "BigBirdBlockSparseAttention(seed=seed): numpy seed of the random plan"),
            ("num_global_blocks", "not settable: HF fixes the FIRST AND LAST block as global (ours: the first "
             "num_global_blocks); use num_global_blocks=2 in ours for equal keys per query"),
            ("(window)", "fixed to 3 blocks (own and one each side)"),
            ("(projections)", "its query/key/value Linears + our out Linear(dim, dim)"),
        ),
        notes=(
            "falls back to full attention at seq <= (5 + 2r) * b tokens (704 for b=64, r=3), as BigBirdModel does",
            "eval mode uses no random blocks (transformers #23055): time it in train mode with dropout 0",
            "at padded lengths 1024, 3072, 4096 the random blocks come only from the first 1024 tokens (#16566)",
            "the random plan is drawn in numpy on the host on every call, reseeding numpy's global generator",
            "transformers 5.x always fills a dense (batch, heads, n, n) attention_probs tensor in the block-sparse "
            "path (no output_attentions switch any more): its memory is O(n^2) (268 MB at n=4096, 4 heads, fp32)",
        ),
        builder=HFBigBirdPeer,
    ),
    "linformer": PeerSpec(
        name="linformer",
        distribution="linformer",
        module="linformer",
        description="lucidrains linformer LinformerSelfAttention (our `linformer`, headwise=False)",
        levels=("layer",),
        params={"k": 256, "max_len": None, "share_kv": False, "headwise": False},
        mapping=(
            ("k", "LinformerSelfAttention(k=k)"),
            ("max_len (default: seq_len)", "LinformerSelfAttention(seq_len=max_len); shorter inputs slice E, F"),
            ("share_kv", "share_kv; lucidrains also reuses the key Linear for values (V = K) where ours shares only "
             "E = F, so the two agree only when our W_v equals W_k"),
            ("headwise", "only False: one E (and F) shared by all heads"),
            ("num_heads, dim", "heads=num_heads, dim=dim, dim_head=dim // num_heads"),
        ),
        notes=(
            "q/k/v projections have no bias, the output projection has one",
            "no key padding mask and no causal mode",
        ),
        builder=LinformerPeer,
        check=_check_linformer_params,
    ),
    "hf-llama-decode": PeerSpec(
        name="hf-llama-decode",
        distribution="transformers",
        module="transformers",
        description="HF transformers' decode: LlamaAttention (sdpa) + DynamicCache of a one-layer random Llama; "
                    "window_size gives the Mistral sliding_window twin (our `full` / `window` decode)",
        levels=("layer",),
        params={"window_size": None, "causal": True, "seed": 0},
        mapping=(
            ("(full)", "LlamaConfig(hidden=dim, heads=num_heads, 1 layer), attn_implementation='sdpa', DynamicCache"),
            ("window_size=w", "MistralConfig(sliding_window=w + 1): w + 1 keys with the query; the DynamicCache "
             "keeps the last w keys and values"),
            ("seed", "build_hf_llama(seed=...): the random weights"),
            ("causal=True", "always (a decoder); causal=False is refused"),
            ("(positions)", "RoPE at the cache's length (ours: no positions unless rope=true; one token's rotation)"),
            ("(cache bytes)", "keys + values every cache layer holds after the step"),
        ),
        notes=(
            "decode only: one token per sequence against a DynamicCache filled with random keys and values",
            "DynamicCache appends by torch.cat: every step copies the whole cache (ours writes one slot)",
        ),
        builder=HFLlamaDecodePeer,
        modes=("decode",),
    ),
}


def mapping_table() -> str:
    """The parameter mapping of every peer as a plain-text table (ours -> theirs), rendered from :data:`PEERS`."""
    rows = [("peer", "levels", "our parameter", "their parameter / behaviour")]
    for name in sorted(PEERS):
        spec = PEERS[name]
        for i, (ours, theirs) in enumerate(spec.mapping):
            rows.append((name if i == 0 else "", ", ".join(spec.levels) if i == 0 else "", ours, theirs))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * len(rows[0][3]))
    return "\n".join(lines)


def list_peers() -> list[str]:
    """Sorted peer names."""
    return sorted(PEERS)


def _get(name: str) -> PeerSpec:
    if not isinstance(name, str):
        raise TypeError(f"peer name must be a str, got {type(name).__name__}")
    try:
        return PEERS[name]
    except KeyError:
        raise unknown_name_error("peer", name, list_peers(), "peers") from None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require(spec: PeerSpec) -> None:
    """Import the peer's package, or raise :class:`PeerUnavailableError` with the install command."""
    try:
        importlib.import_module(spec.module)
    except ImportError as exc:
        raise PeerUnavailableError(
            f"peer {spec.name!r} needs the package {spec.distribution!r}, which is not installed ({exc}); "
            f"install the peers with: {INSTALL_HINT}"
        ) from exc


def peer_info(name: str) -> dict[str, Any]:
    """What a peer is: package, installed version (None if missing), levels, parameters, mapping and notes."""
    spec = _get(name)
    return {
        "name": spec.name,
        "package": spec.distribution,
        "version": _installed_version(spec.distribution),
        "description": spec.description,
        "levels": list(spec.levels),
        "modes": list(spec.modes),
        "params": dict(spec.params),
        "mapping": [{"ours": ours, "theirs": theirs} for ours, theirs in spec.mapping],
        "notes": list(spec.notes),
        "install": INSTALL_HINT,
    }


def _resolve_params(spec: PeerSpec, seq_len: int, params: dict[str, Any]) -> dict[str, Any]:
    check_parameter_names(params, list(spec.params), f"peer {spec.name!r}")
    resolved = {**spec.params, **params}
    if "max_len" in resolved and resolved["max_len"] is None:
        resolved["max_len"] = seq_len
    for key, value in resolved.items():
        if value is None and spec.params.get(key, 0) is None:
            continue  # an optional parameter left unset (hf-llama-decode's window_size)
        if key in ("causal", "share_kv", "headwise"):
            if not isinstance(value, bool):
                raise ValueError(f"peer {spec.name!r}: {key} must be a bool, got {value!r}")
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"peer {spec.name!r}: seed must be a non-negative int, got {value!r}")
        else:
            require_positive_int(f"peer {spec.name!r}: {key}", value)
    if spec.check is not None:
        spec.check(resolved, seq_len)
    return resolved


def build_peer(name: str, *, dim: int, num_heads: int, seq_len: int, params: dict[str, Any]) -> PeerAttention:
    """Build peer ``name`` as a layer: ``forward(x, key_padding_mask=None)`` maps ``(batch, seq, dim)`` to the same.

    Args:
        name: a peer from :func:`list_peers`.
        dim: model width; ``num_heads`` must divide it.
        num_heads: number of heads.
        seq_len: the length it will run at (sets HF's ``max_position_embeddings`` and Linformer's default max_len).
        params: OUR parameter names (see the module's mapping table); defaults in ``peer_info(name)["params"]``.

    Returns:
        A :class:`PeerAttention` in train mode (HF BigBird needs it for its random blocks); dropout is 0 everywhere.

    Raises:
        KeyError: unknown peer (names the nearest).
        TypeError: a parameter the peer does not take (names the allowed ones).
        ValueError: a bad value (which parameter, what is allowed).
        PeerUnavailableError: the peer's package is missing (says ``pip install 'efficient-attn[peers]'``).
    """
    spec = _get(name)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of our parameter names, got {type(params).__name__}")
    for field_name, value in (("dim", dim), ("num_heads", num_heads), ("seq_len", seq_len)):
        require_positive_int(field_name, value)
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
    resolved = _resolve_params(spec, seq_len, params)
    _require(spec)
    return spec.builder(dim=dim, num_heads=num_heads, seq_len=seq_len, params=resolved)
