"""``backend="auto"``: one table decides, the decision depends on device, mode, dtype and length, never the pattern."""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention.auto import AUTO_TABLE, FLEX_MIN_LEN, Choice, AutoRow, choose_backend
from helpers import random_qkv

CPU = torch.device("cpu")
FAMILIES = {"full": "full", "full-causal": "full", "window": "window", "bigbird": "bigbird", "longformer": "longformer"}


def variant_of(family: str) -> str:
    return FAMILIES[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_every_family_has_a_row_of_real_backends(family, device, needs_grad):
    row = AUTO_TABLE[(family, device, needs_grad)]
    assert row.choices and row.evidence
    backends = ea.get_spec(variant_of(family)).backends
    for choice in row.choices:
        assert choice.backend in backends, f"{choice.backend} is not a backend of {variant_of(family)}"
    if device == "cuda":
        assert row.evidence == "unmeasured"  # until a GPU run measures it
    else:
        assert row.evidence != "unmeasured"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cpu_training_rows_start_with_a_backend_that_has_a_backward(family):
    first = AUTO_TABLE[(family, "cpu", True)].choices[0]
    cls = ea.get_spec(variant_of(family)).module_cls
    assert cls.unavailable_reason(first.backend, CPU, True, torch.float32) is None


FLEX_FIRST = AutoRow((Choice("flex", FLEX_MIN_LEN), Choice("torch")), "test: flex first from FLEX_MIN_LEN")


def test_cpu_pattern_rows_lead_with_the_blocked_backend():
    # measured on the quiet reference machine: torch beats compiled flex at 4K and 16K for every pattern
    for family in ("window", "bigbird", "longformer"):
        assert AUTO_TABLE[(family, "cpu", False)].choices[0] == Choice("torch")


def test_choose_respects_order_length_and_availability(monkeypatch):
    monkeypatch.setitem(AUTO_TABLE, ("window", "cpu", False), FLEX_FIRST)
    everything = lambda backend: True  # noqa: E731
    assert choose_backend("window", CPU, False, seq_len=FLEX_MIN_LEN, is_available=everything) == "flex"
    assert choose_backend("window", CPU, False, seq_len=FLEX_MIN_LEN - 1, is_available=everything) == "torch"
    assert choose_backend("window", CPU, False, seq_len=None, is_available=everything) == "torch"
    no_flex = lambda backend: backend != "flex"  # noqa: E731
    assert choose_backend("window", CPU, False, seq_len=10**6, is_available=no_flex) == "torch"


def test_choose_errors_name_the_problem(monkeypatch):
    with pytest.raises(KeyError, match="no row for family 'nope'.*rows: "):
        choose_backend("nope", CPU, False, seq_len=8, is_available=lambda b: True)
    monkeypatch.setitem(AUTO_TABLE, ("window", "cpu", False), AutoRow((Choice("flex"),), "test"))
    with pytest.raises(RuntimeError, match=r"no available backend for 'window' on cpu \(tried flex\)"):
        choose_backend("window", CPU, False, seq_len=8, is_available=lambda b: False)


@pytest.mark.parametrize(
    "dtype, seq_len, grad, dropout, expected",
    [
        (torch.float32, FLEX_MIN_LEN, False, 0.0, "flex"),
        (torch.float32, FLEX_MIN_LEN - 1, False, 0.0, "torch"),  # too short to earn the compile back
        (torch.float64, FLEX_MIN_LEN, False, 0.0, "torch"),  # no float64 FlexAttention kernel on CPU
        (torch.float32, FLEX_MIN_LEN, True, 0.0, "torch"),  # CPU flex is forward-only
        (torch.float32, FLEX_MIN_LEN, False, 0.1, "torch"),  # flex has no attention dropout
    ],
)
def test_window_auto_decision_on_cpu(dtype, seq_len, grad, dropout, expected, monkeypatch):
    # the decision logic on a flex-first row (the CPU table itself leads with torch, see above)
    monkeypatch.setitem(AUTO_TABLE, ("window", "cpu", False), FLEX_FIRST)
    attn = ea.build_attention("window", dim=32, num_heads=4, dropout=dropout).train()
    assert attn.resolve_backend(CPU, grad, seq_len=seq_len, dtype=dtype) == expected


def test_full_auto_is_sdpa_on_cpu_and_recorded():
    for causal in (False, True):
        attn = ea.build_attention("full", dim=32, num_heads=4, causal=causal)
        q, k, v = random_qkv(1, 4, 40, 8, dtype=torch.float32)
        with torch.no_grad():
            attn.attend(q, k, v)
        assert attn.last_backend == "sdpa"


def test_short_inputs_never_compile():
    attn = ea.build_attention("window", dim=32, num_heads=4, window_size=8)
    q, k, v = random_qkv(1, 4, 64, 8, dtype=torch.float32)
    with torch.no_grad():
        attn.attend(q, k, v)
    assert attn.last_backend == "torch"


@pytest.mark.slow
def test_auto_picks_flex_for_long_forward_and_keeps_the_pattern(monkeypatch):
    monkeypatch.setitem(AUTO_TABLE, ("window", "cpu", False), FLEX_FIRST)
    n = FLEX_MIN_LEN
    auto = ea.build_attention("window", dim=64, num_heads=4, window_size=64).eval()
    blocked = ea.build_attention("window", dim=64, num_heads=4, window_size=64, backend="torch").eval()
    q, k, v = random_qkv(1, 4, n, 16, dtype=torch.float32, seed=11)
    with torch.no_grad():
        out = auto.attend(q, k, v)
        ref = blocked.attend(q, k, v)
    assert auto.last_backend == "flex"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
