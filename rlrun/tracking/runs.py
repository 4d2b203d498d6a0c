"""Tracker runs: every decision about which W&B and MLflow runs a job logs to, in one place.

- W&B: one run per job, `<id>-<job>`, in one group per rlrun run. The parent picks the
  shared `logger.wandb.id` and group once (`prepare_runs`); each job's backend derives its
  own id from it (`wandb_run_id`); a resumed job continues the id saved in its checkpoint.
- MLflow: one run per rlrun run, shared by its jobs (metric keys prefixed `<job>/`). The
  parent creates it (`prepare_runs`) and marks how it ended (`end_runs`); a sweep has a
  parent run of its own that its jobs nest under (`create_sweep_run`, `end_run`).

mlflow and wandb are imported only by the functions that use them.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("rlrun.tracking")
T = TypeVar("T")

# ---------------------------------------------------------------- W&B


def generate_wandb_id(length: int = 8) -> str:
    """A W&B-style run id (lowercase base36), chosen locally so it is known before any connection."""
    return "".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=length))


def wandb_run_id(cfg: Any, job: str, resume_ids: dict[str, str]) -> str:
    """The W&B run a job logs to: the one its checkpoint saved, else `<logger.wandb.id>-<job>`."""
    if resume_ids.get("wandb_run_id"):
        return resume_ids["wandb_run_id"]
    cfg_id = getattr(cfg, "id", None)
    if not cfg_id:
        return generate_wandb_id()
    return f"{cfg_id}-{job}" if job else str(cfg_id)


def prepare_wandb(cfg: Any, run_name: str) -> None:
    """The run's shared W&B id and group (in `cfg`, a `logger.wandb` node), unless set."""
    if not cfg.id:
        cfg.id = secrets.token_hex(4)  # the jobs' runs: <id>-trainer, <id>-orchestrator
    if not cfg.group:
        cfg.group = f"{cfg.name or run_name}-{cfg.id}"  # this run's jobs, side by side


# ---------------------------------------------------------------- MLflow: stores and clients

# The MLflow HTTP client retries a failing request for minutes by default (7 retries with
# exponential backoff, 120 s timeout), which would stall a writer thread; the delivery
# layer retries with its own backoff instead. MLflow reads these per request; a value the
# user set wins.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bars from a background thread
}
# Several processes writing one SQLite store (sweep jobs): a write lock held too long.
_SQLITE_CONTENTION = ("database is locked",)


def resolve_tracking_uri(cfg: Any) -> str:
    """`cfg.tracking_uri`, else $MLFLOW_TRACKING_URI, else a SQLite store at ./outputs/mlflow.db.

    The parent resolves this once and hands the result to its jobs (their working
    directory may differ, which would move the cwd-relative default).
    """
    uri = getattr(cfg, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    return f"sqlite:///{Path('outputs').resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def mlflow_client(uri: str) -> Any:
    """A client for `uri`; a local SQLite store's directory is created first.

    Creating the client creates or migrates a SQLite store's schema; processes doing that
    at the same moment (the jobs of a sweep on a fresh store) break each other's
    migration, so they take turns under a file lock next to the store.
    """
    import mlflow

    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if (db := sqlite_path(uri)) is None:
        return mlflow.MlflowClient(tracking_uri=uri)
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return mlflow.MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def retry_sqlite_contention(fn: Callable[[], T], uri: str, timeout_s: float = 120.0) -> T:
    """`fn()`, retried while a SQLite store is locked by another process (servers: once)."""
    if sqlite_path(uri) is None:
        return fn()
    deadline, delay = time.monotonic() + timeout_s, 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not any(s in str(exc) for s in _SQLITE_CONTENTION) or time.monotonic() > deadline:
                raise
            log.warning("mlflow: %s busy (%s); retrying", uri, str(exc).splitlines()[0][:120])
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _local_artifact_location(uri: str, experiment_name: str) -> str | None:
    """Artifacts of experiments we create next to a local SQLite store; servers decide their own."""
    db_path = sqlite_path(uri)
    if db_path is None:
        return None
    safe_name = re.sub(r"[^\w.-]", "_", experiment_name) or "default"
    return str(db_path.resolve().parent / "mlartifacts" / safe_name)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created when missing; a deleted one is an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri, name))
        except MlflowException as e:
            # Another process (the other job, a sweep sibling) created it between our get and create.
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise RuntimeError(f"MLflow experiment {name!r} reported as existing but cannot be read")
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} at {uri} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
            "or choose another logger.mlflow.experiment_name"
        )
    return experiment.experiment_id


