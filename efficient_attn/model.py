"""One transformer backbone shared by every attention variant.

Token embedding -> positions (sinusoidal | learned | none) -> ``depth`` pre-LN blocks -> final LayerNorm -> a head:

* ``task="lm"``: causal language model; ``model(tokens)`` returns logits ``(batch, seq, vocab_size)``.
* ``task="classify"``: encoder classifier; ``model(tokens, key_padding_mask)`` returns ``(batch, num_classes)``,
  pooling by the mean over real tokens (``pooling="mean"``) or taking the first token's state (``pooling="first"``,
  BERT's [CLS] convention: the first token must gather what the answer needs through attention).

Each block is ``x + Attention(LN(x))`` then ``x + MLP(LN(x))`` (pre-LN, Xiong et al. 2020, arXiv:2002.04745), with the
attention built from the registry by key, so every variant runs in exactly the same network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

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


class TransformerModel(nn.Module):
    """The shared backbone; build it with :func:`build_model`.

    Shapes: ``tokens`` long ``(batch, seq)``; ``key_padding_mask`` bool ``(batch, seq)``, True = real token.
    """

    def __init__(
        self,
        attention_key: str,
        *,
        task: str,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        max_len: int,
        positional: str,
        mlp_ratio: int,
        dropout: float,
        num_classes: int | None,
        activation: str,
        tie_weights: bool,
        pooling: str,
        attention_params: dict[str, Any],
    ) -> None:
        super().__init__()
        self.attention_key = attention_key
        self.task = task
        self.pooling = pooling
        self.max_len = max_len
        self.positional = positional
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_len, dim) if positional == "learned" else None
        self.embed_drop = nn.Dropout(dropout)
        causal = task == "lm"
        self.blocks = nn.ModuleList(
            Block(
                build_attention(attention_key, dim=dim, num_heads=num_heads, causal=causal, **attention_params),
                dim,
                mlp_ratio,
                activation,
                dropout,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        if task == "lm":
            self.head = nn.Linear(dim, vocab_size, bias=False)
            if tie_weights:
                self.head.weight = self.token_embedding.weight
        else:
            assert num_classes is not None  # checked by build_model
            self.head = nn.Linear(dim, num_classes)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token plus position embeddings: ``(batch, seq)`` -> ``(batch, seq, dim)``."""
        seq_len = tokens.shape[1]
        if self.positional == "learned" and seq_len > self.max_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_len={self.max_len} of the learned position embedding; "
                "build the model with a larger max_len or positional='sinusoidal'"
            )
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(seq_len, device=tokens.device))
        elif self.positional == "sinusoidal":
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
        if self.pooling == "first":
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

    ``attention_params`` go to the attention's config (so a misspelt name is a ``TypeError`` there); ``max_len`` is
    also passed to any attention config with a ``max_len`` field. ``task="lm"`` makes every attention causal and is
    refused for variants that cannot be causal.
    """
    spec = get_spec(attention_key)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if positional not in POSITIONALS:
        raise ValueError(f"positional must be one of {POSITIONALS}, got {positional!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    for name, value in (("vocab_size", vocab_size), ("depth", depth), ("max_len", max_len), ("mlp_ratio", mlp_ratio)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if task == "classify":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"task='classify' needs num_classes >= 2, got {num_classes!r}")
    elif num_classes is not None:
        raise ValueError("num_classes is only used with task='classify'")
    if tie_weights and task != "lm":
        raise ValueError("tie_weights only applies to task='lm'")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if task == "lm" and not spec.supports_causal:
        reason = spec.module_cls.causal_unsupported_reason
        raise ValueError(f"attention {attention_key!r} cannot be used with task='lm' (causal): {reason}")
    if "causal" in attention_params:
        raise TypeError("causal is set by the task ('lm' is causal, 'classify' is not); do not pass it")
    config_fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    if "max_len" in config_fields and "max_len" not in attention_params:
        attention_params = {**attention_params, "max_len": max_len}
    return TransformerModel(
        attention_key,
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
