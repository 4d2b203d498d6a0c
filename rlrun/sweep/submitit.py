"""The submitit launchers' work (`hydra/launcher=submitit_slurm`, `submitit_local`).

`launch_submitit` runs in the submitting process and `finish_submitit_job` in each job;
they are the bodies of the launchers in `hydra_plugins.rlrun_launcher` (Hydra loads
launchers only from `hydra_plugins`). This is the one module that touches submitit's and
hydra-submitit-launcher's internals: their launcher raises when a job fails (ending the
whole sweep), reports a failed run as COMPLETED to Slurm, and hangs without `sacct`.

submitit is imported by the functions that use it, never at import time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from rlrun.launcher import EXIT_FAILED
from rlrun.rundir import read_json, write_json
from rlrun.sweep.cli import SweepError
from rlrun.sweep.summary import JOBS_FILE

_SCONTROL_FIELDS = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState)=(\S+)")
_UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "UNKNOWN", None}


class RunFailed(RuntimeError):
    """Raised at the end of a submitit job whose run failed, so that Slurm records FAILED."""


# ---------------------------------------------------------------- checks before submitting


def check_slurm(params: dict[str, Any]) -> None:
    """Refuse what Slurm would refuse, or what rlrun cannot run, before anything is submitted."""
    for tool in ("sbatch", "srun", "squeue", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            raise SweepError(
                f"hydra/launcher=submitit_slurm: `{tool}` not found, so this is not a Slurm login/compute node. "
                "Run the sweep where Slurm's commands work, or use hydra/launcher=submitit_local "
                "(same jobs, local processes) or hydra/launcher=basic."
            )
    if int(params.get("nodes") or 1) != 1 or int(params.get("tasks_per_node") or 1) != 1:
        raise SweepError(
            "hydra.launcher.nodes and hydra.launcher.tasks_per_node must be 1: each sweep job is one rlrun run "
            "that starts its own inference, orchestrator and trainer processes on one node. For more trainer "
            "ranks set trainer.num_ranks=N with hydra.launcher.gpus_per_node=N (trainer.device=cuda)."
        )
    if params.get("partition"):
        _check_partition(str(params["partition"]))


def _check_partition(partition: str) -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SweepError(f"could not list Slurm partitions (sinfo: {out.stderr.strip() or out.returncode}); "
                         "is slurmctld reachable?")  # fmt: skip
    partitions = sorted({p.strip().rstrip("*") for p in out.stdout.split() if p.strip()})
    unknown = [p for p in (w.strip() for w in partition.split(",")) if p not in partitions]
    if unknown:
        raise SweepError(
            f"Slurm partition {', '.join(map(repr, unknown))} does not exist on this cluster "
            f"(hydra.launcher.partition={partition}). Partitions here: {', '.join(partitions) or 'none'}. "
            "Set hydra.launcher.partition=<one of them>, or leave it unset for the cluster's default."
        )


def check_submission(slurm_executor: Any) -> None:
    """`sbatch --test-only` on the job script submitit would submit: Slurm says now whether it
    would ever run it (a cluster without EnforcePartLimits accepts a job asking for more than
    any node has, and leaves it pending forever)."""
    # Private: submitit builds its sbatch script only here; the script must be the very one submitted.
    text = slurm_executor._make_submission_file_text("true", "test")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="rlrun-test-", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        detail = " ".join(line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip())
        raise SweepError(
            f"Slurm would not run the sweep's jobs: {detail or f'sbatch --test-only exited {out.returncode}'}\n"
            "Check hydra.launcher.* (partition, timeout_min, cpus_per_task, gpus_per_node, mem_gb, account, qos) "
            "against what the partition offers: sinfo -o '%P %c %m %G %l'. Nothing was submitted."
        )


def validate_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> None:
    """Compose and check every job's config here, before any Slurm job waits in a queue."""
    from rlrun.config import ConfigError, validate

    problems = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        try:  # the launcher's `config` and `hydra_context` are what Hydra gave the plugin's setup()
            cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
        except ConfigError as exc:
            problems.append(f"  job #{idx} ({' '.join(overrides)}): {exc}")
    if problems:
        raise SweepError("config errors; no job was submitted:\n" + "\n".join(problems))


# ---------------------------------------------------------------- job states without accounting


