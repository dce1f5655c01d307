"""Grouped-query and multi-query attention (``num_kv_heads < num_heads``; Ainslie et al. 2023, Shazeer 2019).

For every variant and backend: ``attend`` on k, v with ``num_kv_heads`` heads equals the same variant (same
parameters, same random plan or features) on k, v repeated to ``num_heads`` heads, outputs and q/k/v gradients, in
float64 (flex: float32 and forward only, CPU FlexAttention has neither float64 nor backward). The non-naive backends
must never repeat k or v: a dispatch mode watches every op that moves k or v data.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import efficient_attn as ea
from efficient_attn.attention import flex as flex_backend
from helpers import pattern_with_padding, random_padding
from variant_cases import backend_cases, build_small, supports_gqa

GQA_KEYS = [k for k in ea.list_attentions() if supports_gqa(k)]

CPU = torch.device("cpu")
HEADS, HEAD_DIM = 4, 8

#: several chunks / blocks at these lengths (the defaults, 64, would make a 37-token input one chunk or block);
#: moba's top_k = 3 of 5 blocks leaves a real choice
FAMILY_PARAMS = {"linear": {"chunk_size": 8}, "retention": {"chunk_size": 8}, "moba": {"block_size": 8, "top_k": 3}}


def build_gqa_case(key: str, **params):
    return build_small(key, **{**FAMILY_PARAMS.get(key, {}), **params})


def gqa_and_reference(key: str, kv_heads: int, **params):
    """The variant with ``kv_heads`` key/value heads and the same variant with ``HEADS``, sharing every parameter."""
    gqa = build_gqa_case(key, num_heads=HEADS, num_kv_heads=kv_heads, **params)
    mha = build_gqa_case(key, num_heads=HEADS, **params)
    state = gqa.state_dict()
    group = HEADS // kv_heads
    for name, value in mha.state_dict().items():
        mine = state[name]
        if mine.shape == value.shape:
            value.copy_(mine)
        elif name == "qkv.weight" or name == "qkv.bias":
            continue  # projections are not part of attend
        else:  # a per-key/value-head parameter (Linformer headwise E, F): each query head reads its group's
            value.copy_(mine.repeat_interleave(group, dim=0))
    return gqa, mha


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


def qkv(batch: int, seq: int, kv_heads: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def runnable_here(attn, backend, dtype, needs_grad):
    return attn.unavailable_reason(backend, CPU, needs_grad, dtype) is None


# flex compiles a kernel per shape (~20 s each on 2 cores): two cases below, the rest of flex's GQA path is shared
CASES = [pytest.param(k, b, id=f"{k}-{b}") for k, b in backend_cases(GQA_KEYS, exclude=("xformers", "flex"))]


@pytest.mark.parametrize("key, backend", CASES)
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_equal_repeated_heads(key, backend, kv_heads, causal):
    if causal and not ea.get_spec(key).supports_causal:
        pytest.skip(f"{key} is not causal (test_contract checks it refuses)")
    gqa, mha = gqa_and_reference(key, kv_heads, causal=causal, backend=backend)
    gqa.eval(), mha.eval()
    seq, group = 37, HEADS // kv_heads
    kpm = random_padding(2, seq, seed=3)
    q, k, v = qkv(2, seq, kv_heads)
    out = gqa.attend(q, k, v, key_padding_mask=kpm)
    assert gqa.last_backend == backend and out.shape == q.shape
    ref = mha.attend(q, repeat_kv(k, group), repeat_kv(v, group), key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    grad = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


def test_blocked_matmul_path_equals_the_fused_kernel(monkeypatch):
    """The exact matmul kernels (used off CPU) fold a group's query heads into rows; check them on CPU too."""
    from efficient_attn.attention import blocked

    for key in ("window", "longformer", "bigbird", "full"):
        gqa, mha = gqa_and_reference(key, 2, causal=key != "full", backend="torch")
        q, k, v = qkv(2, 37, 2, seed=5)
        kpm = random_padding(2, 37, seed=6)
        ref = mha.attend(q, repeat_kv(k, 2), repeat_kv(v, 2), key_padding_mask=kpm)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        with monkeypatch.context() as patch:
            patch.setattr(blocked, "_use_cpu_flash", lambda q: False)
            out = gqa.attend(q, k, v, key_padding_mask=kpm)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ no repeats
