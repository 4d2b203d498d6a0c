"""Process supervision: start the jobs, watch them, stop all of them together.

Each job runs in its own session (process group), so stopping a job reaches everything it
started (torchrun's ranks, env workers) with one `killpg`. When one job exits non-zero the
others get SIGTERM, a grace period, then SIGKILL, and the caller gets a `JobFailed` naming
the job, its exit code and its log file. No job outlives the parent: on any exit path the
parent stops what is still running, and each job also stops itself when the parent's pid
disappears (`RLRUN_PARENT_PID`, see `rlrun.job.StopFlag`).

A job placed on other nodes (deployment=slurm) is the same `Job` whose command starts with
`srun`; it names its Slurm step (`step`), which is stopped with `scancel -s TERM`, then KILL
(a signal to `srun` itself would reach the tasks as SIGKILL, without a grace period), and
its failure names the node where it failed, from the node records (`rlrun.launcher.node`).
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
    nodes: tuple[str, ...] = ()  # where srun placed it (deployment=slurm); empty: this machine
    step: str | None = None  # its Slurm step's name (deployment=slurm)
    node_stdout: str | None = None  # each node's stdout and stderr, `{node}` in the path (a job on several nodes)
    required: bool = True  # False: a failure is reported, not fatal (the nodes' usage samplers)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class JobFailed(RuntimeError):
    def __init__(self, job: Job, code: int, run_dir: Path | None = None) -> None:
        self.job, self.code = job, code
        self.node, node_code, self.log_file, stdout = _failure_site(job, run_dir)
        code = code if node_code is None else node_code  # the failed node's own, not srun's summary of all
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
        where = f" on node {self.node}" if self.node else f" on nodes {','.join(job.nodes)}" if job.nodes else ""
        log_file = _relative(self.log_file, run_dir)
        extra = "" if stdout == self.log_file else f" (stdout/stderr: {_relative(stdout, run_dir)})"
        super().__init__(f"job '{job.name}' failed{where} ({reason}); see its log {log_file}{extra}")


def _failure_site(job: Job, run_dir: Path | None) -> tuple[str | None, int | None, Path, Path]:
    """(node, its exit code, log, stdout) of a failure: on several nodes, the first node whose part
    failed (from the node records), and the log of a rank that ran there."""
    if not job.nodes:
        return None, None, job.log_file, job.stdout_file
    from rlrun.launcher.node import failed_node, job_records, rank_records

    node = failed_node(run_dir, job.name) if run_dir is not None else None
    if node is None and len(job.nodes) == 1:
        node = job.nodes[0]
    if node is None:
        return None, None, job.log_file, job.stdout_file
    records = [r for r in job_records(run_dir, job.name) if r.get("node") == node] if run_dir is not None else []
    code = records[-1].get("exit_code") if records else None
    log_file = job.log_file
    if run_dir is not None and job.log_file.name.startswith("rank_"):  # a job with ranks: one of this node's
        ranks = [r["rank"] for r in rank_records(run_dir, job.name) if r.get("node") == node]
        if ranks:
            log_file = job.log_file.with_name(f"rank_{ranks[0]}.log")
    stdout = Path(job.node_stdout.format(node=node)) if job.node_stdout else job.stdout_file
    return node, code, log_file, stdout


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
        self._reported: set[str] = set()

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
        where = f" on node{'s' if len(job.nodes) > 1 else ''} {','.join(job.nodes)} through srun" if job.nodes else ""
        self.log(f"started {job.name}{where} (pid {job.proc.pid}{how}): log {_relative(job.log_file, self.run_dir)}")
        return job

    def running_pids(self) -> dict[str, int]:
        """Each running job's pid (the monitor reads this at every sample: later jobs are seen too)."""
        return {j.name: j.proc.pid for j in list(self.jobs) if j.proc is not None and j.proc.returncode is None}

    def check(self) -> None:
        """Raise JobFailed for the first required job that exited non-zero (the others are reported once)."""
        for job in self.jobs:
            code = job.returncode
            if code not in (None, 0):
                if job.required:
                    raise JobFailed(job, code, self.run_dir)
                if job.name not in self._reported:
                    self._reported.add(job.name)
                    self.log(f"{JobFailed(job, code, self.run_dir)}; the run goes on without it")

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
        steps = [job.step for job in groups if job.step]
        _signal_steps(steps, "TERM")  # every node's processes, through slurmstepd
        for job in groups:
            if job.returncode is None and not job.step:
                self._signal(job, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for job in groups:
            assert job.proc is not None
            try:
                job.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{job.name} did not stop within {grace_s:.0f}s; killing it")
        _signal_steps(steps, "KILL")  # what is left of the steps (srun exits once its tasks have)
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
        except (ProcessLookupError, PermissionError):
            pass


def _signal_steps(steps: list[str], sig: str) -> None:
    if steps:
        from rlrun.launcher.deployment.slurm import signal_steps

        signal_steps(steps, sig)
