"""Each job's metrics as `<dir>/<job>/metrics.csv` (step, name, value rows), its params as
`params.csv`, alerts as `alerts.csv`; samples and distributions as row counts."""

from __future__ import annotations

import csv
from pathlib import Path

from rlrun.tracking.base import Backend


class CsvLogBackend(Backend):
    name = "csvlog"

    def __init__(self, cfg, ctx):
        self.dir = Path(cfg.dir or ctx.output_dir / "csvlog") / ctx.job
        self.delimiter = cfg.delimiter

    def _append(self, file: str, rows: list[list]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / file, "a", newline="") as f:
            csv.writer(f, delimiter=self.delimiter).writerows(rows)

    def log_metrics(self, points):
        self._append("metrics.csv", [[p.step, k, v] for p in points for k, v in p.metrics.items()])

    def log_hyperparams(self, params):
        self._append("params.csv", [[k, v] for k, v in params.items()])

    def log_samples(self, rows, step):
        self._append("samples.csv", [[step, len(rows)]])

    def log_distribution(self, name, values, step):
        self._append("distributions.csv", [[step, name, len(values)]])

    def log_alert(self, alert):
        self._append("alerts.csv", [[alert.step, alert.rule, alert.metric]])
