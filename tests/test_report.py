"""The report: fits recover known scaling laws and crossovers, plots are written, failed cells are marked,
runs overlay, and ``effattn report`` runs end to end. All inputs are synthetic result tables with known costs."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from report_synthetic import (  # noqa: E402
    Series,
    linear,
    make_rows,
    quadratic,
    realistic_run,
    write_run,
)

from efficient_attn.cli import main  # noqa: E402
from efficient_attn.report.analyses.budget import longest_within_budget  # noqa: E402
from efficient_attn.report.analyses.crossover import (  # noqa: E402
    crossover_polynomial_fit,
    crossover_power,
    crossover_rows,
    measured_crossover,
)
from efficient_attn.report.analyses.fit import fit_power_law  # noqa: E402
from efficient_attn.report.analyses.tables import lra_table, relative_to_baseline  # noqa: E402
from efficient_attn.report.build import build_report  # noqa: E402
from efficient_attn.report.format import length_label  # noqa: E402
from efficient_attn.report.load import load_runs  # noqa: E402
from efficient_attn.report.palette import series_palette  # noqa: E402
from efficient_attn.report.plots import STATUS_MARKERS  # noqa: E402

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- fits


def test_quadratic_series_has_slope_two_and_linear_slope_one():
    rng = np.random.default_rng(1)
    n = np.array(LENGTHS, dtype=float)
    noise = np.exp(rng.normal(0.0, 0.02, size=n.size))
    quad = fit_power_law(n, 3e-6 * n**2 * noise)
    lin = fit_power_law(n, 5e-3 * n * noise[::-1])
    assert quad.exponent == pytest.approx(2.0, abs=0.05)
    assert lin.exponent == pytest.approx(1.0, abs=0.05)
    assert quad.r2 > 0.99 and lin.r2 > 0.99
    assert (quad.n_min, quad.n_max, quad.n_points) == (512, 16384, len(LENGTHS))


def test_slope_from_the_loaded_table_ignores_failed_cells(tmp_path):
    series = [
        Series("full", "naive", quadratic(2e-6), quadratic(16.0), failures={("fwd", 16384): ("oom", "too big")}),
        Series("window", "torch", linear(4e-3), linear(4096.0)),
    ]
    write_run(tmp_path / "r", make_rows(series, LENGTHS, modes=("fwd",)))
    frame, _ = load_runs([tmp_path / "r"])
    for name, expected in (("full:naive", 2.0), ("window:torch", 1.0)):
        rows = frame[(frame["series"] == name) & (frame["status"] == "ok")]
        assert fit_power_law(rows["seq_len"], rows["time_ms"]).exponent == pytest.approx(expected, abs=0.05)
        assert fit_power_law(rows["seq_len"], rows["peak_mem_bytes"]).exponent == pytest.approx(expected, abs=0.05)


def test_power_fit_needs_two_lengths():
    with pytest.raises(ValueError, match="at least two distinct lengths"):
        fit_power_law([1024, 1024], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least two distinct lengths"):
        fit_power_law([1024, 2048], [1.0, float("nan")])


def test_cab_crossover_of_quadratic_and_line_is_the_positive_root():
    a, b, c = 2.0e-6, 3.0e-3, 1.5  # baseline a n^2, variant b n + c
    n = np.array(LENGTHS, dtype=float)
    result = crossover_polynomial_fit(n, a * n**2, n, b * n + c)
    expected = (b + math.sqrt(b * b + 4 * a * c)) / (2 * a)  # a n^2 = b n + c
    assert result.verdict == "at"
    assert result.length == pytest.approx(expected, rel=1e-6)
    assert result.extrapolated == (not LENGTHS[0] <= expected <= LENGTHS[-1])


def test_power_law_crossover_solves_the_two_laws():
    n = np.array(LENGTHS, dtype=float)
    c2, p2, c1, p1 = 3e-6, 2.0, 8e-3, 1.0
    result = crossover_power(fit_power_law(n, c2 * n**p2), fit_power_law(n, c1 * n**p1))
    assert result.verdict == "at"
    assert result.length == pytest.approx((c1 / c2) ** (1 / (p2 - p1)), rel=1e-6)
    # the variant that grows faster than the baseline never overtakes it
    assert crossover_power(fit_power_law(n, c1 * n), fit_power_law(n, c2 * n**2)).verdict == "never"


def test_cab_crossover_always_and_never():
    n = np.array(LENGTHS, dtype=float)
    assert crossover_polynomial_fit(n, 1e-6 * n**2 + 5, n, 1e-4 * n).verdict == "always"
    assert crossover_polynomial_fit(n, 1e-3 * n, n, 1e-6 * n**2).verdict == "never"


def test_measured_crossover_first_length_from_which_variant_wins():
    a, b, c = 2.0e-6, 3.0e-3, 1.5
    base = {n: a * n * n for n in LENGTHS}
    var = {n: b * n + c for n in LENGTHS}
    analytic = (b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
    result = measured_crossover(base, var)
    assert result.length == min(n for n in LENGTHS if n > analytic)
    # a baseline that ran out of memory loses at that length
    base_oom = {512: 1.0, 1024: 1.0, 2048: math.inf}
    assert measured_crossover(base_oom, {512: 2.0, 1024: 2.0, 2048: 2.0}).length == 2048
    # a win in the middle that is lost again at the longest length is no crossover
    assert measured_crossover({1: 2.0, 2: 2.0}, {1: 1.0, 2: 3.0}).verdict == "never"


def test_longest_within_budget_measured_predicted_extrapolated():
    budget = 1e9
    lengths = [1024, 2048, 4096, 8192]
    mem = [4.0 * n * n for n in lengths]  # 4 n^2 bytes
    statuses = ["ok", "ok", "ok", "skipped_budget"]
    peak = mem[:3] + [float("nan")]
    reach = longest_within_budget(lengths, statuses, peak, mem, budget)
    assert reach.measured == 4096
    assert reach.predicted == max(n for n, m in zip(lengths, mem) if m <= budget)
    assert reach.extrapolated == pytest.approx(math.sqrt(budget / 4.0), rel=1e-6)


# ---------------------------------------------------------------- loading and tables


def test_load_tolerates_missing_optional_columns_and_rejects_bad_status(tmp_path):
    frame = make_rows([Series("full", "sdpa", quadratic(1e-6), linear(100.0))], [256, 512], modes=("fwd",))
    frame = frame.drop(columns=["tokens_per_s", "peak_rss_bytes", "compile_ms", "flops_computed", "note"])
    write_run(tmp_path / "a", frame)
    loaded, runs = load_runs([tmp_path / "a"])
    assert set(loaded["series"]) == {"full:sdpa"}
    assert loaded["tokens_per_s"].notna().all()  # derived from the time
    assert runs[0].label == "a"
    frame.loc[0, "status"] = "crashed"
    write_run(tmp_path / "b", frame)
    with pytest.raises(ValueError, match="unknown status value.*crashed.*allowed: ok"):
        load_runs([tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="results.csv not found"):
        load_runs([tmp_path / "missing"])


def test_series_names_params_and_peers(tmp_path):
    series = [
        Series("window", "torch", linear(1e-3), linear(1.0), params={"window_size": 128}),
        Series("window", "torch", linear(2e-3), linear(1.0), params={"window_size": 256}),
        Series("hf-bigbird", "peer", linear(3e-3), linear(1.0), is_peer=True, level="layer"),
    ]
    write_run(tmp_path / "r", make_rows(series, [512, 1024], modes=("fwd",)))
    frame, _ = load_runs([tmp_path / "r"])
    assert set(frame["series"]) == {
        "window:torch[window_size=128]",
        "window:torch[window_size=256]",
        "hf-bigbird (peer)",
    }
    palette = series_palette(frame)
    assert len(set(palette.values())) == 3


def test_relative_to_baseline_and_lra_table(tmp_path):
    a, b = 4e-6, 2e-3
    series = [
        Series("full", "naive", quadratic(a), quadratic(8.0), failures={("fwd", 16384): ("oom", "")}),
        Series("window", "torch", linear(b), linear(4096.0)),
    ]
    write_run(tmp_path / "r", make_rows(series, LENGTHS, modes=("fwd",)))
    frame, _ = load_runs([tmp_path / "r"])
    rel = relative_to_baseline(frame, "full", "naive")
    at_4k = rel[rel["seq_len"] == 4096].iloc[0]
    assert at_4k["speedup"] == pytest.approx(a * 4096 / b)
    assert at_4k["memory_saving"] == pytest.approx(8.0 * 4096 / 4096.0)
    assert bool(rel.loc[rel["seq_len"] == 16384, "base_failed"].iloc[0])
    header, rows = lra_table(frame, "full", "naive")
    assert any("published, other hardware" in h for h in header)
    (row,) = rows
    assert row[2] == "window:torch"
    assert float(row[header.index("speed 4K")].rstrip("x")) == pytest.approx(a * 4096 / b, rel=5e-3)
    assert row[header.index("speed 1K")].endswith("x")
    assert row[header.index("LRA speed 1K/2K/4K (published, other hardware: TPU v3)")].startswith("Local: 1.1x")


# ---------------------------------------------------------------- plots and the report


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    return realistic_run(tmp_path_factory.mktemp("runs") / "cpu")


@pytest.fixture(scope="module")
def realistic_report(realistic, tmp_path_factory):
    """One report of the realistic run, shared by the tests that read it (plots are the slow part)."""
    return build_report([realistic], tmp_path_factory.mktemp("report"), dpi=40)


def small_run(path: Path, *, scale: float = 1.0) -> Path:
    """Three series, three lengths, one oom: enough for the CLI and overlay tests, quick to plot."""
    series = [
        Series(
            "full",
            "naive",
            quadratic(4e-5 * scale),
            quadratic(16.0),
            failures={("fwd_bwd", 4096): ("oom", "")},
            flops=quadratic(1024.0),
        ),
        Series("full", "sdpa", quadratic(1.5e-5 * scale), linear(4096.0), flops=quadratic(1024.0)),
        Series("window", "torch", linear(2e-3 * scale, 0.4 * scale), linear(8192.0), flops=linear(1024.0 * 512)),
    ]
    return write_run(path, make_rows(series, [1024, 2048, 4096]), budget=2e8)


def test_every_plot_written_as_png(realistic_report):
    kinds = {p.kind for p in realistic_report.plots}
    assert kinds == {"latency", "memory", "throughput", "flops", "speedup", "memory_ratio", "memory_predicted"}
    for plot in realistic_report.plots:
        assert plot.path.stat().st_size > 1000
        width, height = png_size(plot.path)
        assert width > 200 and height > 100


def test_realistic_run_has_every_failure_kind(realistic):
    frame, _ = load_runs([realistic])
    assert {"ok", "oom", "skipped_budget", "unsupported", "error"} <= set(frame["status"])


def test_failed_cells_are_drawn_as_markers(realistic, tmp_path):
    """The oom cell of full:naive appears in the latency figure as its status marker at 16K."""
    from efficient_attn.report import plots as plots_module
    from efficient_attn.report.format import format_ms

    frame, runs = load_runs([realistic])
    seen: list[tuple[float, str, str]] = []
    original = plots_module._mark

    def spy(ax, x, row_slot, marker, colour, top, hollow=False):
        seen.append((x, marker, colour))
        return original(ax, x, row_slot, marker, colour, top, hollow)

    plots_module._mark = spy
    try:
        only = frame[frame["mode"] == "fwd_bwd"]
        plots_module._metric_figure(
            only, "time_ms", "t", format_ms, "t", tmp_path / "t.png", series_palette(frame), ["cpu"], 40
        )
    finally:
        plots_module._mark = original
    palette = series_palette(frame)
    assert (16384, STATUS_MARKERS["oom"][0], palette["full:naive"]) in seen
    assert (16384, STATUS_MARKERS["error"][0], palette["performer:torch"]) in seen
    assert (16384, STATUS_MARKERS["skipped_budget"][0], palette["hf-bigbird (peer)"]) in seen
    assert sum(1 for x, m, _ in seen if m == STATUS_MARKERS["unsupported"][0]) == 5


def test_report_markdown_has_every_section_and_html_embeds_images(realistic_report):
    files = realistic_report
    text = files.markdown.read_text()
    for section in (
        "## Environment",
        "## Plots",
        "## Scaling exponents",
        "## Crossover lengths",
        "### vs full:naive",
        "### vs full:sdpa",
        "## Longest length within the memory budget",
        "## Comparison with published figures",
        "## Cell status",
        "## Timing noise",
    ):
        assert section in text, section
    assert "published, other hardware" in text
    assert "**oom** - predicted 19.3 GB > budget 8.0 GB" in text
    assert "Synthetic CPU @ 2.0GHz" in text
    environment = text.split("## Environment")[1].split("## Plots")[0]
    for row in (
        "| CPU | Synthetic CPU @ 2.0GHz, 2 cores |",
        "| torch threads | 2 |",
        "| versions | python 3.12.0, torch 2.13.0, efficient_attn 0.1.0 |",
        "| git commit | 0123456789abcdef |",
        "| memory budget | 8,000,000,000 (8 GB) |",
        "| wall time | 321.5 s (1 session) |",
    ):
        assert row in environment, row
    assert "config." not in environment and environment.count("\n|") < 25  # the config stays in meta.json
    for plot in files.plots:
        assert f"]({plot.path.name})" in text
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == len(files.plots)
    assert "<h2>Crossover lengths</h2>" in page


def test_report_crossover_table_matches_the_constructed_laws(tmp_path):
    a, b, c = 4e-6, 2e-3, 1.0
    series = [
        Series("full", "naive", quadratic(a), quadratic(8.0)),
        Series("window", "torch", linear(b, c), linear(64.0)),
    ]
    write_run(tmp_path / "r", make_rows(series, LENGTHS, modes=("fwd",)))
    frame, _ = load_runs([tmp_path / "r"])
    header, rows, fitted = crossover_rows(frame, ("full", "naive"))
    expected = (b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
    (row,) = rows
    assert row[header.index("faster: fitted (CAB)")].startswith(f"{expected:,.0f}")
    assert fitted[("r", "fwd", "window:torch")] == row[header.index("faster: fitted (CAB)")]
    assert row[header.index("faster: measured")] == f"from {length_label(min(n for n in LENGTHS if n > expected))}"


def test_two_runs_overlay_with_labels(tmp_path):
    cpu = small_run(tmp_path / "before")
    after = small_run(tmp_path / "after", scale=0.5)
    files = build_report([cpu, after], dpi=40)
    assert files.markdown.parent == cpu / "compare"
    text = files.markdown.read_text()
    assert "| before | after |" in text.replace("|  | before | after |", "| before | after |")
    assert "| after | fwd | full:sdpa |" in text and "| before | fwd | full:sdpa |" in text
    # the after run was built at half the time: before / after = 2x at every length
    assert "## Run comparison" in text
    expected = "| window:torch | fwd | before / after | 1K-4K (3) | 2.00x at 4K (mean 2.00x) | 1.00x at 4K (mean 1.00x) |"
    assert expected in text
    for plot in files.plots:
        assert plot.path.stat().st_size > 1000
    frame, runs = load_runs([cpu, after])
    assert [r.label for r in runs] == ["before", "after"]
    # the legend names both runs
    from efficient_attn.report.plots import _legend_handles

    handles = _legend_handles(["full:naive"], series_palette(frame), ["before", "after"], False, set(), [])
    assert {"run: before", "run: after"} <= {h.get_label() for h in handles}


def test_cli_end_to_end(tmp_path, capsys):
    run_dir = small_run(tmp_path / "run")
    assert main(["report", str(run_dir), "--baseline", "full:sdpa", "--labels", "mine", "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'report.md'}" in out  # written into the run folder by default
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(
        f"{k}.png" for k in ("latency", "memory", "throughput", "flops", "speedup", "memory_ratio", "memory_predicted")
    )
    text = (run_dir / "report.md").read_text()
    assert "Baseline: `full:sdpa`" in text and "### vs full:naive" not in text
    assert "# Attention benchmark report: mine" in text
    assert main(["report", str(run_dir), "--labels", "a", "b"]) == 2
    assert "labels: got 2 label(s) for 1 run folder(s)" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--baseline", "full:flex"]) == 2
    assert "not in these runs; available:" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--baseline", "naive"]) == 2
    assert "expected VARIANT:BACKEND" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_meta_is_read_by_the_keys_the_harness_writes(tmp_path):
    """The budget is the harness's ``budget_bytes`` (else the suite's ``config.budget_gb``); guessed aliases are not
    read; a key of the wrong type is an error naming it; the label is the folder name."""
    from efficient_attn.report.load import RunInfo, load_run, memory_budget

    frame = make_rows([Series("full", "sdpa", quadratic(1e-6), linear(100.0))], [256, 512], modes=("fwd",))
    run = load_run(write_run(tmp_path / "x", frame, budget=123456789))
    assert run.label == "x"
    assert run.info.budget_bytes == 123456789
    assert run.info.device_memory_bytes == 24 * 2**30
    assert (run.info.cpu_model, run.info.torch_threads, run.info.sessions) == ("Synthetic CPU @ 2.0GHz", 2, 1)
    meta = json.loads((tmp_path / "x" / "meta.json").read_text())
    del meta["budget_bytes"]
    assert memory_budget(meta) is None
    assert memory_budget(meta | {"limits": {"memory_budget_bytes": 5}, "memory_budget": 5}) is None
    meta["config"]["budget_gb"] = 2
    assert memory_budget(meta) == 2 * 2**30
    with pytest.raises(ValueError, match="'budget_bytes' holds '8GB'; expected int or float"):
        memory_budget(meta | {"budget_bytes": "8GB"})
    with pytest.raises(ValueError, match="environment: key 'torch_threads' holds True"):
        RunInfo.from_meta(meta | {"environment": {"torch_threads": True}})


def test_committed_reference_meta_reads_into_run_info():
    """A meta.json the harness wrote (the committed reference run) fills every field the environment table shows."""
    from efficient_attn.report.load import load_run

    reference = Path(__file__).parents[1] / "reports" / "default-cpu"
    meta = json.loads((reference / "meta.json").read_text())
    info = load_run(reference).info
    assert info.budget_bytes == meta["budget_bytes"] and info.device_memory_bytes == meta["device_memory_bytes"]
    assert info.wall_s == meta["wall_s"] and info.timed_window_s == meta["timed_window_s"]
    assert info.sessions == len(meta["sessions"])
    env = meta["environment"]
    assert (info.device_name, info.cpu_model, info.cpu_count) == (env["device_name"], env["cpu_model"], env["cpu_count"])
    assert (info.torch, info.python, info.git_commit) == (env["torch"], env["python"], env["git_commit"])
    assert info.torch_threads == env["torch_threads"] and info.libraries == env["libraries"]
    assert info.suite == meta["config"]["name"]


def test_baseline_mask_selects_our_own_rows_of_the_resolved_backend(tmp_path):
    """One selector: ``full:torch`` matches an ``auto`` row that resolved to torch, never a peer or another backend."""
    from efficient_attn.report.series import available_baselines, baseline_mask, references

    series = [
        Series("full", "naive", quadratic(1e-6), quadratic(4.0)),
        Series("full", "sdpa", quadratic(5e-7), linear(8.0)),
        Series("window", "torch", linear(1e-3), linear(8.0)),
        Series("linformer", "peer", linear(2e-3), linear(4.0), is_peer=True, level="layer"),
    ]
    frame = make_rows(series, [256, 512], modes=("fwd",))
    frame.loc[frame["variant"] == "window", "backend_requested"] = "auto"
    write_run(tmp_path / "r", frame)
    loaded, _ = load_runs([tmp_path / "r"])
    for variant, backend in (("full", "naive"), ("full", "sdpa"), ("window", "torch")):
        mask = baseline_mask(loaded, variant, backend)
        assert mask.sum() == 2
        assert set(loaded.loc[mask, "series"]) == {f"{variant}:{backend}"}
    assert not baseline_mask(loaded, "linformer", "peer").any()  # a peer is never the baseline
    assert not baseline_mask(loaded, "window", "auto").any()  # auto is matched by what it resolved to
    assert available_baselines(loaded) == ["full:naive", "full:sdpa", "window:torch"]
    assert references(("full", "naive")) == [("full", "naive"), ("full", "sdpa")]
    assert references(("full", "sdpa")) == [("full", "sdpa")]
    # every analysis that compares uses it: the rows left out of the ratios are exactly the baseline's
    rel = relative_to_baseline(loaded, "full", "sdpa")
    assert len(rel) == len(loaded) - 2 and "full:sdpa" not in set(rel["series"])


def test_conditions_get_their_own_plot_files(tmp_path):
    """Causal and non-causal cells are not mixed on one line: one set of plots per condition."""
    from efficient_attn.report.plots import make_plots

    series = [
        Series("full", "naive", quadratic(1e-6), quadratic(4.0)),
        Series("window", "torch", linear(1e-3), linear(8.0)),
    ]
    both = pd.concat(
        [make_rows(series, [256, 512, 1024], modes=("fwd",), causal=c) for c in (False, True)], ignore_index=True
    )
    write_run(tmp_path / "r", both)
    frame, runs = load_runs([tmp_path / "r"])
    assert set(frame["condition"]) == {"causal", "non-causal"}
    plots = make_plots(frame, runs, tmp_path / "out", dpi=30)
    names = {p.path.name for p in plots}
    assert {"latency__causal.png", "latency__non_causal.png"} <= names
    assert all(p.path.stat().st_size > 0 for p in plots)


def test_report_without_the_default_baseline_says_so(tmp_path):
    from efficient_attn.report.render_md import to_markdown
    from efficient_attn.report.sections import report_blocks

    series = [
        Series("window", "torch", linear(1e-3), linear(8.0)),
        Series("linformer", "torch", linear(2e-3), linear(4.0)),
    ]
    write_run(tmp_path / "r", make_rows(series, [256, 512, 1024, 2048], modes=("fwd",)))
    frame, runs = load_runs([tmp_path / "r"])
    text = to_markdown(report_blocks(frame, runs, [], "full:naive", False), tmp_path)
    assert "`full:naive` is not in these runs" in text
    assert "The baseline `full:naive` (the default; choose another with --baseline) is not in these runs" in text
    assert "## Scaling exponents" in text and "## Timing noise" in text
