"""Our attention variants inside Hugging Face transformers models: ``attn_implementation="efficient_attn:<key>"``.

transformers (5.x) routes every attention call of most of its models through a registry of functions, the
``AttentionInterface``, and builds their masks through a second one, the ``AttentionMaskInterface``; both are selected
by the same name (``attn_implementation=`` in ``from_config`` / ``from_pretrained``, or
``model.set_attn_implementation``). :func:`register_hf` registers one of our variants, with its parameters, under one
name in both::

    from transformers import LlamaConfig, LlamaForCausalLM
    from efficient_attn.integrations.hf import register_hf, check_hf_model
    name = register_hf("window", window_size=256)            # "efficient_attn:window"
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, attn_implementation=name))
    check_hf_model(model)                                     # a model that bypasses the interface is an error
    logits = model(input_ids).logits

How the pieces meet:

* **The mask** (:func:`describe_mask`): instead of an ``(batch, 1, q, kv)`` tensor, our mask function returns a
  :class:`CompactMask`: causal or not, the key padding as a bool ``(batch, kv)`` (True = real token, None when nothing
  is padded), the model's own sliding window if any, and the query/key offsets. It recognises transformers' causal
  and bidirectional mask functions by identity, and a sliding-window mask function by checking it on the band around
  the diagonal (O(n * window), never n x n); any other pattern (packed sequences, image-token overlays, chunked
  attention) is an error rather than a silently different mask.
* **The attention** (:meth:`HFVariant.attention`): transformers passes q ``(batch, heads, seq, head_dim)``, k and v
  with ``heads / num_key_value_groups`` heads, the mask, ``dropout`` and ``scaling``. The call requires our
  :class:`CompactMask` (with no mask the causal flag would be lost: that is an error, never a bidirectional run), builds
  one of our attention modules per (layer, shape, causal, window, device, dtype) with
  :func:`efficient_attn.build_attention` and caches it, and returns ``(output (batch, seq, heads, head_dim), None)``.
* **Scaling**: our variants score with ``1 / sqrt(head_dim)``; a model whose ``scaling`` differs gets q pre-multiplied
  by ``scaling * sqrt(head_dim)``, which gives exactly ``softmax(q k^T * scaling)``.
* **Sliding windows**: transformers' ``sliding_window = w`` (Mistral, Qwen2) lets a causal query i see keys
  ``i - w < j <= i``: **w keys, itself included**; in bidirectional models (``|i - j| <= w``) it is 2w + 1 keys. Our
  ``window`` variant's ``window_size = r`` means ``|i - j| <= r`` (causal: ``0 <= i - j <= r``, **r + 1 keys**). So a
  causal ``sliding_window = w`` is our ``window_size = w - 1``, a bidirectional one is ``window_size = w``;
  :meth:`CompactMask.window_size` does the conversion and ``window`` takes it when ``window_size`` is not given.
* **GQA**: k and v arrive with ``heads / num_key_value_groups`` heads. A variant with grouped heads (its class's
  ``supports_gqa``) is built with ``num_kv_heads`` and reads them as they are, never repeated outside ``naive``; only
  a variant without grouped heads gets them repeated by :func:`expand_kv`.
* **Generation** (``model.generate``, or any forward with ``use_cache=True``): transformers keeps its own key/value
  cache (``DynamicCache``; a sliding-window config's layers keep the last ``sliding_window - 1`` keys) and hands the
  attention the new tokens' queries with every cached key. Our variants decode with our own caches
  (:mod:`efficient_attn.attention.caches`): a causal prefill with ``use_cache=True`` (query offset 0) makes a fresh
  decode cache of ours for that layer (``new_cache``, filled by ``attend(..., cache=)``), replacing an earlier
  generation's; a later call (query offset > 0, one token or a chunk) appends the new tokens, the last ``q_len`` keys
  and values transformers passes, to it. So ``full`` keeps every key (a second copy next to transformers'), ``window``
  a rolling ``window_size + 1``, and performer / linear / retention their constant-size state, which transformers'
  cache could not hold. The two caches are tied by transformers' layer module (held weakly: ours go with the model)
  and checked every step: our length must be the query offset and our last key the key transformers holds before the
  new ones, so an interleaved generation or a reordered cache (beam search) is an error, not a wrong result. A cache
  cropped by assisted generation is followed where ours is a plain KV cache (``full``, ``bigbird``) and an error
  elsewhere; static caches (``cache_implementation="static"``) and cross-attention are errors. Left padding: the
  prompt's padding comes from the 2D ``attention_mask`` and stays marked in our cache. Pass ``use_cache=False`` for a
  forward that will not be continued (no cache of ours is made then). :func:`decode_caches` lists ours.

Supported: transformers ``>= 5.0, < 6`` (:data:`SUPPORTED_TRANSFORMERS`); tested with 5.24 only. ``AttentionInterface``
arrived in 4.48 and ``AttentionMaskInterface`` in 4.53, but 4.x builds encoder (BERT) masks outside it; early 5.x
passes the mask function ``cache_position`` instead of ``q_length`` / ``q_offset``, which :func:`describe_mask` accepts. Linformer's
learned projections live in our cached module (see :func:`attention_modules`), not in the transformers model's
parameters.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from efficient_attn.attention.base import Attention
from efficient_attn.attention.caches import Cache, KVCache
from efficient_attn.registry import build_attention, build_config, get_spec

try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, PreTrainedModel
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "efficient_attn.integrations.hf needs transformers>=5.0,<6 (pip install 'efficient-attn[peers]'): " f"{error}"
    ) from error

__all__ = [
    "PREFIX",
    "SUPPORTED_TRANSFORMERS",
    "CompactMask",
    "HFVariant",
    "attention_modules",
    "check_hf_model",
    "check_transformers_version",
    "decode_caches",
    "describe_mask",
    "expand_kv",
    "register_hf",
]

#: Default name prefix: ``register_hf("window")`` registers ``"efficient_attn:window"``.
PREFIX = "efficient_attn:"
#: The transformers versions this module supports: ``(lowest, first unsupported)``.
SUPPORTED_TRANSFORMERS = ("5.0", "6")

#: Config fields the model decides (a ``register_hf`` parameter may not set them).
_MODEL_FIELDS = ("dim", "num_heads", "num_kv_heads", "causal", "dropout")
#: transformers' own implementation names: never overwritten.
_BUILTIN_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
#: Attention-call arguments that do not change the result for q, k, v and the mask we are given.
_IGNORED_ARGUMENTS = (
    "position_ids",
    "cache_position",
    "use_cache",  # read: a causal prefill with use_cache=True fills our decode cache
    "output_hidden_states",
    "return_dict",
    "encoder_hidden_states",  # a self-attention layer ignores it; cross-attention fails the length check
    "deterministic",  # ModernBERT's flag for flash-attn's backward; our kernels' results do not depend on it
)
#: Attention-call arguments that would change the result: refused unless unset.
_REFUSED_ARGUMENTS = (
    "softcap",
    "s_aux",
    "sinks",
    "position_bias",
    "head_mask",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)
#: Mask-interface arguments that only tune transformers' own mask building.
_MASK_TUNING_ARGUMENTS = ("allow_is_causal_skip", "allow_is_bidirectional_skip", "allow_torch_fix", "dtype")
#: Largest band block (elements) :func:`describe_mask` evaluates at once when it checks a sliding-window function.
_BAND_BLOCK = 1 << 20


def check_transformers_version(version: str | None = None) -> str:
    """The installed transformers version (or ``version``) if it is in :data:`SUPPORTED_TRANSFORMERS`.

    Raises:
        RuntimeError: outside the range, naming the version and the range.
    """
    version = version if version is not None else importlib.metadata.version("transformers")
    low, high = SUPPORTED_TRANSFORMERS
    if not Version(low) <= Version(version) < Version(high):
        raise RuntimeError(
            f"transformers {version} is not supported by efficient_attn.integrations.hf: it needs "
            f"transformers>={low},<{high} (AttentionInterface and AttentionMaskInterface for decoders and encoders)"
        )
    return version


# ------------------------------------------------------------------------------------------------------------- mask
@dataclass(frozen=True, eq=False)
class CompactMask:
    """What our mask function gives our attention function instead of an n x n tensor.

    Attributes:
        causal: query i sees keys j <= i only.
        key_padding: bool ``(batch, kv_length)``, True = real token; None when no key is padding.
        sliding_window: the model's own window in transformers' convention (``config.sliding_window``: causal
            ``i - w < j <= i``, bidirectional ``|i - j| <= w``), None for none.
        q_length, kv_length: query and key lengths of the attention call.
        q_offset, kv_offset: absolute position of the first query and key (0 and 0 in a prefill).
        max_positions: the model's ``max_position_embeddings`` (None if it has none): Linformer's ``max_len``.
    """

    causal: bool
    key_padding: Tensor | None
    sliding_window: int | None
    q_length: int
    kv_length: int
    q_offset: int = 0
    kv_offset: int = 0
    max_positions: int | None = None

    @property
    def window_size(self) -> int | None:
        """The model's window as our ``window_size`` (``|i - j| <= r``): ``w - 1`` causal, ``w`` bidirectional."""
        if self.sliding_window is None:
            return None
        return self.sliding_window - 1 if self.causal else self.sliding_window

    @property
    def window_is_moot(self) -> bool:
        """True when the model's window excludes no key at these lengths (every key is within reach)."""
        reach = self.window_size
        if reach is None:
            return True
        behind = self.q_offset + self.q_length - 1 - self.kv_offset  # farthest key behind a query
        ahead = 0 if self.causal else self.kv_offset + self.kv_length - 1 - self.q_offset  # farthest key ahead
        return reach >= max(behind, ahead)


