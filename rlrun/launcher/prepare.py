"""Before any job starts: the run directory, and the one config every job reads.

`prepare_dir` runs before the parent's logger exists (it moves a resumed run's old logs
aside); `settle` then fixes everything the jobs must agree on (tracker runs, each inference
server's URL, the run's inference token, the model) and writes `<run>/config.yaml`, secrets
redacted. The token lives only in `<run>/secrets/inference_token` (0600), never in the config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rlrun.redact import extract_secrets, redact, register_secret, scrub
from rlrun.rundir import SUBDIRS, model_dir, remove_after, resume_step

# Carried over from the run being resumed, so the jobs continue the same tracker runs.
RESUMED_IDS = ("logger.mlflow.run_id", "logger.mlflow.tracking_uri", "logger.wandb.id")


def prepare_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Keep secrets out of every file and of the command line, and lay out the run tree."""
    for value in extract_secrets(cfg).values():
        register_secret(str(value))
    # Libraries record the command line (W&B's run metadata): a key typed there must not travel.
    sys.argv[:] = [scrub(arg) for arg in sys.argv]
    _redact_hydra_files(run_dir)
    if cfg.resume_from:
        _keep_previous_logs(run_dir)
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)


def settle(cfg: DictConfig, run_dir: Path, log: Any) -> DictConfig:
    """Settle everything jobs must agree on, and write `<run>/config.yaml` (secrets redacted)."""
    from rlrun.config import fill_job_log_extras
    from rlrun.inference.auth import create_token
    from rlrun.inference.launch import check_servers, choose_port
    from rlrun.tracking.runs import prepare_runs

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
    if cfg.resume_from:
        _resume(cfg, run_dir, log)
    prepare_runs(cfg.logger, cfg.name, run_dir, log.info)
    choose_port(cfg)
    check_servers(cfg.inference)  # what a deployment filled in too
    create_token(run_dir)  # before any job starts: each reads it from there
    fill_job_log_extras(cfg)  # the record shows what each job logs
    # The tiny model is built by the first job that loads it: the parent imports no torch.
    log.info(f"policy: {model_dir(cfg.model, run_dir)}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(redact(resolved)), run_dir / "config.yaml")
    return cfg


def _resume(cfg: DictConfig, run_dir: Path, log: Any) -> None:
    """Continue the same tracker runs; redo what the crashed attempt did after its checkpoint."""
    previous = OmegaConf.load(run_dir / "config.yaml")
    for key in RESUMED_IDS:
        if OmegaConf.select(cfg, key) in (None, "") and OmegaConf.select(previous, key) not in (None, ""):
            OmegaConf.update(cfg, key, OmegaConf.select(previous, key))
    step = resume_step(run_dir)
    for sub in ("rollouts", "weights"):
        remove_after(run_dir / sub, step)
    log.info(f"resuming {run_dir} after checkpoint step {step}")


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