class KVMovementWatch(TorchDispatchMode):
    """Records every op output that carries k/v data (taint through data-movement ops, starting at k and v's
    storages) and has ``num_heads`` along a head axis: that would be a repeat or expand-and-copy of k or v."""

    MOVEMENT = {
        "view", "_unsafe_view", "reshape", "expand", "clone", "contiguous", "index_select", "index", "gather",
        "repeat", "repeat_interleave", "cat", "stack", "transpose", "permute", "t", "slice", "select", "unsqueeze",
        "squeeze", "_to_copy", "copy_", "constant_pad_nd", "as_strided", "unfold", "alias", "detach", "flatten",
        "unflatten", "narrow", "split", "split_with_sizes", "chunk", "masked_fill", "where", "diagonal",
    }

    def __init__(self, sources, num_heads: int) -> None:
        super().__init__()
        self.keep = list(sources)  # tainted tensors stay alive, so their data pointers are never reused
        self.tainted = {t.untyped_storage().data_ptr() for t in sources}
        self.num_heads = num_heads
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if name in self.MOVEMENT and any(t.untyped_storage().data_ptr() in self.tainted for t in inputs if t.numel()):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel():
                    self.keep.append(t)
                    self.tainted.add(t.untyped_storage().data_ptr())
                    if t.dim() >= 4 and self.num_heads in t.shape[1:-1]:
                        self.violations.append(f"{func} -> {tuple(t.shape)}")
        return out


def test_the_watch_catches_a_repeat():
    k = torch.randn(2, 1, 37, HEAD_DIM)
    with KVMovementWatch([k], HEADS) as watch:
        k.repeat_interleave(HEADS, dim=1)
    assert watch.violations
    with KVMovementWatch([k], HEADS) as watch:
        k.expand(2, HEADS, 37, HEAD_DIM).contiguous()
    assert watch.violations


#: BigBird's random blocks and MoBA's content-selected blocks differ per query head, so their torch backends gather
#: each query head's own blocks (from the shared key/value head): the same gathered size as with num_kv_heads =
#: num_heads, not a repeat of k (test_per_head_gathers_read_the_shared_head checks MoBA reads the shared head).
PER_HEAD_GATHER = {("bigbird", "torch"), ("moba", "torch")}

NO_REPEAT_CASES = [
    pytest.param(k, b, id=f"{k}-{b}") for k, b in backend_cases(GQA_KEYS, exclude=("xformers", "naive", "flex"))
    if (k, b) not in PER_HEAD_GATHER
]


