"""Our variants inside transformers models (``attn_implementation="efficient_attn:<key>"``).

Every model is tiny (hidden 32), built from a config with random weights; the reference is transformers' own ``sdpa``
on the same weights. float32 throughout: the models' own dtype.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import efficient_attn as ea

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    BertConfig,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import masking_utils  # noqa: E402

from efficient_attn.integrations import hf  # noqa: E402
from efficient_attn.integrations.hf_models import build_hf_llama  # noqa: E402

VOCAB = 64
CAUSAL_KEYS = [k for k in ea.list_attentions() if ea.get_spec(k).supports_causal]
PADDING_KEYS = [k for k in ea.list_attentions() if ea.get_spec(k).supports_key_padding]
#: Small-pattern parameters so that 16-24 tokens exercise each variant's sparsity (not its full-attention limit).
SMALL = {
    "window": {"window_size": 3},
    "longformer": {"window_size": 3, "global_tokens": 1},
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "performer": {"num_features": 32},
    "nystrom": {"num_landmarks": 4},
    "linformer": {"k": 8},
}


def tiny_llama(attn: str, *, lm_head: bool = True, kv_heads: int = 2, seed: int = 0):
    return build_hf_llama(
        layers=2, hidden=32, heads=4, kv_heads=kv_heads, intermediate=64, vocab=VOCAB, attn_implementation=attn,
        lm_head=lm_head, max_positions=256, seed=seed,
    )


def same_weights(cls, config, name: str, seed: int = 0):
    """(reference with sdpa, ours with ``name``): one model class, one config, the same random weights."""
    models = []
    for attn in ("sdpa", name):
        cfg = copy.deepcopy(config)
        cfg._attn_implementation = attn
        torch.manual_seed(seed)
        models.append(hf.check_hf_model(cls(cfg).eval()))
    return models


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def right_padding(lengths: list[int], seq: int) -> torch.Tensor:
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


# ------------------------------------------------------------------------------------------ exactness against sdpa
@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("padded", [False, True])
def test_full_llama_matches_sdpa_logits_and_gradients(backend, padded):
    name = hf.register_hf("full", name=f"efficient_attn:full-{backend}", backend=backend)
    ref, ours = tiny_llama("sdpa"), tiny_llama(name)
    ids = tokens(2, 12)
    mask = right_padding([12, 7], 12) if padded else None
    real = torch.ones(2, 12, dtype=torch.bool) if mask is None else mask.bool()
    out_ref, out_ours = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out_ours[real], out_ref[real], atol=1e-5, rtol=1e-5)
    out_ref[real].square().sum().backward()
    out_ours[real].square().sum().backward()
    for (pname, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=pname)
    assert {m.last_backend for m in hf.attention_modules(name)} == ({"sdpa"} if backend == "auto" else {"naive"})


def test_model_scaling_other_than_inverse_sqrt_head_dim_is_exact():
    # Granite scores with config.attention_multiplier instead of 1/sqrt(head_dim): we pre-scale q.
    config = GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, attention_multiplier=0.9, max_position_embeddings=64,
    )
    ref, ours = same_weights(GraniteForCausalLM, config, hf.register_hf("full"))
    assert ours.model.layers[0].self_attn.scaling == 0.9
    ids = tokens(2, 10)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_attention_function_maps_inputs_directly():
    # transformers' call, by hand: GQA heads, a non-default scaling, key padding -> (batch, seq, heads, head_dim).
    variant = hf._VARIANTS[hf.register_hf("full")]
    module = torch.nn.Module().eval()
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    mask = variant.mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding)
    out, weights = variant.attention(module, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 4, 8)
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & padding.bool()[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- sliding windows (Mistral)
def mistral_config(sliding_window: int) -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=sliding_window, max_position_embeddings=128,
    )


@pytest.mark.parametrize("padded", [False, True])
def test_window_matches_mistral_sliding_window(padded):
    # transformers' sliding_window=4 is our window_size=3 (derived when not given).
    ref, ours = same_weights(MistralForCausalLM, mistral_config(4), hf.register_hf("window"))
    ids = tokens(2, 16)
    mask = right_padding([16, 11], 16) if padded else None
    real = torch.ones(2, 16, dtype=torch.bool) if mask is None else mask.bool()
    expected = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], expected[real], atol=1e-5, rtol=1e-5)
    assert {m.config.window_size for m in hf.attention_modules("efficient_attn:window")} >= {3}
    # The model without its window is a different model: the comparison can fail.
    no_window = copy.deepcopy(mistral_config(4))
    no_window.sliding_window = None
    _, full = same_weights(MistralForCausalLM, no_window, hf.register_hf("full"))
    assert not torch.allclose(full(ids, attention_mask=mask).logits[real], expected[real], atol=1e-3)


@pytest.mark.parametrize("w", [1, 2, 5])
def test_sliding_window_convention_off_by_one(w):
    # transformers: a causal sliding_window=w sees w keys (itself included), a bidirectional one |i - j| <= w.
    # ours: window_size=r means |i - j| <= r, i.e. r + 1 keys causally. So causal w -> r = w - 1, bidirectional r = w.
    n = 9
    for causal, function, reach in (
        (True, masking_utils.sliding_window_causal_mask_function(w), w - 1),
        (False, masking_utils.sliding_window_bidirectional_mask_function(w), w),
    ):
        theirs = masking_utils.sdpa_mask(
            batch_size=1, q_length=n, kv_length=n, mask_function=function, allow_is_causal_skip=False
        )[0, 0]
        if causal:
            assert int(theirs[n - 1].sum()) == w
        described = hf.describe_mask(1, n, mask_function=function, local_size=w, q_length=n)
        assert (described.causal, described.sliding_window, described.window_size) == (causal, w, reach)
        if reach >= 1:
            ours = ea.build_attention("window", dim=8, num_heads=1, causal=causal, window_size=reach)
            assert torch.equal(ours.dense_mask(n), theirs)


def test_window_size_conflicting_with_the_models_window_is_an_error():
    name = hf.register_hf("window", name="efficient_attn:window-4", window_size=4)
    model = MistralForCausalLM(copy.deepcopy(mistral_config(4))).eval()
    model.set_attn_implementation(name)
    with pytest.raises(ValueError, match=r"window_size=4 .*sliding_window=4 is window_size=3"):
        model(tokens(1, 8))


def test_variant_that_ignores_the_models_window_is_an_error_once_it_matters():
    model = MistralForCausalLM(copy.deepcopy(mistral_config(4))).eval()
    model.set_attn_implementation(hf.register_hf("full"))
    model(tokens(1, 4))  # 4 tokens: the window excludes nothing
    with pytest.raises(ValueError, match="sliding_window=4.*register 'window'"):
        model(tokens(1, 8))


# ---------------------------------------------------------------------------- every causal variant stays causal
def decoder(kind: str, name: str):
    if kind == "llama":
        return tiny_llama(name)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=name,
    )
    torch.manual_seed(0)
    return hf.check_hf_model(Qwen2ForCausalLM(config).eval())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("key", CAUSAL_KEYS)
def test_every_causal_variant_keeps_the_model_causal_and_prefix_consistent(kind, key):
    model = decoder(kind, hf.register_hf(key, name=f"efficient_attn:{key}-small", **SMALL.get(key, {})))
    n, t = 24, 13
    ids = tokens(2, n)
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
    with torch.no_grad():
        out, out_changed, prefix = (model(x).logits for x in (ids, changed, ids[:, : t + 1]))
    assert not torch.allclose(out[:, t + 1 :], out_changed[:, t + 1 :])  # the change reaches later positions
    torch.testing.assert_close(out_changed[:, : t + 1], out[:, : t + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix, out[:, : t + 1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the causal flag is never lost
def test_mask_function_describes_causal_and_bidirectional_masks_compactly():
    padding = torch.tensor([[1, 1, 1, 0]])
    causal = hf.describe_mask(1, 4, attention_mask=padding, q_length=4)
    assert causal.causal and causal.sliding_window is None
    assert causal.key_padding.shape == (1, 4) and causal.key_padding.dtype == torch.bool
    bidirectional = hf.describe_mask(1, 4, mask_function=masking_utils.bidirectional_mask_function, q_length=4)
    assert not bidirectional.causal and bidirectional.key_padding is None  # nothing padded: no mask at all


def test_mask_function_takes_the_older_cache_position_form():
    mask = hf.describe_mask(2, 7, cache_position=torch.arange(7), attention_mask=torch.ones(2, 7))
    assert (mask.causal, mask.q_length, mask.q_offset, mask.key_padding) == (True, 7, 0, None)
    decode = hf.describe_mask(2, 8, cache_position=torch.tensor([7]))
    assert (decode.q_length, decode.q_offset, decode.kv_length) == (1, 7, 8)
    with pytest.raises(TypeError, match="does not know"):
        hf.describe_mask(2, 7, q_length=7, new_transformers_flag=True)


def test_model_without_our_mask_function_is_an_error_not_a_bidirectional_run():
    # The trap: an attention function registered without its mask function gets no mask and would lose causality.
    variant = hf._VARIANTS[hf.register_hf("full")]
    AttentionInterface.register("efficient_attn-test:attention-only", variant.attention)
    model = tiny_llama("efficient_attn-test:attention-only")
    with pytest.raises(ValueError, match="causal is unknown"):
        model(tokens(1, 6))


def test_unsupported_mask_patterns_are_errors():
    packed = masking_utils.and_masks(
        masking_utils.causal_mask_function,
        masking_utils.packed_sequence_mask_function(torch.tensor([[0, 0, 1, 1]])),
    )
    with pytest.raises(ValueError, match="packed sequences"):
        hf.describe_mask(1, 4, mask_function=packed, q_length=4)
    chunked = masking_utils.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="chunked"):
        hf.describe_mask(1, 6, mask_function=chunked, local_size=2, q_length=6)
    with pytest.raises(ValueError, match="overlay"):
        hf.describe_mask(1, 4, q_length=4, use_vmap=True)


def test_packed_sequences_in_a_sliding_window_model_are_caught_on_the_band():
    packed = masking_utils.and_masks(
        masking_utils.sliding_window_causal_mask_function(3),
        masking_utils.packed_sequence_mask_function(torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])),
    )
    with pytest.raises(ValueError, match="cannot honour the mask pattern"):
        hf.describe_mask(1, 8, mask_function=packed, local_size=3, q_length=8)


# --------------------------------------------------------------------------------------------------- encoders
def bert(name: str):
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, attn_implementation=name,
    )
    torch.manual_seed(0)
    return hf.check_hf_model(BertModel(config).eval())


def test_full_bert_matches_sdpa_with_padding():
    name = hf.register_hf("full", name="efficient_attn:full-bert")
    ref, ours = bert("sdpa"), bert(name)
    ids, mask = tokens(2, 10), right_padding([10, 6], 10)
    real = mask.bool()
    expected = ref(ids, attention_mask=mask).last_hidden_state[real]
    torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state[real], expected, atol=1e-5, rtol=1e-5)
    assert not any(m.config.causal for m in hf.attention_modules(name))


@pytest.mark.parametrize("key", PADDING_KEYS)
def test_every_padding_variant_runs_in_bert_and_ignores_padding(key):
    name = hf.register_hf(key, name=f"efficient_attn:{key}-bert", **SMALL.get(key, {}))
    model = bert(name)
    ids, mask = tokens(2, 16), right_padding([16, 9], 16)
    other = ids.clone()
    other[1, 9:] = (other[1, 9:] + 7) % VOCAB  # change only padded tokens
    with torch.no_grad():
        out, out_other = (model(x, attention_mask=mask).last_hidden_state for x in (ids, other))
    torch.testing.assert_close(out_other[1, :9], out[1, :9], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_other[1, 9:], out[1, 9:])  # the padded positions did change
    built = hf.attention_modules(name)
    assert built and not any(m.config.causal for m in built)


# ----------------------------------------------------------------------------------------------- generation
def test_generate_with_full_matches_sdpa_without_cache():
    # use_cache=False recomputes the prefix every step (prefills only); tests/test_hf_generate.py covers the caches.
    ref, ours = tiny_llama("sdpa"), tiny_llama(hf.register_hf("full"))
    prompt = tokens(1, 6)
    expected = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False), expected)


def test_generate_with_window_matches_mistral_sliding_window():
    ref, ours = same_weights(MistralForCausalLM, mistral_config(4), hf.register_hf("window"))
    prompt = tokens(1, 6)
    expected = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False), expected)


# --------------------------------------------------------------------------------------- registration errors
def test_bad_key_or_parameter_gives_our_usual_errors():
    with pytest.raises(KeyError, match="did you mean 'window'"):
        hf.register_hf("windw")
    with pytest.raises(TypeError, match=r"'window_sz' \(did you mean 'window_size'\?\).*allowed:"):
        hf.register_hf("window", window_sz=3)
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        hf.register_hf("window", window_size=0)
    with pytest.raises(TypeError, match="causal for attention 'window' come from the transformers model"):
        hf.register_hf("window", causal=True)
    with pytest.raises(ValueError, match="one of transformers' own"):
        hf.register_hf("full", name="sdpa")
    hf.register_hf("window", name="efficient_attn:window-taken", window_size=5)
    assert hf.register_hf("window", name="efficient_attn:window-taken", window_size=5) == "efficient_attn:window-taken"
    with pytest.raises(ValueError, match="already registered"):
        hf.register_hf("window", name="efficient_attn:window-taken", window_size=6)


def test_model_the_interface_does_not_reach_is_an_error_naming_its_class():
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="BloomForCausalLM does not route its attention"):
        hf.check_hf_model(model)


def test_llama_builder_rejects_an_unregistered_implementation():
    with pytest.raises(ValueError, match="register ours first"):
        build_hf_llama(attn_implementation="efficient_attn:not-registered")


def test_transformers_version_outside_the_range_is_an_error_naming_it():
    assert hf.check_transformers_version() == transformers.__version__
    for version in ("4.48.0", "4.57.1", "6.0.0"):
        with pytest.raises(RuntimeError, match=rf"transformers {version} .*>=5.0,<6"):
            hf.check_transformers_version(version)


def test_decoder_variant_that_cannot_be_causal_is_an_error():
    model = tiny_llama(hf.register_hf("nystrom", name="efficient_attn:nystrom-small", num_landmarks=4))
    with pytest.raises(ValueError, match="cannot be causal"):
        model(tokens(1, 8))


def test_importing_efficient_attn_does_not_import_transformers():
    code = "import sys, efficient_attn, efficient_attn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- GQA without repeats
@pytest.mark.parametrize("key", ["full", "window", "longformer", "performer"])
def test_grouped_heads_reach_our_kernel_unrepeated(key):
    # transformers hands a custom attention function k and v with kv_heads heads; a variant with grouped heads must
    # read them as they are (no op in its non-naive backend returns k/v data with the query head count).
    from test_gqa import KVMovementWatch

    assert ea.get_spec(key).module_cls.supports_gqa
    variant = hf._VARIANTS[hf.register_hf(key)]
    module = torch.nn.Module().eval()
    q = torch.randn(2, 4, 24, 8, requires_grad=True)
    k = torch.randn(2, 1, 24, 8, requires_grad=True)
    v = torch.randn(2, 1, 24, 8, requires_grad=True)
    mask = variant.mask(batch_size=2, q_length=24, kv_length=24, attention_mask=None)
    with KVMovementWatch([k, v], 4) as watch:
        out, _ = variant.attention(module, q, k, v, mask)
        out.sum().backward()
    assert not watch.violations, watch.violations
    assert out.shape == (2, 24, 4, 8) and k.grad.shape == k.shape
    grouped = [m for m in hf.attention_modules(variant.name) if m.config.num_kv_heads == 1]
    assert len(grouped) == 1 and grouped[0].last_backend != "naive"


def test_shared_builder_sliding_window_is_mistral_with_that_window():
    model = build_hf_llama(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, sliding_window=4)
    assert type(model).__name__ == "MistralModel" and model.config.sliding_window == 4
    # the sliding window changes the result against the same weights without it (16 tokens > 4-key window)
    plain = build_hf_llama(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB)
    ids = tokens(1, 16)
    assert not torch.allclose(model(ids).last_hidden_state, plain(ids).last_hidden_state)
    torch.testing.assert_close(model(ids[:, :4]).last_hidden_state, plain(ids[:, :4]).last_hidden_state)
    with pytest.raises(ValueError, match="sliding_window"):
        build_hf_llama(layers=1, hidden=32, heads=4, vocab=VOCAB, sliding_window=0)
