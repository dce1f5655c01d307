"""Peers: the wrappers' errors, that each peer runs with the documented mapping, and -- where the semantics coincide --
that our variants compute exactly what the peers compute (issue 7 item 4).

Only a missing PEER package skips a test (``pytest.importorskip``); a missing variant of ours is a failure.
"""

from __future__ import annotations

import sys

import pytest
import torch
from einops import rearrange

import efficient_attn as ea
from efficient_attn.peers import PeerUnavailableError, build_peer, list_peers, peer_info
from tests.helpers import random_padding, random_qkv, reference_attention

DIM, HEADS = 32, 4  # head_dim 8


def _band(seq: int, w: int, causal: bool) -> torch.Tensor:
    """Independent dense window pattern: |i-j| <= w, or 0 <= i-j <= w when causal."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = (i - j).abs() <= w
    return allowed & (j <= i) if causal else allowed


def _rows_with_keys(allowed: torch.Tensor) -> torch.Tensor:
    """(b, 1|h, n) bool: queries that have at least one allowed key."""
    return allowed.any(dim=-1)


# ------------------------------------------------------------------------------------------------ registry-ish
def test_list_peers_and_info():
    assert list_peers() == ["hf-bigbird", "hf-llama-decode", "hf-longformer", "linformer", "local-attention"]
    for name in list_peers():
        info = peer_info(name)
        assert info["name"] == name
        assert info["mapping"] and info["levels"]
        assert "layer" in info["levels"]
        assert info["install"] == "pip install 'efficient-attn[peers]'"
    assert peer_info("local-attention")["levels"] == ["core", "layer"]
    assert any("full attention" in note for note in peer_info("hf-bigbird")["notes"])


def test_mapping_is_stated_once_consistently():
    """Every parameter a peer accepts appears in its mapping rows and in the module docstring's table."""
    import efficient_attn.peers as peers

    table = peers.mapping_table()
    for name, spec in peers.PEERS.items():
        assert name in table and name in peers.__doc__
        ours = " ".join(row[0] for row in spec.mapping)
        for param in spec.params:
            assert param in ours, (name, param)
            assert param in peers.__doc__, (name, param)


def test_unknown_peer_suggests_nearest():
    with pytest.raises(KeyError, match=r"unknown peer 'hf-bigbrd'.*did you mean 'hf-bigbird'"):
        build_peer("hf-bigbrd", dim=DIM, num_heads=HEADS, seq_len=64, params={})
    with pytest.raises(KeyError, match=r"did you mean 'linformer'"):
        peer_info("linfomer")


def test_unknown_param_names_allowed():
    message = r"unknown parameter 'window' \(did you mean 'window_size'\?\).*allowed: window_size"
    with pytest.raises(TypeError, match=message):
        build_peer("hf-longformer", dim=DIM, num_heads=HEADS, seq_len=64, params={"window": 8})


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("local-attention", {"window_size": 0}, r"peer 'local-attention': window_size must be a positive int, got 0"),
        ("local-attention", {"causal": 1}, r"causal must be a bool"),
        ("hf-bigbird", {"seed": -1}, r"seed must be a non-negative int"),
        ("linformer", {"max_len": 32}, r"max_len=32 is below seq_len=64"),
    ],
)
def test_bad_values_are_value_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_peer(name, dim=DIM, num_heads=HEADS, seq_len=64, params=params)


def test_linformer_headwise_has_no_counterpart():
    with pytest.raises(ValueError, match=r"headwise=True has no counterpart"):
        build_peer("linformer", dim=DIM, num_heads=HEADS, seq_len=64, params={"headwise": True})


def test_peer_specific_checks_are_part_of_the_peer_entry(monkeypatch):
    """A peer's own checks live in its PEERS entry: the resolver runs whatever check the entry holds."""
    import dataclasses

    import efficient_attn.peers as peers

    assert peers.PEERS["linformer"].check is not None
    seen = []
    monkeypatch.setitem(
        peers.PEERS, "linformer", dataclasses.replace(peers.PEERS["linformer"], check=lambda p, n: seen.append((p, n)))
    )
    resolved = peers._resolve_params(peers.PEERS["linformer"], 64, {"headwise": True})
    assert seen == [(resolved, 64)] and resolved["max_len"] == 64  # the entry's check ran instead of the original
    with pytest.raises(ValueError, match=r"dim must be a positive int, got 0"):
        build_peer("linformer", dim=0, num_heads=HEADS, seq_len=64, params={})


