"""The run config, composed from each package's own schema, and how it is checked and loaded.

The primary config (`conf/config.yaml`) starts from `base_config` (`RunConfig`), so every
group option merges into a typed node: an unknown key or a wrong type fails at composition
with Hydra's message naming the key. Value rules sit on the fields (`rlrun.schema.checked`);
`validate()` checks them, plus the few rules that span fields, before any job starts.

This module imports only omegaconf/hydra and the schemas: `python -m rlrun --cfg job`
must stay cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from rlrun.doctor.config import DoctorConfig, check_doctor
from rlrun.envs.config import LEVELS, EnvWorkersConfig, TaskConfig
from rlrun.inference.config import SCHEMAS as INFERENCE_SCHEMAS
from rlrun.inference.config import InferenceConfig
from rlrun.inference.launch import check_servers
from rlrun.launcher.config import MonitorConfig
from rlrun.launcher.deployment.config import SCHEMAS as DEPLOYMENT_SCHEMAS
from rlrun.launcher.deployment.config import DeploymentConfig, check_deployment
from rlrun.orchestrator.config import OrchestratorConfig
from rlrun.schema import ConfigError, check_fields, checked
from rlrun.sft.config import SftConfig
from rlrun.tracking.backends import logger_schema, plugins, selectable
from rlrun.tracking.config import (
    DeliveryConfig,
    LogExtrasConfig,
    MlflowLoggerConfig,
    TensorboardLoggerConfig,
    WandbLoggerConfig,
)
from rlrun.trainer.config import TrainerConfig

__all__ = [
    "CONF_DIR", "ConfigError", "DeliveryConfig", "DeploymentConfig", "DoctorConfig", "EnvWorkersConfig", "InferenceConfig", "LogExtrasConfig",
    "LoggerConfig", "MlflowLoggerConfig", "ModelConfig", "MonitorConfig", "OrchestratorConfig", "RunConfig",
    "SftConfig", "TaskConfig", "TensorboardLoggerConfig", "TrainerConfig", "WandbLoggerConfig", "load_run_config",
    "register", "validate",
]  # fmt: skip

CONF_DIR = Path(__file__).parent / "conf"
JOBS_WITH_LOG_EXTRAS = ("orchestrator", "trainer")
LoggerConfig = logger_schema()  # one field per registered tracker backend (rlrun.tracking.backends)


@dataclass
class ModelConfig:
    name: str = checked("tiny", one_of=("tiny", "hf"))  # tiny: built by rlrun; hf: any causal LM directory or hub id
    path: Optional[str] = None
    # Weights and compute of inference; the jobs that train keep fp32 weights and compute in this
    # dtype under autocast when it is bfloat16 or float16 (rlrun/trainer/precision.py). auto: the checkpoint's.
    dtype: str = checked("float32", one_of=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = False
    # Shape of the built-in tiny Llama (ignored for `hf`).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = checked(64, gt=0)  # the longest prompt + completion, in tokens


@dataclass
class PerfConfig:
    # The device's peak FLOP/s for `perf/mfu`; None: a table of known GPUs (rlrun/trainer/perf.py),
    # and no MFU on the CPU.
    peak_flops: Optional[float] = checked(None, gt=0)


@dataclass
class RunConfig:
    name: str = "rlrun"
    seed: int = 0
    max_steps: int = checked(200, gt=0)
    output_dir: Optional[str] = None  # default: Hydra's run / sweep-job directory
    resume_from: Optional[str] = None
    log_level: str = checked("INFO", one_of=LEVELS)
    # Local single-process jobs are forked from one interpreter that imported torch and
    # transformers once (rlrun.launcher.zygote); false: every job is a fresh subprocess.
    preload_imports: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # each backend merges its own schema
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    env_workers: EnvWorkersConfig = field(default_factory=EnvWorkersConfig)
    log_extras: LogExtrasConfig = field(default_factory=LogExtrasConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)  # each option merges its own schema


def _run_dir(resume_from: str | None, default: str) -> str:
    """hydra.run.dir: a resumed run continues in its own directory."""
    return str(resume_from) if resume_from not in (None, "None", "null", "") else default


def register() -> None:
    """What composing `conf/` needs: the schemas in Hydra's ConfigStore and the `rlrun_run_dir`
    resolver. Called by `python -m rlrun` before Hydra starts (and by tests that compose)."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("rlrun_run_dir", _run_dir, replace=True)
    store = ConfigStore.instance()
    store.store(name="base_config", node=RunConfig)
    for backend, schema in INFERENCE_SCHEMAS.items():  # conf/inference/<backend>.yaml names its schema
        store.store(group="schema/inference", name=backend, node=schema)
    for name, schema in DEPLOYMENT_SCHEMAS.items():  # conf/deployment/<name>.yaml too
        store.store(group="schema/deployment", name=name, node=schema)
    for name in plugins():  # `logger=<name>` (or `logger=[a,b]`) turns the backend on
        if selectable(name) and not (CONF_DIR / "logger" / f"{name}.yaml").is_file():
            store.store(group="logger", name=name, node={name: {"enabled": True}})


