"""Process supervision with real processes: failures stop everything, nothing is left behind."""

from __future__ import annotations

import signal
import sys
import time

import psutil
import pytest
from conftest import alive

from rlrun.launcher.supervisor import Job, JobFailed, Supervisor
from rlrun.rundir import wait_for

# A job that starts a grandchild in its own process group, then sleeps.
SLEEPER_WITH_CHILD = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _job(tmp_path, name: str, code: str, *args: str) -> Job:
    return Job(name, [sys.executable, "-c", code, *args], log_file=tmp_path / f"{name}.log",
               stdout_file=tmp_path / f"{name}.stdout")  # fmt: skip


def _printed(tmp_path, name: str, text: str) -> bool:
    path = tmp_path / f"{name}.stdout"
    return path.is_file() and text in path.read_text()


def _descendants(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
            found.extend(psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]




def test_failing_job_is_named_and_everything_is_stopped(tmp_path):
    said: list[str] = []
    sup = Supervisor(tmp_path, log=said.append)
    inference = sup.start(_job(tmp_path, "inference", SLEEPER_WITH_CHILD))
    trainer = sup.start(_job(tmp_path, "trainer", SLEEPER_WITH_CHILD))
    go = tmp_path / "fail_now"  # the orchestrator fails once the test has seen everything running
    fail = ("import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
            "print('boom', file=sys.stderr)\nsys.exit(3)")  # fmt: skip
    sup.start(_job(tmp_path, "orchestrator", fail, str(go)))
    wait_for(lambda: _printed(tmp_path, "inference", "ready") and _printed(tmp_path, "trainer", "ready"),
             "both sleepers to start their children", timeout_s=60)  # fmt: skip
    tree = [p.pid for p in _descendants([j.proc.pid for j in sup.jobs])]
    assert len(tree) >= 5, "three jobs plus two grandchildren are running"
    go.touch()

    with pytest.raises(JobFailed) as failed:
        sup.wait({"orchestrator", "trainer"}, poll_s=0.1)
    message = str(failed.value)
    assert "'orchestrator'" in message and "exit code 3" in message and "orchestrator.log" in message
    assert "boom" in (tmp_path / "orchestrator.stdout").read_text(), "stderr captured in the job's stdout file"

    sup.stop_all(grace_s=5)
    assert not [m for m in said if "did not stop" in m], said
    assert inference.proc.returncode == trainer.proc.returncode == -signal.SIGTERM, "stopped by SIGTERM, in the grace"
    assert alive(tree) == [], "processes left behind"


def test_job_killed_by_signal_is_reported(tmp_path):
    sup = Supervisor(tmp_path, log=lambda _m: None)
    job = sup.start(_job(tmp_path, "orchestrator", "import time; time.sleep(600)"))
    job.proc.kill()
    with pytest.raises(JobFailed, match="killed by SIGKILL"):
        sup.wait({"orchestrator"}, poll_s=0.05)
    sup.stop_all(grace_s=1)


def test_term_ignoring_job_is_killed_after_grace(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(600)"
    sup = Supervisor(tmp_path, log=lambda _m: None)
    job = sup.start(_job(tmp_path, "stubborn", code))
    wait_for(lambda: _printed(tmp_path, "stubborn", "x"), "the job to ignore SIGTERM", timeout_s=60)
    start = time.monotonic()
    sup.stop_all(grace_s=1)
    assert time.monotonic() - start > 0.9, "SIGKILL only after the grace"
    assert job.proc.returncode == -signal.SIGKILL


def test_wait_returns_when_jobs_succeed(tmp_path):
    sup = Supervisor(tmp_path, log=lambda _m: None)
    sup.start(_job(tmp_path, "server", "import time; time.sleep(600)"))
    sup.start(_job(tmp_path, "worker", "print('done')"))
    assert sup.wait({"worker"}, poll_s=0.05) is True
    sup.stop_all(grace_s=5)
    assert all(j.returncode is not None for j in sup.jobs)
