"""The import zygote: jobs forked with the heavy modules already imported, supervised like subprocesses."""

from __future__ import annotations

import os
import signal
import textwrap

import psutil
import pytest

from rlrun.launcher.supervisor import Job, JobFailed, Supervisor, python_module
from rlrun.launcher.zygote import ForkedProcess

JOB = textwrap.dedent(
    """
    import os, sys, time
    print("preloaded:", "json.tool" in sys.modules, "argv:", sys.argv[1:], "own session:", os.getsid(0) == os.getpid(),
          "secret:", os.environ.get("RLRUN_TEST_SECRET"), flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(int(sys.argv[-1]))
    """
)


@pytest.fixture
def sup(tmp_path, monkeypatch):
    (tmp_path / "zjob.py").write_text(JOB)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    said: list[str] = []
    sup = Supervisor(tmp_path, log=said.append)
    sup.said = said  # type: ignore[attr-defined]
    sup.preload(["json.tool"], {"RLRUN_TEST_SECRET": "s3"})
    yield sup
    sup.stop_all(2.0)


def _job(tmp_path, name, *args, env=None) -> Job:
    log = tmp_path / f"{name}.log"
    return Job(name, python_module("zjob", *args), log_file=log, stdout_file=log, env=env or {"RLRUN_TEST_SECRET": "s3"})


def test_forked_job_runs_with_preloaded_modules_its_own_session_argv_and_exit_code(sup, tmp_path):
    job = sup.start(_job(tmp_path, "a", "--flag", "3"))
    assert isinstance(job.proc, ForkedProcess)
    assert job.proc.wait(30) == 3
    out = (tmp_path / "a.log").read_text()
    assert "preloaded: True argv: ['--flag', '3'] own session: True secret: s3" in out
    assert "forked from the zygote" in sup.said[-1]
    assert sup.zygote.proc.poll() is None, "the zygote stays for the next job"


def test_forked_job_shows_its_own_command_and_a_kill_is_a_named_failure(sup, tmp_path):
    job = sup.start(_job(tmp_path, "b", "--sleep", "0"))
    proc = psutil.Process(job.proc.pid)
    deadline = psutil.time.monotonic() + 20
    while "zjob --sleep" not in " ".join(proc.cmdline()) and psutil.time.monotonic() < deadline:
        psutil.time.sleep(0.05)
    assert "-m zjob --sleep 0" in " ".join(proc.cmdline()), "ps shows the job, not the zygote's command"
    assert proc.ppid() == sup.zygote.proc.pid
    os.kill(job.proc.pid, signal.SIGKILL)
    with pytest.raises(JobFailed, match=r"job 'b' failed \(killed by SIGKILL\); see its log b.log"):
        sup.wait({"b"}, poll_s=0.05)


def test_stop_all_stops_forked_jobs_and_the_zygote(sup, tmp_path):
    jobs = [sup.start(_job(tmp_path, name, "--sleep", "0")) for name in ("c", "d")]
    pids = [j.proc.pid for j in jobs]
    sup.stop_all(2.0)
    assert all(j.returncode == -signal.SIGTERM for j in jobs)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert sup.zygote.proc.poll() is not None


def test_other_jobs_start_as_subprocesses(sup, tmp_path):
    """A job with an environment of its own (e.g. CUDA_VISIBLE_DEVICES), or with the zygote gone."""
    own_env = sup.start(_job(tmp_path, "e", "0", env={"RLRUN_TEST_SECRET": "other"}))
    assert not isinstance(own_env.proc, ForkedProcess) and own_env.proc.wait(30) == 0
    assert "secret: other" in (tmp_path / "e.log").read_text()
    sup.zygote.close()
    after = sup.start(_job(tmp_path, "f", "0"))
    assert not isinstance(after.proc, ForkedProcess) and after.proc.wait(30) == 0
    assert "preloaded: False" in (tmp_path / "f.log").read_text()


def test_a_module_that_cannot_be_preloaded_is_reported_and_jobs_still_fork(tmp_path, monkeypatch):
    (tmp_path / "zjob.py").write_text(JOB)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sup = Supervisor(tmp_path, log=lambda _m: None)
    sup.preload(["no_such_module_xyz", "json.tool"], {})
    try:
        job = sup.start(Job("g", python_module("zjob", "0"), log_file=tmp_path / "g.log", stdout_file=tmp_path / "g.log"))
        assert isinstance(job.proc, ForkedProcess) and job.proc.wait(30) == 0
        assert "preloaded: True" in (tmp_path / "g.log").read_text()
        assert "could not preload no_such_module_xyz" in (tmp_path / "logs" / "zygote.log").read_text()
    finally:
        sup.stop_all(2.0)


@pytest.mark.parametrize("preload", [True, False])
def test_a_run_forks_its_jobs_from_the_zygote_unless_told_not_to(tmp_path, preload):
    from conftest import metrics, run_app

    run_dir = tmp_path / "run"
    out = run_app(run_dir, "sft.max_steps=0", "max_steps=2", f"preload_imports={str(preload).lower()}", timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    started = [line for line in (run_dir / "logs" / "rl.log").read_text().splitlines() if "started " in line]
    assert len(started) == 3
    assert all(("forked from the zygote" in line) == preload for line in started), started
    assert [r["step"] for r in metrics(run_dir, "trainer")] == [1, 2]
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / ".model.lock").exists()


@pytest.mark.parametrize("overrides, preloaded", [
    ([], True), (["trainer.device=cuda"], False), (["inference.device=cuda"], False), (["inference=vllm"], False),
])  # fmt: skip
def test_runs_that_touch_cuda_start_no_zygote(hydra_compose, overrides, preloaded):
    """A forked child cannot use a CUDA its parent may have initialised: GPU runs fork nothing."""
    from rlrun.launcher.run import _cpu_only

    assert _cpu_only(hydra_compose(*overrides)) is preloaded
