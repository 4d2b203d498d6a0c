"""Typed config schemas for every group, registered in Hydra's ConfigStore.

The primary config (`conf/config.yaml`) starts from `base_config`, so every group option
merges into a typed node: an unknown key or a wrong type fails at composition with
Hydra's message naming the key. Value checks that types cannot express (ranges, paths)
live in `validate()`, which the entrypoint runs before any job starts.

This module imports only omegaconf/hydra: `python -m rlrun --cfg job` must stay cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

# ---------------------------------------------------------------- logger (trackers)


@dataclass
class ConsoleLoggerConfig:
    enabled: bool = False
    # Metrics shown on the console line; empty shows every metric of the step.
    metrics: list[str] = field(default_factory=list)


@dataclass
class JsonlLoggerConfig:
    # Always on: the local, append-only record. Default: <output_dir>/metrics.
    dir: Optional[str] = None


@dataclass
class TensorboardLoggerConfig:
    enabled: bool = False
    log_dir: Optional[str] = None  # default: <output_dir>/tensorboard
    flush_secs: float = 5.0


@dataclass
class MlflowLoggerConfig:
    enabled: bool = False
    # Default: a SQLite store at outputs/mlflow.db (artifacts in outputs/mlartifacts).
    tracking_uri: Optional[str] = None
    experiment_name: str = "rlrun"
    run_name: Optional[str] = "${name}"
    run_id: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class WandbLoggerConfig:
    enabled: bool = False
    project: str = "rlrun"
    entity: Optional[str] = None
    name: Optional[str] = "${name}"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    id: Optional[str] = None
    offline: bool = False
    dir: Optional[str] = None  # default: <output_dir>
    api_key: Optional[str] = None  # prefer WANDB_API_KEY; never written anywhere


@dataclass
class DeliveryConfig:
    """How the writer threads deliver to backends (retries, memory bound, warnings)."""

    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    max_in_memory: int = 20_000  # queued events per backend before spilling to disk
    warn_interval_s: float = 30.0
    flush_timeout_s: float = 120.0  # how long finish() waits for a failing backend


@dataclass
class LoggerConfig:
    console: ConsoleLoggerConfig = field(default_factory=ConsoleLoggerConfig)
    jsonl: JsonlLoggerConfig = field(default_factory=JsonlLoggerConfig)
    tensorboard: TensorboardLoggerConfig = field(default_factory=TensorboardLoggerConfig)
    mlflow: MlflowLoggerConfig = field(default_factory=MlflowLoggerConfig)
    wandb: WandbLoggerConfig = field(default_factory=WandbLoggerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)


# ---------------------------------------------------------------- RL jobs


@dataclass
class ModelConfig:
    name: str = "tiny"  # tiny: built by rlrun; hf: any causal LM directory or hub id
    path: Optional[str] = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    # Shape of the built-in tiny Llama (ignored for `hf`).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128


@dataclass
class TaskConfig:
    name: str = "reverse_text"
    min_chars: int = 3
    max_chars: int = 6
    alphabet: str = "abcdefgh"
    num_eval_prompts: int = 64
    # Weight of each named reward function in the total reward; missing names weigh 1.
    reward_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class InferenceConfig:
    backend: str = "local"
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    device: str = "cpu"
    max_batch_size: int = 512  # sequences generated together
    startup_timeout_s: float = 120.0
    num_threads: int = 1  # torch intra-op threads of the local server
    # vLLM's server (`inference=vllm`, see rlrun/inference/vllm.py) only:
    gpu_memory_utilization: float = 0.9  # share of each inference GPU's memory vLLM may take
    tensor_parallel_size: int = 1  # GPUs of the server: the first ones visible; the trainer gets the rest
    max_model_len: Optional[int] = None  # None: the model's own context length
    dtype: str = "${model.dtype}"  # weights and activations: auto, bfloat16, float16, float32
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` flags, e.g. [--enforce-eager]


# ---------------------------------------------------------------- log extras and monitoring


@dataclass
class LogExtrasConfig:
    """Sample tables and distributions (the `log_extras` group)."""

    samples: bool = False  # a table of informative rollouts (orchestrator)
    distributions: bool = False  # histograms: rewards, advantages, lengths; entropy, ratios, loss
    interval: int = 10  # every this many steps
    samples_per_step: int = 8  # rows per logged step
    max_rows: int = 1000  # rows the accumulating W&B table keeps (the newest)


@dataclass
class JobLogExtrasConfig:
    """A job's own copy of `log_extras`; follows the top-level group unless overridden,
    e.g. `orchestrator.log_extras.interval=5`."""

    samples: bool = "${log_extras.samples}"  # type: ignore[assignment]
    distributions: bool = "${log_extras.distributions}"  # type: ignore[assignment]
    interval: int = "${log_extras.interval}"  # type: ignore[assignment]
    samples_per_step: int = "${log_extras.samples_per_step}"  # type: ignore[assignment]
    max_rows: int = "${log_extras.max_rows}"  # type: ignore[assignment]


@dataclass
class MonitorConfig:
    """GPU and system usage sampled in the background (the `monitor` group; NeMo-RL's names)."""

    system: bool = False  # CPU %, RAM, each job's RSS, disk of the run directory
    gpu: bool = False  # every visible GPU through NVML
    collection_interval: float = 2.0  # seconds between samples
    flush_interval: float = 10.0  # seconds between hand-overs to the tracker


# ---------------------------------------------------------------- RL jobs (continued)


@dataclass
class OrchestratorConfig:
    batch_size: int = 16  # prompts per step
    group_size: int = 8  # completions per prompt
    max_tokens: int = 12
    temperature: float = 1.0
    max_async_steps: int = 1  # how many steps generation may run ahead of training
    keep_last: int = 3  # rollouts/step_<n> kept on disk
    request_timeout_s: float = 300.0
    eval_interval: int = 50  # steps between evaluations on held-out prompts (and at the end); 0: off
    num_val_samples_to_print: int = 4  # evaluation samples shown as a table in the log
    log_extras: JobLogExtrasConfig = field(default_factory=JobLogExtrasConfig)


@dataclass
class TrainerConfig:
    num_ranks: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    device: str = "cpu"  # cpu or cuda; ranks use gloo on cpu, nccl on cuda
    checkpoint_interval: int = 20  # steps; 0 disables
    keep_last: int = 3  # weights/step_<n> kept on disk
    num_threads: int = 1  # torch intra-op threads per rank
    micro_batch_size: Optional[int] = None  # rows per forward/backward pass; None: the rank's whole batch
    log_extras: JobLogExtrasConfig = field(default_factory=JobLogExtrasConfig)


@dataclass
class EnvWorkersConfig:
    num_workers: int = 1
    file_logs: bool = True  # logs/env_workers/<env>.log
    level: str = "INFO"
    env_level: str = "WARNING"  # level of the environment library's own loggers


@dataclass
class RunConfig:
    name: str = "rlrun"
    seed: int = 0
    max_steps: int = 200
    output_dir: Optional[str] = None  # default: Hydra's run / sweep-job directory
    resume_from: Optional[str] = None
    log_level: str = "INFO"
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    env_workers: EnvWorkersConfig = field(default_factory=EnvWorkersConfig)
    log_extras: LogExtrasConfig = field(default_factory=LogExtrasConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


CONF_DIR = Path(__file__).parent / "conf"


def _run_dir(resume_from: str | None, default: str) -> str:
    """hydra.run.dir: a resumed run continues in its own directory."""
    return str(resume_from) if resume_from not in (None, "None", "null", "") else default


def register() -> None:
    """What composing `conf/` needs: the schemas in Hydra's ConfigStore and the `rlrun_run_dir`
    resolver. Called by `python -m rlrun` before Hydra starts (and by tests that compose)."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("rlrun_run_dir", _run_dir, replace=True)
    ConfigStore.instance().store(name="base_config", node=RunConfig)


# ---------------------------------------------------------------- checks and loading


class ConfigError(ValueError):
    """A config value that is well-typed but unusable; the message names the key."""


_LEVELS = {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}


def _check_schema(cfg: DictConfig) -> None:
    """Keys the schema does not have: Hydra adds `+trainer.typo=1` even to typed nodes."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Check values that types cannot; raise ConfigError naming the first bad key."""
    _check_schema(cfg)

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: {why}")

    positive = [
        "max_steps",
        "orchestrator.batch_size",
        "orchestrator.group_size",
        "orchestrator.max_tokens",
        "trainer.num_ranks",
        "env_workers.num_workers",
        "inference.max_batch_size",
        "task.min_chars",
        "log_extras.interval",
        "log_extras.samples_per_step",
        "log_extras.max_rows",
        "orchestrator.log_extras.interval",
        "orchestrator.log_extras.samples_per_step",
        "trainer.log_extras.interval",
        "monitor.collection_interval",
        "monitor.flush_interval",
    ]
    for key in positive:
        require(OmegaConf.select(cfg, key) > 0, key, "must be > 0")
    require(cfg.orchestrator.max_async_steps >= 0, "orchestrator.max_async_steps", "must be >= 0")
    require(cfg.orchestrator.eval_interval >= 0, "orchestrator.eval_interval", "must be >= 0 (0: no evaluation)")
    require(cfg.orchestrator.num_val_samples_to_print >= 0, "orchestrator.num_val_samples_to_print", "must be >= 0")
    require(cfg.orchestrator.temperature > 0, "orchestrator.temperature", "must be > 0")
    require(cfg.trainer.lr > 0, "trainer.lr", "must be > 0")
    require(cfg.trainer.checkpoint_interval >= 0, "trainer.checkpoint_interval", "must be >= 0")
    require(cfg.trainer.kl_coef >= 0, "trainer.kl_coef", "must be >= 0")
    require(cfg.trainer.keep_last >= 2, "trainer.keep_last", "must be >= 2")
    require(cfg.orchestrator.keep_last >= 1, "orchestrator.keep_last", "must be >= 1")
    require(cfg.task.max_chars >= cfg.task.min_chars, "task.max_chars", "must be >= task.min_chars")
    require(cfg.trainer.device in ("cpu", "cuda"), "trainer.device", "must be 'cpu' or 'cuda'")
    require(cfg.inference.backend in ("local", "vllm"), "inference.backend", "must be 'local' or 'vllm'")
    require(0 < cfg.inference.gpu_memory_utilization <= 1, "inference.gpu_memory_utilization", "must be in (0, 1]")
    require(cfg.inference.tensor_parallel_size > 0, "inference.tensor_parallel_size", "must be > 0")
    for key in ("log_level", "env_workers.level", "env_workers.env_level"):
        require(str(OmegaConf.select(cfg, key)).upper() in _LEVELS, key, f"must be one of {sorted(_LEVELS)}")
    require(cfg.model.name in ("tiny", "hf"), "model.name", "must be 'tiny' or 'hf'")
    if cfg.model.name == "hf":
        path = cfg.model.path
        require(bool(path), "model.path", "is required with model=hf")
        looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
        if looks_local:
            require(Path(path).expanduser().is_dir(), "model.path", "no such model directory")
    from rlrun.envs import ENVIRONMENTS  # light: the registry imports no env code

    require(cfg.task.name in ENVIRONMENTS, "task.name", f"unknown task; known: {sorted(ENVIRONMENTS)}")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Load a run's resolved `config.yaml` onto the schema, for a job started on its own.

    Secrets were redacted from that file; they come back from the environment
    (see `rlrun.redact.SECRETS_ENV`).
    """
    from rlrun.redact import restore_secrets

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    restore_secrets(cfg)
    validate(cfg)
    return cfg  # type: ignore[return-value]