def _band_matches(
    mask_function: Callable,
    *,
    causal: bool,
    reach: int,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    device: torch.device | str,
) -> bool:
    """Whether index-based ``mask_function`` is the window ``|i - j| <= reach`` (causal: ``0 <= i - j <= reach``) on
    every (query, key) pair within ``reach + 1`` of the diagonal: O(batch * q_length * reach), block by block."""
    low = -min(reach + 1, kv_length + q_offset)
    high = 1 if causal else min(reach + 1, kv_length + q_offset)
    offsets = torch.arange(low, high + 1, device=device)  # key - query
    expected = (offsets <= 0) & (offsets >= -reach) if causal else offsets.abs() <= reach
    batch_idx = torch.arange(batch_size, device=device)[:, None, None]
    head_idx = torch.zeros(1, dtype=torch.long, device=device)[:, None, None]
    rows = max(1, _BAND_BLOCK // (offsets.numel() * batch_size))
    for start in range(0, q_length, rows):
        q_idx = torch.arange(start, min(start + rows, q_length), device=device) + q_offset  # (rows,)
        kv_idx = q_idx[:, None] + offsets[None, :]  # (rows, m)
        inside = (kv_idx >= kv_offset) & (kv_idx < kv_offset + kv_length)
        kv_safe = kv_idx.clamp(kv_offset, kv_offset + kv_length - 1)
        got = mask_function(batch_idx, head_idx, q_idx[None, :, None], kv_safe[None])
        got = torch.broadcast_to(torch.as_tensor(got, device=device), (batch_size, *kv_idx.shape))
        if not bool(((got == expected) | ~inside).all()):
            return False
    return True


def _key_padding(attention_mask: Tensor | None, kv_length: int, kv_offset: int) -> Tensor | None:
    """transformers' 2D mask ``(batch, seen + new)`` (1 = real) as our ``(batch, kv_length)`` bool, None if all real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"efficient_attn's mask function expects the 2D (batch, seq) padding mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:  # transformers' convention: keys past the given mask (empty static-cache slots) are padding
        mask = F.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    return None if bool(mask.all()) else mask.contiguous()


def describe_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Callable = masking_utils.causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    *,
    q_length: int | None = None,
    q_offset: int | Tensor = 0,
    cache_position: Tensor | None = None,
    config: Any = None,
    use_vmap: bool = False,
    device: torch.device | str | None = None,
    **tuning: Any,
) -> CompactMask:
    """Our ``AttentionMaskInterface`` function: transformers' mask request as a :class:`CompactMask`.

    Takes the arguments transformers' mask creators pass (``q_length`` / ``q_offset`` in recent 5.x, the older
    ``cache_position`` before); ``tuning`` are the flags that only steer transformers' own mask tensors
    (``allow_is_causal_skip`` and the like) and are accepted only by those names.

    Raises:
        TypeError: an argument this function does not know.
        ValueError: a mask pattern our kernels cannot honour (custom overlays, packed sequences, chunked attention).
    """
    unknown = sorted(set(tuning) - set(_MASK_TUNING_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"efficient_attn's mask function got argument(s) {', '.join(unknown)} it does not know (transformers "
            f"{transformers.__version__}; supported: >={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]})"
        )
    if q_length is None:
        if cache_position is None:
            raise TypeError("efficient_attn's mask function needs q_length (or cache_position)")
        q_length = int(cache_position.numel())
        q_offset = int(cache_position[0]) if q_length else 0
        if q_length and int(cache_position[-1]) - q_offset != q_length - 1:
            raise ValueError("efficient_attn's mask function needs consecutive query positions (cache_position)")
    q_offset = int(q_offset)
    if q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(
            f"efficient_attn's mask function got {q_length} queries from position {q_offset} against {kv_length} keys "
            f"from position {kv_offset}: our attention takes self-attention whose new tokens are the last keys (no "
            "cache, or transformers' dynamic caches); static caches (cache_implementation='static') and "
            "cross-attention are not supported"
        )
    if device is None:
        device = attention_mask.device if attention_mask is not None else "cpu"
    if use_vmap:
        raise ValueError(
            "efficient_attn cannot honour a custom mask overlay (or_mask_function / and_mask_function, e.g. image "
            "tokens): our kernels take causal + key padding (+ a sliding window) only"
        )
    if mask_function is masking_utils.causal_mask_function:
        causal, window = True, None
    elif mask_function is masking_utils.bidirectional_mask_function:
        causal, window = False, None
    else:
        causal = window = None
        if local_size is not None:
            for candidate_causal, reach in ((True, local_size - 1), (False, local_size)):
                if _band_matches(
                    mask_function,
                    causal=candidate_causal,
                    reach=reach,
                    batch_size=batch_size,
                    q_length=q_length,
                    kv_length=kv_length,
                    q_offset=q_offset,
                    kv_offset=kv_offset,
                    device=device,
                ):
                    causal, window = candidate_causal, local_size
                    break
        if causal is None:
            raise ValueError(
                f"efficient_attn cannot honour the mask pattern {getattr(mask_function, '__qualname__', mask_function)}"
                f" (local_size={local_size}): our kernels take causal or bidirectional attention with key padding "
                "and an optional sliding window; packed sequences, chunked attention and custom overlays are not "
                "supported"
            )
    return CompactMask(
        causal=causal,
        key_padding=_key_padding(attention_mask, kv_length, kv_offset),
        sliding_window=window,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        max_positions=getattr(config, "max_position_embeddings", None),
    )


# -------------------------------------------------------------------------------------------------------- attention
def expand_kv(key: Tensor, value: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat ``(batch, kv_heads, seq, head_dim)`` k and v to ``num_heads`` heads (GQA, Ainslie et al. 2023,
    arXiv:2305.13245: query head h reads kv head ``h // (num_heads / kv_heads)``, transformers' ``repeat_kv`` order).

    Only for variants without grouped key/value heads (``supports_gqa`` False); the others read k and v as they are.
    """
    kv_heads = key.shape[1]
    if num_heads % kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv_heads} key/value heads")
    groups = num_heads // kv_heads
    if groups == 1:
        return key, value
    return (repeat(t, "b g n d -> b (g r) n d", r=groups) for t in (key, value))  # type: ignore[return-value]


