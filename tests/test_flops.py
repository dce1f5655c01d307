"""FLOP counting: the CPU fused SDPA op (which FlopCounterMode counts as 0) and the useful-FLOP convention."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from efficient_attn.measure.flops import BACKWARD_FACTOR, count_flops, useful_flops_for_mode
from efficient_attn.registry import build_attention


def _sdpa(q):
    return F.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize("b,h,n,d", [(1, 2, 64, 16), (2, 3, 40, 8)])
def test_sdpa_forward_is_4bhn2d(b, h, n, d):
    q = torch.randn(b, h, n, d)
    with FlopCounterMode(display=False) as plain:
        _sdpa(q)
    assert plain.get_total_flops() == 0  # torch alone misses the CPU fused op: the formula is needed
    assert count_flops(lambda: _sdpa(q)) == 4 * b * h * n * n * d


def test_sdpa_backward_recomputes_scores_and_runs_four_matmuls():
    b, h, n, d = 1, 2, 48, 16
    q = torch.randn(b, h, n, d, requires_grad=True)
    forward = 4 * b * h * n * n * d
    total = count_flops(lambda: _sdpa(q).sum().backward())
    assert total == forward + 10 * b * h * n * n * d  # backward = 2.5 x forward


def test_naive_full_attention_computes_exactly_its_useful_flops():
    attn = build_attention("full", dim=32, num_heads=4, backend="naive")
    q = torch.randn(2, 4, 50, 8)
    assert count_flops(lambda: attn.attend(q, q, q)) == attn.useful_flops(2, 50) == 4 * 2 * 4 * 50 * 50 * 8


def test_useful_flops_for_mode():
    assert useful_flops_for_mode(100, "fwd") == 100
    assert useful_flops_for_mode(100, "fwd_bwd") == BACKWARD_FACTOR * 100 == 300
    assert useful_flops_for_mode(100, "train_step") == 300
    with pytest.raises(ValueError, match="mode must be one of"):
        useful_flops_for_mode(100, "backward")
