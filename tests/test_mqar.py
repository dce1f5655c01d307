"""Tests of MQAR (issue 14): the generator against its brute-force oracle, the absence of a context-free shortcut,
LM loss masking, LM training end to end, head ablation and similarity metrics, and the state-size curve runner."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from efficient_attn.model import build_model
from efficient_attn.quality import metrics
from efficient_attn.quality.curves import KNOBS, run_curve, run_point
from efficient_attn.quality.tasks import IGNORE, TASKS, TaskBatch, mqar_batch, mqar_vocab_size, solve_mqar
from efficient_attn.quality.train import (
    TrainConfig,
    TrainResult,
    count_correct,
    evaluate,
    task_loss,
    train_and_evaluate,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------- task
@pytest.mark.parametrize(("seq_len", "pairs", "queries"), [(64, 8, None), (40, 4, 2), (19, 1, 1)])
def test_mqar_layout_and_oracle(seq_len: int, pairs: int, queries: int | None) -> None:
    kw = dict(num_pairs=pairs, num_keys=12, num_values=10, num_queries=queries)
    batch = mqar_batch(50, seq_len, seed=3, **kw)
    again = mqar_batch(50, seq_len, seed=3, **kw)
    assert all(torch.equal(a, b) for a, b in zip(batch, again))
    assert not torch.equal(batch.tokens, mqar_batch(50, seq_len, seed=4, **kw).tokens)
    assert batch.tokens.shape == batch.labels.shape == (50, seq_len) and batch.key_padding_mask.all()
    assert int(batch.tokens.max()) < mqar_vocab_size(12, 10)
    asked = pairs if queries is None else queries
    for tokens, labels in zip(batch.tokens.tolist(), batch.labels.tolist()):
        keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k <= 12 for k in keys) and all(13 <= v <= 22 for v in values)
        scored = [t for t, y in enumerate(labels) if y != IGNORE]
        assert len(scored) == asked and all(t >= 2 * pairs for t in scored)
        assert len({tokens[t] for t in scored}) == asked  # each key asked at most once
        for t in scored:
            # the label is the value paired with the query key, and the stream continues with it (teacher forcing)
            assert labels[t] == values[keys.index(tokens[t])] == tokens[t + 1]
        others = [tok for t, tok in enumerate(tokens[2 * pairs :], 2 * pairs) if t not in scored and t - 1 not in scored]
        assert set(others) <= {0}  # blanks elsewhere
    # the oracle, which never reads the token after a query, answers every query
    oracle = solve_mqar(batch.tokens, num_pairs=pairs, num_keys=12, num_values=10, num_queries=asked)
    assert torch.equal(oracle, batch.labels)
    logits = torch.nn.functional.one_hot(oracle.clamp_min(0), mqar_vocab_size(12, 10)).float()
    correct, total = count_correct(logits, batch.labels)
    assert correct == total == 50 * asked


def test_mqar_registry_defaults_match_the_calibrated_setting() -> None:
    from efficient_attn.quality.curves import MQAR_SEQ_LEN
    from efficient_attn.quality.tasks import make_batch

    info = TASKS["mqar"]
    batch = make_batch("mqar", 8, MQAR_SEQ_LEN, seed=0)
    assert torch.equal(info.solve(batch.tokens), batch.labels)
    assert int(batch.tokens.max()) < info.vocab_size == mqar_vocab_size()
    assert int((batch.labels != IGNORE).sum()) == 8 * 4  # four pairs, each queried once
    assert info.num_classes == 16


def test_mqar_oracle_rejects_a_broken_row() -> None:
    batch = mqar_batch(2, 32, seed=0, num_pairs=4)
    broken = batch.tokens.clone()
    broken[0, 2] = broken[0, 0]  # a key repeated among the pairs
    with pytest.raises(ValueError, match="fresh key-value pair"):
        solve_mqar(broken, num_pairs=4)
    with pytest.raises(ValueError, match="queries, expected"):
        solve_mqar(batch.tokens, num_pairs=4, num_queries=3)


def test_mqar_has_no_context_free_shortcut() -> None:
    """The best predictor that sees only the query key (a count table fitted on training rows) is at chance."""
    train = mqar_batch(4000, 48, seed=1, num_pairs=6, num_keys=8, num_values=8)
    held = mqar_batch(2000, 48, seed=2, num_pairs=6, num_keys=8, num_values=8)
    table: dict[int, Counter] = {}
    for tokens, labels in ((train.tokens.flatten(), train.labels.flatten()),):
        for key, value in zip(tokens[labels != IGNORE].tolist(), labels[labels != IGNORE].tolist()):
            table.setdefault(key, Counter())[value] += 1
    keys, values = held.tokens[held.labels != IGNORE], held.labels[held.labels != IGNORE]
    guesses = torch.tensor([table[k].most_common(1)[0][0] for k in keys.tolist()])
    accuracy = float((guesses == values).float().mean())
    assert abs(accuracy - 1 / 8) < 0.03, accuracy


def test_mqar_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_batch(2, 64, 0, num_pairs=9, num_keys=8)
    with pytest.raises(ValueError, match="num_queries"):
        mqar_batch(2, 64, 0, num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="seq_len >= 32"):
        mqar_batch(2, 30, 0, num_pairs=8)
    with pytest.raises(TypeError, match="num_pair"):
        TASKS["mqar"].vocab({"num_pair": 4})
    assert TASKS["mqar"].kind == "lm" and TASKS["recall"].kind == "classify"
    assert TASKS["mqar"].vocab({"num_keys": 5, "num_values": 7}) == 13


# ------------------------------------------------------------------------------------------------ loss, training
def test_lm_loss_only_counts_scored_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.full((3, 7), IGNORE)
    labels[0, 2], labels[1, 5], labels[2, 0] = 4, 9, 1
    loss = task_loss(logits, labels)
    picked = torch.stack([logits[0, 2], logits[1, 5], logits[2, 0]])
    expected = torch.nn.functional.cross_entropy(picked, torch.tensor([4, 9, 1]))
    assert torch.allclose(loss, expected)
    loss.backward()
    grad_norm = logits.grad.norm(dim=-1)  # (3, 7)
    assert bool((grad_norm[labels == IGNORE] == 0).all()) and bool((grad_norm[labels != IGNORE] > 0).all())
    right, scored = count_correct(logits.detach(), labels)
    assert scored == 3 and right == sum(int(logits[b, t].argmax() == labels[b, t]) for b, t in ((0, 2), (1, 5), (2, 0)))


def _repeat_task(batch_size: int, seq_len: int, seed: int) -> TaskBatch:
    """Trivial LM task in the mqar vocabulary: at every even position the next token repeats the current one."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(1, mqar_vocab_size(), (batch_size, seq_len // 2), generator=gen)
    tokens = first.repeat_interleave(2, dim=1)
    labels = torch.full_like(tokens, IGNORE)
    labels[:, 0::2] = first
    return TaskBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), labels)


