"""One transformer backbone shared by every attention variant.

Token embedding -> positions (sinusoidal | learned | none) -> ``depth`` pre-LN blocks -> final LayerNorm -> a head:

* ``task="lm"``: causal language model; ``model(tokens)`` returns logits ``(batch, seq, vocab_size)``.
* ``task="classify"``: encoder classifier; ``model(tokens, key_padding_mask)`` returns ``(batch, num_classes)``,
  pooling by the mean over real tokens (``pooling="mean"``) or taking the first token's state (``pooling="first"``,
  BERT's [CLS] convention: the first token must gather what the answer needs through attention).

Each block is ``x + Attention(LN(x))`` then ``x + MLP(LN(x))`` (pre-LN, Xiong et al. 2020, arXiv:2002.04745), with the
attention built from the registry by key, so every variant runs in exactly the same network. The whole backbone is
described by one :class:`ModelConfig`; :func:`build_model` makes it from keywords.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from efficient_attn.errors import require_positive_int
from efficient_attn.registry import build_attention, get_spec

TASKS = ("lm", "classify")
POSITIONALS = ("sinusoidal", "learned", "none")
POOLINGS = ("mean", "first")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def sinusoidal_table(seq_len: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The fixed sin/cos position table of Vaswani et al. 2017: ``(seq_len, dim)``."""
    position = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
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

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm_attn(x), key_padding_mask=key_padding_mask))
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
        params = dict(self.attention_params)
        if "causal" in params:
            raise TypeError("causal is set by the task ('lm' is causal, 'classify' is not); do not pass it")
        config_fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        if "max_len" in config_fields and "max_len" not in params:
            params["max_len"] = self.max_len
        object.__setattr__(self, "attention_params", params)  # frozen: set once, here

    @property
    def causal(self) -> bool:
        """Whether every attention is causal: ``task="lm"`` is, ``task="classify"`` is not."""
        return self.task == "lm"


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
        self.blocks = nn.ModuleList(
            Block(
                build_attention(
                    config.attention_key,
                    dim=dim,
                    num_heads=config.num_heads,
                    causal=config.causal,
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
        if config.task == "lm":
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

    def embed(self, tokens: Tensor) -> Tensor:
        """Token plus position embeddings: ``(batch, seq)`` -> ``(batch, seq, dim)``."""
        seq_len = tokens.shape[1]
        max_len = self.config.max_len
        if self.config.positional == "learned" and seq_len > max_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_len={max_len} of the learned position embedding; "
                "build the model with a larger max_len or positional='sinusoidal'"
            )
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(seq_len, device=tokens.device))
        elif self.config.positional == "sinusoidal":
            x = x + sinusoidal_table(seq_len, x.shape[-1], tokens.device).to(x.dtype)
        return self.embed_drop(x)

    def features(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The final hidden states after the last LayerNorm: ``(batch, seq, dim)``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask)
        return self.norm(x)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """LM: logits ``(batch, seq, vocab_size)``; classify: logits ``(batch, num_classes)``."""
        hidden = self.features(tokens, key_padding_mask)
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
    **attention_params: Any,
) -> TransformerModel:
    """Build the shared backbone with the attention registered under ``attention_key`` in every block.

    The keywords are the fields of :class:`ModelConfig` (which validates them); ``attention_params`` go to the
    attention's config (so a misspelt name is a ``TypeError`` there); ``max_len`` is also passed to any attention
    config with a ``max_len`` field. ``task="lm"`` makes every attention causal and is refused for variants that
    cannot be causal.
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
    )
    return TransformerModel(config)
