"""The shared backbone with every registered attention."""

import pytest
import torch

import efficient_attn as ea

KEYS = ea.list_attentions()
CAUSAL_KEYS = [k for k in KEYS if ea.get_spec(k).supports_causal]
SMALL = dict(vocab_size=50, dim=32, depth=2, num_heads=4, max_len=128)


@pytest.mark.parametrize("key", KEYS)
def test_classifier_shapes_for_every_key(key):
    model = ea.build_model(key, task="classify", num_classes=3, **SMALL)
    tokens = torch.randint(0, 50, (2, 40))
    kpm = torch.arange(40)[None, :] < torch.tensor([[40], [25]])
    logits = model(tokens, key_padding_mask=kpm)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("key", KEYS)
def test_classifier_ignores_padded_tokens(key):
    torch.manual_seed(0)
    model = ea.build_model(key, task="classify", num_classes=3, **SMALL).eval()
    tokens = torch.randint(0, 50, (1, 40))
    kpm = torch.arange(40)[None, :] < 30
    other = tokens.clone()
    other[:, 30:] = (other[:, 30:] + 7) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, kpm), model(other, kpm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", CAUSAL_KEYS)
def test_lm_shapes_and_causality(key):
    torch.manual_seed(0)
    model = ea.build_model(key, task="lm", **SMALL).eval()
    tokens = torch.randint(0, 50, (2, 48))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (2, 48, 50)
        t = 17
        changed = tokens.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 50
        logits2 = model(changed)
    torch.testing.assert_close(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, t + 1 :], logits2[:, t + 1 :])


@pytest.mark.parametrize("key", [k for k in KEYS if k not in CAUSAL_KEYS])
def test_lm_refused_for_non_causal_variants(key):
    with pytest.raises(ValueError, match=rf"'{key}' cannot be used with task='lm' \(causal\)"):
        ea.build_model(key, task="lm", **SMALL)


def test_positions_change_the_output_and_none_is_permutation_equivariant():
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (1, 20))
    perm = torch.randperm(20)
    outputs = {}
    for positional in ("sinusoidal", "learned", "none"):
        torch.manual_seed(1)
        model = ea.build_model("full", task="classify", num_classes=4, positional=positional, **SMALL).eval()
        with torch.no_grad():
            outputs[positional] = (model(tokens), model(tokens[:, perm]))
    # without positions an encoder with mean pooling is permutation invariant; with positions it is not
    torch.testing.assert_close(*outputs["none"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(*outputs["sinusoidal"], atol=1e-4)
    assert not torch.allclose(*outputs["learned"], atol=1e-4)


def test_learned_positions_reject_sequences_past_max_len():
    model = ea.build_model("full", task="lm", positional="learned", **SMALL)
    with pytest.raises(ValueError, match="exceeds max_len=128 of the learned position embedding"):
        model(torch.randint(0, 50, (1, 129)))
    # sinusoidal positions have no such limit
    ea.build_model("full", task="lm", **SMALL)(torch.randint(0, 50, (1, 129)))


def test_sinusoidal_table_values():
    table = ea.model.sinusoidal_table(4, 6)
    assert table.shape == (4, 6)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(table[1, 0], torch.sin(torch.tensor(1.0)))


def test_weight_tying():
    model = ea.build_model("full", task="lm", tie_weights=True, **SMALL)
    assert model.head.weight is model.token_embedding.weight


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(task="translate"), ValueError, "task must be one of"),
        (dict(task="classify"), ValueError, "needs num_classes >= 2"),
        (dict(task="lm", positional="rotary"), ValueError, "positional must be one of"),
        (dict(task="lm", activation="tanh"), ValueError, "activation must be one of"),
        (dict(task="lm", causal=False), TypeError, "causal is set by the task"),
        (dict(task="lm", dropuot=0.1), TypeError, r"unknown parameter 'dropuot'"),
        (dict(task="lm", vocab_size=0), ValueError, "vocab_size must be a positive int, got 0"),
        (dict(task="lm", depth=True), ValueError, "depth must be a positive int, got True"),
        (dict(task="lm", mlp_ratio=1.5), ValueError, "mlp_ratio must be a positive int, got 1.5"),
        (dict(task="lm", num_classes=3), ValueError, "num_classes is only used with task='classify'"),
        (dict(task="classify", num_classes=3, tie_weights=True), ValueError, "tie_weights only applies to task='lm'"),
        (dict(task="lm", dim=30), ValueError, "num_heads=4 must divide dim=30"),
    ],
)
def test_build_model_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ea.build_model("full", **{**SMALL, **kwargs})


def test_attention_params_reach_every_block():
    model = ea.build_model("full", task="lm", backend="naive", **SMALL)
    assert [b.attn.config.backend for b in model.blocks] == ["naive", "naive"]
    assert all(b.attn.config.causal for b in model.blocks)
    assert model.blocks[0].attn is not model.blocks[1].attn


def test_first_token_pooling_and_its_errors():
    torch.manual_seed(0)
    model = ea.build_model("full", task="classify", num_classes=3, pooling="first", **SMALL).eval()
    tokens = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.head(model.features(tokens)[:, 0]))
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'first'\)"):
        ea.build_model("full", task="classify", num_classes=3, pooling="cls", **SMALL)


def test_model_config_is_the_one_description_of_the_backbone():
    config = ea.ModelConfig(attention_key="linformer", task="classify", num_classes=3, **SMALL)
    # the attention's max_len is filled in from the backbone's, unless given
    assert config.attention_params == {"max_len": 128}
    assert not config.causal
    given = ea.ModelConfig(attention_key="linformer", task="classify", num_classes=3, attention_params={"max_len": 64},
                           **SMALL)
    assert given.attention_params == {"max_len": 64}
    model = ea.TransformerModel(config)
    assert model.config is config and model.attention_key == "linformer" and model.task == "classify"
    assert len(model.blocks) == SMALL["depth"]
    assert all(block.attn.config.max_len == 128 for block in model.blocks)
    # build_model makes the same config from keywords
    assert ea.build_model("linformer", task="classify", num_classes=3, **SMALL).config == config


def test_model_config_validates_on_creation():
    with pytest.raises(ValueError, match="task must be one of"):
        ea.ModelConfig(attention_key="full", task="translate", **SMALL)
    with pytest.raises(KeyError, match="did you mean 'full'"):
        ea.ModelConfig(attention_key="fulll", task="lm", **SMALL)
    with pytest.raises(TypeError, match="causal is set by the task"):
        ea.ModelConfig(attention_key="full", task="lm", attention_params={"causal": True}, **SMALL)
    with pytest.raises(TypeError, match="TransformerModel needs a ModelConfig, got dict"):
        ea.TransformerModel(dict(attention_key="full", task="lm", **SMALL))