def _same_window(layer_window: int, mask: CompactMask) -> bool:
    """Whether a layer's ``sliding_window`` argument names its mask's window. The mask (checked on the band by
    :func:`describe_mask`) is what we honour; the argument is for flash-attn, in two conventions: the config's ``w``
    (Mistral, Qwen2) or, in bidirectional ModernBERT, ``w + 1`` (flash-attn's inclusive bound for ``|i - j| <= w``)."""
    if mask.sliding_window is None:
        return False
    return layer_window == mask.sliding_window or (not mask.causal and layer_window == mask.sliding_window + 1)


def _owner(module: nn.Module) -> str:
    return type(module).__name__


def _croppable(cache: Cache, given_key: Tensor) -> bool:
    """Whether ``cache`` can drop its last tokens the way transformers' ``DynamicCache.crop`` does (assisted
    generation): a plain :class:`KVCache` (every key and value, nothing else) of the keys as transformers holds them."""
    return type(cache) is KVCache and not cache.extra and cache.kv_heads == given_key.shape[1]


@dataclass(eq=False)
class _DecodeState:
    """One layer's decode cache of ours next to transformers' cache, and the last key it took (as transformers holds
    it: before any GQA repeat), to check that the two caches still hold the same tokens."""

    cache: Cache
    last_key: Tensor


