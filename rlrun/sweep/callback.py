"""The sweep in the submitting process: Hydra's callback around the launcher, and its outcome.

`SweepCallback.on_multirun_start` writes `<sweep>/sweep.json` and creates (migrates) the
MLflow store once, with a parent run for the sweep; `on_multirun_end` writes the summary
and ends that run. `main()` asks `sweep_failed()` for its exit code, and calls
`finish_interrupted_sweep()` for a sweep that stopped before its end callback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rlrun.rundir import read_json, write_json
from rlrun.sweep.summary import JOBS_FILE, SWEEP_FILE, job_dirs, summarize, sweep_id, timestamp
from rlrun.tracking.runs import create_sweep_run, end_run


@dataclass
class SweepState:
    """The sweep started in this process: its directory, its sweep.json, how it ended."""

    dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    summarized: bool = False
    failed: bool = False

    def start(self, sweep_dir: Path, info: dict[str, Any]) -> None:
        self.dir, self.info, self.summarized, self.failed = sweep_dir, info, False, False

    def end(self, failed: bool) -> None:
        self.summarized, self.failed = True, failed


# Hydra constructs SweepCallback itself (from hydra.callbacks in conf/config.yaml) and
# drops it, while main() needs the outcome after app() returns: the one sweep of this
# process is recorded here, outside the callback.
_STATE = SweepState()


def sweep_failed() -> bool:
    """Did a job of this process's sweep not finish? (`main` exits non-zero then.)"""
    return _STATE.failed


class SweepCallback(Callback):
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
            "started_at": timestamp(),
            "launcher": str(OmegaConf.select(config, "hydra.launcher._target_") or ""),
            "jobs": [{"job": i, "overrides": o} for i, o in enumerate(jobs)] if jobs is not None else None,
            "mlflow": None,
        }
        _STATE.start(sweep_dir, sweep)
        if _mlflow_in_sweep(config, jobs):
            try:
                sweep["mlflow"] = _create_parent_run(config, sweep)
            except Exception as exc:  # the jobs still create their runs; they retry a locked store
                print(f"rlrun: could not prepare the MLflow store for the sweep: {exc}", file=sys.stderr)
        write_json(sweep_dir / SWEEP_FILE, sweep)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _finish(Path(str(config.hydra.sweep.dir)).resolve())


def finish_interrupted_sweep() -> None:
    """`main` calls this when Hydra is done: a sweep that stopped before its end callback
    (Ctrl-C, a launcher error) still gets its summary and its MLflow parent run closed."""
    if _STATE.dir is None or _STATE.summarized:
        return
    if (_STATE.dir / JOBS_FILE).is_file() or job_dirs(_STATE.dir):
        _finish(_STATE.dir, interrupted=True)
    else:  # refused before any job started (a launcher error): the error says it all
        _end_parent_run(_STATE.info, "FAILED")
        _STATE.end(failed=True)


def _finish(sweep_dir: Path, interrupted: bool = False) -> None:
    """The summary, the MLflow parent run's end, and (for this process's sweep) its outcome."""
    rows = summarize(sweep_dir)
    failed = interrupted or not rows or any(r["status"] != "done" for r in rows)
    sweep = read_json(sweep_dir / SWEEP_FILE, default=None) or _STATE.info
    _end_parent_run(sweep, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    if _STATE.dir == sweep_dir:
        _STATE.end(failed)


def plan_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as Hydra's BasicSweeper will make them (None: another sweeper)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if not target.endswith("BasicSweeper"):
        return None
    # Hydra's own splitting of `a=1,2 b=3,4` into jobs; it has no public entry point.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else params or {}
    arguments = [f"{k}={v}" for k, v in params.items()]  # type: ignore[union-attr]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    overrides = OverridesParser.create().parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for job in batch]


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


def _create_parent_run(config: DictConfig, sweep: dict[str, Any]) -> dict[str, str]:
    """The sweep's MLflow parent run, created (with the store) once before any job starts.

    Several jobs creating a fresh SQLite store at the same moment race on its schema
    migration; once it exists they only append rows (and retry a locked database).
    """
    tags = {"sweep": sweep["id"], "sweep_dir": sweep["dir"], "rlrun.sweep_parent": "true"}
    info = create_sweep_run(config.logger.mlflow, f"{config.name}-{sweep['id']}", tags)
    if info["tracking_uri"].startswith("sqlite:") and "slurm" in sweep["launcher"].lower():
        print(f"rlrun: MLflow store {info['tracking_uri']} is a SQLite file: fine on one machine; for many "
              "concurrent Slurm jobs or nodes sharing it over NFS, run `mlflow server` and set "
              "logger.mlflow.tracking_uri=http://<host>:<port>", file=sys.stderr)  # fmt: skip
    return info


def _end_parent_run(sweep: dict[str, Any], status: str) -> None:
    parent = sweep.get("mlflow") or {}
    if not parent.get("parent_run_id"):
        return
    try:
        end_run(parent["tracking_uri"], parent["parent_run_id"], status)
    except Exception as exc:
        print(f"rlrun: could not end the sweep's MLflow parent run: {exc}", file=sys.stderr)