@pytest.mark.parametrize(
    "name, module", [("local-attention", "local_attention"), ("hf-bigbird", "transformers"), ("linformer", "linformer")]
)
def test_missing_package_says_how_to_install(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(PeerUnavailableError, match=r"pip install 'efficient-attn\[peers\]'") as info:
        build_peer(name, dim=DIM, num_heads=HEADS, seq_len=64, params={})
    assert isinstance(info.value, RuntimeError)
    assert repr(peer_info(name)["package"]) in str(info.value)


# ---------------------------------------------------------------------------------------- every peer runs
PEER_CASES = [
    ("local-attention", {"window_size": 8}, 45),
    ("local-attention", {"window_size": 8, "causal": True}, 45),
    ("hf-longformer", {"window_size": 8}, 45),
    ("hf-bigbird", {"block_size": 8, "num_random_blocks": 2}, 100),  # > (5 + 2*2) * 8 = 72: block-sparse
    ("hf-bigbird", {"block_size": 8, "num_random_blocks": 2}, 40),  # fallback to full attention
    ("linformer", {"k": 16}, 45),
]


@pytest.mark.parametrize("name, params, seq", PEER_CASES)
def test_peer_forward_backward(name, params, seq):
    pytest.importorskip(peer_info(name)["package"].replace("-", "_"))
    torch.manual_seed(0)
    peer = build_peer(name, dim=DIM, num_heads=HEADS, seq_len=seq, params=params)
    assert peer.training
    x = torch.randn(2, seq, DIM, requires_grad=True)
    y = peer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in peer.named_parameters():
        if "global" in pname:  # HF Longformer's global projections are unused without global tokens
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert peer.last_padded_len is not None and peer.last_padded_len >= seq


@pytest.mark.parametrize("name, params, seq", [c for c in PEER_CASES if c[0] != "linformer"])
def test_peer_key_padding(name, params, seq):
    """Padded keys never reach a real query: changing their inputs leaves real outputs unchanged."""
    pytest.importorskip(peer_info(name)["package"].replace("-", "_"))
    torch.manual_seed(0)
    peer = build_peer(name, dim=DIM, num_heads=HEADS, seq_len=seq, params=params).double()
    x = torch.randn(2, seq, DIM, dtype=torch.float64)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[1, seq - 7 :] = False
    x2 = x.clone()
    x2[1, seq - 7 :] += 5.0
    y1, y2 = peer(x, key_padding_mask=mask), peer(x2, key_padding_mask=mask)
    torch.testing.assert_close(y1[mask], y2[mask], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y1, peer(x2))  # without the mask the change is seen


def test_linformer_peer_rejects_padding_mask():
    pytest.importorskip("linformer")
    peer = build_peer("linformer", dim=DIM, num_heads=HEADS, seq_len=16, params={"k": 4})
    with pytest.raises(ValueError, match=r"does not support key_padding_mask"):
        peer(torch.randn(1, 16, DIM), key_padding_mask=torch.ones(1, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ hf-bigbird
def _bigbird_pair(seq: int, *, seed_a: int, seed_b: int, block: int = 8, r: int = 2):
    torch.manual_seed(0)
    params = {"block_size": block, "num_random_blocks": r}
    a = build_peer("hf-bigbird", dim=DIM, num_heads=HEADS, seq_len=seq, params={**params, "seed": seed_a})
    b = build_peer("hf-bigbird", dim=DIM, num_heads=HEADS, seq_len=seq, params={**params, "seed": seed_b})
    b.load_state_dict(a.state_dict())
    return a.double(), b.double()


def test_hf_bigbird_uses_random_blocks_in_train_mode():
    pytest.importorskip("transformers")
    seq = 160  # 20 blocks of 8 > fallback (5 + 2*2) * 8 = 72
    a, b = _bigbird_pair(seq, seed_a=0, seed_b=1)
    assert a.uses_block_sparse(seq)
    x = torch.randn(1, seq, DIM, dtype=torch.float64)
    ya, ya_again, yb = a(x), a(x), b(x)
    torch.testing.assert_close(ya, ya_again)  # the plan is a function of the seed
    assert (ya - yb).abs().max() > 1e-3  # another seed, another random plan
    a.eval()
    y_eval = a(x)
    assert (ya - y_eval).abs().max() > 1e-3  # eval mode has no random blocks (transformers #23055)
    assert "no random blocks" in a.last_note


def test_hf_bigbird_is_block_sparse_above_fallback():
    """In eval mode the plan is fixed (window + first/last global blocks): a far block cannot reach block 3."""
    pytest.importorskip("transformers")
    seq, block = 160, 8
    a, _ = _bigbird_pair(seq, seed_a=0, seed_b=0)
    a.eval()
    x = torch.randn(1, seq, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 10 * block : 11 * block] += 3.0  # perturb block 10
    y, y2 = a(x), a(x2)
    changed = (y - y2).abs().amax(dim=-1)[0]  # (seq,)
    blocks = changed.reshape(-1, block).amax(dim=-1)
    assert blocks[3] < 1e-12 and blocks[5] < 1e-12  # not in their window, not global, no random blocks in eval
    assert blocks[9] > 1e-3 and blocks[10] > 1e-3 and blocks[11] > 1e-3  # window
    assert blocks[0] > 1e-3 and blocks[-1] > 1e-3  # global query blocks see everything


def test_hf_bigbird_fallback_is_full_attention_and_noted():
    pytest.importorskip("transformers")
    seq = 40  # <= (5 + 2*2) * 8 = 72
    a, _ = _bigbird_pair(seq, seed_a=0, seed_b=0)
    x = torch.randn(2, seq, DIM, dtype=torch.float64)
    mask = random_padding(2, seq, seed=1)
    y = a(x, key_padding_mask=mask)
    assert not a.uses_block_sparse(seq)
    assert "fell back to full attention" in a.last_note and "72" in a.last_note
    q, k, v = (
        rearrange(lin(x), "b n (h d) -> b h n d", h=HEADS)
        for lin in (a.sparse.query, a.sparse.key, a.sparse.value)
    )
    o = reference_attention(q, k, v, mask[:, None, None, :])
    expected = a.out(rearrange(o, "b h n d -> b n (h d)"))
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------- local-attention == our window
LOCAL_CASES = [(64, 16, False), (37, 8, False), (80, 16, True), (45, 8, True), (100, 32, False)]


@pytest.mark.parametrize("seq, w, causal", LOCAL_CASES)
def test_local_attention_core_is_the_window_pattern(seq, w, causal):
    """The peer itself computes the band |i-j| <= w (causal: 0 <= i-j <= w), checked against an independent oracle."""
    pytest.importorskip("local_attention")
    params = {"window_size": w, "causal": causal}
    peer = build_peer("local-attention", dim=DIM, num_heads=HEADS, seq_len=seq, params=params)
    q, k, v = random_qkv(2, HEADS, seq, DIM // HEADS, seed=seq)
    mask = random_padding(2, seq, seed=w)
    allowed = _band(seq, w, causal)[None, None] & mask[:, None, None, :]
    out = peer.attend(q, k, v, key_padding_mask=mask)
    ref = reference_attention(q, k, v, allowed)
    rows = _rows_with_keys(allowed).expand(-1, HEADS, -1)  # peer gives a uniform average on empty rows, ours zeros
    torch.testing.assert_close(out[rows], ref[rows])
    torch.testing.assert_close(peer.attend(q, k, v), reference_attention(q, k, v, _band(seq, w, causal)))


@pytest.mark.parametrize("seq, w, causal", LOCAL_CASES)
def test_our_window_equals_local_attention_core(seq, w, causal):
    """Issue 7 item 4: our `window` variant's attend == lucidrains' exact window, outputs and gradients, float64."""
    pytest.importorskip("local_attention")
    ours = ea.build_attention("window", dim=DIM, num_heads=HEADS, window_size=w, causal=causal)
    params = {"window_size": w, "causal": causal}
    peer = build_peer("local-attention", dim=DIM, num_heads=HEADS, seq_len=seq, params=params)
    q, k, v = random_qkv(2, HEADS, seq, DIM // HEADS, seed=seq + 1)
    out_ours = ours.attend(q, k, v)
    grads_ours = torch.autograd.grad(out_ours.square().sum(), (q, k, v))
    out_peer = peer.attend(q, k, v)
    grads_peer = torch.autograd.grad(out_peer.square().sum(), (q, k, v))
    torch.testing.assert_close(out_ours, out_peer)
    for g_ours, g_peer in zip(grads_ours, grads_peer):
        torch.testing.assert_close(g_ours, g_peer)
    # with key padding, on every query that has a real key in its window
    mask = random_padding(2, seq, seed=seq)
    allowed = _band(seq, w, causal)[None, None] & mask[:, None, None, :]
    rows = _rows_with_keys(allowed).expand(-1, HEADS, -1)
    torch.testing.assert_close(ours.attend(q, k, v, mask)[rows], peer.attend(q, k, v, mask)[rows])


def test_our_window_layer_equals_local_attention_layer():
    """Same projections copied in: the layers agree too (float64)."""
    pytest.importorskip("local_attention")
    seq, w = 50, 8
    ours = ea.build_attention("window", dim=DIM, num_heads=HEADS, window_size=w).double()
    peer = build_peer("local-attention", dim=DIM, num_heads=HEADS, seq_len=seq, params={"window_size": w}).double()
    peer.qkv.load_state_dict(ours.qkv.state_dict())
    peer.out.load_state_dict(ours.out.state_dict())
    x = torch.randn(2, seq, DIM, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x))


# --------------------------------------------------------------------------- hf-longformer == our window
@pytest.mark.parametrize("seq, w", [(64, 8), (45, 8), (70, 16)])
def test_our_window_equals_hf_longformer_layer(seq, w):
    """HF Longformer without global tokens is our non-causal window (attention_window = 2w); HF's softmax runs in
    float32 even for float64 inputs, hence the float32-level tolerance."""
    pytest.importorskip("transformers")
    ours = ea.build_attention("window", dim=DIM, num_heads=HEADS, window_size=w).double()
    peer = build_peer("hf-longformer", dim=DIM, num_heads=HEADS, seq_len=seq, params={"window_size": w}).double()
    d = DIM
    with torch.no_grad():
        for idx, lin in enumerate((peer.attn.query, peer.attn.key, peer.attn.value)):
            lin.weight.copy_(ours.qkv.weight[idx * d : (idx + 1) * d])
            lin.bias.copy_(ours.qkv.bias[idx * d : (idx + 1) * d])
    peer.out.load_state_dict(ours.out.state_dict())
    x = torch.randn(2, seq, DIM, dtype=torch.float64)
    mask = random_padding(2, seq, seed=seq)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-6)
    real = mask  # HF zeroes padded queries' probabilities; compare real tokens
    torch.testing.assert_close(ours(x, mask)[real], peer(x, mask)[real], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- linformer == our linformer
@pytest.mark.parametrize("seq, max_len, k, share_kv", [(64, 64, 16, False), (40, 64, 16, True), (33, 48, 40, False)])
def test_our_linformer_equals_lucidrains_linformer(seq, max_len, k, share_kv):
    """Issue 7 item 4: lucidrains' LinformerSelfAttention with our weights copied in == our `linformer` forward."""
    pytest.importorskip("linformer")
    ours = ea.build_attention(
        "linformer", dim=DIM, num_heads=HEADS, max_len=max_len, k=k, share_kv=share_kv, bias=False
    ).double()
    peer = build_peer(
        "linformer", dim=DIM, num_heads=HEADS, seq_len=seq, params={"k": k, "max_len": max_len, "share_kv": share_kv}
    ).double()
    d = DIM
    theirs = peer.attn
    with torch.no_grad():
        theirs.to_q.weight.copy_(ours.qkv.weight[:d])
        theirs.to_k.weight.copy_(ours.qkv.weight[d : 2 * d])
        theirs.proj_k.copy_(ours.proj_k)
        if share_kv:
            # lucidrains shares the key projection for values too (values = keys): only equal when W_v = W_k
            ours.qkv.weight[2 * d :].copy_(ours.qkv.weight[d : 2 * d])
        else:
            theirs.to_v.weight.copy_(ours.qkv.weight[2 * d :])
            theirs.proj_v.copy_(ours.proj_v)
        theirs.to_out.weight.copy_(ours.out.weight)
        theirs.to_out.bias.zero_()
    x = torch.randn(2, seq, DIM, dtype=torch.float64, requires_grad=True)
    y_ours = ours(x)
    g_ours = torch.autograd.grad(y_ours.square().sum(), x)[0]
    y_peer = peer(x)
    g_peer = torch.autograd.grad(y_peer.square().sum(), x)[0]
    torch.testing.assert_close(y_ours, y_peer)
    torch.testing.assert_close(g_ours, g_peer)


# ------------------------------------------------------------------------------------------- the peers suites
def _peer_suites():
    import glob
    import os
    import tomllib

    root = os.path.join(os.path.dirname(__file__), "..", "bench")
    suites = {}
    for path in sorted(glob.glob(os.path.join(root, "peers_*.toml"))):
        with open(path, "rb") as f:
            suites[os.path.basename(path)] = tomllib.load(f)
    return suites


def test_peer_suites_name_real_peers_and_parameters():
    """Every bench/peers_*.toml names existing peers with accepted parameters, and our variants with valid configs."""
    from efficient_attn.peers import PEERS, _resolve_params

    suites = _peer_suites()
    expected = {"peers_core.toml", "peers_layer_window.toml", "peers_layer_bigbird.toml", "peers_layer_linformer.toml"}
    assert set(suites) >= expected
    for fname, suite in suites.items():
        dim = suite["heads"] * suite["head_dim"]
        assert suite["peers"], fname
        for peer in suite["peers"]:
            spec = PEERS[peer["name"]]
            assert suite["level"] in spec.levels, (fname, peer["name"])
            _resolve_params(spec, max(suite["lengths"]), peer["params"])
        for variant in suite["variants"]:
            ea.build_config(variant["key"], dim=dim, num_heads=suite["heads"], **variant["params"])
