"""Sweeps (`python -m rlrun -m ...`): one complete rlrun run per job, grouped tracker runs,
and a summary that tells the truth about every job, whichever launcher ran it.

Where each piece runs:

- submitting process: `SweepCallback.on_multirun_start` writes `<sweep>/sweep.json` and
  creates (migrates) a local MLflow SQLite store once, with a parent run for the sweep;
  the launcher starts the jobs; `on_multirun_end` writes `<sweep>/sweep_summary.csv` and
  prints the table; `python -m rlrun` exits non-zero when a job did not finish.
- each job (in this process for `basic`, a subprocess for `submitit_local`, a Slurm job
  for `submitit_slurm`): `prepare_job` names and groups its tracker runs after the sweep,
  resumes when Slurm requeued it, and `run_and_record` writes `<run>/status.json`.
- `launch_submitit` / `finish_submitit_job` are the bodies of the submitit launchers in
  `hydra_plugins.rlrun_launcher` (Hydra only loads launchers from `hydra_plugins`).

The summary reads each job's `status.json`, never only what the launcher says: with
hydra-submitit a failed task used to look COMPLETED to Slurm, and a job that Slurm killed
(time limit, scancel, node failure) writes nothing, which is reported as failed.

This module imports no torch, mlflow or submitit at import time (`--cfg job` stays cheap).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[assignment,misc]

STATUS_FILE = "status.json"
SWEEP_FILE = "sweep.json"
JOBS_FILE = "sweep_jobs.json"
SUMMARY_FILE = "sweep_summary.csv"

EXIT_FAILED = 1
EXIT_CONFIG = 2
LAUNCHERS = {
    "basic": "Hydra's default: the jobs one after another, in this process",
    "submitit_local": "the jobs at the same time, as local processes (submitit)",
    "submitit_slurm": "one Slurm job per sweep job (submitit); settings under hydra.launcher.*",
    "submitit_slurm_gpu": "submitit_slurm with GPUs: gpus_per_node, more cpus and memory",
}
SUBMITIT_LAUNCHERS = {name for name in LAUNCHERS if name.startswith("submitit")}
INSTALL_HINT = "pip install 'rlrun[slurm]'  (or: pip install hydra-submitit-launcher)"


class SweepError(CompactHydraException):
    """A sweep that cannot start; Hydra prints just this message."""


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- launcher choice (before Hydra)


def submitit_available() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


def missing_extra_message(launcher: str) -> str:
    return (
        f"hydra/launcher={launcher} needs hydra-submitit-launcher, which is not installed. "
        f"Install the slurm extra: {INSTALL_HINT}; or run the sweep without it: "
        "hydra/launcher=basic (the default)."
    )


def check_launcher_args(args: Sequence[str]) -> str | None:
    """What is wrong with the `hydra/launcher=...` on the command line (None: nothing).

    Hydra would also refuse an unknown name, but with a traceback for a missing plugin;
    this says what to do instead.
    """
    for arg in args:
        match = re.fullmatch(r"\+*hydra/launcher=(.*)", arg.strip())
        if not match:
            continue
        name = match.group(1).strip().strip("'\"")
        if name in SUBMITIT_LAUNCHERS and not submitit_available():
            return missing_extra_message(name)
        known = _known_launchers()
        if name not in known:
            choices = "\n".join(f"  hydra/launcher={n:<20} {LAUNCHERS.get(n, '(a Hydra plugin)')}" for n in known)
            return f"unknown launcher {name!r} (hydra/launcher={name}). Choose one of:\n{choices}"
    return None


def _known_launchers() -> list[str]:
    """Launcher configs Hydra can load: ours (conf/hydra/launcher), Hydra's, installed plugins'."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from rlrun.config import CONF_DIR

    names = {p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")} | {"basic"}
    Plugins.instance()  # plugins register their launcher configs when scanned
    try:
        names |= {n.removesuffix(".yaml") for n in ConfigStore.instance().list("hydra/launcher")}
    except OSError:
        pass
    return sorted(n for n in names if not n.startswith("_"))


# ---------------------------------------------------------------- this process's sweep

_SWEEP: dict[str, Any] = {}  # the multirun started in this process (the submitting one)


def sweep_failed() -> bool:
    """Did a job of this process's sweep not finish? (`main` exits non-zero then.)"""
    return bool(_SWEEP.get("failed"))


def sweep_id(sweep_dir: str | Path) -> str:
    """`outputs/multirun/2026-11-23/14-05-09` -> `2026-11-23_14-05-09`; else the folder name."""
    parts = Path(sweep_dir).parts
    if len(parts) >= 3 and parts[-3] == "multirun":
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1] if parts else "sweep"