def test_lm_training_learns_a_trivial_task() -> None:
    config = TrainConfig(dim=16, depth=1, num_heads=2, batch_size=16, steps=40, lr=2e-2, warmup_steps=5,
                         eval_size=64)
    result = train_and_evaluate("full", "mqar", 8, seed=0, config=config, task_fn=_repeat_task)
    assert result.accuracy >= 0.95, result
    assert result.model.task == "lm" and result.majority_accuracy < 0.2
    with pytest.raises(ValueError, match="either task_fn or task_params"):
        train_and_evaluate("full", "mqar", 8, 0, config, task_fn=_repeat_task, task_params={"num_pairs": 2})


def test_mqar_task_params_reach_generator_and_vocabulary() -> None:
    config = TrainConfig(dim=16, depth=1, num_heads=2, batch_size=4, steps=2, eval_size=8, positional="learned")
    result = train_and_evaluate("window", "mqar", 24, 0, config, {"window_size": 4},
                                task_params={"num_pairs": 3, "num_keys": 5, "num_values": 6})
    assert result.model.token_embedding.num_embeddings == 12 and result.model.position_embedding is not None
    assert 0.0 <= result.accuracy <= 1.0
    with pytest.raises(ValueError, match="positional"):
        TrainConfig(positional="rotary")


