"""How close each variant is to full attention, and how different its heads are from each other.

Approximation error: the relative output error ``||y - y_full||_F / ||y_full||_F`` of a variant's core against full
softmax attention (Vaswani et al. 2017, arXiv:1706.03762) on the same ``(batch, heads, seq, head_dim)`` q, k, v --
(a) random Gaussian inputs, (b) q, k, v captured with forward hooks from a trained backbone's layers, where the
variant's own trained core (e.g. Linformer's learned projections) is used.

Head diversity (Michel et al. 2019 "Are Sixteen Heads Really Better than One?", arXiv:1905.10650; Voita et al. 2019,
arXiv:1905.09418, ask how redundant heads are): per layer, the pairwise cosine similarity between heads' outputs and
between their attention maps. A head's output is compared in the model's residual space -- its ``(batch, seq,
head_dim)`` output times its slice of the output projection -- so every head lives in the same coordinates.
Attention maps (``softmax(q k^T / sqrt(d))`` over the variant's pattern) exist only for exact variants; low-rank and
kernel approximations define no n x n map and get none.

Head importance by ablation (Michel et al. 2019, section 3): zero one head's output (its slice of the attention's
``(batch, seq, heads * head_dim)`` input to the output projection) at evaluation and measure the accuracy drop;
:func:`head_ablation` does it for every head of every layer, :func:`heads_summary` condenses the per-layer similarity
and the ablation into the numbers the heads question asks for (mean pairwise cosine of outputs and of maps, how many
heads cost more than a point when removed).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from einops import rearrange
from torch import Tensor, nn

from efficient_attn.attention.functional import combine_masks, masked_softmax
from efficient_attn.model import TransformerModel
from efficient_attn.registry import build_attention, get_spec

__all__ = [
    "relative_error",
    "cosine_matrix",
    "mean_offdiagonal",
    "capture_qkv",
    "head_contributions",
    "attention_probs",
    "random_input_errors",
    "trained_errors",
    "head_diversity",
    "ablate_head",
    "head_ablation",
    "mean_similarity",
    "heads_summary",
]


def relative_error(y: Tensor, y_ref: Tensor, row_mask: Tensor | None = None) -> float:
    """``||y - y_ref||_F / ||y_ref||_F`` over all entries (float64 accumulation).

    Args:
        y, y_ref: tensors of one shape, e.g. ``(batch, heads, seq, head_dim)``.
        row_mask: optional bool ``(batch, seq)``; only those query rows count (padded queries are ignored).
    """
    if y.shape != y_ref.shape:
        raise ValueError(f"relative_error needs equal shapes, got {tuple(y.shape)} and {tuple(y_ref.shape)}")
    diff = (y.double() - y_ref.double())
    ref = y_ref.double()
    if row_mask is not None:
        keep = rearrange(row_mask, "b n -> b 1 n 1").to(ref.dtype)  # (b, 1, n, 1)
        diff, ref = diff * keep, ref * keep
    denom = float(torch.linalg.vector_norm(ref))
    if denom == 0.0:
        raise ValueError("relative_error: the reference output is all zeros")
    return float(torch.linalg.vector_norm(diff)) / denom


def cosine_matrix(vectors: Tensor) -> Tensor:
    """Pairwise cosine similarity of the rows of ``vectors`` ``(heads, m)`` -> ``(heads, heads)`` (float64)."""
    if vectors.dim() != 2:
        raise ValueError(f"cosine_matrix expects (heads, m), got {tuple(vectors.shape)}")
    v = vectors.double()
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
    unit = v / norms
    return unit @ unit.T  # (h, m) @ (m, h) -> (h, h)


def mean_offdiagonal(matrix: Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN for 1 x 1)."""
    h = matrix.shape[0]
    if h < 2:
        return float("nan")
    off = ~torch.eye(h, dtype=torch.bool, device=matrix.device)
    return float(matrix[off].mean())


def _attention_modules(model: TransformerModel) -> list[nn.Module]:
    return [block.attn for block in model.blocks]


