"""The one small interface every tracking backend implements.

Backends are called only from their own writer thread (see `delivery.py`), never from
the training loop, so they may block, raise, or talk to a slow server: the delivery
layer retries failures and keeps what could not be delivered.
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


@dataclass
class TrackerContext:
    """What a backend needs to know about the job it records."""

    job: str  # "trainer", "orchestrator", ...: names files, W&B runs and MLflow prefixes
    output_dir: Path  # the run directory
    run_name: str = "rlrun"
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """One tracker destination. Methods may raise; the caller retries the same data.

    Constructed as `Backend(cfg, ctx)`: `cfg` is the backend's own node of the `logger`
    config (e.g. `logger.mlflow`), `ctx` the job's TrackerContext. The constructor must be
    cheap and offline; connecting belongs in `open()`.
    """

    name: str = "backend"
    # Most metric values one `log_metrics_batch` call may carry (one request for HTTP backends).
    max_batch_metrics: int = 100_000

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        """Fail fast, on the caller's thread, for settings that can never work (no credentials)."""

    def open(self) -> None:
        """Connect / create the run; called on the writer thread before the first delivery."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int, time: float) -> None: ...

    def log_metrics_batch(self, points: list[MetricPoint]) -> None:
        """Deliver several steps at once; backends with a batch API override this."""
        for point in points:
            self.log_metrics(point.metrics, point.step, point.time)

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """`params` is flat (dotted keys) and already redacted."""

    @abstractmethod
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A table of rollouts: each row maps column name to a str / int / float."""

    @abstractmethod
    def log_distribution(self, name: str, values: list[float], step: int) -> None: ...

    def run_identity(self) -> dict[str, str]:
        """Ids a resumed job needs to continue the same tracker run (e.g. {'wandb_run_id': ...})."""
        return {}

    def finish(self) -> None:
        """Flush and close; called once, on the writer thread, after the last delivery."""
