"""Tests of the quality suite (issue 8): task generators vs brute-force solvers, the training loop, the error and
diversity metrics on constructed examples, suite resume, and the CLI end to end on a tiny config."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from efficient_attn import vocab
from efficient_attn.cli import main
from efficient_attn.harness.runfolder import read_rows
from efficient_attn.quality import metrics
from efficient_attn.quality.suite import KEY_COLUMNS, STATUSES, load_suite, plan_cells, run_metrics, run_suite
from efficient_attn.quality.tasks import (
    TASKS,
    TaskBatch,
    evaluate_listops,
    listops_batch,
    recall_batch,
    recall_guess_accuracy,
    solve_listops,
    solve_recall,
)
from efficient_attn.quality.train import TrainConfig, train_and_evaluate
from efficient_attn.registry import build_attention, list_attentions


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models here run much faster on one thread, and 2 threads on a shared CPU can be 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("pair_format", ["fused", "split"])
@pytest.mark.parametrize("seq_len", [32, 64, 300])
def test_recall_deterministic_and_solved(pair_format: str, seq_len: int) -> None:
    a = recall_batch(32, seq_len, seed=5, pair_format=pair_format)
    b = recall_batch(32, seq_len, seed=5, pair_format=pair_format)
    c = recall_batch(32, seq_len, seed=6, pair_format=pair_format)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (32, seq_len) and a.key_padding_mask.all() and a.labels.shape == (32,)
    assert torch.equal(solve_recall(a.tokens), a.labels)
    assert int(a.tokens.max()) < TASKS["recall"].vocab_size and int(a.labels.max()) < TASKS["recall"].num_classes


def test_recall_distance_is_controlled() -> None:
    batch = recall_batch(64, 200, seed=1, min_distance=150, max_distance=160, pair_format="split")
    for row in batch.tokens.tolist():
        hits = [i for i in range(2, 200) if row[i] == row[1]]
        assert len(hits) == 1 and 150 <= hits[0] - 1 <= 160
        # distractor keys share the answer's distance range: position gives nothing away
        keys = [i for i in range(2, 200) if 3 <= row[i] < 11]
        assert len(keys) == 4 and all(150 <= i - 1 <= 160 for i in keys)
    # guessing among the four values present is right about a quarter of the time (more when values repeat)
    assert 0.25 <= recall_guess_accuracy(batch.tokens, batch.labels) <= 0.45


def test_recall_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="num_pairs"):
        recall_batch(2, 64, 0, num_pairs=9, num_keys=8)
    with pytest.raises(ValueError, match="max_distance"):
        recall_batch(2, 64, 0, min_distance=10, max_distance=100)
    with pytest.raises(ValueError, match="fewer than"):
        recall_batch(2, 64, 0, min_distance=50, max_distance=52)
    with pytest.raises(ValueError, match="pair_format"):
        recall_batch(2, 64, 0, pair_format="joined")


@pytest.mark.parametrize("seq_len", [16, 128, 512])
def test_listops_deterministic_and_solved(seq_len: int) -> None:
    a = listops_batch(32, seq_len, seed=3)
    b = listops_batch(32, seq_len, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.tokens, listops_batch(32, seq_len, seed=4).tokens)
    assert torch.equal(solve_listops(a.tokens), a.labels)
    lengths = a.key_padding_mask.sum(1)
    assert int(lengths.max()) <= seq_len and int(lengths.min()) >= 4
    # the mask is a prefix: real tokens first, padding after
    assert torch.equal(a.key_padding_mask, torch.arange(seq_len)[None, :] < lengths[:, None])


def test_listops_evaluator_on_hand_written_expressions() -> None:
    # tokens: digit d -> d + 1; [MAX 11, [MIN 12, [MED 13, [SM 14, ] 15
    d = lambda x: x + 1  # noqa: E731
    assert evaluate_listops([11, d(3), d(9), d(1), 15]) == 9
    assert evaluate_listops([12, d(3), 11, d(2), d(8), 15, 15, 0, 0]) == 3  # MIN(3, MAX(2, 8))
    assert evaluate_listops([13, d(1), d(7), d(5), d(2), 15]) == 5  # upper median of 1 2 5 7
    assert evaluate_listops([14, d(7), d(8), 12, d(9), d(6), 15, 15]) == (7 + 8 + 6) % 10
    with pytest.raises(ValueError, match="unfinished"):
        evaluate_listops([11, d(3), d(4)])


# ------------------------------------------------------------------------------------------------------ training
def _first_token_task(batch_size: int, seq_len: int, seed: int) -> TaskBatch:
    """Trivial task: the label is the first token (0..9); the rest are noise tokens 10..15."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 16, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, 10, (batch_size,), generator=gen)
    tokens[:, 0] = labels
    return TaskBatch(tokens, torch.ones(batch_size, seq_len, dtype=torch.bool), labels)