def _slurm_watcher() -> Any:
    """submitit's Slurm state watcher, working without accounting.

    submitit asks `sacct`; on a cluster without slurmdbd (accounting_storage/none) that
    fails, submitit warns "status may be inaccurate" and sees every job as UNKNOWN (still
    running) forever, so a job killed before it wrote its result would hang the sweep.
    Then this asks `scontrol show job` (and counts a job slurmctld forgot as ended).
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):  # type: ignore[misc]
        sacct_works: bool | None = None

        # Private: `update` is submitit's one hook for how states are fetched; it reads and
        # keeps its bookkeeping (_registered, _finished, _info_dict, ...) as the base class does.
        def update(self) -> None:
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return
            self._num_calls += 1
            info = self._sacct_states() if self.sacct_works is not False else None
            if info is None:
                info = scontrol_states(to_check, self._registered - self._finished)
            if info is not None:
                self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _sacct_states(self) -> dict[str, dict[str, str]] | None:
            command = self._make_command()
            try:
                assert command is not None
                out = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout
                info: dict[str, dict[str, str]] = self.read_info(out)
            except Exception:
                if self.sacct_works is None:
                    self.sacct_works = False  # no accounting here: ask slurmctld from now on
                return None
            self.sacct_works = True
            return info

    return Watcher(delay_s=60)


def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """`scontrol -o show job` lines -> {job id (`<array>_<task>` for array tasks): {"State": ...}}."""
    states: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(_SCONTROL_FIELDS.findall(line))
        if "JobState" not in fields or "JobId" not in fields:
            continue
        state = {"State": fields["JobState"]}
        task = fields.get("ArrayTaskId")
        if fields.get("ArrayJobId") and task:
            for part in task.split("%")[0].split(","):
                low, _, high = part.partition("-")
                for i in range(int(low), int(high or low) + 1):
                    states[f"{fields['ArrayJobId']}_{i}"] = state
        else:
            states[fields["JobId"]] = state
    return states


def scontrol_states(main_ids: set[str], registered: set[str]) -> dict[str, dict[str, str]] | None:
    """States of the jobs (and array tasks) of `main_ids`; None when slurmctld did not answer."""
    states: dict[str, dict[str, str]] = {}
    for main_id in main_ids:
        out = subprocess.run(["scontrol", "-o", "show", "job", main_id], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            states.update(parse_scontrol(out.stdout))
        elif "invalid job id" in (out.stdout + out.stderr).lower():
            pass  # slurmctld forgot it (MinJobAge): it ended long ago
        else:
            return None
    for job_id in registered:  # registered but unknown to slurmctld: it has left the queue
        if job_id.split("_")[0] in main_ids and job_id not in states:
            states[job_id] = {"State": "ENDED"}
    return states


def _job_state(job: Any) -> str | None:
    try:
        return str(job.watcher.get_state(job.job_id, mode="force")).split()[0] or None
    except Exception:
        return None


# ---------------------------------------------------------------- the submitting process


@dataclass
class _Submitted:
    """One submitted sweep job: its number, its overrides, submitit's handle."""

    idx: int
    overrides: list[str]
    job: Any


@dataclass
class _JobsRecord:
    """`<sweep>/sweep_jobs.json`: each submitted job's ids, Slurm state and error, for the summary."""

    path: Path
    kind: str  # "slurm" or "local"
    entries: dict[int, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:  # jobs of an earlier batch of this sweep stay
        record = read_json(self.path, default=None) or {"jobs": []}
        self.entries = {int(j["job"]): j for j in record["jobs"]}

    def add(self, submitted: list[_Submitted]) -> None:
        for sub in submitted:
            slurm_id = sub.job.job_id if self.kind == "slurm" else None
            self.entries[sub.idx] = {"job": sub.idx, "overrides": sub.overrides, "slurm_job_id": slurm_id,
                                     "submitit_job_id": sub.job.job_id, "state": None, "error": None}  # fmt: skip
        self.save()

    def save(self) -> None:
        jobs = [self.entries[k] for k in sorted(self.entries)]
        write_json(self.path, {"launcher": f"submitit_{self.kind}", "jobs": jobs})


def launch_submitit(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """hydra-submitit-launcher's `launch`, except that a job that failed, timed out or was
    killed is a result (reported by the summary), not an exception that ends the sweep;
    and job states are right without `sacct`."""
    # Private: the plugin keeps its kind ("slurm" / "local") only in `_EXECUTOR`.
    kind = launcher._EXECUTOR
    params = dict(launcher.params)  # hydra.launcher.*, as the plugin's setup() kept them
    if kind == "slurm":
        check_slurm(params)
    validate_jobs(launcher, job_overrides, initial_job_idx)
    executor = _executor(kind, params)
    if kind == "slurm":
        check_submission(executor._executor)  # Private: AutoExecutor's SlurmExecutor, which writes the script
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"rlrun: submitit_{kind}: {len(job_overrides)} job(s), sweep directory {sweep_dir}", file=sys.stderr)
    submitted = _submit(launcher, executor, job_overrides, initial_job_idx)
    record = _JobsRecord(sweep_dir / JOBS_FILE, kind)
    record.add(submitted)
    if kind == "slurm":
        _watch_without_sacct(submitted)
    results = _results(submitted, record, sweep_dir, str(launcher.config.hydra.job.name))
    if kind == "slurm":  # Slurm's last word on each job (a result file comes before the job's end)
        for idx, state in _final_states(submitted).items():
            record.entries[idx]["state"] = state
        record.save()
    return results


def _executor(kind: str, params: dict[str, Any]) -> Any:
    """submitit's executor, set up as hydra-submitit-launcher sets it up."""
    import submitit

    # BaseQueueConf's fields are the executor's shared parameter names; the others are
    # specific to the cluster kind and take its prefix (`slurm_partition`).
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    init_params = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init_params[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=kind, **init_params)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = ("submitit_folder", "max_num_timeout")
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items() if k not in skip})
    return executor


