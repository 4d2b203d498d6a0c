"""A compact line per step (and a rich table for samples) in the job's text log / stdout."""

from __future__ import annotations

from typing import Any

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext


def format_value(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


class ConsoleBackend(Backend):
    name = "console"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.keys = list(cfg.metrics or [])
        self.job = ctx.job

    def _emit(self, text: str) -> None:
        try:
            from rlrun.log import get_logger

            get_logger().info(text)
        except RuntimeError:  # no process logger (library use): print with rich instead
            from rich.console import Console

            Console(highlight=False).print(text, markup=False)

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for point in points:
            keys = [k for k in self.keys if k in point.metrics] if self.keys else sorted(point.metrics)
            body = " | ".join(f"{k} {format_value(point.metrics[k])}" for k in keys)
            self._emit(f"[{self.job}] step {point.step} | {body}")

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._emit(f"[{self.job}] {len(params)} hyperparameters logged")

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        from rlrun.log import render_table

        columns = list(rows[0])
        table = render_table(f"{self.job} samples, step {step}", columns, [[row.get(c) for c in columns] for row in rows])
        self._emit("\n" + table)

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        n = len(values)
        ordered = sorted(values)
        mean = sum(values) / n
        self._emit(
            f"[{self.job}] step {step} | {name}: n={n} mean={format_value(mean)} "
            f"p50={format_value(ordered[n // 2])} min={format_value(ordered[0])} max={format_value(ordered[-1])}"
        )

    def log_alert(self, alert: Alert) -> None:
        """Nothing: the doctor itself writes each finding's warning line to the job's log, the
        console backend's destination, whether or not this backend is on."""
