"""What runs inside each sweep job: in this process for `basic`, a subprocess for
`submitit_local`, a Slurm job for `submitit_slurm`.

`prepare_job` names and groups the job's tracker runs after its sweep (else every job's
runs share one name) and resumes a job that Slurm requeued; `run_and_record` writes
`<run>/status.json`, the job's own word on how it ended, which the summary trusts over
whatever the launcher says.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rlrun.gpus import allocated_gpu_count
from rlrun.launcher import EXIT_CONFIG, EXIT_DOCTOR, EXIT_FAILED
from rlrun.rundir import read_json, write_json
from rlrun.sweep.summary import STATUS_FILE, SWEEP_FILE, final_metrics, sweep_id, timestamp
from rlrun.tracking.runs import resolve_tracking_uri

_LOG_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\s+\S+ \S+ (.*)$")


def job_info(hc: Any) -> dict[str, Any]:
    """This sweep job's number, overrides and sweep, from Hydra's runtime config."""
    sweep_dir = Path(str(hc.sweep.dir)).resolve()
    sweep = read_json(sweep_dir / SWEEP_FILE, default=None) or {"id": sweep_id(sweep_dir), "dir": str(sweep_dir)}
    return {
        "job": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "override_dirname": str(hc.job.override_dirname),
        "sweep": sweep,
    }


def restart_count() -> int:
    """How often Slurm requeued this job (preemption, `scontrol requeue`, a timeout requeue)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def should_resume(run_dir: Path) -> bool:
    """A requeued Slurm job finds its own run directory from the attempt before: continue it."""
    return restart_count() > 0 and (run_dir / "config.yaml").is_file()


def prepare_job(cfg: DictConfig, run_dir: Path, info: dict[str, Any]) -> DictConfig:
    """Name, group and tag this job's tracker runs after its sweep; resume a requeued job."""
    if cfg.output_dir and not OmegaConf.is_interpolation(cfg, "output_dir"):
        raise ValueError(
            f"output_dir={cfg.output_dir!r} would be shared by every job of the sweep: leave it unset "
            "(each job gets <hydra.sweep.dir>/<job number>) or make it depend on ${hydra:job.num}"
        )
    cfg = cfg.copy()
    with open_dict(cfg):
        _name_wandb_run(cfg, info)
        _name_mlflow_run(cfg, info)
        if not cfg.resume_from and should_resume(run_dir):
            cfg.resume_from = str(run_dir)
    return cfg


def _name_wandb_run(cfg: DictConfig, info: dict[str, Any]) -> None:
    """`<name>-<job>` (-trainer / -orchestrator), grouped by the sweep, tagged with the overrides."""
    sweep, wandb = info["sweep"], cfg.logger.wandb
    if OmegaConf.to_container(wandb, resolve=False).get("name") == "${name}":  # type: ignore[union-attr]
        wandb.name = f"{cfg.name}-{info['job']}"  # the runs of one sweep share a name otherwise
    if not wandb.group:
        wandb.group = sweep["id"]
    tags = list(wandb.tags)
    for tag in [f"sweep:{sweep['id']}", *info["overrides"]]:
        if len(tag) <= 64 and tag not in tags:  # W&B's limit per tag
            tags.append(tag)
    wandb.tags = tags


def _name_mlflow_run(cfg: DictConfig, info: dict[str, Any]) -> None:
    """`<name>-<job>`, tagged with the sweep, nested under the sweep's parent run on its store."""
    sweep, mlflow = info["sweep"], cfg.logger.mlflow
    if OmegaConf.to_container(mlflow, resolve=False).get("run_name") == "${name}":  # type: ignore[union-attr]
        mlflow.run_name = f"{cfg.name}-{info['job']}"
    tags = {"sweep": sweep["id"], "sweep_dir": sweep["dir"], "sweep_job": str(info["job"]),
            "overrides": info["override_dirname"]}  # fmt: skip
    parent = sweep.get("mlflow") or {}
    if parent.get("parent_run_id") and resolve_tracking_uri(mlflow) == parent.get("tracking_uri"):
        tags["mlflow.parentRunId"] = parent["parent_run_id"]
    mlflow.tags = {**tags, **mlflow.tags}