def plan_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as Hydra's BasicSweeper will make them (None: another sweeper)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else params or {}
    arguments = [f"{k}={v}" for k, v in params.items()]  # type: ignore[union-attr]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    overrides = OverridesParser.create().parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for job in batch]


def _varying(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that differ between jobs (what the sweep is about)."""
    if len(jobs) < 2:
        return jobs
    common = set(jobs[0]).intersection(*map(set, jobs[1:]))
    return [[o for o in job if o not in common] for job in jobs]


def _mlflow_in_sweep(config: DictConfig, jobs: list[list[str]] | None, max_composed: int = 64) -> bool:
    """Does any job of the sweep log to MLflow? (The overrides may switch it on per job.)"""
    if config.logger.mlflow.enabled:
        return True
    maybe = [job for job in jobs or [] if any(("logger" in o or "experiment" in o) for o in job)]
    if not maybe:
        return False
    try:
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        return any(loader.load_sweep_config(config, job).logger.mlflow.enabled for job in maybe[:max_composed])
    except Exception:
        return any("mlflow" in o for job in maybe for o in job)


def prepare_mlflow(config: DictConfig, sweep: dict[str, Any]) -> dict[str, Any]:
    """Create (or migrate) the store and the experiment once, before any job, and a parent run.

    Several jobs creating a fresh SQLite store at the same moment race on its schema
    migration; once it exists they only append rows (and retry a locked database).
    """
    from rlrun.tracking.backends.mlflow import _client, _experiment_id, _retry_sqlite_contention, resolve_tracking_uri

    mcfg = config.logger.mlflow
    uri = resolve_tracking_uri(mcfg)
    client = _client(uri)
    experiment_id = _retry_sqlite_contention(lambda: _experiment_id(client, mcfg.experiment_name or "rlrun", uri), uri)
    tags = {"sweep": sweep["id"], "sweep_dir": sweep["dir"], "rlrun.sweep_parent": "true"}
    run = _retry_sqlite_contention(
        lambda: client.create_run(experiment_id, run_name=f"{config.name}-{sweep['id']}", tags=tags), uri
    )
    info = {"tracking_uri": uri, "experiment_name": mcfg.experiment_name, "parent_run_id": run.info.run_id}
    if uri.startswith("sqlite:") and "slurm" in str(OmegaConf.select(config, "hydra.launcher._target_") or "").lower():
        print(f"rlrun: MLflow store {uri} is a SQLite file: fine on one machine; for many concurrent Slurm jobs or "
              "nodes sharing it over NFS, run `mlflow server` and set logger.mlflow.tracking_uri=http://<host>:<port>",
              file=sys.stderr)  # fmt: skip
    return info


def _end_mlflow_parent(sweep: dict[str, Any], status: str) -> None:
    mlflow_info = sweep.get("mlflow") or {}
    if not mlflow_info.get("parent_run_id"):
        return
    try:
        from rlrun.tracking.backends.mlflow import _client, _retry_sqlite_contention

        uri = mlflow_info["tracking_uri"]
        client = _client(uri)
        _retry_sqlite_contention(lambda: client.set_terminated(mlflow_info["parent_run_id"], status=status), uri)
    except Exception as exc:
        print(f"rlrun: could not end the sweep's MLflow parent run: {exc}", file=sys.stderr)


class SweepCallback(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback (`hydra.callbacks.rlrun_sweep` in conf/config.yaml).

    Hydra turns an exception in a callback into a warning, so nothing here may be what
    stops a broken sweep: the launchers check what must be right before submitting.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            jobs = plan_jobs(config)
        except Exception:
            jobs = None
        sweep: dict[str, Any] = {
            "id": sweep_id(sweep_dir),
            "dir": str(sweep_dir),
            "name": config.name,
            "started_at": _now(),
            "launcher": str(OmegaConf.select(config, "hydra.launcher._target_") or ""),
            "jobs": [{"job": i, "overrides": o} for i, o in enumerate(jobs)] if jobs is not None else None,
            "mlflow": None,
        }
        _SWEEP.clear()
        _SWEEP.update(dir=sweep_dir, summarized=False, failed=False, info=sweep)
        if _mlflow_in_sweep(config, jobs):
            try:
                sweep["mlflow"] = prepare_mlflow(config, sweep)
            except Exception as exc:  # the jobs still create their runs; they retry a locked store
                print(f"rlrun: could not prepare the MLflow store for the sweep: {exc}", file=sys.stderr)
        _write_json(sweep_dir / SWEEP_FILE, sweep)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(Path(str(config.hydra.sweep.dir)).resolve())


def finish_interrupted_sweep() -> None:
    """`main` calls this when Hydra is done: a sweep that stopped before its end callback
    (Ctrl-C, a launcher error) still gets its summary and its MLflow parent run closed."""
    if not _SWEEP or _SWEEP.get("summarized"):
        return
    sweep_dir = Path(_SWEEP["dir"])
    if (sweep_dir / JOBS_FILE).is_file() or _job_dirs(sweep_dir):
        summarize(sweep_dir, interrupted=True)
    else:  # refused before any job started (a launcher error): the error says it all
        _end_mlflow_parent(_SWEEP.get("info") or {}, "FAILED")
        _SWEEP.update(summarized=True, failed=True)


# ---------------------------------------------------------------- each job


def restart_count() -> int:
    """How often Slurm requeued this job (preemption, `scontrol requeue`, a timeout requeue)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def should_resume(run_dir: Path) -> bool:
    """A requeued Slurm job finds its own run directory from the attempt before: continue it."""
    return restart_count() > 0 and (run_dir / "config.yaml").is_file()


def _visible_gpus() -> int | None:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip() not in ("", "-1", "NoDevFiles")])
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    return int(gpus) if gpus and gpus.isdigit() else None


