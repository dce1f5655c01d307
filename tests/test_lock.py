"""A run folder belongs to one writer process (issue 19, item 2): the writer holds an OS file lock on the folder, a
second writer (``effattn bench`` or ``effattn quality`` on the same ``--out``) refuses with one line naming the
holder, and the lock goes away with the holder however it ends."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from efficient_attn import cli
from efficient_attn.harness.runfolder import LOCK_FILE, RunFolder, RunFolderBusyError, duplicate_keys, lock_holder

COLUMNS = ("task", "seed", "status")

# a writer in another process: opens the folder, says so, and waits to be killed
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from efficient_attn.harness.runfolder import RunFolder
    folder = RunFolder(Path(sys.argv[1]), {"holder": True}, columns=("task", "seed", "status"),
                       key_columns=("task", "seed"), schema_version=1, environment={})
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of ``tmp_path / 'run'``: (folder, process)."""
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def open_folder(path):
    return RunFolder(path, {"holder": False}, columns=COLUMNS, key_columns=("task", "seed"), schema_version=1,
                     environment={})


def test_a_second_writer_process_is_refused_naming_the_holder(holder):
    folder, proc = holder
    assert lock_holder(folder) == {"pid": proc.pid, "host": socket.gethostname(), "since": lock_holder(folder)["since"]}
    with pytest.raises(RunFolderBusyError) as caught:
        open_folder(folder)
    message = str(caught.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "\n" not in message
    # nothing was written by the refused writer: the holder's config stands
    assert '"holder": true' in (folder / "meta.json").read_text()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_lock_goes_with_its_process_however_it_ends(holder, how):
    folder, proc = holder
    proc.send_signal(how)
    proc.wait()
    with pytest.raises(Exception, match="different config"):  # the lock is free: only the config check stands now
        open_folder(folder)


def test_in_one_process_folders_share_the_lock_until_the_last_closes(tmp_path):
    first = open_folder(tmp_path)
    second = open_folder(tmp_path)
    first.close()
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / LOCK_FILE)], capture_output=True)
    assert probe.returncode != 0  # still held by `second`
    second.close()
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / LOCK_FILE)], capture_output=True)
    assert probe.returncode == 0


BENCH = ["bench", "quick", "--lengths", "32", "--backends", "sdpa", "--min-run-time", "0.01", "--no-progress"]
QUALITY = ["quality", "--tasks", "recall", "--variants", "full", "--lengths", "64", "--seeds", "1", "--steps", "2",
           "--no-progress", "--no-metrics"]


@pytest.mark.parametrize("command", [BENCH, QUALITY], ids=["bench", "quality"])
def test_every_writing_command_refuses_a_folder_another_process_writes(holder, command, capsys):
    folder, proc = holder
    rc = cli.main([*command, "--out", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) >= 1 and f"pid {proc.pid}" in err[-1] and "being written by" in err[-1]
    assert not (folder / "results.csv").read_text().count("\n") > 1  # no row was written


def test_duplicated_cells_of_a_table_written_before_the_lock_are_found():
    rows = [{"task": "a", "seed": "0"}, {"task": "a", "seed": "1"}, {"task": "a", "seed": "0"}]
    assert duplicate_keys(rows, ("task", "seed")) == {("a", "0"): 2}
    assert duplicate_keys(rows[:2], ("task", "seed")) == {}
