"""One validator for the attention configs and the attend entry (issue 19, item 4: configs), over the registry.

Every case is generated from the registry and the config dataclasses' declared field types, so a new variant or a
new field is covered without new code here: a misspelt required parameter is named as itself; every field refuses
a value of the wrong type (a bool field takes a bool only, a float field a number); the attend entry refuses a
list as ``key_padding_mask``, q, k, v of mixed dtypes (before any backend work: flex does not compile first) and an
empty batch or sequence with one message, the same for every backend.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
import torch

import efficient_attn as ea
from helpers import needs_max_len

KEYS = ea.list_attentions()
HEADS, DIM = 4, 32


def _base(key: str) -> dict:
    return {"dim": DIM, "num_heads": HEADS, **({"max_len": 64} if needs_max_len(key) else {})}


@pytest.mark.parametrize("key", KEYS)
def test_misspelt_required_parameter_is_named(key):
    params = _base(key)
    del params["num_heads"]
    with pytest.raises(TypeError, match=r"unknown parameter 'num_head' \(did you mean 'num_heads'\?\)"):
        ea.build_attention(key, **params, num_head=4)


@pytest.mark.parametrize("key", KEYS)
def test_missing_required_parameter_is_named(key):
    params = _base(key)
    del params["dim"]
    with pytest.raises(TypeError, match=rf"attention '{key}' needs dim"):
        ea.build_attention(key, **params)


def _wrong_values(hint) -> list:
    """Values of the wrong type for a field declared ``hint`` (an ``object()`` is wrong for every type)."""
    wrong = [object()]
    accepted = typing.get_args(hint) or (hint,)
    if bool in accepted:
        wrong += ["no", "True"] + ([] if int in accepted else [1, 0])
    if int in accepted and float not in accepted:
        wrong += ["5", 2.5] + ([] if bool in accepted else [True])
    if float in accepted:
        wrong += ["0.1"] + ([] if bool in accepted else [False])
    if str in accepted:
        wrong += [3]
    return wrong


def _field_cases():
    for key in KEYS:
        config_cls = ea.get_spec(key).config_cls
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            if field.init:
                for value in _wrong_values(hints[field.name]):
                    yield pytest.param(key, field.name, value, id=f"{key}-{field.name}-{value!r}"[:60])


@pytest.mark.parametrize("key,field,value", list(_field_cases()))
def test_every_field_refuses_a_value_of_the_wrong_type(key, field, value):
    with pytest.raises(ValueError, match=rf"^{field} .*must .*got {re.escape(repr(value))}"):
        ea.build_config(key, **{**_base(key), field: value})


def test_the_reported_cases():
    with pytest.raises(ValueError, match=r"bias .*must be a bool \(True or False\), got 'no'"):
        ea.build_attention("full", dim=DIM, num_heads=HEADS, bias="no")
    with pytest.raises(ValueError, match=r"dropout .*must be a number .*got '0.1'"):
        ea.build_attention("full", dim=DIM, num_heads=HEADS, dropout="0.1")


def _backend_cases():
    for key in KEYS:
        spec = ea.get_spec(key)
        for backend in spec.backends:
            yield pytest.param(key, backend, id=f"{key}-{backend}")


def _module(key, backend):
    return ea.build_attention(key, **_base(key), backend=backend).eval()


def _qkv(batch=2, seq=8, dtypes=(torch.float32,) * 3):
    return [torch.randn(batch, HEADS, seq, DIM // HEADS, dtype=d) for d in dtypes]


@pytest.fixture
def no_compile(monkeypatch):
    """Fail a test that reaches torch.compile (FlexAttention compiles on first use)."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was reached: validation must come before any backend work")

    monkeypatch.setattr(torch, "compile", refuse)


@pytest.mark.parametrize("key,backend", list(_backend_cases()))
def test_a_list_as_key_padding_mask_is_refused(key, backend, no_compile):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor of shape \(batch, kv_len\).*list"):
        _module(key, backend).attend(q, k, v, key_padding_mask=[[True] * 8] * 2)


@pytest.mark.parametrize("key,backend", list(_backend_cases()))
def test_mixed_dtypes_are_one_error_before_any_backend_work(key, backend, no_compile):
    q, k, v = _qkv(dtypes=(torch.float32, torch.float64, torch.float16))
    with pytest.raises(ValueError, match=r"one dtype .*got dtypes torch.float32, torch.float64, torch.float16"):
        _module(key, backend).attend(q, k, v)


@pytest.mark.parametrize("key", KEYS)
def test_empty_batch_or_sequence_is_the_same_error_on_every_backend(key, no_compile):
    for batch, seq in ((0, 8), (2, 0)):
        messages = set()
        for backend in ea.get_spec(key).backends:
            q, k, v = _qkv(batch, seq)
            with pytest.raises(ValueError, match="non-empty batch and sequence") as error:
                _module(key, backend).attend(q, k, v)
            messages.add(str(error.value))
        assert len(messages) == 1, messages
        assert str((batch, HEADS, seq, DIM // HEADS)) in messages.pop()


@pytest.mark.parametrize("key", KEYS)
def test_forward_refuses_an_empty_input(key):
    with pytest.raises(ValueError, match="non-empty batch and sequence"):
        _module(key, ea.get_spec(key).backends[0])(torch.randn(0, 8, DIM))


def test_list_device_typo_is_one_line_status_2():
    done = subprocess.run([sys.executable, "-m", "efficient_attn.cli", "list", "--device", "cdua"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'cuda'" in lines[0] and "allowed: auto, cpu, cuda" in lines[0]