class HFVariant:
    """One registered (variant, parameters) pair: the attention and mask functions transformers calls, and the cache
    of the attention modules they build (one per layer and shape)."""

    def __init__(self, key: str, name: str, params: dict[str, Any]) -> None:
        self.key = key
        self.name = name
        self.params = dict(params)
        self.spec = get_spec(key)
        self.modules: dict[tuple, Attention] = {}
        #: Our decode caches: per transformers attention layer (held weakly: they go with the model), per module.
        self.decode_states: weakref.WeakKeyDictionary[nn.Module, dict[int, _DecodeState]] = weakref.WeakKeyDictionary()

    # --------------------------------------------------------------------------------------- the mask interface
    def mask(self, *args: Any, **kwargs: Any) -> CompactMask:
        """``AttentionMaskInterface`` entry: :func:`describe_mask`."""
        return describe_mask(*args, **kwargs)

    # ---------------------------------------------------------------------------------- the attention interface
    def attention(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: CompactMask | Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        sliding_window: int | None = None,
        output_attentions: bool = False,
        **extra: Any,
    ) -> tuple[Tensor, None]:
        """``AttentionInterface`` entry: q ``(batch, heads, seq, head_dim)``, k/v ``(batch, kv_heads, seq,
        head_dim)`` -> ``(output (batch, seq, heads, head_dim), None)``."""
        owner = _owner(module)
        self._check_extra(owner, extra, output_attentions)
        mask = self._require_mask(owner, attention_mask)
        batch, heads, q_len, head_dim = query.shape
        kv_len = key.shape[-2]
        if (q_len, kv_len) != (mask.q_length, mask.kv_length) or mask.q_offset + q_len != mask.kv_offset + kv_len:
            raise NotImplementedError(
                f"{self.name} in {owner}: {q_len} queries from position {mask.q_offset} against {kv_len} keys from "
                f"position {mask.kv_offset}: the new tokens must be the last keys (self-attention over a dynamic "
                "cache); cross-attention and static caches (cache_implementation='static') are not supported"
            )
        if value.shape[-1] != head_dim:
            raise ValueError(f"{self.name} in {owner}: value head_dim {value.shape[-1]} != query head_dim {head_dim}")
        if is_causal is not None and bool(is_causal) != mask.causal:
            raise ValueError(
                f"{self.name} in {owner}: is_causal={is_causal} disagrees with the model's mask "
                f"({'causal' if mask.causal else 'bidirectional'})"
            )
        if sliding_window is not None and not _same_window(sliding_window, mask):
            raise ValueError(
                f"{self.name} in {owner}: the layer asks for sliding_window={sliding_window} but its mask has "
                f"{mask.sliding_window}"
            )
        given_key = key
        kv_heads = key.shape[1]
        if not self.spec.module_cls.supports_gqa:
            key, value = expand_kv(key, value, heads)
            kv_heads = heads
        attn = self.module_for(
            module, mask, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dropout=dropout, like=query
        )
        if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-12):
            query = query * (scaling * math.sqrt(head_dim))  # our variants score with 1/sqrt(head_dim)
        if mask.q_offset > 0:  # a decode step (or a chunk) after tokens transformers' cache already holds
            out = self._decode(owner, module, attn, mask, query, key, value, given_key)
        elif mask.causal and extra.get("use_cache") and self.spec.module_cls.decode_unsupported_reason is None:
            out = self._prefill_into_cache(module, attn, mask, query, key, value, given_key)
        else:
            out = attn.attend(query, key, value, key_padding_mask=mask.key_padding)
        return rearrange(out, "b h n d -> b n h d").contiguous(), None

    # ------------------------------------------------------------------------------ decoding with transformers
    def _prefill_into_cache(
        self, layer: nn.Module, attn: Attention, mask: CompactMask, q: Tensor, k: Tensor, v: Tensor, given_key: Tensor
    ) -> Tensor:
        """A first chunk with ``use_cache``: our attention over it, and a fresh decode cache of ours for ``layer``
        (replacing the one of an earlier generation) filled with it."""
        cache = attn.new_cache(q.shape[0], device=q.device, dtype=q.dtype)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out = attn.attend(q, k, v, key_padding_mask=mask.key_padding)  # the cache must not hold the graph
            attn.fill_cache(cache, q.detach(), k.detach(), v.detach(), mask.key_padding)
        else:
            out = attn.attend(q, k, v, key_padding_mask=mask.key_padding, cache=cache)
        self.decode_states.setdefault(layer, {})[id(attn)] = _DecodeState(cache, given_key[:, :, -1:].detach().clone())
        return out

    def _decode(
        self,
        owner: str,
        layer: nn.Module,
        attn: Attention,
        mask: CompactMask,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        given_key: Tensor,
    ) -> Tensor:
        """New tokens at ``mask.q_offset``... against transformers' cache: our own decode cache for ``layer`` takes the
        new tokens (the last ``q_len`` keys and values) after checking it holds exactly what transformers' does."""
        reason = self.spec.module_cls.decode_unsupported_reason
        if reason is not None:
            raise NotImplementedError(
                f"{self.name} in {owner}: {self.key!r} cannot decode with a cache ({reason}); generate with "
                "use_cache=False"
            )
        state = self.decode_states.get(layer, {}).get(id(attn))
        q_len = q.shape[-2]
        if state is None:
            raise ValueError(
                f"{self.name} in {owner}: queries from position {mask.q_offset} but this layer has no decode cache of "
                "ours: the tokens before them did not run through this registration with use_cache=True"
            )
        cache = state.cache
        if cache.length > mask.q_offset and _croppable(cache, given_key):  # assisted generation rejected a draft
            cache.length = mask.q_offset
            state.last_key = cache.keys[:, :, mask.q_offset - 1 : mask.q_offset]
        if cache.length != mask.q_offset or cache.batch != q.shape[0]:
            raise ValueError(
                f"{self.name} in {owner}: transformers' cache holds {mask.q_offset} tokens x batch {q.shape[0]}, ours "
                f"{cache.length} x batch {cache.batch}: a cache that was cropped, reordered or resized (assisted "
                "generation, beam search, contrastive search) cannot be mirrored; use greedy or sampling generation"
            )
        previous = given_key[:, :, -q_len - 1 : -q_len]
        if previous.shape[-2] == 1 and not torch.equal(previous, state.last_key):
            raise ValueError(
                f"{self.name} in {owner}: transformers' cache no longer holds the keys ours was filled with (another "
                "generation interleaved, or the cache was reordered, e.g. by beam search); start a new generation"
            )
        real = None if mask.key_padding is None else mask.key_padding[:, -q_len:]
        out = attn.attend(q, k[:, :, -q_len:], v[:, :, -q_len:], key_padding_mask=real, cache=cache)
        state.last_key = given_key[:, :, -1:].detach().clone()
        return out

    def _check_extra(self, owner: str, extra: dict[str, Any], output_attentions: bool) -> None:
        if output_attentions:
            raise ValueError(f"{self.name} in {owner}: output_attentions=True is not available (no weights formed)")
        for name, value in extra.items():
            if name in _IGNORED_ARGUMENTS:
                continue
            if name in _REFUSED_ARGUMENTS:
                if value is None or value is False:
                    continue
                raise ValueError(f"{self.name} in {owner}: attention argument {name!r} is not supported")
            raise TypeError(
                f"{self.name} in {owner}: unknown attention argument {name!r}; known: "
                f"{', '.join(_IGNORED_ARGUMENTS + _REFUSED_ARGUMENTS)}"
            )

    def _require_mask(self, owner: str, attention_mask: object) -> CompactMask:
        if isinstance(attention_mask, CompactMask):
            return attention_mask
        what = "no mask" if attention_mask is None else f"a {type(attention_mask).__name__} mask"
        raise ValueError(
            f"{self.name} in {owner} got {what} instead of efficient_attn's compact mask: the model did not build its "
            "mask through transformers' AttentionMaskInterface (or was given a prepared 4D mask), so whether it is "
            "causal is unknown; pass the 2D padding mask and use a model whose masks come from masking_utils"
        )

    # -------------------------------------------------------------------------------------------- our modules
    def resolve_params(self, mask: CompactMask) -> dict[str, Any]:
        """The variant's parameters for a call with ``mask``: the registered ones, plus the model's window for
        ``window`` and the model's length for ``max_len``.

        Raises:
            ValueError: the model's sliding window conflicts with the variant (or its ``window_size``).
        """
        params = dict(self.params)
        reach = mask.window_size
        if self.key == "window" and reach is not None:
            given = params.setdefault("window_size", reach)
            if given != reach:
                raise ValueError(
                    f"{self.name}: window_size={given} but the model's sliding_window={mask.sliding_window} is "
                    f"window_size={reach} in our convention (|i - j| <= window_size; causal: sliding_window - 1)"
                )
        elif reach is not None and not mask.window_is_moot:
            raise ValueError(
                f"{self.name}: the model attends within sliding_window={mask.sliding_window}, which {self.key!r} "
                f"would not honour; register 'window' (it takes window_size={reach}) or set config.sliding_window=None"
            )
        field = self.spec.max_len_field
        if field is not None and field not in params:
            if mask.max_positions is None:
                raise ValueError(f"{self.name}: the model has no max_position_embeddings; register with {field}=...")
            params[field] = mask.max_positions
        return params

    def module_for(
        self,
        owner: nn.Module,
        mask: CompactMask,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        dropout: float,
        like: Tensor,
    ) -> Attention:
        """Our attention module for this layer and shape, built once with ``build_attention`` and cached."""
        params = self.resolve_params(mask)
        cache_key = (
            getattr(owner, "layer_idx", None),
            heads,
            kv_heads,
            head_dim,
            mask.causal,
            repr(sorted(params.items())),
            float(dropout),
            like.device,
            like.dtype,
        )
        attn = self.modules.get(cache_key)
        if attn is None:
            attn = build_attention(
                self.key,
                dim=heads * head_dim,
                num_heads=heads,
                num_kv_heads=kv_heads,
                causal=mask.causal,
                dropout=dropout,
                **params,
            ).to(device=like.device, dtype=like.dtype)
            self.modules[cache_key] = attn
        attn.train(owner.training)
        return attn