# ---------------------------------------------------------------- MLflow: runs


def ensure_run(cfg: Any, run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """The MLflow run id to log to, creating experiment and run when needed.

    With `cfg.run_id` set, checks the run exists (MlflowException otherwise) and returns it.
    Otherwise gets or creates `cfg.experiment_name` and creates a run named `cfg.run_name`
    (else `run_name`) with `cfg.tags`.
    """
    uri = tracking_uri or resolve_tracking_uri(cfg)

    def attempt() -> str:
        client = mlflow_client(uri)
        run_id = getattr(cfg, "run_id", None)
        if run_id:
            client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for a wrong id
            return str(run_id)
        exp_id = experiment_id(client, getattr(cfg, "experiment_name", None) or "rlrun", uri)
        tags = {str(k): str(v) for k, v in (getattr(cfg, "tags", None) or {}).items()}
        name = getattr(cfg, "run_name", None) or run_name
        return client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    return retry_sqlite_contention(attempt, uri)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    retry_sqlite_contention(lambda: mlflow_client(tracking_uri).set_terminated(run_id, status=status), tracking_uri)


def create_sweep_run(cfg: Any, run_name: str, tags: dict[str, str]) -> dict[str, str]:
    """A sweep's parent run (its jobs' runs nest under it); creates or migrates the store first.

    Several jobs creating a fresh SQLite store at the same moment race on its schema
    migration; once it exists they only append rows (and retry a locked database).
    """
    uri = resolve_tracking_uri(cfg)
    client = mlflow_client(uri)
    exp_id = retry_sqlite_contention(lambda: experiment_id(client, cfg.experiment_name or "rlrun", uri), uri)
    run = retry_sqlite_contention(lambda: client.create_run(exp_id, run_name=run_name, tags=tags), uri)
    return {"tracking_uri": uri, "experiment_name": cfg.experiment_name, "parent_run_id": run.info.run_id}


# ---------------------------------------------------------------- the parent's set-up and teardown


def prepare_runs(logger_cfg: Any, run_name: str, output_dir: Path, info: Callable[[str], None]) -> None:
    """Settle, in `logger_cfg`, the tracker runs every job of this run logs to (before any starts).

    W&B online without credentials fails here; MLflow's shared run is created here.
    """
    if logger_cfg.wandb.enabled:
        from rlrun.tracking.backends.wandb import WandbBackend
        from rlrun.tracking.base import TrackerContext

        WandbBackend.preflight(logger_cfg.wandb, TrackerContext(job="rl", output_dir=output_dir, run_name=run_name))
        prepare_wandb(logger_cfg.wandb, run_name)
    if logger_cfg.mlflow.enabled:
        mcfg = logger_cfg.mlflow
        mcfg.tracking_uri = resolve_tracking_uri(mcfg)
        mcfg.run_id = ensure_run(mcfg, run_name, tracking_uri=mcfg.tracking_uri)
        info(f"MLflow run {mcfg.run_id} at {mcfg.tracking_uri}")


def end_runs(logger_cfg: Any, status: str, warn: Callable[[str], None]) -> None:
    """The jobs share one MLflow run: its status says how the whole run ended."""
    mcfg = logger_cfg.mlflow
    if not mcfg.enabled or not mcfg.run_id:
        return
    try:
        end_run(mcfg.tracking_uri, mcfg.run_id, status)
    except Exception as exc:  # the tracker being down must not change the run's exit code
        warn(f"could not mark MLflow run {mcfg.run_id} {status}: {exc}")
