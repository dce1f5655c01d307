"""Non-finite values stay visible and stay inside the pattern (issue 19, item 3), for every variant x CPU backend.

The rule: a non-finite query gives a non-finite output row; a non-finite key or value makes non-finite exactly the
output rows whose pattern includes that token, and no others; a padded token reaches nobody. Every other row equals
the output with the bad entry replaced by a finite value (for position-defined patterns any value: those rows do
not depend on it at all).

The rows that "may see" a token come from an independent description of each pattern: the exact variants'
``dense_mask``, MoBA's ``dense_mask_for`` (its data-dependent selection), causal / all for the kernel and recurrent
variants, and all rows for the ones that mix every token (Linformer's projections, Nystrom's landmarks).
"""

from __future__ import annotations

import math

import pytest
import torch

import efficient_attn as ea
from helpers import build_for_test
from variant_cases import SMALL_PARAMS, kv_heads_for

SEQ, BATCH, HEADS, DIM = 20, 3, 4, 32
#: Small blocks and chunks so that a 20-token input has structure (several blocks, several chunks).
PARAMS = {
    **SMALL_PARAMS,
    "moba": {"block_size": 4, "top_k": 2},
    "linear": {"chunk_size": 8},
    "retention": {"chunk_size": 8},
    "performer": {"num_features": 32, "chunk_size": 8},
    "nystrom": {"num_landmarks": 4},
}
#: Where the bad entry goes: (batch row, head, position, value); row 2's bad token is at a padded position.
PLACES = [(0, 1, 7, math.nan), (1, 0, 3, math.inf), (2, 2, 17, -math.inf)]
REAL_LENGTHS = [SEQ, 15, 12]
#: FlexAttention compiles on CPU (slow): two float32 cases only, each module built once (its kernels reused).
FLEX_CASES = (("full", False), ("window", True))
_BUILT: dict = {}


def _cases():
    for key in ea.list_attentions():
        spec = ea.get_spec(key)
        for backend in spec.backends:
            module = spec.module_cls
            if module.unavailable_reason(backend, torch.device("cpu"), False, torch.float32) is not None:
                continue
            for causal in ((False, True) if spec.supports_causal else (False,)):
                if backend == "flex" and (key, causal) not in FLEX_CASES:
                    continue
                marks = [pytest.mark.slow] if backend == "flex" else []
                yield pytest.param(key, backend, causal, id=f"{key}-{backend}-{'causal' if causal else 'bidir'}",
                                   marks=marks)


def _build(key: str, backend: str, causal: bool):
    if backend == "flex":  # one module (and one set of compiled kernels) for all of its cases
        if (key, causal) not in _BUILT:
            _BUILT[key, causal] = _fresh(key, backend, causal)
        return _BUILT[key, causal]
    return _fresh(key, backend, causal)


def _fresh(key: str, backend: str, causal: bool):
    kv = kv_heads_for(key, 2, HEADS)
    attn = build_for_test(key, dim=DIM, num_heads=HEADS, num_kv_heads=kv, causal=causal, backend=backend,
                          **PARAMS.get(key, {})).eval()
    dtype = torch.float32 if backend == "flex" else torch.float64
    return attn.to(dtype), dtype


