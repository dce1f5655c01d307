"""``model.generate``: a decode cache per layer; greedy generation equals recomputing the whole sequence at every
step (every causal variant, left-padded prompts of different lengths, RoPE and table positions continuing from the
cache); sampling options; refusals."""

from __future__ import annotations

import pytest
import torch

from decode_cases import CAUSAL_PARAMS
from efficient_attn.model import build_model


def lm(key: str, positional: str = "rope", **extra):
    torch.manual_seed(0)
    params = {**CAUSAL_PARAMS[key], **extra}
    model = build_model(key, task="lm", vocab_size=23, dim=32, depth=2, num_heads=4, max_len=64,
                        positional=positional, **params).double().eval()
    with torch.no_grad():  # at initialisation the residual stream is mostly the current token's embedding: make the
        for block in model.blocks:  # attention matter, so the next token depends on the context (the test can fail)
            block.attn.out.weight.mul_(30.0)
            block.attn.qkv.weight.mul_(3.0)
    return model


def recompute_greedy(model, prompt, mask, new):
    """Greedy decoding by running the whole sequence again at every step (the reference)."""
    seq = prompt
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    for _ in range(new):
        with torch.no_grad():
            logits = model(seq, key_padding_mask=mask, positions=positions)[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return seq


def prompts():
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 23, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False  # the second prompt is 6 tokens, left-padded
    return prompt, mask


@pytest.mark.parametrize("positional", ["rope", "sinusoidal"])
@pytest.mark.parametrize("key", list(CAUSAL_PARAMS))
def test_greedy_generation_equals_recomputing_every_step(key, positional):
    model = lm(key, positional)
    prompt, mask = prompts()
    out = model.generate(prompt, 7, key_padding_mask=mask)
    assert out.shape == (2, 17) and torch.equal(out[:, :10], prompt)
    assert torch.equal(out, recompute_greedy(model, prompt, mask, 7))
    # the logits of the cached steps equal the recomputed ones, not only their argmax (the argmax alone can miss a
    # wrong cache when a tiny random model repeats one token)
    caches = model.new_caches(2)
    positions = (torch.cat([mask, torch.ones(2, 7, dtype=torch.bool)], 1).long().cumsum(-1) - 1).clamp_min(0)
    full_mask = torch.cat([mask, torch.ones(2, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        reference = model(out, key_padding_mask=full_mask, positions=positions)
        steps = [model.head(model.features(out[:, :10], mask, positions=positions[:, :10], caches=caches))]
        for t in range(10, 17):
            steps.append(model.head(model.features(out[:, t:t + 1], None, positions=positions[:, t:t + 1],
                                                   caches=caches)))
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, rtol=1e-9, atol=1e-9)


def test_a_left_padded_prompt_continues_as_if_alone_with_full_attention():
    model = lm("full", "sinusoidal")
    prompt, mask = prompts()
    batched = model.generate(prompt, 5, key_padding_mask=mask)
    alone = model.generate(prompt[1:, 4:], 5)
    assert torch.equal(batched[1, 4:], alone[0])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = lm("window")
    prompt, _ = prompts()
    a = model.generate(prompt, 6, temperature=1.0, seed=5)
    b = model.generate(prompt, 6, temperature=1.0, seed=5)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1, seed=1), model.generate(prompt, 6))


def test_generate_refusals():
    model = lm("full")
    prompt, mask = prompts()
    with pytest.raises(ValueError, match="left padding only"):
        model.generate(prompt, 2, key_padding_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="top_k restricts sampling; it needs temperature > 0"):
        model.generate(prompt, 2, top_k=3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(prompt, -1)
    classifier = build_model("full", task="classify", num_classes=2, vocab_size=23, dim=32, depth=1, num_heads=4,
                             max_len=64)
    with pytest.raises(ValueError, match="generate needs task='lm'"):
        classifier.generate(prompt, 2)
    learned = build_model("full", task="lm", vocab_size=23, dim=32, depth=1, num_heads=4, max_len=12,
                          positional="learned")
    with pytest.raises(ValueError, match="exceeds max_len=12 of the learned position embedding"):
        learned.generate(prompt, 5)
