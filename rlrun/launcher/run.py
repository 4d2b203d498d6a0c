"""`rlrun.launcher.run`: check the config, prepare the run, start the jobs, watch them, stop them.

It only starts, watches and stops (as prime-rl's `rl` launcher does): the jobs do the work
and talk through the run directory. With `sft.max_steps > 0` the SFT job runs first, alone
(RL starts from the policy it leaves). Then inference, orchestrator and trainer start at once (orchestrator and trainer
import torch while inference loads the model); the parent waits for inference's `/health`
so that a server that cannot start is reported as such. The run is done when orchestrator
and trainer exit 0; when any job fails, every job is stopped and the parent exits 1, or
`EXIT_DOCTOR` (3) when the job stopped on a run-doctor finding (`doctor.stop_on`).

Where each job runs is the deployment's decision (`rlrun.launcher.deployment`): here
(`deployment=local`) or through srun on the nodes of a Slurm allocation (`deployment=slurm`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlrun.config import ConfigError, validate
from rlrun.metric_names import check_metric_names
from rlrun.job import StopFlag
from rlrun.launcher import EXIT_CONFIG, EXIT_DOCTOR, EXIT_FAILED, EXIT_OK
from rlrun.launcher.prepare import prepare_dir, settle
from rlrun.inference.launch import server_jobs
from rlrun.launcher.supervisor import JobFailed, Supervisor, python_module
from rlrun.redact import secrets_env
from rlrun.sft import sft_model_dir


def run(cfg: DictConfig, run_dir: str | Path) -> int:
    """Run the experiment `cfg` in `run_dir`; the process exit code."""
    run_dir = Path(run_dir).resolve()
    try:
        validate(cfg)
        check_metric_names(cfg)
        if cfg.resume_from and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"resume_from={cfg.resume_from!r}: not an rlrun run directory (no config.yaml)")
    except ConfigError as exc:
        print(f"rlrun: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    prepare_dir(cfg, run_dir)

    from rlrun.inference.launch import plan
    from rlrun.launcher.deployment import DeploymentError, make_deployment
    from rlrun.log import setup_logger
    from rlrun.tracking.runs import end_runs

    log = setup_logger(cfg.log_level, run_dir / "logs" / "rl.log", job="rl")
    log.info(f"run directory: {run_dir}")
    try:
        deployment = make_deployment(cfg, run_dir, log)  # slurm: the allocation's nodes, the shared-filesystem check
        cfg = settle(deployment.configure(cfg), run_dir, log)
        launch = plan(cfg, run_dir)
    except Exception as exc:  # a tracker or backend that can never work, a model that cannot be built
        plain = isinstance(exc, (ConfigError, DeploymentError))
        log.error(f"could not start the run: {exc if plain else f'{type(exc).__name__}: {exc}'}")
        end_runs(cfg.logger, "FAILED", log.warning)
        return EXIT_CONFIG

    code = _start_and_watch(cfg, run_dir, launch, deployment, log)
    end_runs(cfg.logger, "FINISHED" if code == EXIT_OK else "FAILED" if code == EXIT_FAILED else "KILLED", log.warning)
    return code


def _start_and_watch(cfg: DictConfig, run_dir: Path, launch: Any, deployment: Any, log: Any) -> int:
    from rlrun.launcher.monitor import start_monitor
    from rlrun.launcher.progress import RunProgress, doctor_summary
    from rlrun.tracking.record import read_alerts

    stop = StopFlag().install()
    sup = Supervisor(run_dir, log=log.info)
    env = {**secrets_env(cfg), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if cfg.preload_imports and cfg.deployment.name == "local" and _cpu_only(cfg):
        sup.preload(preload_modules(cfg), env)
    config = ["--config", str(run_dir / "config.yaml")]
    progress = monitor = None
    code = EXIT_OK
    try:
        # From the first job on; across nodes it merges each node's sampler.
        monitor = start_monitor(cfg, run_dir, sup.running_pids, warn=log.warning, nodes_dir=deployment.nodes_dir)
        for sampler in deployment.samplers(cfg):
            sup.start(sampler)
        if cfg.sft.max_steps > 0 and not (sft_model_dir(run_dir) / "config.json").is_file():
            sup.start(deployment.ranked("sft", "rlrun.sft", cfg.sft.num_ranks, config, env))
            if not sup.wait({"sft"}, should_stop=lambda: bool(stop)):
                raise KeyboardInterrupt  # a stop requested during the SFT stage
            log.info(f"sft stage finished ({cfg.sft.max_steps} steps); RL starts from {sft_model_dir(run_dir)}")
        for server in deployment.inference(cfg, launch, env):
            sup.start(server)
        sup.start(deployment.job("orchestrator", python_module("rlrun.orchestrator", *config), env))
        sup.start(deployment.ranked("trainer", "rlrun.trainer", cfg.trainer.num_ranks, config,
                                    {**env, **launch.trainer_env}))  # fmt: skip
        _wait_serving(cfg, sup, stop)
        urls = list(cfg.inference.urls)
        if len(urls) == 1:
            log.info(f"inference is serving on {cfg.inference.host}:{cfg.inference.port}")
        else:
            log.info(f"inference is serving on {len(urls)} servers: "
                     + ", ".join(f"{name} {url}" for name, url in zip(server_jobs(len(urls)), urls)))  # fmt: skip

        progress = RunProgress(run_dir, cfg.max_steps, warn=log.warning)
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
        stopping = [a for a in read_alerts(run_dir) if a.get("stop")]
        if stopping:  # the job stopped itself on a finding: a clean stop, not a crash
            code = EXIT_DOCTOR
            log.error(f"the run doctor stopped the run (doctor.stop_on): {stopping[0]['text']} "
                      f"[job '{exc.job.name}' exited with code {exc.code}; checkpoints kept]")  # fmt: skip
        else:
            code = EXIT_FAILED
            log.error(str(exc))
            _show_tail(exc.log_file, log)
    except Exception as exc:
        code = EXIT_FAILED
        log.exception(f"the run failed: {exc}")
    finally:
        if progress is not None:
            progress.close()
        if code != EXIT_OK and (findings := doctor_summary(run_dir)):
            log.warning(findings.strip())
        # A failure stops the others fast; a requested stop lets trackers flush.
        grace = 5.0 if code == EXIT_FAILED else float(cfg.logger.delivery.flush_timeout_s) + 15.0
        sup.stop_all(grace)
        if monitor is not None:  # after the jobs: its last samples see them go; before the MLflow run ends
            monitor.close()
    return code


def _cpu_only(cfg: DictConfig) -> bool:
    """No job of the run touches CUDA: a forked child cannot use a CUDA its parent may have
    initialised, so GPU runs start every job as a fresh subprocess."""
    inference_cpu = cfg.inference.backend == "local" and str(cfg.inference.get("device", "cpu")) == "cpu"
    return inference_cpu and cfg.trainer.device == "cpu"  # the SFT job runs on the trainer's device


def preload_modules(cfg: DictConfig) -> list[str]:
    """What the local jobs import before their first step, imported once by the zygote."""
    model = "transformers.models.llama.modeling_llama" if cfg.model.name == "tiny" else "transformers.modeling_utils"
    jobs = ["rlrun.inference.engine", "rlrun.inference.server", "rlrun.orchestrator.loop", "rlrun.trainer.loop"]
    return ["torch", "rlrun.model", model, "transformers.models.auto.tokenization_auto", *jobs]


def _wait_serving(cfg: DictConfig, sup: Supervisor, stop: StopFlag) -> None:
    """Until every server answers `/health`; a job failing meanwhile raises JobFailed."""
    from rlrun.inference.client import InferenceServers

    def check() -> None:
        sup.check()
        if stop:
            raise KeyboardInterrupt

    urls = list(cfg.inference.urls)
    servers = InferenceServers(urls, server_jobs(len(urls)))
    try:
        servers.wait_healthy(cfg.inference.startup_timeout_s, check=check)
    finally:
        servers.close()


def _show_tail(path: Path, log: Any, lines: int = 15) -> None:
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            log.error(f"last lines of {path.name}:\n" + "\n".join(tail))
