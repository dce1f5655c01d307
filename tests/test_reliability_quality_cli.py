"""Issue 19 item 6: ``effattn quality`` behaves like ``bench``: one-line errors with status 2 (bad options, a missing
suite, a changed --steps on resume, a bad meta.json), 130 on Ctrl-C, and the heads sweep follows the filters."""

from pathlib import Path

import pytest

from efficient_attn import cli
from efficient_attn.commands.quality_cmd import DEFAULT_SUITE
from efficient_attn.quality.suite import load_suite, open_run_folder, plan_cells

SMALL = ["--tasks", "recall", "--variants", "full", "--lengths", "64", "--seeds", "1", "--steps", "1",
         "--no-metrics", "--no-progress"]


def one_line(capsys, argv, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,expected", [
    (["--suite", "no/such.toml"], "does not exist"),
    (["--variants", "fulll"], "did you mean 'full'"),
    (["--tasks", "recal"], "did you mean 'recall'"),
    (["--lengths", "8"], "lengths"),
    (["--variants", "full", "full"], "given twice"),
])
def test_bad_quality_options_are_one_line(capsys, tmp_path, extra, expected):
    err = one_line(capsys, ["quality", *SMALL, "--out", str(tmp_path / "q"), *extra])
    assert err.startswith("effattn quality: error:") and expected in err
    assert not (tmp_path / "q" / "results.csv").exists()


def test_changed_steps_or_a_bad_meta_json_on_resume_are_one_line(capsys, tmp_path):
    suite = load_suite(DEFAULT_SUITE, tasks=["recall"], variants=["full"], lengths=[64], seeds=1, steps=1)
    open_run_folder(tmp_path, suite)  # a run with --steps 1 exists
    argv = ["quality", *SMALL, "--out", str(tmp_path)]
    argv[argv.index("--steps") + 1] = "2"
    assert "different config" in one_line(capsys, argv)
    (tmp_path / "meta.json").write_text("[]")
    assert "is not a run record" in one_line(capsys, argv)


def test_ctrl_c_is_130_and_says_how_to_resume(capsys, tmp_path, monkeypatch):
    import efficient_attn.quality.suite as quality_suite

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality_suite, "run_suite", interrupted)
    assert "rerun the same command to resume" in one_line(capsys, ["quality", *SMALL, "--out", str(tmp_path)], 130)


def test_the_heads_sweep_follows_the_filters(capsys):
    heads = Path(DEFAULT_SUITE).with_name("heads.toml")  # the suite that has a heads sweep (mqar, full, 64 tokens)
    filtered = load_suite(heads, tasks=["mqar"], variants=["full"], lengths=[128])
    cells = plan_cells(filtered)
    assert {(c.task, c.variant, c.seq_len) for c in cells} == {("mqar", "full", 128)}
    assert filtered.heads_sweep is None and "--lengths does not include its 64" in filtered.dropped_heads_sweep
    # filters that keep the sweep's task, variant and length keep the sweep
    kept = load_suite(heads, tasks=["mqar"], variants=["full"], lengths=[64])
    assert kept.heads_sweep is not None and {c.num_heads for c in plan_cells(kept)} == {1, 2, 4, 8, 16}
    assert load_suite(heads).heads_sweep is not None  # no filters: the suite's sweep
