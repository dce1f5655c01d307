"""``model.generate(...)`` through transformers' caches with our variants (``efficient_attn.integrations.hf``).

transformers keeps its own key/value cache (a ``DynamicCache``; a Mistral config's layers keep only the sliding
window); our attention keeps its own decode cache per layer next to it (states for performer / linear / retention),
filled by the prefill and checked against transformers' length and last key at every step. References: transformers'
``sdpa`` on the same weights, and our own ``use_cache=False`` generation (the whole prefix recomputed each step).
Tiny models (hidden 32, 2 layers, GQA 4/2 heads), float32, greedy decoding of a batch of two left-padded prompts.
"""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea

transformers = pytest.importorskip("transformers")

from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from efficient_attn.attention.caches import KVCache, RollingKVCache, StateCache  # noqa: E402
from efficient_attn.integrations import hf  # noqa: E402
from efficient_attn.integrations.hf_models import build_hf_llama  # noqa: E402

VOCAB = 64
CAUSAL_KEYS = [k for k in ea.list_attentions() if ea.get_spec(k).supports_causal]
#: Patterns a few tokens wide, so a 6-token prompt plus 10 new tokens crosses windows, blocks and chunks.
SMALL = {
    "window": {"window_size": 3},
    "longformer": {"window_size": 3, "global_tokens": 1},
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "performer": {"num_features": 32},
    "moba": {"block_size": 4, "top_k": 2},
    "linear": {"chunk_size": 4},
    "retention": {"chunk_size": 4},
}
GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


def tiny_llama(attn: str, seed: int = 0):
    return build_hf_llama(
        layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, attn_implementation=attn,
        lm_head=True, max_positions=256, seed=seed,
    )


def tiny_mistral(attn: str, sliding_window: int = 4):
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=sliding_window, max_position_embeddings=128, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return hf.check_hf_model(MistralForCausalLM(config).eval())


