"""The backbone's new shapes: ``task="seq2seq"`` (encoder, causal decoder, cross-attention chosen by key),
``num_kv_heads``, ``positional="rope" | "alibi"`` and packed batches (``model(tokens, document_ids=...)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efficient_attn as ea
from variant_cases import SMALL_PARAMS, kv_heads_for

SMALL = dict(vocab_size=12, dim=32, depth=1, num_heads=4, max_len=32)
CROSS = [k for k in ea.list_attentions() if ea.get_spec(k).module_cls.supports_cross_attention
         and ea.get_spec(k).module_cls.queries_independent]
CAUSAL = [k for k in ea.list_attentions() if ea.get_spec(k).supports_causal]
BOS, LENGTH, FIRST_TOKEN = 1, 8, 2  # source tokens are 2..11: chance accuracy 1/10


def reverse_batch(n: int, gen: torch.Generator):
    src = torch.randint(FIRST_TOKEN, SMALL["vocab_size"], (n, LENGTH), generator=gen)
    tgt = src.flip(-1)
    decoder_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1)  # teacher forcing: the target shifted
    return src, decoder_in, tgt


def test_seq2seq_learns_to_reverse():
    """Reverse 8 tokens of 10 values: chance is 0.10 per token; the test asks for chance + 0.5 after 60 Adam steps
    (measured: 0.99 at 80 steps on held-out sequences)."""
    torch.manual_seed(0)
    model = ea.build_model("full", task="seq2seq", cross_attention="full", num_kv_heads=2, **SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        src, decoder_in, tgt = reverse_batch(32, gen)
        loss = F.cross_entropy(model(src, decoder_tokens=decoder_in).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, decoder_in, tgt = reverse_batch(256, torch.Generator().manual_seed(99))
    with torch.no_grad():
        accuracy = (model(src, decoder_tokens=decoder_in).argmax(-1) == tgt).float().mean().item()
    chance = 1 / (SMALL["vocab_size"] - FIRST_TOKEN)
    assert accuracy > chance + 0.5, accuracy


@pytest.mark.parametrize("cross", CROSS)
def test_decoder_is_causal_and_reads_the_encoder(cross):
    params = SMALL_PARAMS.get(cross, {})
    model = ea.build_model("window", task="seq2seq", cross_attention=cross, cross_params=params, window_size=3,
                           **SMALL).double().eval()
    gen = torch.Generator().manual_seed(2)
    src = torch.randint(0, 12, (2, 13), generator=gen)
    tgt = torch.randint(0, 12, (2, 9), generator=gen)
    kpm = torch.arange(13)[None] < torch.tensor([[13], [7]])
    with torch.no_grad():
        logits = model(src, kpm, decoder_tokens=tgt)
        assert logits.shape == (2, 9, 12)
        changed = tgt.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 12
        torch.testing.assert_close(model(src, kpm, decoder_tokens=changed)[:, :5], logits[:, :5], atol=1e-10, rtol=0)
        other_src = src.clone()
        other_src[0, 3] = (other_src[0, 3] + 1) % 12
        assert not torch.allclose(model(other_src, kpm, decoder_tokens=tgt)[0], logits[0])
        padded_src = src.clone()
        padded_src[1, 7:] = 0  # encoder padding is never attended
        torch.testing.assert_close(model(padded_src, kpm, decoder_tokens=tgt)[1], logits[1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("encoder", ea.list_attentions())
def test_the_encoder_can_be_any_variant(encoder):
    model = ea.build_model(encoder, task="seq2seq", **SMALL, **SMALL_PARAMS.get(encoder, {}))
    out = model(torch.randint(0, 12, (2, 16)), decoder_tokens=torch.randint(0, 12, (2, 5)))
    assert out.shape == (2, 5, 12) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(decoder_attention="fulll"), KeyError, "did you mean 'full'"),
        (dict(cross_attention="windw"), KeyError, "did you mean 'window'"),
        (dict(decoder_attention="linformer"), ValueError, "decoder_attention 'linformer' cannot be causal"),
        (dict(cross_attention="window"), ValueError, r"cross_attention 'window' does not support.*full"),
        (dict(cross_params={"causal": True}), TypeError, "causal is set by the task"),
        (dict(cross_attention="nystrom"), ValueError, "mixes the queries.*decoder would not be causal; use full"),
    ],
)
def test_seq2seq_keys_are_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        ea.build_model("full", task="seq2seq", **SMALL, **kwargs)


def test_decoder_keys_need_seq2seq_and_seq2seq_needs_decoder_tokens():
    with pytest.raises(ValueError, match="decoder_attention is only used with task='seq2seq'"):
        ea.build_model("full", task="lm", decoder_attention="full", **SMALL)
    model = ea.build_model("full", task="seq2seq", **SMALL)
    with pytest.raises(ValueError, match="needs decoder_tokens"):
        model(torch.randint(0, 12, (1, 4)))


# ------------------------------------------------------------------------------------------- positions, GQA
@pytest.mark.parametrize("key", CAUSAL)
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_lm_with_attention_positions_stays_causal(key, positional):
    if positional == "alibi" and not ea.get_spec(key).module_cls.alibi_backends:
        with pytest.raises(ValueError, match=r"positional='alibi' needs exact softmax scores.*full"):
            ea.build_model(key, task="lm", positional=positional, **SMALL)
        return
    kv_heads = kv_heads_for(key, 2)
    model = ea.build_model(key, task="lm", positional=positional, num_kv_heads=kv_heads, **SMALL,
                           **SMALL_PARAMS.get(key, {})).double().eval()
    attn = model.blocks[0].attn
    assert attn.config.num_kv_heads == kv_heads and (attn.config.rope if positional == "rope" else attn.config.alibi)
    tokens = torch.randint(0, 12, (1, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 3) % 12
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :12], model(tokens)[:, :12], atol=1e-10, rtol=0)


def test_num_kv_heads_is_validated_by_the_model_config():
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads=4.*valid values: 1, 2, 4"):
        ea.build_model("full", task="lm", num_kv_heads=3, **SMALL)
    with pytest.raises(TypeError, match="num_kv_heads is set by the model's num_kv_heads"):
        ea.ModelConfig(attention_key="full", task="lm", attention_params={"num_kv_heads": 2}, **SMALL)
    with pytest.raises(TypeError, match="rope is set by positional='rope'"):
        ea.build_model("full", task="lm", rope=True, **SMALL)


@pytest.mark.parametrize("positional", ["sinusoidal", "rope"])
def test_packed_lm_equals_each_document_alone(positional):
    model = ea.build_model("window", task="lm", positional=positional, window_size=3, **SMALL).double().eval()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 12, (1, 15), generator=gen)
    ids = torch.tensor([[0] * 6 + [1] * 9])
    with torch.no_grad():
        packed = model(tokens, document_ids=ids)
        alone = torch.cat([model(tokens[:, :6]), model(tokens[:, 6:])], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-8)