def test_training_learns_trivial_task_quickly() -> None:
    config = TrainConfig(dim=32, depth=1, num_heads=2, batch_size=32, steps=150, lr=3e-3, eval_size=256)
    started = time.perf_counter()
    result = train_and_evaluate("full", "listops", 16, seed=0, config=config, task_fn=_first_token_task)
    elapsed = time.perf_counter() - started
    assert result.accuracy >= 0.95, result
    assert elapsed < 30.0
    assert result.majority_accuracy < 0.3  # ten balanced classes
    assert result.steps == 150 and result.steps_per_s > 0 and result.peak_mem_bytes > 0


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="budget_s"):
        TrainConfig(budget_s=-1.0)


# ------------------------------------------------------------------------------------------------------- metrics
def test_relative_error_known_values() -> None:
    y = torch.randn(2, 3, 5, 4)
    assert metrics.relative_error(y, y) == 0.0
    assert metrics.relative_error(2 * y, y) == pytest.approx(1.0)
    assert metrics.relative_error(torch.zeros_like(y), y) == pytest.approx(1.0)
    # masked rows are ignored: corrupt the last query row and mask it out
    z = y.clone()
    z[:, :, -1] += 100.0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    assert metrics.relative_error(z, y, mask) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        metrics.relative_error(y, y[:, :2])


def test_cosine_matrix_identical_and_orthogonal_heads() -> None:
    identical = torch.randn(1, 7).repeat(4, 1)
    assert torch.allclose(metrics.cosine_matrix(identical), torch.ones(4, 4, dtype=torch.float64))
    assert metrics.mean_offdiagonal(metrics.cosine_matrix(identical)) == pytest.approx(1.0)
    orthogonal = torch.eye(4, 9) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert torch.allclose(metrics.cosine_matrix(orthogonal), torch.eye(4, dtype=torch.float64))
    assert metrics.mean_offdiagonal(metrics.cosine_matrix(orthogonal)) == pytest.approx(0.0)


def test_head_diversity_of_copied_heads_is_one() -> None:
    """A layer whose heads share their q, k, v and output weights has identical heads: similarity 1 everywhere."""
    from efficient_attn.model import build_model

    torch.manual_seed(0)
    model = build_model("full", task="classify", vocab_size=16, dim=8, depth=1, num_heads=2, max_len=12,
                        num_classes=10).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        w = attn.qkv.weight.view(3, 2, 4, 8)  # (three, heads, head_dim, dim)
        w[:, 1] = w[:, 0]
        attn.qkv.bias.view(3, 2, 4)[:, 1] = attn.qkv.bias.view(3, 2, 4)[:, 0]
        attn.out.weight[:, 4:] = attn.out.weight[:, :4]
    tokens = torch.randint(0, 16, (3, 12))
    rows = metrics.head_diversity(model, tokens, None)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"output", "map"}
    assert all(r["cosine"] == pytest.approx(1.0) for r in rows)


def test_random_input_errors_known_values() -> None:
    assert "window" in list_attentions()
    rows = metrics.random_input_errors(["full", "window"], [24], {"window": {"window_size": 64}}, num_heads=2,
                                       head_dim=4)
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["full"]["rel_error"] == 0.0
    # a window wider than the sequence is full attention: error at float32 rounding level
    assert by_variant["window"]["status"] == "ok" and by_variant["window"]["rel_error"] < 1e-5
    narrow = metrics.random_input_errors(["window"], [64], {"window": {"window_size": 2}}, num_heads=2, head_dim=4)
    assert narrow[0]["rel_error"] > 0.05
    bad = metrics.random_input_errors(["window"], [24], {"window": {"window_size": 0}}, num_heads=2, head_dim=4)
    assert bad[0]["status"] == "error" and "window_size" in bad[0]["note"]


