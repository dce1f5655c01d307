"""One palette for both reports: a variant key has the same colour in the benchmark report and the quality report,
and a key nobody listed still gets a colour that depends on the key alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_hex

sys.path.insert(0, str(Path(__file__).parent))

from report_synthetic import Series, linear, make_rows, quadratic, write_run  # noqa: E402

from efficient_attn.quality import plots as quality_plots  # noqa: E402
from efficient_attn.registry import list_attentions  # noqa: E402
from efficient_attn.report.load import load_runs  # noqa: E402
from efficient_attn.report.palette import (  # noqa: E402
    SPARE_COLOURS,
    VARIANT_COLOURS,
    peer_variant,
    series_palette,
    variant_colour,
)


def _quality_results(variants: list[str]) -> pd.DataFrame:
    rows = []
    for i, variant in enumerate(variants):
        for seed in (0, 1):
            for seq_len in (64, 128):
                rows.append(
                    {
                        "task": "recall", "variant": variant, "seq_len": seq_len, "seed": seed, "status": "ok",
                        "accuracy": 0.5 + 0.01 * i + 0.001 * seed, "majority_accuracy": 0.25,
                        "steps_per_s": 10.0 + i, "peak_mem_bytes": 1e6 * (i + 1),
                    }
                )
    return pd.DataFrame(rows)


def _captured(monkeypatch) -> list:
    figures: list = []
    original = quality_plots._save

    def spy(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(quality_plots, "_save", spy)
    return figures


def test_every_registered_variant_has_a_fixed_colour_of_its_own():
    keys = list_attentions()
    assert set(keys) <= set(VARIANT_COLOURS)
    assert len({variant_colour(k) for k in keys}) == len(keys)


def test_a_variant_has_the_same_colour_in_the_benchmark_and_the_quality_report(tmp_path, monkeypatch):
    variants = ["full", "window", "linformer", "moba", "brand_new_variant"]
    # benchmark report: one series per variant, drawn in the variant's own colour
    series = [Series(v, "torch", linear(1e-3 * (i + 1)), linear(8.0)) for i, v in enumerate(variants)]
    write_run(tmp_path / "bench", make_rows(series, [256, 512], modes=("fwd",)))
    frame, _ = load_runs([tmp_path / "bench"])
    bench = series_palette(frame)
    assert {v: bench[f"{v}:torch"] for v in variants} == {v: variant_colour(v) for v in variants}
    # quality report: the lines of accuracy-vs-length and the bubbles of the LRA chart
    figures = _captured(monkeypatch)
    results = _quality_results(variants)
    quality_plots.accuracy_vs_length(results, tmp_path / "acc.png")
    quality_plots.lra_chart(results, tmp_path / "lra.png")
    acc, lra = figures
    lines = {bars.get_label(): to_hex(bars.lines[0].get_color()) for bars in acc.axes[0].containers}
    assert {v: lines[v] for v in variants} == {v: variant_colour(v) for v in variants}
    bubbles = {c.get_label().split(":")[0]: to_hex(c.get_facecolor()[0], keep_alpha=False)
               for c in lra.axes[0].collections}
    assert {v: bubbles[v] for v in variants} == {v: variant_colour(v) for v in variants}
    assert variant_colour("window") == "#1f77b4"  # blue in both (the quality report used to draw it pink)


def test_unknown_keys_are_deterministic_across_processes_and_independent_of_other_keys(tmp_path):
    unknown = ["my_variant", "hydra", "zeta-attn"]
    colours = {k: variant_colour(k) for k in unknown}
    assert all(c in SPARE_COLOURS for c in colours.values())
    assert not set(colours.values()) & set(VARIANT_COLOURS.values())
    code = (
        "from efficient_attn.report.palette import variant_colour; "
        f"print([variant_colour(k) for k in {unknown[::-1]!r}])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert other.stdout.strip() == str([colours[k] for k in unknown[::-1]])
    # the colour of a key does not depend on which other series a report holds
    alone = [Series("hydra", "torch", linear(1e-3), linear(8.0))]
    crowded = alone + [Series(k, "torch", quadratic(1e-6), linear(8.0)) for k in ("zeta-attn", "full", "window")]
    write_run(tmp_path / "a", make_rows(alone, [256, 512], modes=("fwd",)))
    write_run(tmp_path / "b", make_rows(crowded, [256, 512], modes=("fwd",)))
    colour_a = series_palette(load_runs([tmp_path / "a"])[0])["hydra:torch"]
    colour_b = series_palette(load_runs([tmp_path / "b"])[0])["hydra:torch"]
    assert colour_a == colour_b == variant_colour("hydra")


@pytest.mark.parametrize(
    ("peer", "variant"),
    [("local-attention", "window"), ("hf-longformer", "longformer"), ("hf-bigbird", "bigbird"),
     ("linformer", "linformer"), ("fla-retention", "retention"), ("somebody-else", None)],
)
def test_a_peer_takes_the_colour_of_the_variant_it_implements(peer, variant):
    assert peer_variant(peer) == variant
    expected = variant_colour(variant) if variant else variant_colour(peer)
    assert variant_colour(peer, is_peer=True) == expected


def test_every_peer_maps_to_a_registered_variant():
    from efficient_attn.peers import list_peers

    for peer in list_peers():
        assert peer_variant(peer) in list_attentions(), peer
