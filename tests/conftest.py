"""Shared pytest setup: a small, deadline-free hypothesis profile and deterministic threads."""

import os

import torch
from hypothesis import settings

settings.register_profile("default", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# --- a real Slurm for the cluster executor's tests --------------------------------------------------------------
# Started lazily: only a test that asks for the ``slurm`` fixture pays for it (about 20 s on a fresh machine, to
# install slurm-wlm and munge; a second or two when they are installed). The daemons are stopped at the end of the
# run only when this fixture started them; a Slurm that was already reachable is used as it is.

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SLURM_LOCAL = Path(__file__).resolve().parent.parent / "scripts" / "slurm-local.sh"
#: slurm-local.sh's exit status for "not possible on this machine" (not root, no package manager)
_NOT_POSSIBLE_HERE = 3


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """A reachable Slurm: the partition to submit to and whether this test run started it."""

    partition: str
    started_here: bool


def _default_partition() -> str | None:
    """The default partition of the Slurm the environment points at, or ``None`` when none answers."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    partitions = [line.split()[0] for line in out.stdout.splitlines() if line.strip().endswith("up")]
    default = [p[:-1] for p in partitions if p.endswith("*")]
    return (default or partitions or [None])[0]


@pytest.fixture(scope="session")
def slurm():
    """A Slurm to submit to: the one the environment reaches, else a one-node Slurm from scripts/slurm-local.sh."""
    partition = _default_partition()
    if partition is not None:
        yield SlurmCluster(partition=partition, started_here=False)
        return
    local_dir = Path(os.environ.get("EFFATTN_SLURM_DIR", "/tmp/effattn-slurm"))
    saved_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(local_dir / "slurm.conf")
    already_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0
    # the node declares more CPUs than the machine has: the tests' tasks mostly wait for Python and torch to start,
    # so running them side by side keeps the Slurm tests short (timings measured there are not the point)
    env = {**os.environ, "EFFATTN_SLURM_CPUS": os.environ.get("EFFATTN_SLURM_CPUS", str(max(16, os.cpu_count() or 1)))}
    try:
        if not already_up:
            start = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=300,
                                   env=env)
            if start.returncode == _NOT_POSSIBLE_HERE:
                pytest.skip("no Slurm reachable and scripts/slurm-local.sh cannot start one here: "
                            f"{start.stderr.strip()}")
            if start.returncode != 0:
                pytest.fail(f"scripts/slurm-local.sh start failed (rc {start.returncode}):\n{start.stderr}")
        partition = _default_partition()
        if partition is None:
            pytest.fail("scripts/slurm-local.sh reports the cluster up, but sinfo shows no partition that is up")
        yield SlurmCluster(partition=partition, started_here=not already_up)
    finally:
        if not already_up:
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=120)
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf
