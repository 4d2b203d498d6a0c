"""Schemas of the `logger` group (which trackers, and how they are fed) and of `log_extras`.

Each backend's node (`logger.<name>`) comes from its `TrackerPlugin`, registered under the
`rlrun.trackers` entry-point group (rlrun's own below, third-party ones from their packages);
`rlrun.tracking.backends.logger_schema` builds the `logger` node from them all.
"""

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
    # The trained model as an MLflow logged model (transformers flavour): off, final (the last
    # step's), checkpoints (every trainer checkpoint); with registered_model_name, the final
    # one also becomes a version of that registered model.
    log_model: str = checked("off", one_of=("off", "final", "checkpoints"))
    registered_model_name: Optional[str] = None


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
    # The trained model as a W&B artifact of type `model`: off, final, checkpoints (every
    # trainer checkpoint, aliased step-<n>; the last one also `final` / `latest`).
    log_model: str = checked("off", one_of=("off", "final", "checkpoints"))


@dataclass
class DeliveryConfig:
    """How the writer threads deliver to backends (retries, memory bound, warnings)."""

    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    max_in_memory: int = 20_000  # queued events per backend before spilling to disk
    warn_interval_s: float = 30.0
    flush_timeout_s: float = 120.0  # how long finish() waits for a failing backend


@dataclass(frozen=True)
class TrackerPlugin:
    """What a tracker backend registers under the `rlrun.trackers` entry-point group (name ->
    this object): the schema of its `logger.<name>` node (a dataclass; with an `enabled: bool`
    field, `logger=<name>` selects it) and where its `Backend` class is, imported only when the
    backend is chosen. The object must live in a module that imports no tracker library."""

    config: type
    backend: str  # "package.module:BackendClass"


# rlrun's own, registered in pyproject.toml like any third-party plugin.
JSONL = TrackerPlugin(JsonlLoggerConfig, "rlrun.tracking.backends.jsonl:JsonlBackend")  # always on: the local record
CONSOLE = TrackerPlugin(ConsoleLoggerConfig, "rlrun.tracking.backends.console:ConsoleBackend")
TENSORBOARD = TrackerPlugin(TensorboardLoggerConfig, "rlrun.tracking.backends.tensorboard:TensorboardBackend")
MLFLOW = TrackerPlugin(MlflowLoggerConfig, "rlrun.tracking.backends.mlflow:MlflowBackend")
WANDB = TrackerPlugin(WandbLoggerConfig, "rlrun.tracking.backends.wandb:WandbBackend")
BUILTIN = {"jsonl": JSONL, "console": CONSOLE, "tensorboard": TENSORBOARD, "mlflow": MLFLOW, "wandb": WANDB}


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