def _inputs(attn, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = attn.config.num_kv_heads
    hd = attn.config.head_dim
    q = torch.randn(BATCH, HEADS, SEQ, hd, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(BATCH, kv, SEQ, hd, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    real = torch.arange(SEQ)[None, :] < torch.tensor(REAL_LENGTHS)[:, None]
    return q, k, v, real


def _pattern(attn, q, k, real) -> torch.Tensor:
    """Bool ``(batch, heads, n, n)``: query i may see key j (pattern and padding), from an independent source."""
    key, cfg, n = attn.spec_key, attn.config, q.shape[-2]
    if attn.spec.exact:
        pattern = attn.dense_mask(n).bool()
        pattern = pattern if pattern.dim() == 3 else pattern[None]
        pattern = pattern[None].expand(q.shape[0], cfg.num_heads, n, n)
    elif key == "moba":
        pattern = attn.dense_mask_for(q, k, real)
    elif key in ("linformer", "nystrom"):
        pattern = torch.ones(q.shape[0], cfg.num_heads, n, n, dtype=torch.bool)
    else:  # kernel and recurrent forms: every (earlier) key
        pattern = torch.ones(n, n, dtype=torch.bool)
        pattern = (pattern.tril() if cfg.causal else pattern)[None, None].expand(q.shape[0], cfg.num_heads, n, n)
    return pattern & real[:, None, None, :]


def _expected_rows(attn, which: str, q, k, real) -> torch.Tensor:
    """Bool ``(batch, heads, n)``: the rows a bad entry at :data:`PLACES` may reach."""
    group = attn.config.num_heads // attn.config.num_kv_heads
    pattern = _pattern(attn, q, k, real)
    rows = torch.zeros(q.shape[0], attn.config.num_heads, q.shape[-2], dtype=torch.bool)
    for b, h, pos, _ in PLACES:
        if which == "q":
            rows[b, h, pos] = True
            if attn.spec_key == "nystrom" and real[b, pos]:  # query landmarks mix every real query of the head
                rows[b, h, :] = True
        else:
            heads = range(h * group, (h + 1) * group) if h < attn.config.num_kv_heads else ()
            for hh in heads:
                rows[b, hh] |= pattern[b, hh, :, pos]
    return rows


def _place(tensors: dict, which: str, attn, value_of=lambda value: value):
    out = {name: t.clone() for name, t in tensors.items()}
    for b, h, pos, value in PLACES:
        head = h if which == "q" else h % attn.config.num_kv_heads
        out[which][b, head, pos, 1] = value_of(value)
    return out


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("key,backend,causal", list(_cases()))
def test_nonfinite_reaches_exactly_its_pattern(key, backend, causal, which):
    attn, dtype = _build(key, backend, causal)
    q, k, v, real = _inputs(attn, dtype)
    clean = {"q": q, "k": k, "v": v}
    bad = _place(clean, which, attn)
    # MoBA's selection depends on the values: its unreached rows equal the run with 0 (what the cleaned run uses);
    # every other pattern is a function of positions, so those rows cannot depend on the value at all
    finite = _place(clean, which, attn, value_of=lambda value: 0.0 if key == "moba" else 3.0)
    with torch.no_grad():
        out = attn.attend(bad["q"], bad["k"], bad["v"], key_padding_mask=real)
        ref = attn.attend(finite["q"], finite["k"], finite["v"], key_padding_mask=real)
    expected = _expected_rows(attn, which, finite["q"], finite["k"], real)
    nonfinite_rows = ~torch.isfinite(out).all(-1)
    assert torch.equal(nonfinite_rows, expected), (
        f"rows reached: {nonfinite_rows.nonzero().tolist()}, expected {expected.nonzero().tolist()}"
    )
    assert expected.any(), "the bad token must reach some row (the test would prove nothing)"
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out[~expected], ref[~expected], rtol=tol, atol=tol)


def _pack_cases():
    for key in ea.list_attentions():
        module = ea.get_spec(key).module_cls
        if module.supports_packing:
            backend = (module.packing_backends or ea.get_spec(key).backends)[0]
            yield pytest.param(key, backend, id=f"{key}-{backend}")


@pytest.mark.parametrize("key,backend", list(_pack_cases()))
def test_nonfinite_key_stays_in_its_document(key, backend):
    """Packed documents: a bad key reaches rows of its own document only (the pattern of that document alone)."""
    causal = ea.get_spec(key).supports_causal
    attn, dtype = _build(key, backend, causal)
    q, k, v, _ = _inputs(attn, dtype, seed=1)
    docs = torch.tensor([0] * 9 + [1] * 11).expand(BATCH, SEQ)
    k_bad = k.clone()
    k_bad[0, 0, 12, 0] = math.nan  # second document, position 3 in it
    with torch.no_grad():
        out = attn.attend(q, k_bad, v, document_ids=docs)
        alone = attn.attend(q[:, :, 9:], k_bad[:, :, 9:], v[:, :, 9:])  # the document by itself
    reached = ~torch.isfinite(out).all(-1)
    assert not reached[:, :, :9].any(), "a bad key of document 1 reached document 0"
    assert torch.equal(reached[:, :, 9:], ~torch.isfinite(alone).all(-1))
    assert reached[0].any() and not reached[1:].any()


def _decode_cases():
    for key in ea.list_attentions():
        module = ea.get_spec(key).module_cls
        if module.decode_unsupported_reason is None:
            yield key


@pytest.mark.parametrize("key", list(_decode_cases()))
def test_decode_follows_the_same_rule(key):
    """Prefill with a bad value, then decode token by token with a bad key later: each step's output is
    non-finite exactly where the full causal call's is, and equal to it elsewhere."""
    attn, dtype = _build(key, "torch" if "torch" in ea.get_spec(key).backends else ea.get_spec(key).backends[0],
                         True)
    q, k, v, real = _inputs(attn, dtype, seed=2)
    v = v.clone()
    k = k.clone()
    v[0, 0, 2, 0] = math.nan  # in the prefill
    k[1, 1, 13, 3] = math.inf  # in the decode steps
    q = q.clone()
    q[2, 3, 15, 0] = math.nan
    with torch.no_grad():
        full = attn.attend(q, k, v, key_padding_mask=real)
        cache = attn.new_cache(BATCH, dtype=dtype)
        prefix = 8
        outs = [attn.attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], real[:, :prefix], cache=cache)]
        for t in range(prefix, SEQ):
            outs.append(attn.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], real[:, t:t + 1],
                                    cache=cache))
    stepped = torch.cat(outs, dim=-2)
    bad_full, bad_step = ~torch.isfinite(full).all(-1), ~torch.isfinite(stepped).all(-1)
    assert torch.equal(bad_step, bad_full), f"{bad_step.nonzero().tolist()} vs {bad_full.nonzero().tolist()}"
    assert bad_full[0].any() and bad_full[1].any() and bad_full[2, 3, 15]
    torch.testing.assert_close(stepped[~bad_full], full[~bad_full], rtol=1e-9, atol=1e-9)
    assert all(torch.isfinite(t).all() for t in cache.tensors() if t.is_floating_point()), "the cache holds a NaN"


