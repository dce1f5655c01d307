"""Registry behaviour and every error a user can hit while building an attention by key."""

from dataclasses import dataclass

import pytest

import efficient_attn as ea
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.registry import _REGISTRY


def test_list_is_sorted_and_contains_full():
    keys = ea.list_attentions()
    assert keys == sorted(keys)
    assert "full" in keys


def test_list_pattern_filters():
    assert ea.list_attentions("ful*") == ["full"]
    assert ea.list_attentions("no-such-*") == []


def test_unknown_key_suggests_nearest():
    with pytest.raises(KeyError, match=r"unknown attention key 'fulll'.*did you mean 'full'"):
        ea.build_attention("fulll", dim=32, num_heads=4)


def test_unknown_key_windw_suggests_window():
    with pytest.raises(KeyError, match=r"did you mean 'window'"):
        ea.get_spec("windw")


def test_unknown_parameter_names_it_and_allowed():
    with pytest.raises(TypeError, match=r"unknown parameter 'dropuot' \(did you mean 'dropout'\?\).*allowed: dim"):
        ea.build_attention("full", dim=32, num_heads=4, dropuot=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=30, num_heads=4), "num_heads=4 must divide dim=30"),
        (dict(dim=-8, num_heads=4), "dim must be a positive int"),
        (dict(dim=32, num_heads=0), "num_heads must be a positive int"),
        (dict(dim=32, num_heads=4, dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(dim=32, num_heads=4, backend="flash"), r"unknown backend 'flash'.*allowed: auto, naive, sdpa"),
        (dict(dim=32, num_heads=4, backend="sdp"), r"unknown backend 'sdp' for attention 'full'; did you mean 'sdpa'"),
        (dict(dim=True, num_heads=4), "dim must be a positive int, got True"),
    ],
)
def test_bad_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ea.build_attention("full", **kwargs)


def test_duplicate_registration_is_an_error():
    @dataclass(kw_only=True)
    class DupConfig(AttentionConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):

        @ea.register_attention(
            "full", DupConfig, description="d", paper="p", complexity="O(1)", backends=("naive",)
        )
        class Dup(Attention):
            pass


def test_registering_non_dataclass_config_is_an_error():
    with pytest.raises(ValueError, match="must be a dataclass"):
        ea.register_attention("x", dict, description="d", paper="p", complexity="O(1)", backends=("naive",))


def test_new_variant_registers_and_builds():
    @dataclass(kw_only=True)
    class EchoConfig(AttentionConfig):
        gain: float = 1.0

    @ea.register_attention(
        "echo-test", EchoConfig, description="returns v", paper="none", complexity="O(n)", backends=("naive",)
    )
    class Echo(Attention):
        def _attend_naive(self, q, k, v, key_padding_mask):
            return v * self.config.gain

    try:
        attn = ea.build_attention("echo-test", dim=8, num_heads=2, gain=2.0)
        assert "gain=2.0" in repr(attn)
        assert ea.get_spec("echo-test").complexity == "O(n)"
    finally:
        _REGISTRY.pop("echo-test")


def test_spec_capabilities_for_full():
    spec = ea.get_spec("full")
    assert spec.supports_causal and spec.supports_key_padding and spec.exact
    assert spec.backends == ("naive", "sdpa", "flex", "xformers", "torch")
    assert spec.complexity == "O(n^2)"
    assert spec.length_multiple == 1 and spec.max_len_field is None
