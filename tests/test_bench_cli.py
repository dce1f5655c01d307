"""``effattn bench`` / ``effattn predict`` from the command line, and suite loading and validation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from efficient_attn import cli
from efficient_attn.harness.overrides import override_suite, parse_lengths, parse_variant_params
from efficient_attn.harness.runfolder import read_rows
from efficient_attn.harness.suite import SuiteError, available_suites, load_suite, parse_suite


def test_a_tiny_sweep_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "run"

    def bench(lengths):
        cmd = [sys.executable, "-m", "efficient_attn.cli", "bench", "quick", "--out", str(out), "--lengths", lengths,
               "--backends", "sdpa", "--min-run-time", "0.01", "--no-progress"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    proc = bench("32,64")
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out / "results.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert "median time per call (ms)" in proc.stdout and "4 cells (ok: 4)" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["name"] == "quick" and meta["config"]["lengths"] == [32, 64]
    assert meta["wall_s"] > 0 and meta["timed_window_s"] > 0
    # the same command again resumes: nothing to run, nothing duplicated
    again = bench("32,64")
    assert again.returncode == 0 and "ran 0, kept 4" in again.stdout
    assert len(read_rows(out / "results.csv")) == 4
    # a different config for the same folder is refused and says why
    other = bench("32")
    assert other.returncode == 2 and "different config" in other.stderr


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main(["bench", "quick", "--out", str(out), "--dry-run", "--lengths", "64,8k", "--budget-gb",
                     "0.05"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "predicted MiB" in text and "skipped_budget" in text and "nothing was run" in text
    assert text.count("full/") == 8


def test_bad_options_are_clear_errors(capsys):
    assert cli.main(["bench", "quick", "--variants", "fulll", "--dry-run"]) == 2
    assert "did you mean 'full'" in capsys.readouterr().err
    assert cli.main(["bench", "no-such-suite", "--dry-run"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert cli.main(["bench", "quick", "--lengths", "1k:x", "--dry-run"]) == 2
    assert "--lengths" in capsys.readouterr().err


def test_predict_reports_cells_and_the_longest_length_that_fits(capsys):
    code = cli.main(["predict", "--suite", "quick", "--variants", "full", "--backends", "naive", "--lengths",
                     "1k,64k", "--heads", "1", "--head-dim", "8", "--budget-gb", "0.0625", "--max-search", "64k"])
    assert code == 0
    text = capsys.readouterr().out
    assert "over budget" in text and "fits" in text
    # budget 64 MiB, one head: the (n, n) float32 scores and softmax, 8 n^2 bytes, fit up to n ~ 2896
    line = next(l for l in text.splitlines() if l.startswith("full") and "naive" in l and "fwd" in l and "n=" not in l)
    longest = int(line.split()[-1])
    assert 2048 <= longest < 4096 and longest % 256 == 0


def test_parse_lengths():
    assert parse_lengths("1k:16k") == (1024, 2048, 4096, 8192, 16384)
    assert parse_lengths("1024,2048, 3000") == (1024, 2048, 3000)
    assert parse_lengths("64k,1m") == (65536, 1048576)
    for bad in ("", "abc", "16k:1k", "0"):
        with pytest.raises(SuiteError, match="--lengths"):
            parse_lengths(bad)


def test_variant_params_overrides():
    assert parse_variant_params(["window.window_size=128", 'bigbird={"block_size": 32}', "full.bias=false"]) == {
        "window": {"window_size": 128}, "bigbird": {"block_size": 32}, "full": {"bias": False}
    }
    suite = load_suite("quick")
    changed = override_suite(suite, variant_params=["full.dropout=0.1"], backends="sdpa", lengths="256")
    assert changed.variants[0].params == {"dropout": 0.1} and changed.variants[0].backends == ("sdpa",)
    with pytest.raises(SuiteError, match="dropot.*did you mean 'dropout'"):
        override_suite(suite, variant_params=["full.dropot=0.1"])
    with pytest.raises(SuiteError, match="not among the variants"):
        override_suite(suite, variant_params=["window.window_size=8"])
    with pytest.raises(SuiteError, match="none of sdp"):
        override_suite(suite, backends="sdp")


def test_suite_validation_names_the_bad_key_and_the_nearest():
    base = {"lengths": [64], "variants": [{"key": "full"}]}
    with pytest.raises(SuiteError, match="unknown key 'lenghts'; did you mean 'lengths'"):
        parse_suite({"lenghts": [64], "variants": [{"key": "full"}]}, "x")
    with pytest.raises(SuiteError, match=r"variants\[0\].key: unknown attention key 'ful'"):
        parse_suite({**base, "variants": [{"key": "ful"}]}, "x")
    with pytest.raises(SuiteError, match=r"variants\[0\]: unknown key 'backend'; did you mean 'backends'"):
        parse_suite({**base, "variants": [{"key": "full", "backend": ["sdpa"]}]}, "x")
    with pytest.raises(SuiteError, match="'sdp' is not allowed; did you mean 'sdpa'"):
        parse_suite({**base, "variants": [{"key": "full", "backends": ["sdp"]}]}, "x")
    with pytest.raises(SuiteError, match="'fwdbwd' is not allowed; did you mean 'fwd_bwd'"):
        parse_suite({**base, "modes": ["fwdbwd"]}, "x")
    with pytest.raises(SuiteError, match="max_len"):
        parse_suite({**base, "variants": [{"key": "full", "max_len": {"fwd": -1}}]}, "x")
    suite = parse_suite(base, "x")
    assert suite.modes == ("fwd",) and suite.device == "auto" and suite.variants[0].backends[0] == "naive"


@pytest.mark.parametrize("name", available_suites())
def test_every_committed_suite_loads(name):
    suite = load_suite(name)
    assert suite.lengths and (suite.variants or suite.peers)


def test_default_suite_covers_every_registered_variant():
    from efficient_attn.registry import list_attentions

    default = load_suite("default")
    assert {v.key for v in default.variants} == set(list_attentions())
    full = {v.backends: v.max_len for v in default.variants if v.key == "full"}
    assert full == {("naive",): {"fwd_bwd": 8192}, ("sdpa",): {}}  # only the quadratic oracle is capped
    assert default.lengths == (1024, 2048, 4096, 8192, 16384)


def test_suite_path_resolution(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('lengths = [64]\n[[variants]]\nkey = "full"\n')
    assert load_suite(path).name == "mine"
    assert load_suite(str(path)).lengths == (64,)
    bad = tmp_path / "bad.toml"
    bad.write_text("lengths = [64\n")
    with pytest.raises(SuiteError, match="invalid TOML"):
        load_suite(bad)
    assert Path(load_suite("quick").name) == Path("quick")


def test_backend_filter_keeps_each_cap_with_its_own_backend():
    default = load_suite("default")
    only_sdpa = override_suite(default, variants="full", backends="sdpa")
    assert [(v.backends, v.max_len) for v in only_sdpa.variants] == [(("sdpa",), {})]  # naive's cap not inherited
    flex = override_suite(default, variants="full", backends="flex")
    assert [(v.backends, v.max_len) for v in flex.variants] == [(("flex",), {})]
    with pytest.raises(SuiteError, match=r"variants\[0\] and variants\[1\] both run 'full' with backend 'sdpa'"):
        parse_suite({"lengths": [64], "variants": [{"key": "full", "backends": ["sdpa"]},
                                                   {"key": "full", "backends": ["naive", "sdpa"]}]}, "x")
