"""Issue 19 item 4 (CLI side): every command-line mistake is one line on stderr with exit status 2, never a
traceback, and is caught before any work. Parametrised from the argparse parsers themselves, so a new command or
option is covered without new code."""

import argparse
import math
import os

import pytest

from efficient_attn import cli
from efficient_attn.commands import options
from efficient_attn.harness.suite import SuiteError, parse_suite

NUMERIC_TYPES = {options.positive_float, options.positive_int, options.nonnegative_int, options.length}
# what a command needs besides the option under test to get past argparse (its positional arguments)
REQUIRED = {"report": ["some-run-dir"]}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()
OPTIONS = [(name, action) for name, p in COMMANDS.items() for action in p._actions if action.option_strings]
NUMERIC = [(name, a) for name, a in OPTIONS if a.type in NUMERIC_TYPES]
OUT = [(name, a) for name, a in OPTIONS if "--out" in a.option_strings]


def one_line_error(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith((f"effattn {argv[0]}: error:", "effattn: error:")), err
    return err


def test_every_numeric_option_goes_through_the_validator_layer():
    raw = [f"{n} {a.option_strings[0]}" for n, a in OPTIONS if a.type in (int, float)]
    assert not raw, f"use a type from efficient_attn.commands.options for {raw}"
    assert len(NUMERIC) >= 12 and len(OUT) == 3  # bench, report, quality


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
@pytest.mark.parametrize("command,action", NUMERIC, ids=[f"{c}{a.option_strings[0]}" for c, a in NUMERIC])
def test_every_numeric_option_refuses_what_it_cannot_mean(capsys, command, action, value):
    accepts = action.type is options.nonnegative_int and value == "0"
    if accepts:
        assert action.type(value) == 0
        return
    err = one_line_error(capsys, [command, *REQUIRED.get(command, []), action.option_strings[0], value])
    assert action.option_strings[0] in err and repr(value) in err


@pytest.mark.parametrize("command,action", OUT, ids=[c for c, _ in OUT])
def test_every_out_option_refuses_a_file_and_a_path_under_a_file(capsys, tmp_path, command, action):
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    for bad in (a_file, a_file / "run"):
        err = one_line_error(capsys, [command, *REQUIRED.get(command, []), "--out", str(bad)])
        assert "is a file" in err
    assert list(tmp_path.iterdir()) == [a_file]  # nothing created, nothing measured


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
@pytest.mark.parametrize("command,action", OUT, ids=[c for c, _ in OUT])
def test_every_out_option_refuses_a_folder_it_cannot_write(capsys, tmp_path, command, action):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for bad in (locked, locked / "run"):
            assert "not writable" in one_line_error(capsys, [command, *REQUIRED.get(command, []), "--out", str(bad)])
    finally:
        locked.chmod(0o700)


def test_check_out_folder_accepts_new_and_existing_folders(tmp_path):
    assert options.check_out_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert options.check_out_folder(tmp_path) == tmp_path
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--min-run-time", "inf"], "--min-run-time"),
    (["--budget-gb", "nan"], "--budget-gb"),
    (["--variant-params", "window.causal=true"], "--causal"),
    (["--variant-params", "window.backend=naive"], "--backends"),
    (["--variant-params", 'window={"num_heads": 2}'], "--heads"),
    (["--lengths", "3000:5000"], "does not reach 5000"),
    (["--lengths", "1k:10k"], "end it at 8192 or 16384"),
    (["--modes", "fwd,fwd"], "'fwd' listed twice"),
    (["--dtype", "float32,float32"], "listed twice"),
    (["--variants", "window,window"], "listed twice"),
    (["--backends", "torch,torch"], "listed twice"),
    (["--batch-size", "1,1"], "listed twice"),
    (["--level", "modle"], "--level"),
    (["--heads", "two"], "--heads"),
])
def test_bench_option_mistakes(capsys, extra, expected):
    for command in ("bench",) if extra[0] == "--min-run-time" else ("bench", "predict"):
        argv = [command, "quick" if command == "bench" else "--suite=quick", "--variants", "window", *extra]
        if command == "bench":
            argv.append("--dry-run")
        if extra[0] == "--variants":
            argv[2:4] = []
        assert expected in one_line_error(capsys, argv)


def test_a_range_says_what_it_means_and_exact_ranges_still_work():
    from efficient_attn.harness.overrides import parse_lengths

    assert parse_lengths("3000:12000") == (3000, 6000, 12000)
    assert parse_lengths("1k:1k") == (1024,)


def test_max_search_is_named_in_its_own_error(capsys):
    err = one_line_error(capsys, ["predict", "--max-search", "1k:x"])
    assert "--max-search" in err and "--lengths" not in err


def test_a_folder_given_as_suite_is_not_said_to_be_missing(capsys, tmp_path):
    err = one_line_error(capsys, ["bench", str(tmp_path), "--dry-run"])
    assert "is a folder" in err and "does not exist" not in err


def test_an_unknown_peer_is_refused_when_the_suite_loads():
    with pytest.raises(SuiteError, match=r"peers\[0\]\.name: unknown peer 'hf-bigbrd'; did you mean 'hf-bigbird'"):
        parse_suite({"lengths": [64], "peers": [{"name": "hf-bigbrd"}]}, "x")


@pytest.mark.parametrize("key,value", [("min_run_time", math.inf), ("min_run_time", math.nan),
                                       ("slow_call_s", -1.0), ("modes", ["fwd", "fwd"])])
def test_suite_files_get_the_same_checks_as_the_options(key, value):
    with pytest.raises(SuiteError, match=key if key != "modes" else "listed twice"):
        parse_suite({"lengths": [64], "variants": [{"key": "full"}], key: value}, "x")


def test_budget_bytes_refuses_what_the_option_refuses():
    from efficient_attn.harness.host import budget_bytes

    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget_gb"):
            budget_bytes(bad, "cpu")
    assert budget_bytes(0.5, "cpu") == 2**29


def test_unknown_command_and_unknown_option_are_one_line(capsys):
    assert cli.main(["benc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err
    assert "unrecognized arguments" in one_line_error(capsys, ["bench", "--lenghts", "64"])


@pytest.mark.parametrize("command,action", OUT, ids=[c for c, _ in OUT])
def test_every_out_option_refuses_a_folder_the_os_says_is_not_writable(capsys, tmp_path, monkeypatch, command,
                                                                       action):
    # the same check as above for a user the OS refuses (this suite may run as root, for whom os.access says yes)
    real_access = os.access
    monkeypatch.setattr(options.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    for bad in (tmp_path, tmp_path / "run"):
        assert "not writable" in one_line_error(capsys, [command, *REQUIRED.get(command, []), "--out", str(bad)])
