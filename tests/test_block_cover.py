"""The blocked backend's cover: capped at the sequence (issue 19 item 1b) and read without copies (issue 18).

* A window (or Longformer window) larger than the sequence must cost what full attention costs: the effective block
  and the padding are capped at the sequence length, and no slot that can only be empty is gathered. Checked with
  the exact storage tracker, against full attention's bytes on the same input, and on a fake-tensor prediction.
* Away from the edges a window's query blocks read consecutive keys: the backend reads them as one strided view of
  k (no gather). That path must give the float64 dense reference, outputs and gradients, and equal the gathered
  path; block sizes apart from the window (64-key blocks for a 256 window, here scaled down) too.
"""

import json

import pytest
import torch

from efficient_attn.attention import blocked
from efficient_attn.harness.plan import Cell
from efficient_attn.harness.predict import predict_cell
from efficient_attn.measure.storage import StorageTracker
from helpers import build_for_test, random_padding, random_qkv, reference_attention
from test_sparse import check_against_reference

HEADS, HEAD_DIM, SEQ = 4, 64, 128


def _peak(attn, mode: str, seq: int = SEQ) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, generator=gen, requires_grad=mode == "fwd_bwd")
               for _ in range(3))
    attn.attend(q, k, v)  # plan built and cached outside the measurement
    with StorageTracker() as tracker:
        if mode == "fwd":
            with torch.no_grad():
                attn.attend(q, k, v)
        else:
            attn.attend(q, k, v).sum().backward()
    return tracker.peak_bytes


@pytest.mark.parametrize("key", ["window", "longformer"])
@pytest.mark.parametrize("window_size", [2048, 10**6])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_window_larger_than_sequence_costs_what_full_attention_costs(key, window_size, causal, mode):
    attn = build_for_test(key, dim=HEADS * HEAD_DIM, num_heads=HEADS, causal=causal, backend="torch",
                          window_size=window_size)
    full = build_for_test("full", dim=HEADS * HEAD_DIM, num_heads=HEADS, causal=causal, backend="sdpa")
    st = attn.structure(SEQ)
    assert st.block_size == SEQ and st.padded_len == SEQ and st.key_blocks.shape[-1] == 1
    peak, full_peak = _peak(attn, mode), _peak(full, mode)
    qkv_bytes = 3 * HEADS * SEQ * HEAD_DIM * 4
    # one 128 x 128 call: near full attention (before the cap: 215 MB for w=2048, terabytes for w=10**6)
    assert peak <= 2 * full_peak + qkv_bytes, (peak, full_peak)
    assert attn.last_padded_len == SEQ


