"""Memory prediction on CPU fake tensors: within 10% of the measured peak for every registered variant and backend,
nothing allocated at lengths that do not fit, and the longest length that fits a budget."""

import pytest
import torch

from efficient_attn.errors import BackendUnavailableError
from efficient_attn.harness.cell import UNCOUNTABLE_BACKENDS
from efficient_attn.harness.plan import Cell
from efficient_attn.harness.predict import longest_fitting_length, predict_cell
from efficient_attn.harness.workloads import build_workload
from efficient_attn.measure.memory import current_rss_bytes, measure_call
from efficient_attn.registry import get_spec, list_attentions

def _cases():
    cpu = torch.device("cpu")
    for key in list_attentions():
        spec = get_spec(key)
        for backend in spec.backends:
            if backend in UNCOUNTABLE_BACKENDS:
                continue  # compiled: refuses dispatch modes, see test_compiled_backends_refuse_prediction
            for mode in ("fwd", "fwd_bwd"):
                if spec.module_cls.unavailable_reason(backend, cpu, mode != "fwd") is not None:
                    continue  # cannot run on this machine at all (e.g. CUDA-only)
                yield pytest.param(key, backend, mode, id=f"{key}-{backend}-{mode}")


@pytest.mark.parametrize("key,backend,mode", list(_cases()))
def test_prediction_within_10_percent_of_measured(key, backend, mode):
    cell = Cell(key, "{}", backend, "core", mode, False, "cpu", "float32", 1, 256, 2, 8)
    predicted = predict_cell(cell)
    work = build_workload(cell)
    first = measure_call(work.run, "cpu", count_flops=False).peak_bytes  # the harness measures the first call
    steady = measure_call(work.run, "cpu", count_flops=False).peak_bytes
    assert first > 0 and steady > 0
    assert abs(predicted.first_call_bytes - first) <= 0.10 * first, (predicted, first)
    assert abs(predicted.peak_bytes - steady) <= 0.10 * steady, (predicted, steady)
    assert predicted.setup_bytes >= 3 * 256 * 2 * 8 * 4  # q, k, v at least


@pytest.mark.parametrize("key", [k for k in list_attentions() if set(get_spec(k).backends) & UNCOUNTABLE_BACKENDS])
def test_compiled_backends_refuse_prediction(key):
    backend = sorted(set(get_spec(key).backends) & UNCOUNTABLE_BACKENDS)[0]
    with pytest.raises(BackendUnavailableError, match="dispatch mode"):
        predict_cell(Cell(key, "{}", backend, "core", "fwd", False, "cpu", "float32", 1, 256, 2, 8))


def test_layer_and_model_levels_are_predicted_too():
    for level, mode in (("layer", "fwd_bwd"), ("model", "train_step")):
        cell = Cell("full", "{}", "sdpa", level, mode, True, "cpu", "float32", 2, 128, 2, 16)
        predicted = predict_cell(cell)
        work = build_workload(cell)
        measured = measure_call(work.run, "cpu", count_flops=False).peak_bytes
        assert abs(predicted.first_call_bytes - measured) <= 0.10 * measured, (level, predicted, measured)


def test_predicting_a_length_that_does_not_fit_allocates_nothing():
    n = 65536
    naive = Cell("full", "{}", "naive", "core", "fwd", False, "cpu", "float32", 1, n, 4, 64)
    before = current_rss_bytes()
    predicted = predict_cell(naive)
    assert current_rss_bytes() - before < 2**30
    assert predicted.peak_bytes >= 4 * n * n * 4  # at least one (4, n, n) float32 score tensor: 64 GiB
    # SDPA through fake CPU tensors keeps the fused kernel's O(n) memory (the meta device would predict n^2)
    fused = predict_cell(Cell("full", "{}", "sdpa", "core", "fwd", False, "cpu", "float32", 1, n, 4, 64))
    assert fused.peak_bytes < 2**30


def test_longest_fitting_length_is_the_boundary():
    cell = Cell("full", "{}", "naive", "core", "fwd", False, "cpu", "float32", 1, 256, 1, 8)
    budget = 48 * 2**20
    length, made = longest_fitting_length(cell, budget, start=256, limit=1 << 16, multiple=256)
    assert length is not None and length in made
    assert made[length].total_bytes <= budget
    beyond = predict_cell(Cell("full", "{}", "naive", "core", "fwd", False, "cpu", "float32", 1, length + 256, 1, 8))
    assert beyond.total_bytes > budget
    none, _ = longest_fitting_length(cell, 1024, start=256, multiple=256)
    assert none is None
    with pytest.raises(ValueError, match="budget_bytes"):
        longest_fitting_length(cell, 0)


def test_prediction_does_not_touch_the_global_rng_stream_of_real_tensors():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    predict_cell(Cell("full", "{}", "sdpa", "core", "fwd", False, "cpu", "float32", 1, 64, 2, 8))
    # predict seeds its own build (like every cell): only the seed is shared, by design
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), expected)


def test_precheck_with_a_predictor_extrapolates_long_cells():
    """The sweep's precheck (one Predictor per session) fits the shorter fake runs instead of a fake run at the
    long length; the extrapolated figure is the fake run's, and the note says how it was obtained."""
    from efficient_attn.harness.cell import precheck
    from efficient_attn.harness.plan import Cell, PlannedCell
    from efficient_attn.harness.predict import Predictor, predict_cell

    # the blocked kernel runs short inputs as one call, so its bytes are linear in n only from a few thousand tokens
    cell = Cell("window", "{\"window_size\":32}", "torch", "core", "fwd", False, "cpu", "float32", 1, 65536, 2, 8)
    predictor = Predictor(fake_max_len=16384, fit_start=4096, multiple=64)
    check = precheck(PlannedCell(cell), budget_bytes=None, predictor=predictor)
    assert check.status is None and check.note.startswith("memory extrapolated (linear through")
    fake = predict_cell(cell)
    assert abs(check.prediction.total_bytes - fake.total_bytes) <= 0.01 * fake.total_bytes
    short = precheck(PlannedCell(Cell(**{**cell.to_dict(), "seq_len": 512})), budget_bytes=None,
                     predictor=predictor)
    assert short.note == "" and short.prediction == predict_cell(Cell(**{**cell.to_dict(), "seq_len": 512}))
