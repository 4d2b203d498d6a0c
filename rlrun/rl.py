"""The `rl` parent: check the config, prepare the run directory, start and watch the jobs.

It only starts, watches and stops (as prime-rl's `rl` launcher does): the jobs do the work
and talk through the run directory. All three start at once (the orchestrator waits for
inference's port and health itself); the parent also checks inference's health so a server
that cannot start is reported as such. The run is done when orchestrator and trainer exit 0.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rlrun.config import ConfigError, validate
from rlrun.job import StopFlag
from rlrun.launch import Job, JobFailed, Supervisor, python_module, torchrun
from rlrun.redact import extract_secrets, redact, register_secret, scrub, secrets_env
from rlrun.rundir import SUBDIRS, job_log, remove_after, resume_step, wait_for

EXIT_CONFIG = 2
EXIT_FAILED = 1
# Carried over from the run being resumed, so the jobs continue the same tracker runs.
_RESUMED_IDS = ("logger.mlflow.run_id", "logger.mlflow.tracking_uri", "logger.wandb.id")


def run(cfg: DictConfig, run_dir: str | Path) -> int:
    """Run the experiment `cfg` in `run_dir`; the process exit code."""
    run_dir = Path(run_dir).resolve()
    try:
        validate(cfg)
    except ConfigError as exc:
        print(f"rlrun: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    resuming = bool(cfg.resume_from)
    if resuming and not (run_dir / "config.yaml").is_file():
        print(f"rlrun: config error: resume_from={cfg.resume_from!r}: not an rlrun run directory (no config.yaml)",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG

    for value in extract_secrets(cfg).values():
        register_secret(str(value))
    # Libraries record the command line (W&B's run metadata): a key typed there must not travel.
    sys.argv[:] = [scrub(arg) for arg in sys.argv]
    _redact_hydra_files(run_dir)
    if resuming:
        _keep_previous_logs(run_dir)
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)

    from rlrun.log import setup_logger

    log = setup_logger(cfg.log_level, run_dir / "logs" / "rl.log", job="rl")
    log.info(f"run directory: {run_dir}")
    try:
        cfg = _prepare(cfg, run_dir, resuming, log)
    except Exception as exc:  # a tracker that can never work, a model that cannot be built
        log.error(f"could not start the run: {type(exc).__name__}: {exc}")
        return EXIT_CONFIG
    return _supervise(cfg, run_dir, log)


# ---------------------------------------------------------------- before any job starts


def _redact_hydra_files(run_dir: Path) -> None:
    """Hydra saved the config, the overrides and its own settings (which repeat the command
    line) as typed: strip secrets from those copies too."""
    hydra_dir = run_dir / ".hydra"
    config = hydra_dir / "config.yaml"
    if config.is_file():
        OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.load(config)))), config)
    for path in hydra_dir.glob("*.yaml"):  # every value registered as a secret, wherever it appears
        text = path.read_text()
        if scrub(text) != text:
            path.write_text(scrub(text))


def _keep_previous_logs(run_dir: Path) -> None:
    """A resumed run starts fresh log files; the crashed attempt's logs move to logs.<n>/."""
    logs = run_dir / "logs"
    if not logs.is_dir():
        return
    n = 1
    while (run_dir / f"logs.{n}").exists():
        n += 1
    os.replace(logs, run_dir / f"logs.{n}")