_VARIANTS: dict[str, HFVariant] = {}


def register_hf(key: str, name: str | None = None, **params: Any) -> str:
    """Register our variant ``key`` with ``params`` under ``name`` (default ``"efficient_attn:<key>"``) in both
    transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; return the name for ``attn_implementation``.

    ``params`` are the variant's own config fields (``window_size``, ``backend``, ...); the model decides ``dim``,
    ``num_heads``, ``causal`` and ``dropout``. Registering the same name again with the same key and parameters is a
    no-op.

    Raises:
        KeyError: unknown key (with the nearest keys).
        TypeError: a parameter the variant does not have (nearest name, allowed list) or one the model decides.
        ValueError: a bad parameter value, or ``name`` taken (by transformers or by another registration).
        RuntimeError: an unsupported transformers version.
    """
    check_transformers_version()
    spec = get_spec(key)
    decided = [field for field in _MODEL_FIELDS if field in params]
    if decided:
        allowed = [f.name for f in dataclasses.fields(spec.config_cls) if f.init and f.name not in _MODEL_FIELDS]
        raise TypeError(
            f"{', '.join(decided)} for attention {key!r} come from the transformers model, not register_hf; "
            f"allowed: {', '.join(allowed)}"
        )
    trial = dict(params)
    if spec.max_len_field is not None:
        trial.setdefault(spec.max_len_field, 4096)
    build_config(key, dim=64, num_heads=1, **trial)  # names (nearest spelling, allowed list) and values, now
    name = PREFIX + key if name is None else name
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in _BUILTIN_NAMES:
        raise ValueError(f"name {name!r} is one of transformers' own implementations ({', '.join(_BUILTIN_NAMES)})")
    existing = _VARIANTS.get(name)
    if existing is not None:
        if existing.key == key and existing.params == params:
            return name
        raise ValueError(
            f"{name!r} is already registered as {existing.key!r} with {existing.params}; pass another name= for "
            f"{key!r} with {params}"
        )
    variant = HFVariant(key, name, params)
    AttentionInterface.register(name, variant.attention)
    AttentionMaskInterface.register(name, variant.mask)
    _VARIANTS[name] = variant
    return name


