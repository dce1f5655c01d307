"""Our variants inside ModernBERT (Warner et al. 2024, arXiv:2412.13663), an encoder whose attention goes through
transformers' ``AttentionInterface``: global (bidirectional) layers and local layers with a bidirectional sliding
window (``local_attention = 2w``: ``|i - j| <= w``). Tiny models (hidden 32, 3 layers), float32, random weights; the
reference is transformers' own ``sdpa`` on the same weights.
"""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea

transformers = pytest.importorskip("transformers")
ModernBertConfig = getattr(transformers, "ModernBertConfig", None)
if ModernBertConfig is None:  # pragma: no cover - older transformers
    pytest.skip("this transformers has no ModernBERT", allow_module_level=True)

from transformers import ModernBertModel  # noqa: E402

from efficient_attn.integrations import hf  # noqa: E402

VOCAB = 64
PADDING_KEYS = [k for k in ea.list_attentions() if ea.get_spec(k).supports_key_padding]
SMALL = {
    # "window" takes ModernBERT's own window in its local layers (a window_size of its own would conflict there)
    "longformer": {"window_size": 3, "global_tokens": 1},
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "performer": {"num_features": 32},
    "nystrom": {"num_landmarks": 4},
    "linformer": {"k": 8},
}


def modernbert(attn: str, *, local_attention: int = 128, layer_types: list[str] | None = None):
    config = ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        local_attention=local_attention, layer_types=layer_types, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return hf.check_hf_model(ModernBertModel(config).eval())


def batch(seq: int, real_lengths: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(seq)[None, :] < torch.tensor(real_lengths)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_full_modernbert_matches_sdpa(padded):
    # Default local_attention=128 over 12 tokens: the local layers' window excludes nothing, full serves every layer.
    name = hf.register_hf("full", name="efficient_attn:full-modernbert")
    ref, ours = modernbert("sdpa"), modernbert(name)
    assert set(ref.config.layer_types) == {"full_attention", "sliding_attention"}
    ids, mask = batch(12, (12, 8) if padded else (12, 12))
    real = mask.bool()
    expected = ref(ids, attention_mask=mask).last_hidden_state[real]
    torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state[real], expected, atol=1e-5, rtol=1e-5)
    built = hf.attention_modules(name)
    assert built and not any(m.config.causal for m in built)


@pytest.mark.parametrize("padded", [False, True])
def test_window_matches_modernbert_local_attention(padded):
    # local_attention=8: |i - j| <= 4 (bidirectional), our window_size=4; 16 tokens, so the window matters.
    name = hf.register_hf("window", name="efficient_attn:window-modernbert-local")
    local = ["sliding_attention"] * 3
    ref, ours = modernbert("sdpa", local_attention=8, layer_types=local), modernbert(name, local_attention=8,
                                                                                    layer_types=local)
    ids, mask = batch(16, (16, 11) if padded else (16, 16))
    real = mask.bool()
    expected = ref(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state[real], expected[real], atol=1e-5,
                               rtol=1e-5)
    assert {m.config.window_size for m in hf.attention_modules(name)} == {4}
    # the window is real: the same weights with global layers give another result
    glob = modernbert("sdpa", local_attention=8, layer_types=["full_attention"] * 3)
    assert not torch.allclose(glob(ids, attention_mask=mask).last_hidden_state[real], expected[real], atol=1e-3)


def test_a_variant_that_ignores_modernberts_local_window_is_an_error_once_it_matters():
    model = modernbert(hf.register_hf("full", name="efficient_attn:full-modernbert"), local_attention=8)
    model(batch(5, (5, 5))[0])  # |i - j| <= 4 excludes nothing among 5 tokens
    with pytest.raises(ValueError, match="sliding_window=4.*register 'window'"):
        model(batch(8, (8, 8))[0])


@pytest.mark.parametrize("key", PADDING_KEYS)
def test_every_padding_variant_runs_in_modernbert_and_ignores_padding(key):
    name = hf.register_hf(key, name=f"efficient_attn:{key}-modernbert", **SMALL.get(key, {}))
    model = modernbert(name)
    ids, mask = batch(16, (16, 9))
    other = ids.clone()
    other[1, 9:] = (other[1, 9:] + 7) % VOCAB  # change only padded tokens
    with torch.no_grad():
        out, out_other = (model(x, attention_mask=mask).last_hidden_state for x in (ids, other))
    torch.testing.assert_close(out_other[1, :9], out[1, :9], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_other[1, 9:], out[1, 9:])  # the padded positions did change
    built = hf.attention_modules(name)
    assert built and not any(m.config.causal for m in built)
