"""TensorBoard backend: scalars, histograms and markdown text through torch's SummaryWriter.

Each job writes its own event files under `<log_dir>/<job>`, so TensorBoard shows the
trainer and the orchestrator as two runs of one experiment. Hyperparameters go both to a
markdown table and to the HParams plugin: each job's directory is one HParams session
(its params, and the metrics of `HPARAMS_METRICS`, whose latest values the HParams view
shows), so `tensorboard --logdir outputs/multirun/<sweep>` compares a sweep's runs there.
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


# The metrics each job's HParams session shows (their latest logged values) beside its params.
HPARAMS_METRICS = {
    "orchestrator": ("reward", "eval/reward", "eval/rewards/exact/mean", "completions/clipped_ratio"),
    "trainer": ("loss", "entropy", "grad_norm", "mismatch/kl"),
    "sft": ("loss", "eval/reward"),
}


def _hparam_value(value: Any) -> bool | int | float | str:
    """HParams takes bool / number / str; None and lists become their text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorboardBackend(Backend):
    name = "tensorboard"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        base = Path(getattr(cfg, "log_dir", None) or Path(ctx.output_dir) / "tensorboard")
        self.log_dir = base / ctx.job if ctx.job else base
        self.hparams_metrics = HPARAMS_METRICS.get(ctx.job, ())
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
        from torch.utils.tensorboard.summary import hparams

        rows = [[key, value] for key, value in sorted(params.items())]
        self._writer.add_text("hyperparams", markdown_table(["key", "value"], rows), global_step=0)
        # The session in this job's own directory (SummaryWriter.add_hparams would open another).
        experiment, start, end = hparams({k: _hparam_value(v) for k, v in params.items()},
                                         dict.fromkeys(self.hparams_metrics, 0.0))  # fmt: skip
        for summary in (experiment, start, end):
            self._writer.file_writer.add_summary(summary)
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