@pytest.mark.parametrize("key", ["window", "longformer"])
@pytest.mark.parametrize("seq", [5, 100, 300])
def test_capped_cover_keeps_the_pattern(key, seq):
    attn = build_for_test(key, dim=32, num_heads=4, backend="torch", window_size=256).double()
    q, k, v = random_qkv(2, 4, seq, 8, seed=seq)
    check_against_reference(attn, q, k, v, random_padding(2, seq, seed=seq))
    block = attn.pattern.block_size  # window: 64 by default, longformer: its window (256)
    assert attn.last_padded_len == (seq if seq <= 257 else -(-seq // block) * block)


@pytest.mark.parametrize("key", ["window", "longformer"])
def test_dry_run_prediction_of_a_short_cell_is_small(key):
    params = {"window_size": 10**6} if key == "window" else {"window_size": 10**6, "global_tokens": 1}
    for mode in ("fwd", "fwd_bwd"):
        cell = Cell(variant=key, params_json=json.dumps(params), backend_requested="torch", level="core", mode=mode,
                    causal=False, device="cpu", dtype="float32", batch_size=1, seq_len=256, num_heads=HEADS,
                    head_dim=HEAD_DIM)
        prediction = predict_cell(cell)
        assert prediction.total_bytes < 8 * 2**20, prediction  # was 13 GB before the cap


def _strided_calls(attn, seq: int) -> int:
    plan = attn._plan(seq, torch.device("cpu"))
    return sum(call.key_start is not None for call in blocked._calls(plan, 1, attn.config.num_heads, None,
                                                                       attn.config.num_kv_heads or 4))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [4, 6, 16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("blocks_per_call", [1, 3])
def test_strided_key_view_matches_reference_and_gather(causal, block_size, kv_heads, blocks_per_call, monkeypatch):
    seq = 150
    attn = build_for_test("window", dim=32, num_heads=4, num_kv_heads=kv_heads, causal=causal, backend="torch",
                          window_size=16, block_size=block_size).double()
    # no single call for the short input: calls of 1 or 3 query blocks, so the edge calls (which read a zero-padded
    # copy of their keys) span one or several blocks, and interior calls read k itself
    per_block = kv_heads * attn.structure(seq).keys_per_block
    monkeypatch.setattr(blocked, "KEY_ROWS_PER_CALL", (blocks_per_call * per_block) if blocks_per_call > 1 else 0)
    assert _strided_calls(attn, seq) > 0  # the view path really runs
    q, k, v = random_qkv(1, 4, seq, 8, seed=block_size)
    k, v = (t.detach()[:, :kv_heads].clone().requires_grad_() for t in (k, v))
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(1, 4, seq, 8, generator=gen, dtype=torch.float64)

    def run():
        out = attn.attend(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    viewed = run()
    group = 4 // kv_heads
    ref_attn = build_for_test("window", dim=32, num_heads=4, causal=causal, backend="naive", window_size=16).double()
    ref = (lambda o: o)(ref_attn.attend(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    torch.testing.assert_close(viewed[0], ref, atol=1e-10, rtol=1e-9)
    monkeypatch.setattr(blocked, "_contiguous_start", lambda tokens, block_size: None)
    attn._plans.clear()
    assert _strided_calls(attn, seq) == 0
    gathered = run()
    for a, b in zip(viewed, gathered):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("key", ["window", "longformer"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_apart_from_window_matches_reference(key, causal):
    params = {"window_size": 16, "block_size": 4}
    if key == "longformer":
        params["global_tokens"] = 2
    attn = build_for_test(key, dim=32, num_heads=4, causal=causal, backend="torch", **params).double()
    assert attn.structure(96).block_size == 4
    q, k, v = random_qkv(1, 4, 93, 8, seed=3)
    check_against_reference(attn, q, k, v, None)
    q, k, v = random_qkv(2, 4, 93, 8, seed=4)
    check_against_reference(attn, q, k, v, random_padding(2, 93, seed=5, empty_row=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("window", "block", "seq"), [(16, 4, 150), (16, 16, 64), (5, 3, 40), (300, 64, 1000)])
def test_contiguous_rows_claim_holds(causal, window, block, seq):
    attn = build_for_test("window", dim=32, num_heads=4, causal=causal, window_size=window, block_size=block)
    st = attn.structure(seq)
    lo, hi = attn.pattern.contiguous_rows(st)
    assert (lo, hi) == (0, st.num_query_blocks)  # every window row reads one run of keys
    first = blocked._contiguous_start(st.key_tokens(lo, hi), st.block_size)
    assert first is not None
    for r in range(lo, hi):
        tokens = st.key_tokens(r, r + 1)[0, 0]
        run = first + r * st.block_size + torch.arange(tokens.numel())
        used = tokens >= 0
        assert torch.equal(tokens[used], run[used])  # used slots are the run's keys
        assert bool(((run[~used] < 0) | (run[~used] >= st.padded_len)).all())  # empty ones lie outside the input


@pytest.mark.parametrize(("key", "params"), [
    ("window", {"window_size": 12, "block_size": 4, "sink_tokens": 3}),
    ("longformer", {"window_size": 12, "block_size": 4, "global_tokens": 2}),
    ("longformer", {"window_size": 12, "block_size": 4, "global_tokens": (5, 61)}),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_extra_keys_merged_by_lse_match_reference(key, params, causal, padded, monkeypatch):
    """Sinks and global columns run as a second call per group, merged by log-sum-exp; the window part of batch-1
    rows keeps its strided view. Outputs and gradients equal the float64 reference of the dense mask."""
    monkeypatch.setattr(blocked, "KEY_ROWS_PER_CALL", 0)  # several calls: edges and interior apart
    attn = build_for_test(key, dim=32, num_heads=4, num_kv_heads=2, causal=causal, backend="torch",
                          **params).double()
    seq = 70
    plan = attn._plan(seq, torch.device("cpu"))
    calls = list(blocked._calls(plan, 1, 4, None, 2))
    assert any(c.kind == "extra" for c in calls) and calls[-1].kind != "blocks"  # extra calls after the blocks
    assert any(c.key_start is not None for c in calls)  # the window part is strided despite the extra keys
    q, k, v = random_qkv(1, 4, seq, 8, seed=7)
    k, v = (t.detach()[:, :2].clone().requires_grad_() for t in (k, v))
    kpm = random_padding(1, seq, seed=3) if padded else None
    ref_attn = build_for_test(key, dim=32, num_heads=4, causal=causal, backend="naive", **params).double()
    allowed = ref_attn.dense_mask(seq)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(1, 4, seq, 8, generator=gen, dtype=torch.float64)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    ref = reference_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), allowed)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9, msg=f"gradient of {name}")


def test_merge_by_lse_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2)
    parts = []
    for keys in (slice(0, 3), slice(3, 5)):
        s = scores[..., keys]
        parts.append((torch.softmax(s, -1) @ v[:, :, keys], torch.logsumexp(s, -1)))
    out, lse = blocked.merge_by_lse(parts[0][0].clone(), parts[0][1], parts[1][0].clone(), parts[1][1])
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    empty = torch.full_like(parts[1][1], float("-inf"))  # a part with no key leaves the other unchanged
    out, lse = blocked.merge_by_lse(parts[0][0].clone(), parts[0][1], torch.zeros_like(out), empty)
    torch.testing.assert_close(out, parts[0][0])
    out, lse = blocked.merge_by_lse(torch.zeros_like(out), empty, torch.zeros_like(out), empty)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))


@pytest.mark.parametrize(("key", "params"), [
    ("window", {"window_size": 12}),
    ("window", {"window_size": 12, "sink_tokens": 3}),
    ("longformer", {"window_size": 12, "global_tokens": 2}),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_backward_with_a_larger_block_matches_reference(key, params, causal, padded, monkeypatch):
    """The backward runs its own cover (block 8 here against the forward's 4): exact, because it reads the rows'
    saved output and log-sum-exp; a length the larger block would pad differently keeps the forward's plan."""
    monkeypatch.setattr(blocked, "BACKWARD_BLOCK", 8)
    monkeypatch.setattr(blocked, "KEY_ROWS_PER_CALL", 0)  # several calls in both passes
    attn = build_for_test(key, dim=32, num_heads=4, causal=causal, backend="torch", block_size=4,
                          **params).double()
    plan = attn._plan(64, torch.device("cpu"))
    assert plan.backward is not None and plan.backward.structure.block_size == 8
    assert attn._plan(60, torch.device("cpu")).backward is None  # 60 pads to 60 with block 4, to 64 with 8
    q, k, v = random_qkv(1, 4, 64, 8, seed=11)
    check_against_reference(attn, q, k, v, random_padding(1, 64, seed=2) if padded else None, atol=1e-10)
