"""The one small interface every tracking backend implements.

Backends are called only from their own writer thread (see `delivery.py`), never from
the training loop, so they may block, raise, or talk to a slow server: the delivery
layer retries failures and keeps what could not be delivered. What reaches a backend is
already clean: metric values are floats, distribution values are finite, params are
flat and redacted, and a metrics call never carries more than `max_batch_metrics` values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple


class MetricPoint(NamedTuple):
    step: int
    metrics: dict[str, float]
    time: float  # wall-clock seconds (time.time()) when the caller logged it


@dataclass(frozen=True)
class Alert:
    """A finding of the run doctor (`rlrun.doctor`) about one job's metric stream."""

    job: str
    rule: str  # the doctor rule, e.g. "no_eos"
    metric: str  # what it watched, e.g. "completions/clipped_ratio"
    step: int
    value: float
    detail: str  # what was seen, e.g. "(>= 0.9 for 10 steps)"
    hint: str  # what it means, then what to try
    stop: bool  # the rule is in `doctor.stop_on`: the job stops
    time: float

    @property
    def title(self) -> str:
        return f"{self.job}: {self.rule}"

    def text(self) -> str:
        """One line: the rule, the metric, the step, the value, what it means and what to try."""
        stopping = " The run stops (doctor.stop_on)." if self.stop else ""
        return (f"doctor [{self.rule}] {self.job} step {self.step}: {self.metric} = {self.value:.4g} "
                f"{self.detail}: {self.hint}.{stopping}")  # fmt: skip

    def record(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "text": self.text()}


@dataclass
class TrackerContext:
    """What a backend needs to know about the job it records."""

    job: str  # "trainer", "orchestrator", ...: names files, W&B runs and MLflow prefixes
    output_dir: Path  # the run directory
    run_name: str = "rlrun"
    # Run ids a previous attempt of this job saved in its checkpoint (`Tracker.run_identity()`):
    # a resumed job continues those runs, e.g. {"wandb_run_id": ..., "mlflow_run_id": ...}.
    resume_ids: dict[str, str] = field(default_factory=dict)
    max_table_rows: int = 1000  # rows of the accumulating samples table (W&B)
    wandb_settings: dict[str, Any] = field(default_factory=dict)  # extra wandb.Settings
    mlflow_end_run: bool = False  # mark the MLflow run FINISHED on finish() (no parent owns it)


class Backend(ABC):
    """One tracker destination. Methods may raise; the caller retries the same data.

    Constructed as `Backend(cfg, ctx)`: `cfg` is the backend's own node of the `logger`
    config (e.g. `logger.mlflow`), `ctx` the job's TrackerContext. The constructor must be
    cheap and offline; connecting belongs in `open()`.
    """

    name: str = "backend"
    # Most metric values one `log_metrics` call may carry (one request for HTTP backends).
    max_batch_metrics: int = 100_000

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        """Fail fast, on the caller's thread, for settings that can never work (no credentials)."""

    def open(self) -> None:
        """Connect / create the run; called on the writer thread before the first delivery."""

    @abstractmethod
    def log_metrics(self, points: list[MetricPoint]) -> None:
        """Several steps' metrics at once, oldest first."""

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """`params` is flat (dotted keys) and already redacted."""

    @abstractmethod
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A table of rollouts: each row maps column name to a str / int / float."""

    @abstractmethod
    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        """Values of one step (never empty, all finite)."""

    @abstractmethod
    def log_alert(self, alert: Alert) -> None:
        """A run-doctor finding, in the tracker's own alert / tag / text form."""

    def wants_model(self, final: bool) -> bool:
        """Does this backend store the trained model now (`final`: the run's last step)?"""
        return False

    def log_model(self, path: Path, step: int, final: bool) -> None:
        """The policy at `step` as a complete model directory (weights, config, tokenizer), for
        trackers with a model store; called only when `wants_model` said so."""

    def run_identity(self) -> dict[str, str]:
        """Ids a resumed job needs to continue the same tracker run (e.g. {'wandb_run_id': ...})."""
        return {}

    def finish(self) -> None:
        """Flush and close; called once, on the writer thread, after the last delivery."""
