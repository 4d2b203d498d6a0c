"""The local record: `<run>/metrics/<job>.jsonl`, append-only, one JSON object per call.

Always on. Every line is flushed as it is written, so the file holds everything logged
up to a crash; `rlrun.tracking.record` reads it back without any tracker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext


def jsonl_path(cfg: Any, ctx: TrackerContext) -> Path:
    root = Path(cfg.dir) if cfg.dir else ctx.output_dir / "metrics"
    return root / f"{ctx.job}.jsonl"


class JsonlBackend(Backend):
    name = "jsonl"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.path = jsonl_path(cfg, ctx)
        self._file = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, default=str, allow_nan=True) + "\n")

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for p in points:
            self._write({"type": "metrics", "step": p.step, "time": p.time, "metrics": p.metrics})
        self._file.flush()  # type: ignore[union-attr]

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._write({"type": "hyperparams", "params": params})
        self._file.flush()  # type: ignore[union-attr]

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._write({"type": "samples", "step": step, "rows": rows})
        self._file.flush()  # type: ignore[union-attr]

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        self._write({"type": "distribution", "step": step, "name": name, "values": values})
        self._file.flush()  # type: ignore[union-attr]

    def log_alert(self, alert: Alert) -> None:
        self._write({"type": "alert", **alert.record()})
        self._file.flush()  # type: ignore[union-attr]

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