def _prepare(cfg: DictConfig, run_dir: Path, resuming: bool, log: Any) -> DictConfig:
    """Settle everything jobs must agree on, and write `<run>/config.yaml` (secrets redacted)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
    if resuming:
        previous = OmegaConf.load(run_dir / "config.yaml")
        for key in _RESUMED_IDS:
            if OmegaConf.select(cfg, key) in (None, "") and OmegaConf.select(previous, key) not in (None, ""):
                OmegaConf.update(cfg, key, OmegaConf.select(previous, key))
        step = resume_step(run_dir)
        # What the crashed attempt produced after its last checkpoint is redone.
        for sub in ("rollouts", "weights"):
            remove_after(run_dir / sub, step)
        log.info(f"resuming {run_dir} after checkpoint step {step}")

    from rlrun.tracking.base import TrackerContext

    ctx = TrackerContext(job="rl", output_dir=run_dir, run_name=cfg.name)
    if cfg.logger.wandb.enabled:
        from rlrun.tracking.backends.wandb import WandbBackend

        WandbBackend.preflight(cfg.logger.wandb, ctx)  # online without credentials: fail now
        if not cfg.logger.wandb.id:
            cfg.logger.wandb.id = secrets.token_hex(4)  # the jobs' runs: <id>-trainer, <id>-orchestrator
        if not cfg.logger.wandb.group:
            cfg.logger.wandb.group = f"{cfg.logger.wandb.name or cfg.name}-{cfg.logger.wandb.id}"  # this run's jobs
    if cfg.logger.mlflow.enabled:
        from rlrun.tracking.backends.mlflow import ensure_run, resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.logger.mlflow)
        cfg.logger.mlflow.tracking_uri = uri
        cfg.logger.mlflow.run_id = ensure_run(cfg.logger.mlflow, ctx, tracking_uri=uri)
        log.info(f"MLflow run {cfg.logger.mlflow.run_id} at {uri}")

    from rlrun.model import resolve_model_path

    model_path = resolve_model_path(cfg.model, run_dir, cfg.seed)  # builds the tiny model once
    log.info(f"policy: {model_path}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(redact(resolved)), run_dir / "config.yaml")
    return cfg


# ---------------------------------------------------------------- the jobs


def _job_commands(cfg: DictConfig, run_dir: Path) -> dict[str, list[str]]:
    config = ["--config", str(run_dir / "config.yaml")]
    trainer = (
        torchrun("rlrun.trainer", cfg.trainer.num_ranks, *config)
        if cfg.trainer.num_ranks > 1
        else python_module("rlrun.trainer", *config)
    )
    inference = python_module("rlrun.inference", *config, "--port-file", str(run_dir / "logs" / ".inference_port"))
    if cfg.inference.backend == "vllm":  # vLLM's own server: checked, given its port and GPUs (rlrun/inference/vllm.py)
        from rlrun.inference.vllm import free_port, vllm_commands

        if not cfg.inference.port:  # vLLM writes no port file: the parent picks the port
            cfg.inference.port = free_port(cfg.inference.host)
        inference, trainer = vllm_commands(cfg, run_dir, trainer)
    return {
        "inference": inference,
        "orchestrator": python_module("rlrun.orchestrator", *config),
        "trainer": trainer,
    }


def _supervise(cfg: DictConfig, run_dir: Path, log: Any) -> int:
    stop = StopFlag().install()
    sup = Supervisor(run_dir, log=log.info)
    env = {**secrets_env(cfg), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        commands = _job_commands(cfg, run_dir)
    except ConfigError as exc:  # e.g. inference=vllm without vLLM or a GPU; no job has started
        log.error(f"could not start the run: {exc}")
        _end_mlflow_run(cfg, EXIT_FAILED, log)
        return EXIT_CONFIG

    def job(name: str, cmd: list[str]) -> Job:
        log_file = job_log(run_dir, name)
        stdout = log_file if name == "inference" else run_dir / "logs" / f"{name}.stdout"
        return Job(name, cmd, log_file=log_file, stdout_file=stdout, env=env)

    progress = monitor = None
    code = 0
    try:
        port_file = run_dir / "logs" / ".inference_port"
        port_file.unlink(missing_ok=True)
        inference = sup.start(job("inference", commands["inference"]))
        from rlrun.tracking.monitor import start_monitor

        def job_pids() -> dict[str, int]:  # read at every sample: jobs started later are seen too
            return {j.name: j.proc.pid for j in list(sup.jobs) if j.proc is not None and j.proc.returncode is None}

        monitor = start_monitor(cfg, run_dir, job_pids, warn=log.warning)  # from the first job on: model loading
        # Orchestrator and trainer import torch while inference loads the model: the
        # orchestrator learns the port from the port file (vLLM's port is chosen up front).
        if cfg.inference.backend == "vllm":
            orchestrator_cmd = [*commands["orchestrator"], f"inference.port={cfg.inference.port}"]
        else:
            orchestrator_cmd = [*commands["orchestrator"], "--inference-port-file", str(port_file)]
        sup.start(job("orchestrator", orchestrator_cmd))
        sup.start(job("trainer", commands["trainer"]))

        def port_ready() -> str | None:
            sup.check()
            if stop:
                raise KeyboardInterrupt
            return port_file.read_text().strip() if port_file.is_file() else None

        if cfg.inference.backend == "vllm":  # chosen in _job_commands and given to vLLM
            port = int(cfg.inference.port)
        else:
            port = int(wait_for(port_ready, "the inference server's port", timeout_s=cfg.inference.startup_timeout_s))
        from rlrun.inference.client import InferenceClient

        InferenceClient(f"http://{cfg.inference.host}:{port}").wait_healthy(cfg.inference.startup_timeout_s, inference.proc)
        log.info(f"inference is serving on {cfg.inference.host}:{port}")

        from rlrun.progress import RunProgress

        progress = RunProgress(run_dir, cfg.max_steps)
        finished = sup.wait({"orchestrator", "trainer"}, tick=progress.update, should_stop=lambda: bool(stop))
        progress.update()
        if finished:
            log.info(f"run finished: {cfg.max_steps} steps; record in {run_dir}")
            log.info(progress.summary())
        else:
            code = 128 + (stop.signal or signal.SIGTERM)
            log.warning(f"stop requested (signal {stop.signal}); stopping every job gracefully")
    except KeyboardInterrupt:
        code = 128 + (stop.signal or signal.SIGINT)
        log.warning("interrupted; stopping every job gracefully")
    except JobFailed as exc:
        code = EXIT_FAILED
        log.error(str(exc))
        _show_tail(exc.job.log_file, log)
    except Exception as exc:
        code = EXIT_FAILED
        log.exception(f"the run failed: {exc}")
    finally:
        if progress is not None:
            progress.close()
        # A failure stops the others fast; a requested stop lets trackers flush.
        grace = 5.0 if code == EXIT_FAILED else float(cfg.logger.delivery.flush_timeout_s) + 15.0
        sup.stop_all(grace)
        if monitor is not None:  # after the jobs: its last samples see them go; before the MLflow run ends
            monitor.close()
        _end_mlflow_run(cfg, code, log)
    return code


def _end_mlflow_run(cfg: DictConfig, code: int, log: Any) -> None:
    """The jobs share one MLflow run: its status says how the whole run ended."""
    if not cfg.logger.mlflow.enabled:
        return
    from rlrun.tracking.backends.mlflow import end_run

    status = "FINISHED" if code == 0 else "FAILED" if code == EXIT_FAILED else "KILLED"
    try:
        end_run(cfg.logger.mlflow.tracking_uri, cfg.logger.mlflow.run_id, status)
    except Exception as exc:  # the tracker being down must not change the run's exit code
        log.warning(f"could not mark MLflow run {cfg.logger.mlflow.run_id} {status}: {exc}")


def _show_tail(path: Path, log: Any, lines: int = 15) -> None:
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            log.error(f"last lines of {path.name}:\n" + "\n".join(tail))
