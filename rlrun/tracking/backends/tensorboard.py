"""TensorBoard backend: scalars, histograms and markdown text through torch's SummaryWriter.

Each job writes its own event files under `<log_dir>/<job>`, so TensorBoard shows the
trainer and the orchestrator as two runs of one experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext


def _cell(value: Any) -> str:
    """One markdown table cell: pipes escaped, newlines kept as <br> so rows stay rows."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorboardBackend(Backend):
    name = "tensorboard"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        base = Path(getattr(cfg, "log_dir", None) or Path(ctx.output_dir) / "tensorboard")
        self.log_dir = base / ctx.job if ctx.job else base
        self.flush_secs = float(getattr(cfg, "flush_secs", 5.0))
        self._writer: Any = None

    def open(self) -> None:
        if self._writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when this backend is on

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for point in points:
            for key, value in point.metrics.items():
                self._writer.add_scalar(key, float(value), global_step=point.step, walltime=point.time)
        # The file writer buffers; flushing per batch makes what we were handed durable.
        self._writer.flush()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        rows = [[key, value] for key, value in sorted(params.items())]
        self._writer.add_text("hyperparams", markdown_table(["key", "value"], rows), global_step=0)
        self._writer.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = markdown_table(columns, [[row.get(c, "") for c in columns] for row in rows])
        self._writer.add_text("samples", table, global_step=step)
        self._writer.flush()

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        self._writer.add_histogram(name, np.asarray(values, dtype=np.float64), global_step=step)
        self._writer.flush()

    def log_alert(self, alert: Alert) -> None:
        # One text series per rule: TensorBoard's Text tab lists them by step.
        self._writer.add_text(f"alerts/{alert.job}/{alert.rule}", alert.text(), global_step=alert.step, walltime=alert.time)
        self._writer.flush()

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
