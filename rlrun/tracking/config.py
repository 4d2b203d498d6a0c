"""Schemas of the `logger` group (which trackers, and how they are fed) and of `log_extras`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlrun.schema import checked


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


@dataclass
class LogExtrasConfig:
    """Sample tables and distributions (the `log_extras` group)."""

    samples: bool = False  # a table of informative rollouts (orchestrator)
    distributions: bool = False  # histograms: rewards, advantages, lengths; entropy, ratios, loss
    interval: int = checked(10, gt=0)  # every this many steps
    samples_per_step: int = checked(8, gt=0)  # rows per logged step
    max_rows: int = checked(1000, gt=0)  # rows the accumulating W&B table keeps (the newest)


@dataclass
class JobLogExtrasConfig:
    """A job's own `log_extras`: a key left null follows the top-level group, one set wins for
    that job only (`orchestrator.log_extras.interval=5`). Jobs read it filled in (`job_log_extras`)."""

    samples: Optional[bool] = None
    distributions: Optional[bool] = None
    interval: Optional[int] = checked(None, gt=0)
    samples_per_step: Optional[int] = checked(None, gt=0)
    max_rows: Optional[int] = checked(None, gt=0)
