"""A real Slurm cluster for tests (scripts/slurm_cluster.py): one node per session, or several.

    from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        env = {**os.environ, **slurm_cluster.env}   # SLURM_CONF for sbatch/squeue/...

    @pytest.fixture(scope="module")
    def cluster():                       # nodes n1..n3: three slurmd on this host
        yield from running_cluster(nodes=3)

It installs Debian's packages when they are missing (apt-get, as root), starts a private
munged, slurmctld and slurmd, and at the end cancels the jobs left on it and stops each
daemon by the PID it started, whatever the tests did. Without root (or without apt-get and
the packages) the tests skip and say why; set RLRUN_SKIP_SLURM_TESTS=1 to skip them anyway.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def _load_script():
    spec = importlib.util.spec_from_file_location("rlrun_slurm_cluster", ROOT / "scripts" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


slurm = _load_script()


@pytest.fixture(scope="session")
def slurm_cluster():
    yield from running_cluster(nodes=1)


def running_cluster(nodes: int):
    """The body of a fixture: a started cluster of `nodes` nodes, stopped (every daemon by PID) afterwards."""
    if os.environ.get("RLRUN_SKIP_SLURM_TESTS"):
        pytest.skip("RLRUN_SKIP_SLURM_TESTS is set")
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = slurm.Cluster(nodes=nodes)
    try:
        cluster.start()  # stops what it started when it fails
    except slurm.ClusterError as exc:
        shutil.rmtree(cluster.root, ignore_errors=True)
        pytest.fail(f"could not start a local Slurm cluster: {exc}\n(RLRUN_SKIP_SLURM_TESTS=1 skips the Slurm tests)")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def squeue(cluster, *args: str) -> str:
    env = {**os.environ, **cluster.env}
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, env=env, timeout=30).stdout


def scontrol(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **cluster.env}
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=env, timeout=30)


def wait_until(check, what: str, timeout_s: float = 120.0, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
