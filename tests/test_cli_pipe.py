"""`effattn ... | head`: a reader that goes away early is not an error of ours (no traceback, SIGPIPE status)."""

import os
import subprocess
import sys


def test_a_closed_stdout_gives_no_traceback():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "efficient_attn.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # the reader is gone before anything was written
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 141, (proc.returncode, err.decode())