def gpus_needed(cfg: DictConfig) -> int:
    """GPUs a run uses: one per CUDA trainer rank, plus vLLM's own (vLLM shares none with the
    trainer); the local server on CUDA shares the trainer's first GPU (one at least)."""
    need = int(cfg.trainer.num_ranks) if cfg.trainer.device == "cuda" else 0
    if OmegaConf.select(cfg, "inference.backend", default="local") == "vllm":
        need += int(OmegaConf.select(cfg, "inference.tensor_parallel_size", default=1))
    elif str(cfg.inference.device).startswith("cuda"):
        need = max(need, 1)
    return need


def check_allocation(cfg: DictConfig) -> str | None:
    """In a Slurm job, the run must fit the GPUs of the allocation (they are all it can see)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    need, gpus = gpus_needed(cfg), allocated_gpu_count()
    if need and gpus is not None and gpus < need:
        return (
            f"this run needs {need} GPU(s) (trainer.num_ranks={cfg.trainer.num_ranks} on trainer.device="
            f"{cfg.trainer.device}, inference on {OmegaConf.select(cfg, 'inference.backend', default='local')}) "
            f"but its Slurm job has {gpus}: set hydra.launcher.gpus_per_node={need}"
        )
    return None


def run_and_record(
    run: Callable[[DictConfig, Path], int], cfg: DictConfig, run_dir: Path, info: dict[str, Any] | None, hydra_dir: Path
) -> int:
    """`run(cfg, run_dir)` with `<run>/status.json`: `running` while it runs, then how it ended.

    A job that dies without a word (SIGKILL, a node failure, a Slurm time limit) leaves
    `running` behind, which the sweep summary reports as failed.
    """
    status = _start_status(cfg, run_dir, info)
    paths = [run_dir, hydra_dir]
    _write_status(paths, status)
    code: int = EXIT_FAILED
    try:
        code, status["message"] = _run_checked(run, cfg, run_dir)
    except BaseException as exc:  # SystemExit on a submitit requeue, KeyboardInterrupt, a bug
        code = 128 + 15 if isinstance(exc, (SystemExit, KeyboardInterrupt)) else EXIT_FAILED
        status["message"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        status.update(final_metrics(run_dir), status=_status_name(code), exit_code=code, ended_at=timestamp())
        _write_status(paths, status)
    return code


def _start_status(cfg: DictConfig, run_dir: Path, info: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "status": "running",
        "exit_code": None,
        "message": "",
        "run_dir": str(run_dir),
        "job": info["job"] if info else None,
        "overrides": info["overrides"] if info else None,
        "override_dirname": info["override_dirname"] if info else None,
        "sweep": info["sweep"]["id"] if info else None,
        "slurm_job_id": _slurm_job_id(),
        "attempt": restart_count() + 1,
        "resumed": bool(cfg.resume_from),
        "host": socket.gethostname(),
        "max_steps": int(cfg.max_steps),
        "started_at": timestamp(),
    }


def _run_checked(run: Callable[[DictConfig, Path], int], cfg: DictConfig, run_dir: Path) -> tuple[int, str]:
    """The run's exit code and what went wrong ("" when nothing); a bad config is not run."""
    problem = check_allocation(cfg) or _config_problem(cfg)
    if problem:
        print(f"rlrun: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG, f"config error: {problem}"
    code = int(run(cfg, run_dir))
    return code, _failure_message(code, run_dir) if code else ""


def _status_name(code: int) -> str:
    if code == EXIT_DOCTOR:
        return "stopped by doctor"
    return "done" if code == 0 else "stopped" if code >= 128 else "failed"


def _write_status(paths: list[Path], status: dict[str, Any]) -> None:
    for path in dict.fromkeys(paths):  # the run directory and Hydra's job directory, once if the same
        write_json(path / STATUS_FILE, status)


def _config_problem(cfg: DictConfig) -> str | None:
    from rlrun.config import ConfigError, validate

    try:
        validate(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def _failure_message(code: int, run_dir: Path) -> str:
    if code >= 128:
        import signal

        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"stopped by {name}"
    log = run_dir / "logs" / "rl.log"
    error = _last_error(log)
    return f"exit code {code}: {error} (see {log})" if error else f"exit code {code}; see {log}"


def _last_error(log: Path, limit: int = 200) -> str:
    """The first ERROR line of the parent's log (what went wrong first), shortened."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        match = _LOG_LINE.match(line)
        if match:
            text = match.group(2).strip()
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return ""


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")
