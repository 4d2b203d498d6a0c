"""Process supervision: start the jobs, watch them, stop all of them together.

Each job runs in its own session (process group), so stopping a job reaches everything it
started (torchrun's ranks, env workers) with one `killpg`. When one job exits non-zero the
others get SIGTERM, a grace period, then SIGKILL, and the caller gets a `JobFailed` naming
the job, its exit code and its log file. No job outlives the parent: on any exit path the
parent stops what is still running, and each job also stops itself when the parent's pid
disappears (`RLRUN_PARENT_PID`, see `rlrun.job.StopFlag`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlrun.job import PARENT_PID_ENV

if TYPE_CHECKING:
    from rlrun.launcher.zygote import ForkedProcess, Zygote


@dataclass
class Job:
    name: str
    cmd: list[str]
    log_file: Path  # the job's own text log, named in failure messages
    stdout_file: Path  # where its stdout and stderr go
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | ForkedProcess | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class JobFailed(RuntimeError):
    def __init__(self, job: Job, code: int, run_dir: Path | None = None) -> None:
        self.job, self.code = job, code
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
        log_file = _relative(job.log_file, run_dir)
        extra = "" if job.stdout_file == job.log_file else f" (stdout/stderr: {_relative(job.stdout_file, run_dir)})"
        super().__init__(f"job '{job.name}' failed ({reason}); see its log {log_file}{extra}")


def _relative(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def torchrun(module: str, nproc: int, *args: str) -> list[str]:
    """Ranks on this node under torch.distributed.run (its rendezvous on a free local port)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", module, *args,
    ]  # fmt: skip


class Supervisor:
    """Starts jobs in their own process groups and stops them all, whatever happens."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print) -> None:
        self.run_dir = run_dir
        self.jobs: list[Job] = []
        self.log = log
        self.zygote: Zygote | None = None

    @staticmethod
    def _env(extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **extra, PARENT_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}

    def preload(self, modules: list[str], env: dict[str, str]) -> None:
        """Start importing `modules` now in a zygote: later `python -m` jobs that add `env` to
        the environment are forked from it with those modules loaded (`rlrun.launcher.zygote`)."""
        from rlrun.launcher.zygote import Zygote

        self.zygote = Zygote(modules, self._env(env), env, stderr=self.run_dir / "logs" / "zygote.log")

    def start(self, job: Job) -> Job:
        job.stdout_file.parent.mkdir(parents=True, exist_ok=True)
        env = self._env(job.env)
        how = ""
        if self.zygote is not None and self.zygote.accepts(job.cmd, job.env):
            try:
                job.proc, how = self.zygote.start(job.cmd, job.stdout_file, env), ", forked from the zygote"
            except RuntimeError as exc:
                self.log(f"{exc}; starting {job.name} as a subprocess")
        if job.proc is None:
            with open(job.stdout_file, "ab") as out:
                job.proc = subprocess.Popen(
                    job.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True,
                )  # fmt: skip
        self.jobs.append(job)
        self.log(f"started {job.name} (pid {job.proc.pid}{how}): log {_relative(job.log_file, self.run_dir)}")
        return job

    def running_pids(self) -> dict[str, int]:
        """Each running job's pid (the monitor reads this at every sample: later jobs are seen too)."""
        return {j.name: j.proc.pid for j in list(self.jobs) if j.proc is not None and j.proc.returncode is None}

    def check(self) -> None:
        """Raise JobFailed for the first job that exited non-zero."""
        for job in self.jobs:
            code = job.returncode
            if code not in (None, 0):
                raise JobFailed(job, code, self.run_dir)

    def wait(self, names: set[str], poll_s: float = 0.5, tick: Callable[[], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> bool:  # fmt: skip
        """Until every job in `names` exited 0 (True) or a stop was requested (False).

        Raises JobFailed as soon as any job (also one not in `names`) fails.
        """
        while True:
            self.check()
            if all(j.returncode == 0 for j in self.jobs if j.name in names):
                return True
            if should_stop is not None and should_stop():
                return False
            if tick is not None:
                tick()
            time.sleep(poll_s)

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM every running job's process group, wait up to `grace_s`, then SIGKILL.

        Also reaps process groups whose leader already exited (a rank or env worker left
        behind by a crashed leader).
        """
        groups = [job for job in self.jobs if job.proc is not None]
        for job in groups:
            if job.returncode is None:
                self._signal(job, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for job in groups:
            assert job.proc is not None
            try:
                job.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{job.name} did not stop within {grace_s:.0f}s; killing it")
        for job in groups:  # whatever is left in each group, leader or not
            self._signal(job, signal.SIGKILL)
            assert job.proc is not None
            job.proc.wait()
        # SIGKILL is delivered asynchronously: wait (briefly) until every group is empty.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(self._group_alive(job) for job in groups):
            time.sleep(0.02)
        if self.zygote is not None:  # after the jobs: it reaps them
            self.zygote.close()

    @staticmethod
    def _group_alive(job: Job) -> bool:
        assert job.proc is not None
        try:
            os.killpg(job.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal(self, job: Job, sig: int) -> None:
        assert job.proc is not None
        try:
            os.killpg(job.proc.pid, sig)  # the session id is the leader's pid
        except ProcessLookupError:  # a job just forked may not have its own session yet
            try:
                os.kill(job.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        except PermissionError:
            pass