def gpus_needed(cfg: DictConfig) -> int:
    """GPUs a run uses: one per CUDA trainer rank, plus vLLM's own (it never shares one)."""
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
    need, gpus = gpus_needed(cfg), _visible_gpus()
    if need and gpus is not None and gpus < need:
        return (
            f"this run needs {need} GPU(s) (trainer.num_ranks={cfg.trainer.num_ranks} on trainer.device="
            f"{cfg.trainer.device}, inference on {OmegaConf.select(cfg, 'inference.backend', default='local')}) "
            f"but its Slurm job has {gpus}: set hydra.launcher.gpus_per_node={need}"
        )
    return None


def job_info(hc: Any) -> dict[str, Any]:
    """This sweep job's number, overrides and sweep, from Hydra's runtime config."""
    sweep_dir = Path(str(hc.sweep.dir)).resolve()
    sweep = _read_json(sweep_dir / SWEEP_FILE) or {"id": sweep_id(sweep_dir), "dir": str(sweep_dir)}
    return {
        "job": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "override_dirname": str(hc.job.override_dirname),
        "sweep": sweep,
    }


def prepare_job(cfg: DictConfig, run_dir: Path, info: dict[str, Any]) -> DictConfig:
    """Name, group and tag this job's tracker runs after its sweep; resume a requeued job."""
    if cfg.output_dir and not OmegaConf.is_interpolation(cfg, "output_dir"):
        raise ValueError(
            f"output_dir={cfg.output_dir!r} would be shared by every job of the sweep: leave it unset "
            "(each job gets <hydra.sweep.dir>/<job number>) or make it depend on ${hydra:job.num}"
        )
    sweep, num = info["sweep"], info["job"]
    cfg = cfg.copy()
    raw_wandb = OmegaConf.to_container(cfg.logger.wandb, resolve=False)
    raw_mlflow = OmegaConf.to_container(cfg.logger.mlflow, resolve=False)
    with open_dict(cfg):
        # Runs of one sweep share names otherwise: `<name>-<job>` (-trainer / -orchestrator on W&B).
        if raw_wandb.get("name") == "${name}":  # type: ignore[union-attr]
            cfg.logger.wandb.name = f"{cfg.name}-{num}"
        if raw_mlflow.get("run_name") == "${name}":  # type: ignore[union-attr]
            cfg.logger.mlflow.run_name = f"{cfg.name}-{num}"
        if not cfg.logger.wandb.group:
            cfg.logger.wandb.group = sweep["id"]
        tags = list(cfg.logger.wandb.tags)
        for tag in [f"sweep:{sweep['id']}", *info["overrides"]]:
            if len(tag) <= 64 and tag not in tags:  # W&B's limit per tag
                tags.append(tag)
        cfg.logger.wandb.tags = tags
        mlflow_tags = {
            "sweep": sweep["id"],
            "sweep_dir": sweep["dir"],
            "sweep_job": str(num),
            "overrides": info["override_dirname"],
        }
        parent = sweep.get("mlflow") or {}
        if parent.get("parent_run_id"):
            from rlrun.tracking.backends.mlflow import resolve_tracking_uri

            if resolve_tracking_uri(cfg.logger.mlflow) == parent.get("tracking_uri"):
                mlflow_tags["mlflow.parentRunId"] = parent["parent_run_id"]  # nested under the sweep's run
        cfg.logger.mlflow.tags = {**mlflow_tags, **cfg.logger.mlflow.tags}
        if not cfg.resume_from and should_resume(run_dir):
            cfg.resume_from = str(run_dir)
    return cfg


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last training reward, the newest evaluation reward and the last trained step."""
    out: dict[str, Any] = {"reward": None, "eval_reward": None, "steps": 0}
    for job, keys in (("orchestrator", ("reward", "eval/reward")), ("trainer", ())):
        path = run_dir / "metrics" / f"{job}.jsonl"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("type") != "metrics":
                    continue
                metrics = record.get("metrics", {})
                if job == "trainer":
                    out["steps"] = max(out["steps"], int(record.get("step") or 0))
                for key, name in zip(keys, ("reward", "eval_reward")):
                    if key in metrics:
                        out[name] = metrics[key]
    return out


def _status_name(code: int) -> str:
    return "done" if code == 0 else "stopped" if code >= 128 else "failed"


def write_status(paths: Sequence[Path], status: dict[str, Any]) -> None:
    for path in dict.fromkeys(paths):
        _write_json(path / STATUS_FILE, status)


def run_and_record(run: Any, cfg: DictConfig, run_dir: Path, info: dict[str, Any] | None, hydra_dir: Path) -> int:
    """`run(cfg, run_dir)` with `<run>/status.json`: `running` while it runs, then how it ended.

    A job that dies without a word (SIGKILL, a node failure, a Slurm time limit) leaves
    `running` behind, which the sweep summary reports as failed.
    """
    status: dict[str, Any] = {
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
        "started_at": _now(),
    }
    paths = [run_dir, hydra_dir]
    write_status(paths, status)
    code: int = EXIT_FAILED
    try:
        problem = check_allocation(cfg) or _config_problem(cfg)
        if problem:
            print(f"rlrun: config error: {problem}", file=sys.stderr)
            status["message"] = f"config error: {problem}"
            code = EXIT_CONFIG
        else:
            code = int(run(cfg, run_dir))
            if code:
                status["message"] = _failure_message(code, run_dir)
    except BaseException as exc:  # SystemExit on a submitit requeue, KeyboardInterrupt, a bug
        code = 128 + 15 if isinstance(exc, (SystemExit, KeyboardInterrupt)) else EXIT_FAILED
        status["message"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        status.update(final_metrics(run_dir), status=_status_name(code), exit_code=code, ended_at=_now())
        write_status(paths, status)
    return code


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


_LOG_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\s+\S+ \S+ (.*)$")


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


# ---------------------------------------------------------------- the summary


COLUMNS = ["job", "overrides", "status", "final_reward", "eval_reward", "steps", "max_steps", "exit_code",
           "slurm_job_id", "slurm_state", "message", "run_dir", "all_overrides"]  # fmt: skip


def _job_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Job folders that Hydra created: `<sweep>/<subdir>/.hydra/` with the job's number."""
    found: dict[int, Path] = {}
    for hydra_yaml in sweep_dir.glob("**/.hydra/hydra.yaml"):
        job_dir = hydra_yaml.parent.parent
        if ".submitit" in job_dir.parts:
            continue
        try:
            num = OmegaConf.load(hydra_yaml).hydra.job.num
        except Exception:
            continue
        if isinstance(num, int):
            found[num] = job_dir
    return found


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: overrides, status, final reward, Slurm's view; missing -> failed."""
    sweep = _read_json(sweep_dir / SWEEP_FILE) or {}
    launched = {int(j["job"]): j for j in (_read_json(sweep_dir / JOBS_FILE) or {}).get("jobs", [])}
    planned = {int(j["job"]): j["overrides"] for j in sweep.get("jobs") or []}
    dirs = _job_dirs(sweep_dir)
    rows = []
    for num in sorted(set(planned) | set(launched) | set(dirs)):
        job_dir = dirs.get(num, sweep_dir / str(num))
        status = _read_json(job_dir / STATUS_FILE) or {}
        record = launched.get(num, {})
        overrides = planned.get(num) or record.get("overrides") or status.get("overrides")
        if overrides is None and (job_dir / ".hydra" / "overrides.yaml").is_file():
            overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        row: dict[str, Any] = {
            "job": num,
            "all_overrides": list(overrides or []),
            "status": status.get("status"),
            "final_reward": status.get("reward"),
            "eval_reward": status.get("eval_reward"),
            "steps": status.get("steps"),
            "max_steps": status.get("max_steps"),
            "exit_code": status.get("exit_code"),
            "slurm_job_id": record.get("slurm_job_id") or status.get("slurm_job_id"),
            "slurm_state": record.get("state"),
            "message": status.get("message") or "",
            "run_dir": status.get("run_dir") or str(job_dir),
        }
        if row["final_reward"] is None:  # a job that died before writing its end status
            metrics = final_metrics(Path(row["run_dir"]))
            row.update(final_reward=metrics["reward"], eval_reward=metrics["eval_reward"], steps=metrics["steps"])
        if row["status"] != "done":
            reasons = [row["message"]]
            if row["status"] != "failed":  # the job did not say why: what Slurm and submitit saw
                if not status:
                    reasons.insert(0, "never started" if not job_dir.is_dir() else "no status.json")
                elif row["status"] == "running":
                    reasons.insert(0, "ended without writing its status (killed?)")
                if record.get("state") and record["state"] not in ("COMPLETED", "COMPLETING"):
                    reasons.append(f"Slurm state {record['state']}")
                if record.get("error"):
                    reasons.append(record["error"])
            row["message"] = "; ".join(dict.fromkeys(r for r in reasons if r))
            row["status"] = "failed"
        rows.append(row)
    varying = _varying([r["all_overrides"] for r in rows])
    for row, vary in zip(rows, varying):
        row["overrides"] = " ".join(vary)
        row["all_overrides"] = " ".join(row["all_overrides"])
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def print_table(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for name in ("job", "overrides", "status", "reward", "eval reward", "steps", "slurm", "message"):
        table.add_column(name, overflow="fold")
    for row in rows:
        style = "green" if row["status"] == "done" else "red"
        slurm = " ".join(str(x) for x in (row["slurm_job_id"], row["slurm_state"]) if x) or "-"
        steps = f"{num(row['steps'])}/{num(row['max_steps'])}"
        table.add_row(str(row["job"]), row["overrides"] or "-", f"[{style}]{row['status']}[/{style}]",
                      num(row["final_reward"]), num(row["eval_reward"]), steps, slurm, row["message"])  # fmt: skip
    console = Console(stderr=False, width=max(120, shutil.get_terminal_size((160, 20)).columns))
    console.print(table)
    done = sum(r["status"] == "done" for r in rows)
    console.print(f"{done}/{len(rows)} jobs done; summary in {sweep_dir / SUMMARY_FILE}")


def summarize(sweep_dir: Path, interrupted: bool = False) -> list[dict[str, Any]]:
    """Write `sweep_summary.csv`, print the table, end the MLflow parent run; remember failure."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    failed = interrupted or not rows or any(r["status"] != "done" for r in rows)
    if rows:
        write_csv(rows, sweep_dir / SUMMARY_FILE)
        print_table(rows, sweep_dir)
    sweep = _read_json(sweep_dir / SWEEP_FILE) or _SWEEP.get("info") or {}
    _end_mlflow_parent(sweep, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    if _SWEEP and Path(_SWEEP["dir"]) == sweep_dir:
        _SWEEP.update(summarized=True, failed=failed)
    return rows


# ---------------------------------------------------------------- submitit launchers


def _launcher_name(launcher: Any) -> str:
    return f"submitit_{launcher._EXECUTOR}"


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
    partition = params.get("partition")
    if partition:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise SweepError(f"could not list Slurm partitions (sinfo: {out.stderr.strip() or out.returncode}); "
                             "is slurmctld reachable?")  # fmt: skip
        partitions = sorted({p.strip().rstrip("*") for p in out.stdout.split() if p.strip()})
        wanted = [p.strip() for p in str(partition).split(",")]
        unknown = [p for p in wanted if p not in partitions]
        if unknown:
            raise SweepError(
                f"Slurm partition {', '.join(map(repr, unknown))} does not exist on this cluster "
                f"(hydra.launcher.partition={partition}). Partitions here: {', '.join(partitions) or 'none'}. "
                "Set hydra.launcher.partition=<one of them>, or leave it unset for the cluster's default."
            )


def test_submission(slurm_executor: Any) -> None:
    """`sbatch --test-only` on the job script submitit would submit: Slurm says now whether it
    would ever run it (a cluster without EnforcePartLimits accepts a job asking for more than
    any node has, and leaves it pending forever)."""
    import tempfile

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
        try:
            cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
        except ConfigError as exc:
            problems.append(f"  job #{idx} ({' '.join(overrides)}): {exc}")
    if problems:
        raise SweepError("config errors; no job was submitted:\n" + "\n".join(problems))


def _slurm_watcher() -> Any:
    """submitit's Slurm state watcher, working without accounting.

    submitit asks `sacct`; on a cluster without slurmdbd (accounting_storage/none) that
    fails, submitit warns "status may be inaccurate" and sees every job as UNKNOWN (still
    running) forever, so a job killed before it wrote its result would hang the sweep.
    Then this asks `scontrol show job` (and counts a job slurmctld forgot as ended).
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        sacct_works: bool | None = None

        def update(self) -> None:
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return
            self._num_calls += 1
            info = None
            if self.sacct_works is not False:
                command = self._make_command()
                try:
                    assert command is not None
                    out = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout
                    info = self.read_info(out)
                    self.sacct_works = True
                except Exception:
                    if self.sacct_works is None:
                        self.sacct_works = False  # no accounting here: ask slurmctld from now on
            if info is None:
                info = scontrol_states(to_check, self._registered - self._finished)
            if info is not None:
                self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return Watcher(delay_s=60)


_SCONTROL_FIELDS = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState)=(\S+)")


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


