"""`deployment=local`: every job on this machine, each in its own process group (the default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlrun.launcher.supervisor import Job, python_module, torchrun
from rlrun.rundir import is_inference_job, job_log


class LocalDeployment:
    """Jobs as the parent's own subprocesses; trainer ranks under `torchrun --standalone`."""

    nodes_dir: Path | None = None  # the monitor samples this machine itself

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def configure(self, cfg: Any) -> Any:
        """Nothing to settle: the servers are on inference.host (`inference.launch.choose_port`)."""
        return cfg

    def job(self, name: str, cmd: list[str], env: dict[str, str]) -> Job:
        log_file = job_log(self.run_dir, name)
        stdout = log_file if is_inference_job(name) else self.run_dir / "logs" / f"{name}.stdout"
        return Job(name, cmd, log_file=log_file, stdout_file=stdout, env=env)

    def ranked(self, name: str, module: str, num_ranks: int, args: list[str], env: dict[str, str]) -> Job:
        cmd = torchrun(module, num_ranks, *args) if num_ranks > 1 else python_module(module, *args)
        return self.job(name, cmd, env)

    def inference(self, cfg: Any, launch: Any, env: dict[str, str]) -> list[Job]:
        """One job per server: `inference`, or `inference_<k>` for several."""
        from rlrun.inference.launch import server_jobs

        names = server_jobs(len(launch.commands))
        return [self.job(name, cmd, {**env, **launch.env}) for name, cmd in zip(names, launch.commands, strict=True)]

    def samplers(self, cfg: Any) -> list[Job]:
        return []

    def where(self, job: Job) -> str:
        return ""