def test_finite_inputs_take_the_fast_path(monkeypatch):
    """All-finite inputs: one backend call, no reach rerun."""
    attn, dtype = _build("window", "torch", True)
    q, k, v, real = _inputs(attn, dtype)
    calls = []
    original = attn._attend_torch
    monkeypatch.setattr(attn, "_attend_torch", lambda *a: calls.append(1) or original(*a))
    attn.attend(q, k, v, key_padding_mask=real)
    assert len(calls) == 1
    k[0, 0, 0, 0] = math.nan
    attn.attend(q, k, v, key_padding_mask=real)
    assert len(calls) == 3  # the cleaned run and the reach rerun


def test_gradients_of_unreached_rows_stay_finite():
    attn, dtype = _build("window", "torch", True)
    q, k, v, real = _inputs(attn, dtype)
    k = k.clone()
    k[0, 0, 3, 0] = math.nan
    q.requires_grad_(True)
    out = attn.attend(q, k, v, key_padding_mask=real)
    finite = torch.isfinite(out)
    out.masked_fill(~finite, 0).sum().backward()
    assert torch.isfinite(q.grad).all()


def _cross_cases():
    for key in ea.list_attentions():
        if ea.get_spec(key).module_cls.supports_cross_attention:
            yield key


@pytest.mark.parametrize("key", list(_cross_cases()))
def test_cross_attention_bad_key_reaches_the_rows_that_see_it(key):
    """Encoder-decoder attention (q_len != kv_len): a bad real encoder key reaches every decoder row (all of
    them see every real key); a bad padded encoder key reaches none; a bad decoder query only its own row (all rows
    of its head where queries are mixed)."""
    attn, dtype = _build(key, "torch" if "torch" in ea.get_spec(key).backends else ea.get_spec(key).backends[0],
                         False)
    gen = torch.Generator().manual_seed(4)
    hd, kv = attn.config.head_dim, attn.config.num_kv_heads
    q = torch.randn(2, HEADS, 6, hd, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, kv, 11, hd, generator=gen, dtype=dtype) for _ in range(2))
    real = torch.ones(2, 11, dtype=torch.bool)
    real[1, 8:] = False
    k[0, 0, 2, 0] = math.nan  # real: every row of the heads that share kv head 0
    k[1, 0, 9, 0] = math.inf  # padded: nobody
    q[1, 1, 4, 0] = math.nan  # its own row
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=real, cross=True)
    reached = ~torch.isfinite(out).all(-1)
    group = HEADS // kv
    expected = torch.zeros_like(reached)
    expected[0, :group] = True
    if attn.queries_independent:
        expected[1, 1, 4] = True
    else:  # Nystrom: the query landmarks mix every decoder query of the head
        expected[1, 1, :] = True
    assert torch.equal(reached, expected), reached.nonzero().tolist()


def test_alibi_and_dropout_do_not_hide_a_far_bad_key():
    """The reach rerun turns ALiBi off (its bias would underflow far weights) and dropout off (it would drop the
    bad token at random): in training mode with both, a bad key still reaches exactly its pattern's rows."""
    attn = build_for_test("full", dim=DIM, num_heads=HEADS, causal=True, backend="naive", alibi=True,
                          dropout=0.5).train()
    n = 600  # head 0's slope is 1/4: exp(-600 / 4) underflows in float32
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, HEADS, n, DIM // HEADS, generator=gen) for _ in range(3))
    k[0, 0, 0, 0] = math.nan
    out = attn.attend(q, k, v)
    reached = ~torch.isfinite(out).all(-1)
    expected = torch.zeros_like(reached)
    expected[0, 0, :] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("bad_at,reached", [(0, False), (SEQ - 2, True)])
def test_fill_cache_remembers_bad_tokens_within_the_window(bad_at, reached):
    """``fill_cache`` (what benchmarks use) keeps the cache finite and remembers the bad position: a window query
    sees a bad key only while it is inside its window (window 5 here)."""
    attn, dtype = _build("window", "torch", True)
    q, k, v, _ = _inputs(attn, dtype, seed=3)
    k = k.clone()
    k[:, :, bad_at, 0] = math.nan
    cache = attn.new_cache(BATCH, dtype=dtype)
    attn.fill_cache(cache, q, k, v)
    assert all(torch.isfinite(t).all() for t in cache.tensors() if t.is_floating_point())
    step = _inputs(attn, dtype, seed=4)
    with torch.no_grad():
        out = attn.attend(*(t[:, :, :1] for t in step[:3]), cache=cache)
    assert bool((~torch.isfinite(out)).any()) == reached