def _submit(
    launcher: Any, executor: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[_Submitted]:
    """Submit every job (one Slurm array); each runs the launcher's `__call__`."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides

    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        print(f"\t#{idx} : {' '.join(filter_overrides(overrides))}", file=sys.stderr)
        # The arguments of the plugin's `__call__` in the job, as its own `launch` passes them.
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    try:
        jobs = executor.map_array(launcher, *zip(*job_params))
    except Exception as exc:  # submitit's FailedJobError carries sbatch's stderr
        detail = str(exc).strip() or type(exc).__name__
        raise SweepError(
            f"Slurm refused the sweep's jobs: {detail}\nCheck hydra.launcher.* (partition, timeout_min, "
            "cpus_per_task, gpus_per_node, mem_gb) against what the partition offers (`sinfo -o '%P %c %m %G %l'`)."
        ) from exc
    return [_Submitted(idx, overrides, job) for (overrides, _, idx, _, _), job in zip(job_params, jobs)]


def _watch_without_sacct(submitted: list[_Submitted]) -> None:
    """Let these jobs ask `_slurm_watcher` for their states.

    submitit's `SlurmJob.watcher` is a class attribute shared by every Slurm job of the
    process; an instance attribute on just the sweep's jobs leaves submitit as it is for
    anything else (the jobs registered with the class-wide watcher too, which is never asked).
    """
    watcher = _slurm_watcher()
    for sub in submitted:
        sub.job.watcher = watcher
        watcher.register_job(sub.job.job_id)


def _results(submitted: list[_Submitted], record: _JobsRecord, sweep_dir: Path, task_name: str) -> list[Any]:
    """Each job's JobReturn, waiting for it; a job without a result failed (its error recorded)."""
    from hydra.core.utils import JobReturn, JobStatus

    results = []
    for sub in submitted:
        try:
            ret = sub.job.results()[0]
        except Exception as exc:  # failed (our RunFailed), or killed / timed out without a result
            record.entries[sub.idx]["error"] = _error_line(exc)
            ret = JobReturn(overrides=sub.overrides, status=JobStatus.COMPLETED, _return_value=EXIT_FAILED,
                            working_dir=str(sweep_dir / str(sub.idx)), task_name=task_name)  # fmt: skip
        record.save()
        results.append(ret)
    return results


def _final_states(submitted: list[_Submitted], timeout_s: float = 30) -> dict[int, str | None]:
    """Slurm's state of each job once it has left the queue (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {sub.idx: _job_state(sub.job) for sub in submitted}
        if all(s not in _UNFINISHED for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _error_line(exc: BaseException, limit: int = 300) -> str:
    """One line for the summary out of submitit's exception (which carries the job's traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in reversed(lines):  # the job's own exception: `module.Error: message`
        if re.match(r"^[\w.]+(Error|Exception|RunFailed): ", line):
            return line[:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


# ---------------------------------------------------------------- in each job


def finish_submitit_job(ret: Any) -> Any:
    """In the job, after Hydra ran it: pass a success through; make a failure visible to Slurm.

    hydra-submitit returns normally for a failed task, so Slurm showed COMPLETED; raising
    here makes submitit store the error and exit non-zero (Slurm: FAILED). A run stopped by
    a signal (Slurm requeueing, preempting, cancelling it or its time limit) leaves no
    result at all: a requeued job runs again, and Slurm's own state reports the others.
    """
    from hydra.core.utils import JobStatus

    code = ret.return_value if ret.status == JobStatus.COMPLETED else EXIT_FAILED
    code = int(code or 0) if isinstance(code, (int, type(None))) else EXIT_FAILED
    if code == 0:
        return ret
    if code >= 128:
        raise SystemExit(code)
    try:
        workdir = str(ret.hydra_cfg.hydra.runtime.output_dir)
    except Exception:
        workdir = "its run directory"
    overrides = " ".join(ret.overrides or [])
    raise RunFailed(f"rlrun job {overrides!r} exited {code}; see {workdir}/status.json and logs/rl.log")