def left_padded_prompts(lengths: tuple[int, ...] = (7, 4), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: a batch of prompts left-padded to the longest (pad token 0)."""
    n = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), n), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(n)[None, :] >= n - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def generate(model, ids, mask, new: int, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **GREEDY, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)  # (batch, prompt + new), (batch, new, vocab)


def assert_same_generation(got, expected, atol=1e-5):
    (tokens, scores), (tokens_ref, scores_ref) = got, expected
    torch.testing.assert_close(scores, scores_ref, atol=atol, rtol=1e-4)
    assert torch.equal(tokens, tokens_ref)


# ------------------------------------------------------------------------------------- against transformers' own
def test_generate_with_full_matches_sdpa_through_the_dynamic_cache():
    name = hf.register_hf("full")
    ref, ours = tiny_llama("sdpa"), tiny_llama(name)
    ids, mask = left_padded_prompts()
    expected = generate(ref, ids, mask, 10)
    assert_same_generation(generate(ours, ids, mask, 10), expected)
    caches = [c for c in hf.decode_caches(name) if c.batch == 2]
    # one KV cache per layer, holding the prompt and all but the last new token, the padding marked
    assert len(caches) == 2 and all(type(c) is KVCache and c.length == 7 + 9 for c in caches)
    assert all(c.kv_heads == 2 for c in caches)  # GQA: the 2 key/value heads as they are, not repeated to 4
    assert all(not c.all_real and not bool(c.real[1, :3].any()) for c in caches)


def test_generate_in_qwen2_with_full_and_window_matches_sdpa():
    # Another current decoder (attention bias on q, k, v); window 64 > 17 tokens is full attention here.
    def qwen2(attn: str):
        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
        )
        torch.manual_seed(0)
        return hf.check_hf_model(Qwen2ForCausalLM(config).eval())

    ids, mask = left_padded_prompts()
    expected = generate(qwen2("sdpa"), ids, mask, 10)
    for name in (hf.register_hf("full"), hf.register_hf("window", name="efficient_attn:window-64", window_size=64)):
        assert_same_generation(generate(qwen2(name), ids, mask, 10), expected)


def test_generate_with_window_matches_mistral_sliding_window_cache():
    # Mistral's layers keep only the last sliding_window - 1 keys; ours keeps window_size + 1 = 4 (a rolling cache).
    name = hf.register_hf("window")  # window_size = 3 derived from sliding_window = 4
    ref, ours = tiny_mistral("sdpa"), tiny_mistral(name)
    ids, mask = left_padded_prompts()
    expected = generate(ref, ids, mask, 10)
    assert_same_generation(generate(ours, ids, mask, 10), expected)
    caches = [c for c in hf.decode_caches(name) if c.batch == 2 and c.length == 16]
    assert len(caches) == 2 and all(type(c) is RollingKVCache and c.capacity == 4 for c in caches)
    # the window matters at these lengths: without it the same weights generate differently
    no_window = tiny_mistral("sdpa", sliding_window=None)
    assert not torch.allclose(generate(no_window, ids, mask, 10)[1], expected[1], atol=1e-3)


# ----------------------------------------------------------------------------- every causal variant, cache or not
@pytest.mark.parametrize("key", CAUSAL_KEYS)
def test_every_causal_variant_generates_the_same_with_and_without_the_cache(key):
    name = hf.register_hf(key, name=f"efficient_attn:{key}-gen", **SMALL.get(key, {}))
    model = tiny_llama(name)
    ids, mask = left_padded_prompts()
    recomputed = generate(model, ids, mask, 10, use_cache=False)
    cached = generate(model, ids, mask, 10, use_cache=True)
    assert_same_generation(cached, recomputed, atol=1e-4)
    caches = [c for c in hf.decode_caches(name) if c.batch == 2 and c.length == 16]
    assert len(caches) == 2  # the cached run really went through our decode caches, one per layer
    if key in ("performer", "linear", "retention"):
        assert all(isinstance(c, StateCache) for c in caches)


@pytest.mark.parametrize("key", ["full", "window", "performer", "moba"])
def test_a_chunk_after_a_filled_cache_equals_the_full_forward(key):
    # A call transformers can make: several new tokens (q_len > 1) against a non-empty cache.
    model = tiny_llama(hf.register_hf(key, name=f"efficient_attn:{key}-gen", **SMALL.get(key, {})))
    ids, mask = left_padded_prompts((12, 9))
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        first = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        chunk = model(ids[:, 5:], attention_mask=mask, cache=first.past_key_values, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(first.logits[real[:, :5]], whole[:, :5][real[:, :5]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk[real[:, 5:]], whole[:, 5:][real[:, 5:]], atol=1e-5, rtol=1e-5)


def test_assisted_generation_crops_our_full_cache_and_matches_greedy():
    # Assisted generation verifies draft tokens in one chunk and crops the rejected ones from the cache: ours crops
    # with it (a plain KV cache can); the result is greedy decoding's.
    ref, ours = tiny_llama("sdpa"), tiny_llama(hf.register_hf("full"))
    draft = tiny_llama(hf.register_hf("full", name="efficient_attn:full-draft"), seed=1)
    ids = left_padded_prompts((6,))[0]
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        got = ours.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, assistant_model=draft)
    assert torch.equal(got, expected)


# -------------------------------------------------------------------------------------------- clear refusals
def test_cache_reordering_generation_is_a_clear_error():
    # Beam search reorders transformers' cache between steps; ours cannot follow (states have no history).
    model = tiny_llama(hf.register_hf("performer", name="efficient_attn:performer-gen", num_features=32))
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="reordered, e.g. by beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=3)


def test_assisted_generation_with_a_state_variant_is_a_clear_error():
    model = tiny_llama(hf.register_hf("linear", name="efficient_attn:linear-gen", chunk_size=4))
    draft = tiny_llama(hf.register_hf("full", name="efficient_attn:full-draft"), seed=1)
    ids = left_padded_prompts((6,))[0]
    with pytest.raises(ValueError, match="cropped, reordered or resized"):
        model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, assistant_model=draft)


def test_static_cache_is_a_clear_error():
    model = tiny_llama(hf.register_hf("full"))
    ids, mask = left_padded_prompts()
    with pytest.raises(NotImplementedError, match="static caches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_continuing_a_cache_ours_did_not_fill_is_a_clear_error():
    ref, ours = tiny_llama("sdpa"), tiny_llama(hf.register_hf("window", name="efficient_attn:window-gen",
                                                                window_size=3))
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        prefill = ref(ids, attention_mask=mask, use_cache=True)  # transformers' cache, filled by sdpa
        with pytest.raises(ValueError, match="no decode cache of ours"):
            ours(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                 cache=prefill.past_key_values)


def test_a_variant_without_a_decode_path_refuses_decode_steps_by_name(monkeypatch):
    # No causal variant of ours lacks a decode path today: full with its decode path switched off stands in for one.
    monkeypatch.setattr(ea.get_spec("full").module_cls, "decode_unsupported_reason", "a test stand-in")
    model = tiny_llama(hf.register_hf("full", name="efficient_attn:full-no-decode"))
    ids, mask = left_padded_prompts()
    with pytest.raises(NotImplementedError, match=r"'full' cannot decode with a cache \(a test stand-in\)"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generate(model, ids, mask, 3, use_cache=False)[0].shape == (2, 10)
