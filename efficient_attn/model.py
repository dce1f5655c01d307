"""One transformer backbone shared by every attention variant.

Token embedding -> positions -> ``depth`` pre-LN blocks -> final LayerNorm -> a head:

* ``task="lm"``: causal language model; ``model(tokens)`` returns logits ``(batch, seq, vocab_size)``.
* ``task="classify"``: encoder classifier; ``model(tokens, key_padding_mask)`` returns ``(batch, num_classes)``,
  pooling by the mean over real tokens (``pooling="mean"``) or taking the first token's state (``pooling="first"``,
  BERT's [CLS] convention: the first token must gather what the answer needs through attention).
* ``task="seq2seq"``: encoder-decoder (Vaswani et al. 2017): ``model(src, key_padding_mask, decoder_tokens=tgt)``
  returns logits ``(batch, tgt_len, vocab_size)``. The encoder uses ``attention_key`` (any variant, non-causal);
  each decoder block has causal self-attention (``decoder_attention``, any causal-capable variant), cross-attention
  to the encoder output (``cross_attention``, a variant that accepts a query length != key length) and an MLP.

Positions: ``"sinusoidal"`` / ``"learned"`` tables added to the embedding, ``"none"``, or inside attention:
``"rope"`` (every self-attention rotates q and k; Su et al. 2021) or ``"alibi"`` (every self-attention biases its
scores by distance; Press et al. 2022; exact variants only). Cross-attention gets no positions. ``num_kv_heads``
gives every attention grouped key/value heads. Packed batches: ``model(tokens, document_ids=...)`` attends each
document alone, with positions restarting at every document.

Each block is ``x + Attention(LN(x))`` then ``x + MLP(LN(x))`` (pre-LN, Xiong et al. 2020, arXiv:2002.04745), with the
attention built from the registry by key, so every variant runs in exactly the same network. The whole backbone is
described by one :class:`ModelConfig`; :func:`build_model` makes it from keywords.

Generation (``task="lm"``): :meth:`TransformerModel.generate` prefills one decode cache per layer with the prompt
(left-padded prompts of different lengths with a key padding mask; each row's positions start at its first real
token) and then feeds one token at a time; greedy decoding equals recomputing the whole sequence at every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from efficient_attn.attention.base import variants_supporting
from efficient_attn.attention.positions import default_positions
from efficient_attn.errors import require_positive_int
from efficient_attn.registry import build_attention, get_spec

TASKS = ("lm", "classify", "seq2seq")
POSITIONALS = ("sinusoidal", "learned", "none", "rope", "alibi")
#: Positions added to the token embedding (the others act inside attention).
TABLE_POSITIONALS = ("sinusoidal", "learned")
POOLINGS = ("mean", "first")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def sinusoidal_table(
    seq_len: int, dim: int, device: torch.device | None = None, positions: Tensor | None = None
) -> Tensor:
    """The fixed sin/cos position table of Vaswani et al. 2017: ``(seq_len, dim)``, or ``(*positions.shape, dim)`` at
    the given int ``positions``."""
    if positions is None:
        positions = torch.arange(seq_len, device=device)
    position = positions.to(torch.float32)[..., None]  # (..., 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(*positions.shape, dim, device=device)
    table[..., 0::2] = torch.sin(position * freq)
    table[..., 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class MLP(nn.Module):
    """Linear -> activation -> Linear (-> dropout), width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, mlp_ratio: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, mlp_ratio * dim)
        self.act = ACTIVATIONS[activation]()
        self.fc_out = nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    """Pre-LN residual block: ``x + drop(attn(LN(x)))``, then ``x + mlp(LN(x))``."""

    def __init__(self, attention: nn.Module, dim: int, mlp_ratio: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = attention
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, activation, dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, document_ids: Tensor | None = None, *,
        positions: Tensor | None = None, cache: Any = None,
    ) -> Tensor:
        """``positions`` go to a RoPE attention (others take them from the embedding); ``cache``: decode (x holds the
        new tokens only)."""
        extra: dict[str, Any] = {} if document_ids is None else {"document_ids": document_ids}
        if cache is not None:
            extra["cache"] = cache
        if positions is not None and self.attn.config.rope:
            extra["positions"] = positions
        x = x + self.drop(self.attn(self.norm_attn(x), key_padding_mask=key_padding_mask, **extra))
        return x + self.mlp(self.norm_mlp(x))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to the encoder output, MLP (each residual)."""

    def __init__(
        self, self_attention: nn.Module, cross_attention: nn.Module, dim: int, mlp_ratio: int, activation: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = self_attention
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = cross_attention
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, activation, dropout)

    def forward(
        self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None, padding_mask: Tensor | None
    ) -> Tensor:
        x = x + self.drop(self.self_attn(self.norm_self(x), key_padding_mask=padding_mask))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), key_padding_mask=memory_padding_mask, context=memory))
        return x + self.mlp(self.norm_mlp(x))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the backbone is built from, validated on creation (:func:`build_model` makes one from keywords).

    Attributes:
        attention_key: registry key of the attention in every block.
        task: ``"lm"`` (causal language model) or ``"classify"`` (encoder classifier).
        vocab_size: number of token ids.
        dim: model width; ``num_heads`` must divide it (checked by the attention config).
        depth: number of blocks.
        num_heads: attention heads per block.
        max_len: longest sequence (the learned position table's size; also given to an attention config with a
            ``max_len`` field unless ``attention_params`` sets it).
        positional: ``"sinusoidal"``, ``"learned"`` or ``"none"``.
        mlp_ratio: MLP width as a multiple of ``dim``.
        dropout: dropout after the embedding, the attention and the MLP (not the attention weights: that is the
            attention's own ``dropout`` parameter).
        num_classes: classes of ``task="classify"`` (>= 2); must be None for ``"lm"``.
        activation: ``"gelu"`` or ``"relu"``.
        tie_weights: share the LM head with the token embedding (``task="lm"`` only).
        pooling: ``"mean"`` over real tokens or ``"first"`` token (``task="classify"``).
        attention_params: the attention config's own fields (a misspelt name is a ``TypeError`` there); after
            creation it includes the ``max_len`` filled in for attentions that have one.
        num_kv_heads: key/value heads of every attention (None = ``num_heads``; grouped-query attention below).
        decoder_attention: ``task="seq2seq"``: registry key of the decoder's causal self-attention.
        cross_attention: ``task="seq2seq"``: registry key of the decoder's cross-attention.
        decoder_params, cross_params: the own config fields of those two attentions.

    Raises:
        KeyError: unknown ``attention_key``.
        ValueError: a bad value (which field, what is allowed), or ``task="lm"`` with a variant that cannot be causal.
        TypeError: ``causal`` in ``attention_params`` (the task sets it).
    """

    attention_key: str
    task: str
    vocab_size: int
    dim: int
    depth: int
    num_heads: int
    max_len: int
    positional: str = "sinusoidal"
    mlp_ratio: int = 4
    dropout: float = 0.0
    num_classes: int | None = None
    activation: str = "gelu"
    tie_weights: bool = False
    pooling: str = "mean"
    attention_params: dict[str, Any] = field(default_factory=dict)
    num_kv_heads: int | None = None
    decoder_attention: str | None = None
    cross_attention: str | None = None
    decoder_params: dict[str, Any] = field(default_factory=dict)
    cross_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = get_spec(self.attention_key)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}, got {self.positional!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("vocab_size", "depth", "max_len", "mlp_ratio"):
            require_positive_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            valid = [h for h in range(1, self.num_heads + 1) if isinstance(self.num_heads, int) and self.num_heads % h == 0]
            if isinstance(self.num_kv_heads, bool) or self.num_kv_heads not in valid:
                raise ValueError(
                    f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads!r}; valid values: "
                    f"{', '.join(map(str, valid))}"
                )
        num_classes = self.num_classes
        if self.task == "classify":
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"task='classify' needs num_classes >= 2, got {num_classes!r}")
        elif num_classes is not None:
            raise ValueError("num_classes is only used with task='classify'")
        if self.tie_weights and self.task != "lm":
            raise ValueError("tie_weights only applies to task='lm'")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.causal and not spec.supports_causal:
            reason = spec.module_cls.causal_unsupported_reason
            raise ValueError(f"attention {self.attention_key!r} cannot be used with task='lm' (causal): {reason}")
        object.__setattr__(self, "attention_params", self._attention_fields(self.attention_key, self.attention_params))
        self._check_positional(self.attention_key, "attention_key")
        if self.task == "seq2seq":
            decoder = "full" if self.decoder_attention is None else self.decoder_attention
            cross = "full" if self.cross_attention is None else self.cross_attention
            object.__setattr__(self, "decoder_attention", decoder)
            object.__setattr__(self, "cross_attention", cross)
            decoder_spec = get_spec(decoder)  # KeyError with the nearest keys
            if not decoder_spec.supports_causal:
                raise ValueError(
                    f"decoder_attention {decoder!r} cannot be causal: {decoder_spec.module_cls.causal_unsupported_reason}"
                )
            self._check_positional(decoder, "decoder_attention")
            if not get_spec(cross).module_cls.supports_cross_attention:
                raise ValueError(
                    f"cross_attention {cross!r} does not support cross-attention (query length != key length); "
                    f"variants that do: {', '.join(variants_supporting('cross'))}"
                )
            if not get_spec(cross).module_cls.queries_independent:
                raise ValueError(
                    f"cross_attention {cross!r} mixes the queries of a sequence (its outputs at t depend on later "
                    "decoder positions), so the decoder would not be causal; use "
                    + ", ".join(k for k in variants_supporting("cross") if get_spec(k).module_cls.queries_independent)
                )
            object.__setattr__(self, "decoder_params", self._attention_fields(decoder, self.decoder_params))
            object.__setattr__(self, "cross_params", self._attention_fields(cross, self.cross_params))
        else:
            for name in ("decoder_attention", "cross_attention"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only used with task='seq2seq'")
            for name in ("decoder_params", "cross_params"):
                if getattr(self, name):
                    raise ValueError(f"{name} is only used with task='seq2seq'")

    def _attention_fields(self, key: str, given: dict[str, Any]) -> dict[str, Any]:
        """The attention config fields of ``key``: ``given`` plus ``max_len`` where the config has one."""
        params = dict(given)
        for name, owner in (("causal", "the task ('lm' is causal, 'classify' is not)"),
                            ("num_kv_heads", "the model's num_kv_heads"), ("rope", "positional='rope'"),
                            ("alibi", "positional='alibi'")):
            if name in params:
                raise TypeError(f"{name} is set by {owner}; do not pass it in the attention parameters")
        config_fields = {f.name for f in dataclasses.fields(get_spec(key).config_cls)}
        if "max_len" in config_fields and "max_len" not in params:
            params["max_len"] = self.max_len
        return params

    def _check_positional(self, key: str, field_name: str) -> None:
        if self.positional == "alibi" and not get_spec(key).module_cls.alibi_backends:
            raise ValueError(
                f"positional='alibi' needs exact softmax scores, which {field_name} {key!r} never forms; variants "
                f"that support it: {', '.join(variants_supporting('alibi'))}"
            )

    @property
    def causal(self) -> bool:
        """Whether the (encoder) attention is causal: ``task="lm"`` is; ``"classify"`` and the seq2seq encoder are
        not (the seq2seq decoder's self-attention always is)."""
        return self.task == "lm"

    def self_attention_fields(self) -> dict[str, Any]:
        """Fields every self-attention gets from the backbone: ``num_kv_heads`` and the in-attention positions."""
        fields: dict[str, Any] = {}
        if self.num_kv_heads is not None:
            fields["num_kv_heads"] = self.num_kv_heads
        if self.positional == "rope":
            fields["rope"] = True
        elif self.positional == "alibi":
            fields["alibi"] = True
        return fields


class TransformerModel(nn.Module):
    """The shared backbone, built from a :class:`ModelConfig` (or with :func:`build_model`).

    Shapes: ``tokens`` long ``(batch, seq)``; ``key_padding_mask`` bool ``(batch, seq)``, True = real token.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"TransformerModel needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.token_embedding = nn.Embedding(config.vocab_size, dim)
        self.position_embedding = nn.Embedding(config.max_len, dim) if config.positional == "learned" else None
        self.embed_drop = nn.Dropout(config.dropout)
        positions = config.self_attention_fields()
        self.blocks = nn.ModuleList(
            Block(
                build_attention(
                    config.attention_key,
                    dim=dim,
                    num_heads=config.num_heads,
                    causal=config.causal,
                    **positions,
                    **config.attention_params,
                ),
                dim,
                config.mlp_ratio,
                config.activation,
                config.dropout,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.decoder_blocks: nn.ModuleList | None = None
        if config.task == "seq2seq":
            kv = {} if config.num_kv_heads is None else {"num_kv_heads": config.num_kv_heads}
            self.decoder_blocks = nn.ModuleList(
                DecoderBlock(
                    build_attention(config.decoder_attention, dim=dim, num_heads=config.num_heads, causal=True,
                                    **positions, **config.decoder_params),
                    build_attention(config.cross_attention, dim=dim, num_heads=config.num_heads, **kv,
                                    **config.cross_params),
                    dim, config.mlp_ratio, config.activation, config.dropout,
                )
                for _ in range(config.depth)
            )
            self.decoder_norm = nn.LayerNorm(dim)
        if config.task in ("lm", "seq2seq"):
            self.head = nn.Linear(dim, config.vocab_size, bias=False)
            if config.tie_weights:
                self.head.weight = self.token_embedding.weight
        else:
            assert config.num_classes is not None  # checked by ModelConfig
            self.head = nn.Linear(dim, config.num_classes)

    @property
    def attention_key(self) -> str:
        """Registry key of the attention in every block."""
        return self.config.attention_key

    @property
    def task(self) -> str:
        """``"lm"`` or ``"classify"``."""
        return self.config.task

    def embed(self, tokens: Tensor, document_ids: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Token plus position embeddings: ``(batch, seq)`` -> ``(batch, seq, dim)``; table positions restart at every
        packed document, or are the given long ``positions`` ``(batch, seq)``."""
        seq_len = tokens.shape[1]
        max_len = self.config.max_len
        longest = seq_len if positions is None or positions.numel() == 0 else int(positions.max()) + 1
        if self.config.positional == "learned" and longest > max_len:
            raise ValueError(
                f"sequence length {longest} exceeds max_len={max_len} of the learned position embedding; "
                "build the model with a larger max_len or positional='sinusoidal'"
            )
        x = self.token_embedding(tokens)
        if self.config.positional in TABLE_POSITIONALS:
            if positions is None:
                positions = (
                    torch.arange(seq_len, device=tokens.device)
                    if document_ids is None
                    else default_positions(tokens.shape[0], seq_len, document_ids, tokens.device)
                )
            if self.position_embedding is not None:
                x = x + self.position_embedding(positions)
            else:
                x = x + sinusoidal_table(seq_len, x.shape[-1], tokens.device, positions).to(x.dtype)
        return self.embed_drop(x)

    def features(
        self, tokens: Tensor, key_padding_mask: Tensor | None = None, *, document_ids: Tensor | None = None,
        positions: Tensor | None = None, caches: Sequence[Any] | None = None,
    ) -> Tensor:
        """The final hidden states (of the encoder, for seq2seq) after the last LayerNorm: ``(batch, seq, dim)``.

        ``positions`` long ``(batch, seq)``: token positions (table or RoPE); default ``0, 1, ...`` per row.
        ``caches``: one decode cache per block (:meth:`new_caches`); ``tokens`` are then the new tokens only.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per block ({len(self.blocks)}), got {len(caches)}")
        if positions is None and caches is not None:
            positions = (caches[0].length + torch.arange(tokens.shape[1], device=tokens.device)).expand_as(tokens)
        x = self.embed(tokens, document_ids, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask=key_padding_mask, document_ids=document_ids, positions=positions,
                      cache=None if caches is None else caches[i])
        return self.norm(x)

    def new_caches(self, batch: int, *, max_len: int | None = None) -> list[Any]:
        """One empty decode cache per block, on the model's device and in its dtype (``task="lm"``)."""
        if self.task != "lm":
            raise ValueError(f"decoding needs task='lm' (a causal language model), not {self.task!r}")
        param = self.token_embedding.weight
        return [block.attn.new_cache(batch, device=param.device, dtype=param.dtype, max_len=max_len)
                for block in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Autoregressive generation with a decode cache per layer: long ``(batch, prompt + new)``, prompt included.

        Args:
            prompt: long ``(batch, prompt_len)``; prompts of different lengths are left-padded.
            max_new_tokens: tokens to add (>= 0).
            temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
            top_k: sample among the ``top_k`` most likely tokens only (None = all); needs ``temperature > 0``.
            seed: seed of the sampling generator (None = torch's global generator).
            key_padding_mask: bool ``(batch, prompt_len)``, True = real token; padding must be on the left. Each row's
                positions start at 0 at its first real token, so a padded prompt is continued as if alone (up to
                patterns anchored at absolute indices, such as global tokens).

        Call ``model.eval()`` first for deterministic outputs (dropout stays active in training mode).
        """
        if self.task != "lm":
            raise ValueError(f"generate needs task='lm' (a causal language model), not {self.task!r}")
        if prompt.dim() != 2 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a non-empty long tensor (batch, prompt_len), got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None:
            require_positive_int("top_k", top_k)
            if temperature == 0:
                raise ValueError("top_k restricts sampling; it needs temperature > 0 (temperature=0 is greedy)")
        batch, length = prompt.shape
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, length):
                raise ValueError(f"key_padding_mask must be bool (batch, prompt_len) = {(batch, length)}, got "
                                 f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            if bool((key_padding_mask[:, :-1] & ~key_padding_mask[:, 1:]).any()) or not bool(key_padding_mask[:, -1].all()):
                raise ValueError("generate takes left padding only: in each row the padding (False) must come before "
                                 "every real token, and the last prompt token must be real")
            positions = (key_padding_mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            positions = torch.arange(length, device=prompt.device).expand(batch, length)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=prompt.device).manual_seed(seed)
        caches = self.new_caches(batch)
        tokens, mask, pos = prompt, key_padding_mask, positions
        out = [prompt]
        for _ in range(max_new_tokens):
            logits = self.head(self.features(tokens, mask, positions=pos, caches=caches))[:, -1]  # (b, vocab)
            tokens = self._next_token(logits, temperature, top_k, generator)[:, None]
            out.append(tokens)
            mask = None if mask is None else torch.ones_like(tokens, dtype=torch.bool)
            pos = pos[:, -1:] + 1
        return torch.cat(out, dim=1)

    @staticmethod
    def _next_token(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
        """Long ``(batch,)``: argmax (temperature 0) or a sample from the tempered, top-k-restricted softmax."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]

    def decode(
        self, decoder_tokens: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None,
        decoder_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """seq2seq: decoder logits ``(batch, tgt_len, vocab_size)`` for ``decoder_tokens`` ``(batch, tgt_len)`` given
        the encoder output ``memory`` ``(batch, src_len, dim)``. Causal: logits at t depend on tokens 0..t only."""
        if self.decoder_blocks is None:
            raise ValueError(f"decode is for task='seq2seq', not {self.task!r}")
        if decoder_tokens.dim() != 2:
            raise ValueError(f"decoder_tokens must be (batch, tgt_len), got shape {tuple(decoder_tokens.shape)}")
        y = self.embed(decoder_tokens)
        for block in self.decoder_blocks:
            y = block(y, memory, memory_padding_mask, decoder_padding_mask)
        return self.head(self.decoder_norm(y))

    def forward(
        self,
        tokens: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        decoder_tokens: Tensor | None = None,
        decoder_padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """LM: logits ``(batch, seq, vocab_size)``; classify: logits ``(batch, num_classes)``; seq2seq: decoder
        logits ``(batch, tgt_len, vocab_size)`` (``tokens`` is the source, ``decoder_tokens`` the shifted target).

        ``document_ids`` int ``(batch, seq)`` (lm, classify): packed documents, each attended alone.
        ``positions`` long ``(batch, seq)`` (lm, classify): token positions for the table or RoPE (default
        ``0, 1, ...`` per row; :meth:`generate` starts each left-padded row at its first real token)."""
        if self.task == "seq2seq":
            if decoder_tokens is None:
                raise ValueError("task='seq2seq' needs decoder_tokens (the target shifted right)")
            if document_ids is not None or positions is not None:
                raise ValueError("document_ids (packing) and positions are not supported with task='seq2seq'")
            memory = self.features(tokens, key_padding_mask)
            return self.decode(decoder_tokens, memory, key_padding_mask, decoder_padding_mask)
        if decoder_tokens is not None or decoder_padding_mask is not None:
            raise ValueError(f"decoder_tokens are for task='seq2seq', not {self.task!r}")
        hidden = self.features(tokens, key_padding_mask, document_ids=document_ids, positions=positions)
        if self.task == "lm":
            return self.head(hidden)
        if self.config.pooling == "first":
            pooled = hidden[:, 0]
        elif key_padding_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = key_padding_mask.to(hidden.dtype).unsqueeze(-1)  # (b, n, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


def build_model(
    attention_key: str,
    *,
    task: str,
    vocab_size: int,
    dim: int,
    depth: int,
    num_heads: int,
    max_len: int,
    positional: str = "sinusoidal",
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    num_classes: int | None = None,
    activation: str = "gelu",
    tie_weights: bool = False,
    pooling: str = "mean",
    num_kv_heads: int | None = None,
    decoder_attention: str | None = None,
    cross_attention: str | None = None,
    decoder_params: dict[str, Any] | None = None,
    cross_params: dict[str, Any] | None = None,
    **attention_params: Any,
) -> TransformerModel:
    """Build the shared backbone with the attention registered under ``attention_key`` in every block.

    The keywords are the fields of :class:`ModelConfig` (which validates them); ``attention_params`` go to the
    attention's config (so a misspelt name is a ``TypeError`` there); ``max_len`` is also passed to any attention
    config with a ``max_len`` field. ``task="lm"`` makes every attention causal and is refused for variants that
    cannot be causal. ``task="seq2seq"`` takes ``decoder_attention`` and ``cross_attention`` keys (default ``"full"``)
    with their own ``decoder_params`` / ``cross_params``.
    """
    config = ModelConfig(
        attention_key=attention_key,
        task=task,
        vocab_size=vocab_size,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        max_len=max_len,
        positional=positional,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        num_classes=num_classes,
        activation=activation,
        tie_weights=tie_weights,
        pooling=pooling,
        attention_params=attention_params,
        num_kv_heads=num_kv_heads,
        decoder_attention=decoder_attention,
        cross_attention=cross_attention,
        decoder_params=dict(decoder_params or {}),
        cross_params=dict(cross_params or {}),
    )
    return TransformerModel(config)