def test_attention_probs_rows_sum_to_one_on_pattern() -> None:
    attn = build_attention("window", dim=8, num_heads=2, window_size=2)
    q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    probs = metrics.attention_probs(attn, q, k, None)
    assert probs is not None and torch.allclose(probs.sum(-1), torch.ones(1, 2, 10))
    assert bool((probs[..., 0, 5] == 0).all())  # key 5 is outside query 0's window


# ---------------------------------------------------------------------------------------------- suite and CLI
TINY_SUITE = """
description = "tiny test suite"
tasks = ["recall", "listops"]
variants = ["full", "window"]
lengths = [32]
seeds = 1
error_lengths = [32, 48]
[train]
dim = 16
depth = 1
num_heads = 2
batch_size = 4
steps = 3
warmup_steps = 1
eval_size = 8
[params]
window = { window_size = 4 }
[heads_sweep]
variant = "full"
task = "recall"
seq_len = 32
num_heads = [1, 4]
"""


@pytest.fixture()
def tiny_suite(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SUITE)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_suite_resume_skips_finished_cells(tiny_suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    suite = load_suite(tiny_suite, tasks=["recall"])
    assert len(plan_cells(suite)) == 2 + 2  # 2 variants + heads sweep 1 and 4
    ran: list[dict] = []
    run_suite(suite, out, progress=False, on_row=ran.append)
    assert len(ran) == 4 and all(r["status"] == "ok" for r in ran)
    ran.clear()
    run_suite(suite, out, progress=False, on_row=ran.append)
    assert ran == []
    more = load_suite(tiny_suite, tasks=["recall"], seeds=2)
    run_suite(more, out, progress=False, on_row=ran.append)
    assert len(ran) == 2 and {r["seed"] for r in ran} == {1}  # the heads sweep runs seed 0 only
    rows = _rows(out / "results.csv")
    keys = [(r["task"], r["variant"], r["seq_len"], r["seed"], r["num_heads"]) for r in rows]
    assert len(rows) == 6 and len(set(keys)) == 6
    changed = load_suite(tiny_suite, tasks=["recall"], steps=4)
    with pytest.raises(ValueError, match="different config.*train"):
        run_suite(changed, out, progress=False)


# A quality run killed (SIGKILL) while it writes its third row: half the row is on disk, then the process dies.
_KILLED_WHILE_WRITING = r"""
import os, signal, sys
import torch
from efficient_attn.harness import runfolder
from efficient_attn.quality.suite import load_suite, run_suite

torch.set_num_threads(1)
real_append, calls = runfolder.RunFolder.append, []

def dying_append(self, row):
    calls.append(row)
    if len(calls) == 3:
        line = runfolder.csv_line(row[c] for c in self.columns)
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            handle.write(line[: len(line) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_append(self, row)

runfolder.RunFolder.append = dying_append
run_suite(load_suite(sys.argv[1], tasks=["recall"]), sys.argv[2], progress=False)
"""


def test_a_run_killed_mid_row_resumes_without_loss_or_duplicates(tiny_suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(tiny_suite), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    raw = (out / "results.csv").read_bytes()
    assert not raw.endswith(b"\n")  # the torn third row is on disk
    before = read_rows(out / "results.csv")
    assert len(before) == 2
    suite = load_suite(tiny_suite, tasks=["recall"])
    ran: list[dict] = []
    run_suite(suite, out, progress=False, on_row=ran.append)
    assert len(ran) == 2  # the cell that was being written, and the one never reached
    rows = _rows(out / "results.csv")
    keys = [tuple(r[c] for c in KEY_COLUMNS) for r in rows]
    assert sorted(keys) == sorted(c.key() for c in plan_cells(suite))  # nothing lost, nothing twice
    assert rows[:2] == before and all(r["status"] == "ok" for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert [s["cells_run"] for s in meta["sessions"]] == [2]  # the killed session never closed; the resume did


def test_a_first_version_run_folder_is_resumed(tiny_suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "old"
    suite = load_suite(tiny_suite, tasks=["recall"])
    run_suite(suite, out, progress=False)
    rows = _rows(out / "results.csv")
    # the meta.json the quality suite wrote before it used the harness's run folder
    old = {"suite": json.loads(json.dumps(suite.to_dict())), "torch": "2.x", "threads": 1, "unused_params": []}
    (out / "meta.json").write_text(json.dumps(old))
    ran: list[dict] = []
    run_suite(suite, out, progress=False, on_row=ran.append)
    assert ran == [] and _rows(out / "results.csv") == rows
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["train"] == old["suite"]["train"] and meta["environment"]["torch_threads"] == 1
    with pytest.raises(ValueError, match="different config.*train"):
        run_suite(load_suite(tiny_suite, tasks=["recall"], steps=4), out, progress=False)


def test_row_statuses_are_the_projects() -> None:
    assert set(STATUSES) == {"ok", "unsupported", "error"} and set(STATUSES) <= set(vocab.STATUSES)


def test_suite_rejects_bad_config(tiny_suite: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="window"):
        load_suite(tiny_suite, variants=["windw"])
    with pytest.raises(ValueError, match="unknown task"):
        load_suite(tiny_suite, tasks=["copy"])
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_SUITE.replace("window_size = 4", "window_sise = 4"))
    with pytest.raises(TypeError, match="window_sise"):
        load_suite(bad)


def test_cli_end_to_end(tiny_suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["quality", "--suite", str(tiny_suite), "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 * 2 + 2 and all(r["status"] == "ok" for r in rows)
    errors = _rows(out / "errors.csv")
    assert {r["source"] for r in errors} == {"random", "trained"}
    assert {int(r["seq_len"]) for r in errors if r["source"] == "random"} == {32, 48}
    diversity = _rows(out / "diversity.csv")
    assert {r["num_heads"] for r in diversity} == {"1", "2", "4"}
    report = (out / "report.md").read_text()
    assert "majority" in report and "Head diversity" in report and "Finding" in report
    # three steps cannot learn: the report must say the tasks do not count
    assert "Does not count" in report
    for name in ("errors.png", "head_similarity.png", "similarity_vs_heads.png"):
        assert (out / name).stat().st_size > 1000, name
    # nothing counts, so no LRA-style chart; one length, so no accuracy-vs-length figure
    assert "no LRA-style chart" in report and not (out / "lra_chart.png").exists()
    assert not (out / "accuracy_vs_length.png").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["train"]["steps"] == 3
    # a second run resumes: no new rows
    assert main(["quality", "--suite", str(tiny_suite), "--out", str(out), "--no-progress", "--no-metrics"]) == 0
    assert len(_rows(out / "results.csv")) == len(rows)


def test_run_metrics_on_partial_run(tiny_suite: Path, tmp_path: Path) -> None:
    suite = load_suite(tiny_suite, tasks=["listops"], variants=["full"])
    out = tmp_path / "m"
    run_suite(suite, out, progress=False)
    errors_path, diversity_path = run_metrics(suite, out, progress=False)
    trained = [r for r in _rows(errors_path) if r["source"] == "trained"]
    # full against itself: exactly zero error on every layer
    assert trained and all(float(r["rel_error"]) == 0.0 for r in trained)


def test_default_suite_is_mqar_for_every_variant_that_can_run_it() -> None:
    from efficient_attn.commands.quality_cmd import DEFAULT_SUITE
    from efficient_attn.quality.curves import MQAR_SEQ_LEN, MQAR_TRAIN
    from efficient_attn.quality.suite import unsupported_reason
    from efficient_attn.quality.tasks import MQAR_DEFAULTS

    suite = load_suite(DEFAULT_SUITE)  # validates each variant's params against its config
    assert suite.tasks == ["mqar"] and suite.lengths == [MQAR_SEQ_LEN] and suite.seeds == 3
    assert suite.train == MQAR_TRAIN  # the calibrated default, not a copy that drifted
    assert {k: v for k, v in MQAR_DEFAULTS.items() if v is not None} == suite.task_params["mqar"]
    assert suite.unused_params() == []
    # every registered variant is either run or listed as unsupported, except longformer (left to the curves)
    runnable = [k for k in list_attentions() if unsupported_reason("mqar", k) is None]
    assert set(suite.variants) == set(list_attentions()) - {"longformer"}
    assert {k for k in suite.variants if unsupported_reason("mqar", k)} == {"linformer", "nystrom"}
    assert len(plan_cells(suite)) == len(suite.variants) * suite.seeds
    assert len(runnable) >= 7