def launch_submitit(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """hydra-submitit-launcher's `launch`, except that a job that failed, timed out or was
    killed is a result (reported by the summary), not an exception that ends the sweep;
    and job states are right without `sacct`."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm as submitit_slurm

    config, kind = launcher.config, launcher._EXECUTOR
    params = dict(launcher.params)
    if kind == "slurm":
        check_slurm(params)
        submitit_slurm.SlurmJob.watcher = _slurm_watcher()
    validate_jobs(launcher, job_overrides, initial_job_idx)

    init_params = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init_params[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=kind, **init_params)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = ("submitit_folder", "max_num_timeout")
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items() if k not in skip})

    if kind == "slurm":
        test_submission(executor._executor)

    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    name = _launcher_name(launcher)
    print(f"rlrun: {name}: {len(job_overrides)} job(s), sweep directory {sweep_dir}", file=sys.stderr)
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        print(f"\t#{idx} : {' '.join(filter_overrides(overrides))}", file=sys.stderr)
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    try:
        jobs = executor.map_array(launcher, *zip(*job_params))
    except Exception as exc:  # submitit's FailedJobError carries sbatch's stderr
        detail = str(exc).strip() or type(exc).__name__
        raise SweepError(
            f"Slurm refused the sweep's jobs: {detail}\nCheck hydra.launcher.* (partition, timeout_min, "
            "cpus_per_task, gpus_per_node, mem_gb) against what the partition offers (`sinfo -o '%P %c %m %G %l'`)."
        ) from exc

    jobs_file = sweep_dir / JOBS_FILE
    record = _read_json(jobs_file) or {"jobs": []}
    entries = {int(j["job"]): j for j in record["jobs"]}
    for (overrides, _, idx, _, _), job in zip(job_params, jobs):
        entries[idx] = {"job": idx, "overrides": overrides, "slurm_job_id": job.job_id if kind == "slurm" else None,
                        "submitit_job_id": job.job_id, "state": None, "error": None}  # fmt: skip
    _write_json(jobs_file, {"launcher": _launcher_name(launcher), "jobs": [entries[k] for k in sorted(entries)]})

    def save() -> None:
        _write_json(jobs_file, {"launcher": _launcher_name(launcher), "jobs": [entries[k] for k in sorted(entries)]})

    results = []
    for (overrides, _, idx, _, _), job in zip(job_params, jobs):
        entry = entries[idx]
        try:
            ret = job.results()[0]
        except Exception as exc:  # failed (our JobFailed), or killed / timed out without a result
            entry["error"] = _error_line(exc)
            ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=EXIT_FAILED,
                            working_dir=str(sweep_dir / str(idx)), task_name=str(config.hydra.job.name))  # fmt: skip
        save()
        results.append(ret)
    if kind == "slurm":  # Slurm's last word on each job (a result file comes before the job's end)
        deadline = time.monotonic() + 30
        while True:
            states = {idx: _job_state(job) for (_, _, idx, _, _), job in zip(job_params, jobs)}
            if all(s not in _UNFINISHED for s in states.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        for idx, state in states.items():
            entries[idx]["state"] = state
        save()
    return results


def _error_line(exc: BaseException, limit: int = 300) -> str:
    """One line for the summary out of submitit's exception (which carries the job's traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in reversed(lines):  # the job's own exception: `module.Error: message`
        if re.match(r"^[\w.]+(Error|Exception|JobFailed): ", line):
            return line[:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


_UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "UNKNOWN", None}


def _job_state(job: Any) -> str | None:
    try:
        return str(job.watcher.get_state(job.job_id, mode="force")).split()[0] or None
    except Exception:
        return None


class JobFailed(RuntimeError):
    """Raised at the end of a submitit job whose run failed, so that Slurm records FAILED."""


def finish_submitit_job(ret: Any) -> Any:
    """In the job, after Hydra ran it: pass a success through; make a failure visible to Slurm.

    hydra-submitit returns normally for a failed task, so Slurm showed COMPLETED; raising
    here makes submitit store the error and exit non-zero (Slurm: FAILED). A run stopped by
    a signal (Slurm requeueing, preempting, cancelling it or its time limit) leaves no
    result at all: a requeued job runs again, and Slurm's own state reports the others.
    """
    from hydra.core.utils import JobStatus

    if ret.status == JobStatus.COMPLETED:
        code = ret.return_value
    else:
        code = EXIT_FAILED
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
    raise JobFailed(f"rlrun job {overrides!r} exited {code}; see {workdir}/status.json and logs/rl.log")