# ------------------------------------------------------------------------------------------------------- metrics
def _tiny_lm(heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("full", task="lm", vocab_size=13, dim=8, depth=2, num_heads=heads, max_len=12).eval()


def test_ablate_head_equals_zeroing_its_output_columns() -> None:
    model = _tiny_lm()
    tokens = torch.randint(0, 13, (3, 12))
    intact = model(tokens)
    with metrics.ablate_head(model, 1, 0):
        ablated = model(tokens)
    assert not torch.allclose(ablated, intact)
    assert torch.equal(model(tokens), intact)  # the hook is gone after the context
    with torch.no_grad():
        model.blocks[1].attn.out.weight[:, 0:4] = 0.0  # head 0 of layer 1 = columns 0..3 (head_dim 4)
    assert torch.allclose(model(tokens), ablated, atol=1e-6)
    with pytest.raises(ValueError, match="head must be in"):
        with metrics.ablate_head(model, 0, 2):
            pass


def test_head_ablation_of_a_silent_head_and_of_twin_heads() -> None:
    model = _tiny_lm()
    tokens = torch.randint(0, 13, (4, 12))
    reference = model(tokens).detach()
    attn = model.blocks[0].attn
    with torch.no_grad():
        # layer 0: heads 0 and 1 identical (q, k, v and output columns), so removing either has the same effect
        w = attn.qkv.weight.view(3, 2, 4, 8)
        w[:, 1] = w[:, 0]
        attn.qkv.bias.view(3, 2, 4)[:, 1] = attn.qkv.bias.view(3, 2, 4)[:, 0]
        attn.out.weight[:, 4:] = attn.out.weight[:, :4]
        # layer 1: head 1 writes nothing (zero output columns), so removing it changes nothing
        model.blocks[1].attn.out.weight[:, 4:] = 0.0
    reference = model(tokens).detach()

    def score(m) -> float:  # a continuous "accuracy": 1 - distance from the intact output
        return 1.0 - float((m(tokens) - reference).pow(2).mean())

    rows = {(r["layer"], r["head"]): r for r in metrics.head_ablation(model, score)}
    assert set(rows) == {(0, 0), (0, 1), (1, 0), (1, 1)} and all(r["accuracy"] == 1.0 for r in rows.values())
    assert rows[(1, 1)]["drop"] == 0.0
    assert rows[(1, 0)]["drop"] > 0.0
    assert rows[(0, 0)]["drop"] > 0.0 and rows[(0, 0)]["drop"] == pytest.approx(rows[(0, 1)]["drop"], rel=1e-5)
    summary = metrics.heads_summary(model, tokens, None, score, threshold=0.0)
    assert summary["num_heads"] == 2 and summary["important_heads"] == 3
    similarity = metrics.mean_similarity(metrics.head_diversity(model, tokens, None))
    by_layer = {(r["layer"], r["kind"]): r["mean_cosine"] for r in similarity}
    assert by_layer[(0, "output")] == pytest.approx(1.0) and by_layer[(0, "map")] == pytest.approx(1.0)
    assert by_layer[(1, "map")] < 0.999  # layer 1's two heads were not made equal
    assert summary["output_cosine"] == pytest.approx((1.0 + by_layer[(1, "output")]) / 2)


def test_heads_summary_on_a_trained_mqar_model() -> None:
    config = TrainConfig(dim=16, depth=1, num_heads=4, batch_size=8, steps=3, eval_size=16)
    result = train_and_evaluate("full", "mqar", 32, 0, config, task_params={"num_pairs": 4})
    batch = mqar_batch(16, 32, seed=99, num_pairs=4)
    summary = metrics.heads_summary(result.model, batch.tokens, None, lambda m: evaluate(m, batch))
    assert summary["num_heads"] == 4 and 0 <= summary["important_heads"] <= 4
    assert -1.0 <= summary["output_cosine"] <= 1.0 and -1.0 <= summary["map_cosine"] <= 1.0
    single = build_model("full", task="lm", vocab_size=mqar_vocab_size(), dim=16, depth=1, num_heads=1, max_len=32).eval()
    assert math.isnan(metrics.heads_summary(single, batch.tokens, None, lambda m: evaluate(m, batch))["output_cosine"])


# -------------------------------------------------------------------------------------------------------- curves
def _fake_trainer(variant, task, seq_len, seed, config, params, *, task_params=None) -> TrainResult:
    """Accuracy = min(1, window / 16) + seed / 100: a known curve, without training."""
    accuracy = min(1.0, params.get("window_size", 16) / 16) + seed / 100
    return TrainResult(accuracy, 0.1, 1, 0.5, 0.5, 2.0, 1, 0.0, model=None)


def test_run_curve_aggregates_seeds() -> None:
    config = TrainConfig(dim=16, num_heads=2)
    rows = run_curve("window", [4, 8, 32], seq_len=32, config=config, seeds=3, trainer=_fake_trainer)
    assert [r["value"] for r in rows] == [4, 8, 32] and all(r["knob"] == "window_size" for r in rows)
    assert [r["accuracy_mean"] for r in rows] == pytest.approx([0.26, 0.51, 1.01])
    assert all(r["accuracy_std"] == pytest.approx(0.01) and r["seeds"] == 3 for r in rows)
    assert json.loads(rows[0]["accuracies"]) == [0.25, 0.26, 0.27]
    pairs = run_curve("window", [2, 4], seq_len=32, config=config, param="num_pairs", where="task", seeds=2,
                      attention_params={"window_size": 8}, trainer=_fake_trainer)
    assert [json.loads(r["task_params"]) for r in pairs] == [{"num_pairs": 2}, {"num_pairs": 4}]
    bad = run_curve("window", [0], seq_len=32, config=config, seeds=2, trainer=_fake_trainer)
    assert bad[0]["status"] == "error" and "window_size" in bad[0]["note"] and math.isnan(bad[0]["accuracy_mean"])
    with pytest.raises(ValueError, match="no capacity knob"):
        run_curve("full", [1], seq_len=32, config=config, trainer=_fake_trainer)


def test_run_curve_tiny_real_training_and_unsupported_variants() -> None:
    config = TrainConfig(dim=16, depth=1, num_heads=2, batch_size=4, steps=3, eval_size=8)
    task_params = {"num_pairs": 2, "num_keys": 4, "num_values": 4}
    rows = run_curve("window", [2, 16], seq_len=16, config=config, seeds=3, task_params=task_params)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(len(json.loads(r["accuracies"])) == 3 for r in rows)
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 and r["accuracy_std"] >= 0.0 for r in rows)
    ceiling = run_point("full", seq_len=16, config=config, seeds=3, task_params=task_params)
    assert ceiling["status"] == "ok" and ceiling["seeds"] == 3
    for variant in ("linformer", "nystrom"):
        (row,) = run_curve(variant, [KNOBS and 4], seq_len=16, config=config, seeds=3, task_params=task_params)
        assert row["status"] == "unsupported" and "causal" in row["note"] and row["seeds"] == 0