# ---------------------------------------------------------------- checks and loading


def schema(backend: str = "local", deployment: str = "local") -> DictConfig:
    """The typed, empty run config for an inference backend and a deployment (what a composed config merges into)."""
    if backend not in INFERENCE_SCHEMAS:
        raise ConfigError(f"inference.backend={backend!r}: must be one of {sorted(INFERENCE_SCHEMAS)}")
    if deployment not in DEPLOYMENT_SCHEMAS:
        raise ConfigError(f"deployment.name={deployment!r}: must be one of {sorted(DEPLOYMENT_SCHEMAS)}")
    return OmegaConf.merge(RunConfig, {"inference": INFERENCE_SCHEMAS[backend],  # type: ignore[return-value]
                                       "deployment": DEPLOYMENT_SCHEMAS[deployment]})  # fmt: skip


def _schema_of(cfg: DictConfig) -> DictConfig:
    return schema(str(OmegaConf.select(cfg, "inference.backend", default="local")),
                  str(OmegaConf.select(cfg, "deployment.name", default="local")))  # fmt: skip


def _check_schema(cfg: DictConfig) -> None:
    """Keys the schema does not have: Hydra adds `+trainer.typo=1` even to typed nodes."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(_schema_of(cfg), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Check what types cannot; raise ConfigError naming the first bad key."""
    _check_schema(cfg)
    check_fields(cfg)
    check_doctor(cfg.doctor)
    check_servers(cfg.inference)
    check_deployment(cfg)
    _check_task(cfg.task)
    if cfg.sft.data is not None and not Path(cfg.sft.data).expanduser().is_file():
        raise ConfigError(f"sft.data={cfg.sft.data!r}: no such file (a jsonl of prompt/completion pairs)")
    if cfg.model.name == "hf":
        path = cfg.model.path
        if not path:
            raise ConfigError(f"model.path={path!r}: is required with model=hf")
        looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
        if looks_local and not Path(path).expanduser().is_dir():
            raise ConfigError(f"model.path={path!r}: no such model directory")


def _check_task(task: DictConfig) -> None:
    """Each environment's own settings (an unknown dataset or env id fails here, listing what
    exists); imports the environments' modules, so it runs at launch, not for `--cfg job`."""
    from rlrun.envs import MIXTURE, env_configs, environment_class

    if task.name == MIXTURE and not task.envs:
        raise ConfigError("task.envs: a mixture needs at least one environment (key -> {name: ..., weight: ...})")
    for key, env_cfg in env_configs(task).items():
        where = f"task.envs.{key}." if task.name == MIXTURE else "task."
        try:
            environment_class(env_cfg.name).check_config(env_cfg)
        except ImportError as exc:
            raise ConfigError(f"{where}name={env_cfg.name!r}: {exc} (pip install 'rlrun[envs]')") from None
        except ValueError as exc:
            raise ConfigError(f"{where}{exc}") from None


def fill_job_log_extras(cfg: DictConfig) -> None:
    """Each job's `log_extras` keys left null take the top-level group's values."""
    for job in JOBS_WITH_LOG_EXTRAS:
        own = cfg[job].log_extras
        for f in fields(LogExtrasConfig):
            if own[f.name] is None:
                own[f.name] = cfg.log_extras[f.name]


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Load a run's resolved `config.yaml` onto the schema, for a job started on its own.

    Secrets were redacted from that file; they come back from the environment
    (see `rlrun.redact.SECRETS_ENV`).
    """
    from rlrun.redact import restore_secrets

    saved = OmegaConf.load(path)
    if overrides:
        saved = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.merge(_schema_of(saved), saved)
    restore_secrets(cfg)
    validate(cfg)
    fill_job_log_extras(cfg)
    return cfg  # type: ignore[return-value]
