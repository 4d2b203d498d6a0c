"""`Doctor`: the rules of `rlrun.doctor.rules` applied to one job's metric points."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rlrun.doctor.config import RULE_SCHEMAS, TrackerRule
from rlrun.doctor.rules import HINTS, RULE_KINDS, Finding, Rule
from rlrun.tracking.base import Alert, MetricPoint

log = logging.getLogger("rlrun.doctor")


class Doctor:
    """Called with each batch of the job's metric points (on the jsonl writer's thread, after
    they are on disk); reports findings to `alert`. `failing` gives, per tracker backend now
    failing, the seconds since its first failure."""

    def __init__(self, cfg: Any, job: str, alert: Callable[[Alert], None],
                 failing: Callable[[], dict[str, float]] = dict) -> None:  # fmt: skip
        self.job = job
        self.alert = alert
        self.failing = failing
        self.stop_on = set(cfg.stop_on)
        self.rules: list[Rule] = [
            RULE_KINDS[schema](name, cfg[name])
            for name, schema in RULE_SCHEMAS.items()
            if schema in RULE_KINDS and cfg[name].enabled
        ]
        self.tracker_rule: TrackerRule | None = cfg.tracker if cfg.tracker.enabled else None
        self._failing_reported: set[str] = set()

    def __call__(self, points: list[MetricPoint]) -> None:
        for point in points:
            for rule in self.rules:
                finding = rule.observe(point.metrics)
                if finding is not None:
                    self._report(rule.name, finding, point.step)
            if self.tracker_rule is not None:
                self._check_trackers(point.step)

    def _check_trackers(self, step: int) -> None:
        failing = self.failing()
        self._failing_reported &= set(failing)  # a backend that recovered may be reported again
        for backend, seconds in failing.items():
            if seconds >= self.tracker_rule.after_s and backend not in self._failing_reported:  # type: ignore[union-attr]
                self._failing_reported.add(backend)
                self._report("tracker", Finding(f"tracker/{backend}", seconds, "(seconds failing)"), step)

    def _report(self, rule: str, finding: Finding, step: int) -> None:
        alert = Alert(job=self.job, rule=rule, metric=finding.metric, step=step, value=float(finding.value),
                      detail=finding.detail, hint=HINTS[rule], stop=rule in self.stop_on, time=time.time())  # fmt: skip
        (log.error if alert.stop else log.warning)(alert.text())
        self.alert(alert)