def attention_modules(name: str) -> list[Attention]:
    """Our attention modules a registration has built so far (one per layer and shape), e.g. to read
    ``last_backend`` or Linformer's projections."""
    try:
        return list(_VARIANTS[name].modules.values())
    except KeyError:
        raise KeyError(f"{name!r} is not registered by register_hf (registered: {', '.join(_VARIANTS)})") from None


def decode_caches(name: str) -> list[Cache]:
    """Our decode caches a registration holds now (one per layer of each model that generated with it; they are
    replaced by the next generation's prefill and go with their model), e.g. to read their ``nbytes``."""
    if name not in _VARIANTS:
        raise KeyError(f"{name!r} is not registered by register_hf (registered: {', '.join(_VARIANTS)})")
    return [state.cache for states in _VARIANTS[name].decode_states.values() for state in states.values()]


def check_hf_model(model: nn.Module) -> nn.Module:
    """Return ``model`` if transformers routes its attention through the ``AttentionInterface`` (so a registered
    ``attn_implementation`` reaches it).

    transformers silently keeps its own attention for a model class that does not (e.g. ``BloomForCausalLM``), even
    with ``attn_implementation="efficient_attn:..."`` set.

    Raises:
        TypeError: not a transformers ``PreTrainedModel``.
        ValueError: a model class the interface does not reach, named.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    cls = type(model)
    if not cls.is_backend_compatible() or not cls._can_set_attn_implementation():
        raise ValueError(
            f"{cls.__name__} does not route its attention through transformers' AttentionInterface, so "
            "attn_implementation='efficient_attn:...' would not reach it (it would run its own attention)"
        )
    return model