@pytest.mark.parametrize("key, backend", NO_REPEAT_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_non_naive_backends_never_repeat_kv(key, backend, causal):
    if causal and not ea.get_spec(key).supports_causal:
        pytest.skip(f"{key} is not causal")
    attn = build_gqa_case(key, num_heads=HEADS, num_kv_heads=1, causal=causal, backend=backend)
    q, k, v = qkv(2, 40, 1, seed=2)
    kpm = random_padding(2, 40, seed=4)
    with KVMovementWatch([k, v], HEADS) as watch:
        out = attn.attend(q, k, v, key_padding_mask=kpm)
        out.sum().backward()
    assert not watch.violations, watch.violations
    assert k.grad.shape == k.shape


def test_naive_repeats_so_the_watch_can_fail():
    attn = build_small("full", num_heads=HEADS, num_kv_heads=1, backend="naive")
    q, k, v = qkv(1, 16, 1)
    with KVMovementWatch([k, v], HEADS) as watch:
        attn.attend(q, k, v)
    assert watch.violations


def test_flex_grouped_heads_alibi_and_padding():
    """CPU FlexAttention: float32, forward only, one compile for grouped heads + ALiBi's score_mod + padding (its
    float64 pattern reference is in tests/test_flex.py): the kernel gets the 2 shared heads with ``enable_gqa`` and
    equals the float64 ALiBi reference of tests/test_positions.py on the repeated heads (no second flex run on
    repeated heads: that would compile a second kernel for the 4-head shape, and the dense reference is stronger)."""
    from test_positions import alibi_reference

    key, causal, padded = "window", False, True
    gqa, _ = gqa_and_reference(key, 2, causal=causal, backend="flex", alibi=True)
    gqa = gqa.float().eval()
    seen = []
    real = flex_backend.compiled_flex_attention()

    def spy(q, k, v, **kwargs):
        seen.append((k.shape[1], v.shape[1], kwargs.get("enable_gqa")))
        return real(q, k, v, **kwargs)

    q, k, v = (t.detach().float() for t in qkv(2, 37, 2))
    kpm = random_padding(2, 37, seed=3) if padded else None
    with mock.patch.object(flex_backend, "compiled_flex_attention", return_value=spy), torch.no_grad():
        out = gqa.attend(q, k, v, key_padding_mask=kpm)
    assert seen == [(2, 2, True)] and gqa.last_backend == "flex"
    dense = alibi_reference(q, k, v, pattern_with_padding(gqa.dense_mask(37), kpm)).float()  # repeats k, v itself
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    with pytest.raises(ea.BackendUnavailableError, match="forward-only"):
        gqa.attend(q.requires_grad_(), k, v)


# ---------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize("key", [k for k in ea.list_attentions() if not supports_gqa(k)])
def test_variants_without_grouped_heads_refuse_them_by_name(key):
    with pytest.raises(ValueError, match=rf"attention '{key}' does not support grouped key/value heads.*full"):
        build_small(key, num_kv_heads=2)


@pytest.mark.parametrize("key", GQA_KEYS)
def test_kv_projection_parameters_fall_by_the_group_size(key):
    dim, heads = 32, 4
    counts = {}
    for kv_heads in (4, 2, 1):
        attn = build_small(key, dim=dim, num_heads=heads, num_kv_heads=kv_heads)
        weight = attn.qkv.weight
        assert weight.shape == (dim + 2 * kv_heads * (dim // heads), dim)
        q_params = dim * dim + dim  # the query projection (with bias) is untouched
        counts[kv_heads] = weight.numel() + attn.qkv.bias.numel() - q_params
        assert attn.config.num_kv_heads == kv_heads
    assert counts[4] == 2 * counts[2] == 4 * counts[1]


@pytest.mark.parametrize("bad", [3, 0, 8, True, 2.0])
def test_num_kv_heads_must_divide_num_heads(bad):
    with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads=4.*valid values: 1, 2, 4"):
        ea.build_attention("full", dim=32, num_heads=4, num_kv_heads=bad)


def test_num_kv_heads_defaults_to_num_heads_and_attend_checks_kv_heads():
    attn = ea.build_attention("full", dim=32, num_heads=4)
    assert attn.config.num_kv_heads == 4
    grouped = ea.build_attention("full", dim=32, num_heads=4, num_kv_heads=2)
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"expects 2 key/value heads \(config.num_kv_heads\), got 4"):
        grouped.attend(q, q, q)


@pytest.mark.parametrize("key", GQA_KEYS)
def test_forward_with_grouped_heads(key):
    attn = build_small(key, dim=32, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    y = attn(x, key_padding_mask=random_padding(2, 24, seed=1))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_per_head_gathers_read_the_shared_head(kv_heads, monkeypatch):
    """MoBA's causal rows without padding take the split path (own block and history as two mask-free calls); with
    grouped heads the own block is gathered per query head too. Both equal the repeated-heads reference, and the only
    ops that produce a ``num_heads``-headed tensor from k or v are the gathers (``index_select``) of selected blocks."""
    from efficient_attn.attention import moba

    monkeypatch.setattr(moba, "ROWS_PER_CALL", 8)  # one query block per call: blocks 2.. have top_k - 1 earlier ones
    split = []
    own_keys = moba._Chunk.own_keys
    monkeypatch.setattr(moba._Chunk, "own_keys", lambda self, x, bs: split.append(self.own_index is not None)
                        or own_keys(self, x, bs))
    gqa, mha = gqa_and_reference("moba", kv_heads, causal=True, backend="torch")
    q, k, v = qkv(2, 40, kv_heads, seed=7)  # 5 whole blocks of 8, no padding: real is None, the split path
    group = HEADS // kv_heads
    assert torch.equal(gqa.selected_blocks(q, k), mha.selected_blocks(q, repeat_kv(k, group)))
    with KVMovementWatch([k, v], HEADS) as watch:
        out = gqa.attend(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    grouped_split = list(split)
    ref = mha.attend(q, repeat_kv(k, group), repeat_kv(v, group))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")
    assert grouped_split and all(grouped_split), "the split path ran, gathering the own block per query head"
    assert watch.violations, "the per-head gathers are seen (the watch is live)"
    assert all(v.startswith(("aten.index_select", "aten.view")) for v in watch.violations), watch.violations
