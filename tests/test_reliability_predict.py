"""Issue 19 item 1, third bullet: ``effattn predict`` answers fast at any length. Lengths beyond ``fake_max_len`` are
extrapolated from a few fake runs (the variant's known growth, checked against one more run), each figure says how
it was obtained, and a long search shows progress. Parametrised over the registry: a new variant or backend is
covered without new code."""

import pytest

from efficient_attn import cli
from efficient_attn.harness.plan import Cell
from efficient_attn.harness.predict import Predictor, fit_growth, longest_fitting_length, predict_cell
from efficient_attn.registry import get_spec, list_attentions

FIGURES = ("setup_bytes", "peak_bytes", "first_call_bytes")
# backends whose kernels cannot run under the storage tracker or on CPU fake tensors (predicted as "not predicted")
UNFAKEABLE = ("flex", "xformers")
# backends that take one Python step per token (linear's and retention's recurrent form): a fake run costs about
# 0.15 s per token here, so a 16K check would take 40 minutes; their forms are checked in test_families.py
SEQUENTIAL = ("recurrent",)
PAIRS = [(k, b) for k in list_attentions() for b in get_spec(k).backends if b not in UNFAKEABLE + SEQUENTIAL]


def cell(key: str, backend: str, n: int, mode: str = "fwd") -> Cell:
    return Cell(key, "{}", backend, "core", mode, False, "cpu", "float32", 1, n, 1, 8)


@pytest.mark.parametrize("key,backend", PAIRS, ids=[f"{k}-{b}" for k, b in PAIRS])
def test_an_extrapolation_is_right_or_says_it_is_unverified(key, backend):
    predictor = Predictor(fake_max_len=4096, fit_start=512)
    target = cell(key, backend, 16384)
    estimate = predictor.predict(target)
    assert estimate.how == "extrapolated" and estimate.growth is not None
    assert max(n for n, _ in estimate.growth.samples) <= 4096  # nothing longer was run
    if estimate.growth.verified:
        fake = predict_cell(target)
        for name in FIGURES:
            assert getattr(estimate.prediction, name) == pytest.approx(getattr(fake, name), rel=0.01), name
    else:
        assert "UNVERIFIED" in estimate.growth.describe()


def test_dense_growth_is_exact_and_a_fake_run_is_used_where_it_is_cheap():
    predictor = Predictor(fake_max_len=4096, fit_start=512)
    short = predictor.predict(cell("full", "naive", 4096))
    assert short.how == "fake" and short.prediction == predict_cell(cell("full", "naive", 4096))
    far = predictor.predict(cell("full", "naive", 1 << 20))
    assert far.growth.verified and far.growth.degree == 2
    n = 1 << 20
    assert far.prediction.peak_bytes >= 4 * n * n  # at least one (n, n) float32 score matrix, as a fake run says


def test_the_search_beyond_the_fake_range_finds_the_same_boundary():
    target = cell("full", "naive", 1024)
    budget = 2 * 2**30  # one head of (n, n) float32 scores and softmax: the boundary is past 16K
    fast, made = longest_fitting_length(target, budget, start=1024, limit=1 << 16, multiple=256,
                                        predictor=Predictor(fake_max_len=4096, fit_start=512))
    exact, _ = longest_fitting_length(target, budget, start=1024, limit=1 << 16, multiple=256,
                                      predictor=Predictor(fake_max_len=None))
    assert fast == exact and fast > 4096 and made[fast].how == "extrapolated"


def test_fit_growth_needs_room_for_two_samples():
    with pytest.raises(ValueError, match="fewer than two sample lengths"):
        fit_growth(cell("full", "sdpa", 1024), max_len=256, multiple=256)


def test_predict_at_ten_million_tokens_costs_a_few_fake_runs_and_says_how(capsys):
    argv = ["predict", "--suite", "quick", "--variants", "full,window", "--backends", "sdpa,torch", "--lengths", "10m",
            "--max-search", "100m", "--heads", "1", "--head-dim", "8", "--fake-max-len", "4k", "--budget-gb", "8"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if "fake run at n=" in line]
    assert 0 < len(progress) <= 16 and all("n=10485760" not in line for line in progress)
    table = captured.out
    assert "n=10485760" in table and "extrapolated" in table and "fake run" not in table.split("budget")[0]
    assert "full/sdpa core fwd b=1 float32: quadratic through n=1024,2048,4096; checked" in table
    assert cli.main([*argv, "--no-progress"]) == 0
    assert "fake run at" not in capsys.readouterr().err