@torch.no_grad()
def capture_qkv(
    model: TransformerModel, tokens: Tensor, key_padding_mask: Tensor | None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Run ``model`` and capture each layer's q, k, v ``(batch, heads, seq, head_dim)`` with forward hooks on the
    attention's fused ``qkv`` projection."""
    captured: list[tuple[Tensor, Tensor, Tensor]] = []
    handles = []
    for attn in _attention_modules(model):
        heads = attn.config.num_heads

        def hook(_module: nn.Module, _inputs: Any, output: Tensor, heads: int = heads) -> None:
            q, k, v = rearrange(output, "b n (three h d) -> three b h n d", three=3, h=heads)
            captured.append((q.clone(), k.clone(), v.clone()))

        handles.append(attn.qkv.register_forward_hook(hook))
    try:
        model.eval()
        model(tokens, key_padding_mask)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def head_contributions(attn: nn.Module, o: Tensor) -> Tensor:
    """Each head's output in residual space: ``o`` ``(batch, heads, seq, head_dim)`` times the head's columns of the
    output projection ``(dim, heads * head_dim)`` -> ``(batch, heads, seq, dim)`` (no bias: it is shared by heads)."""
    weight = rearrange(attn.out.weight, "dim (h d) -> h d dim", h=attn.config.num_heads)
    return torch.einsum("bhnd,hdm->bhnm", o, weight)  # (b, h, n, d) x (h, d, dim) -> (b, h, n, dim)


def attention_probs(attn: nn.Module, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> Tensor | None:
    """Dense attention probabilities ``(batch, heads, seq, seq)`` over the variant's pattern, or None when the
    variant is an approximation (it defines no n x n map). Materialises n x n: use at small lengths only."""
    spec = get_spec(attn.spec_key)
    if not spec.exact:
        return None
    n = q.shape[-2]
    pattern = attn.dense_mask(n, q.device)  # (n, n) or (h, n, n)
    allowed = combine_masks(pattern, key_padding_mask)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, n, d) x (b, h, d, n) -> (b, h, n, n)
    return masked_softmax(scores, allowed)


def _core_params(key: str, params: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """The variant's params plus ``max_len`` where its config bounds the length (Linformer)."""
    spec = get_spec(key)
    out = dict(params)
    if spec.max_len_field is not None and spec.max_len_field not in out:
        out[spec.max_len_field] = seq_len
    return out


@torch.no_grad()
def random_input_errors(
    variants: list[str],
    lengths: list[int],
    params: dict[str, dict[str, Any]],
    *,
    num_heads: int = 4,
    head_dim: int = 16,
    batch_size: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Relative error of each variant's core vs full attention on standard-normal q, k, v, per length.

    Returns tidy rows ``{source: "random", variant, seq_len, layer: -1, rel_error, status, note}``. A variant that
    cannot run (e.g. a bad parameter) gets ``status="error"`` and the message, never a made-up number.
    """
    rows = []
    dim = num_heads * head_dim
    for n in lengths:
        gen = torch.Generator().manual_seed(seed * 7919 + n)
        q, k, v = (torch.randn(batch_size, num_heads, n, head_dim, generator=gen) for _ in range(3))
        torch.manual_seed(seed)
        full = build_attention("full", dim=dim, num_heads=num_heads).eval()
        y_full = full.attend(q, k, v)
        for key in variants:
            row: dict[str, Any] = {"source": "random", "task": "", "variant": key, "seq_len": n, "layer": -1}
            try:
                torch.manual_seed(seed)
                attn = build_attention(key, dim=dim, num_heads=num_heads, **_core_params(key, params.get(key, {}), n))
                attn.eval()
                row.update(rel_error=relative_error(attn.attend(q, k, v), y_full), status="ok", note="")
            except (ValueError, TypeError, RuntimeError) as exc:
                row.update(rel_error=float("nan"), status="error", note=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    return rows


@torch.no_grad()
def trained_errors(
    model: TransformerModel, tokens: Tensor, key_padding_mask: Tensor | None, *, task: str, seq_len: int
) -> list[dict[str, Any]]:
    """Per layer: the trained model's own attention core vs full attention on the q, k, v that layer produced.

    Rows: ``{source: "trained", task, variant, seq_len, layer, rel_error, status, note}``; padded queries ignored.
    """
    rows = []
    layers = capture_qkv(model, tokens, key_padding_mask)
    for index, (attn, (q, k, v)) in enumerate(zip(_attention_modules(model), layers)):
        # the reference has the model's own causality: a causal LM's core is compared with causal full attention
        full = build_attention("full", dim=attn.config.dim, num_heads=attn.config.num_heads,
                               causal=attn.config.causal).eval()
        y_full = full.attend(q, k, v, key_padding_mask)
        y = attn.attend(q, k, v, key_padding_mask)
        rows.append(
            {
                "source": "trained",
                "task": task,
                "variant": model.attention_key,
                "seq_len": seq_len,
                "layer": index,
                "rel_error": relative_error(y, y_full, key_padding_mask),
                "status": "ok",
                "note": "",
            }
        )
    return rows


@torch.no_grad()
def head_diversity(
    model: TransformerModel, tokens: Tensor, key_padding_mask: Tensor | None, *, max_map_len: int = 512
) -> list[dict[str, Any]]:
    """Pairwise head similarity per layer of a trained model, in tidy long form.

    Rows ``{layer, kind, head_i, head_j, cosine}`` with ``kind`` in ``{"output", "map"}``; ``"map"`` rows only for
    exact variants and sequences up to ``max_map_len`` (the maps are n x n). Padded query rows are excluded
    from both: they carry no information.
    """
    rows = []
    layers = capture_qkv(model, tokens, key_padding_mask)
    n = tokens.shape[1]
    real = key_padding_mask if key_padding_mask is not None else torch.ones(tokens.shape, dtype=torch.bool)
    keep = rearrange(real, "b n -> b 1 n 1").to(torch.float32)
    for index, (attn, (q, k, v)) in enumerate(zip(_attention_modules(model), layers)):
        o = attn.attend(q, k, v, key_padding_mask)
        contrib = head_contributions(attn, o) * keep  # (b, h, n, dim)
        matrices = {"output": cosine_matrix(rearrange(contrib, "b h n m -> h (b n m)"))}
        if n <= max_map_len:
            probs = attention_probs(attn, q, k, key_padding_mask)
            if probs is not None:
                matrices["map"] = cosine_matrix(rearrange(probs * keep, "b h n m -> h (b n m)"))
        for kind, matrix in matrices.items():
            h = matrix.shape[0]
            for i in range(h):
                for j in range(h):
                    rows.append({"layer": index, "kind": kind, "head_i": i, "head_j": j, "cosine": float(matrix[i, j])})
    return rows


@contextmanager
def ablate_head(model: TransformerModel, layer: int, head: int) -> Iterator[None]:
    """Within the context, head ``head`` of block ``layer`` contributes nothing: its output ``(batch, seq,
    head_dim)`` is zeroed before the output projection (a forward pre-hook on ``attn.out``; the projection's bias,
    shared by all heads, stays)."""
    attn = _attention_modules(model)[layer]
    heads = attn.config.num_heads
    if not 0 <= head < heads:
        raise ValueError(f"head must be in [0, {heads}) for layer {layer}, got {head}")
    head_dim = attn.config.dim // heads

    def zero_head(_module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        (x,) = inputs  # (b, n, h * d)
        x = x.clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0.0
        return (x,)

    handle = attn.out.register_forward_pre_hook(zero_head)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def head_ablation(model: TransformerModel, score: Callable[[TransformerModel], float]) -> list[dict[str, Any]]:
    """Accuracy drop from removing each head alone (Michel et al. 2019, arXiv:1905.10650).

    Args:
        model: a trained backbone.
        score: ``model -> accuracy`` on held-out data (e.g. ``lambda m: evaluate(m, batch)``), called once for the
            intact model and once per head with that head zeroed by :func:`ablate_head`.

    Returns:
        Rows ``{layer, head, accuracy, ablated_accuracy, drop}`` with ``drop = accuracy - ablated_accuracy``
        (positive: the head helped).
    """
    model.eval()
    base = score(model)
    rows = []
    for layer, attn in enumerate(_attention_modules(model)):
        for head in range(attn.config.num_heads):
            with ablate_head(model, layer, head):
                ablated = score(model)
            rows.append({"layer": layer, "head": head, "accuracy": base, "ablated_accuracy": ablated,
                         "drop": base - ablated})
    return rows


def mean_similarity(diversity_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(layer, kind)`` of :func:`head_diversity` rows: the mean pairwise (off-diagonal) cosine, via
    :func:`mean_offdiagonal`. Rows ``{layer, kind, num_heads, mean_cosine}`` (NaN for a single head)."""
    groups: dict[tuple[int, str], dict[tuple[int, int], float]] = {}
    for row in diversity_rows:
        groups.setdefault((row["layer"], row["kind"]), {})[(row["head_i"], row["head_j"])] = row["cosine"]
    out = []
    for (layer, kind), entries in sorted(groups.items()):
        h = 1 + max(i for i, _ in entries)
        matrix = torch.tensor([[entries[(i, j)] for j in range(h)] for i in range(h)], dtype=torch.float64)
        out.append({"layer": layer, "kind": kind, "num_heads": h, "mean_cosine": mean_offdiagonal(matrix)})
    return out


def heads_summary(
    model: TransformerModel,
    tokens: Tensor,
    key_padding_mask: Tensor | None,
    score: Callable[[TransformerModel], float],
    *,
    threshold: float = 0.01,
) -> dict[str, Any]:
    """The heads question's numbers for one trained model.

    Returns ``{num_heads, accuracy, output_cosine, map_cosine, important_heads, max_drop}``: the mean over layers of
    the mean pairwise cosine of head outputs and of attention maps on ``tokens`` (NaN with one head; map NaN for
    approximations), and how many heads (over all layers) cost more than ``threshold`` accuracy when removed alone.
    """
    similarity = mean_similarity(head_diversity(model, tokens, key_padding_mask))
    ablation = head_ablation(model, score)

    def layer_mean(kind: str) -> float:
        values = [r["mean_cosine"] for r in similarity if r["kind"] == kind]
        return sum(values) / len(values) if values else float("nan")

    return {
        "num_heads": _attention_modules(model)[0].config.num_heads,
        "accuracy": ablation[0]["accuracy"],
        "output_cosine": layer_mean("output"),
        "map_cosine": layer_mean("map"),
        "important_heads": sum(r["drop"] > threshold for r in ablation),
        "max_drop": max(r["drop"] for r in ablation),
    }
