"""Runs as a report sees them: their metrics, read back from the run's own record.

Only `metrics/<job>.jsonl` (metrics and the run doctor's `alert` records, through
`rlrun.tracking.record`, the one reader of the record)
and `.hydra/overrides.yaml` are read: no tracker, no server, so a finished, crashed or
still-running run can be reported on alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlrun.tracking.record import read_alerts, read_metrics, record_path

JOBS = ("orchestrator", "trainer", "monitor")
ELAPSED = "system/elapsed_s"  # the monitor's x-axis: wall-clock seconds since the start


class NotARun(ValueError):
    """A path given to the report that is neither a run nor a sweep (or has nothing recorded yet)."""


@dataclass
class Series:
    x: list[float]
    y: list[float]


@dataclass
class Run:
    path: Path
    label: str
    overrides: list[str]
    metrics: dict[str, dict[str, Series]] = field(default_factory=dict)  # job -> metric -> series
    alerts: list[dict[str, Any]] = field(default_factory=list)  # the run doctor's findings, oldest first

    def get(self, job: str, name: str) -> Series | None:
        return self.metrics.get(job, {}).get(name)

    def names(self, job: str, prefix: str = "") -> list[str]:
        return sorted(k for k in self.metrics.get(job, {}) if k.startswith(prefix))

    @property
    def steps(self) -> int:
        training = [s for job in ("orchestrator", "trainer") for s in self.metrics.get(job, {}).values() if s.x]
        return max((int(max(s.x)) for s in training), default=0)


def is_run_dir(path: Path) -> bool:
    return (path / "metrics").is_dir() and any((path / "metrics").glob("*.jsonl"))


def sweep_jobs(path: Path) -> list[Path]:
    """A sweep directory's job directories, in job order: Hydra's numbered subdirs (any
    subdir name when Hydra's `multirun.yaml` says it is a sweep)."""
    if not path.is_dir():
        return []
    named = (path / "multirun.yaml").is_file()
    jobs = [p for p in path.iterdir() if p.is_dir() and (named or p.name.isdigit()) and is_run_dir(p)]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def read_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (Hydra's own `hydra.*` ones left out): they label a sweep's jobs."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(o) for o in overrides if not str(o).startswith("hydra.")]


def _series(records: list[dict[str, Any]], job: str) -> dict[str, Series]:
    """A job's numeric metrics as series over the step (the monitor's: over elapsed seconds)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        by_step[int(record["step"])] = record.get("metrics", {})  # a step logged twice: the last wins
    series: dict[str, Series] = {}
    for step in sorted(by_step):
        metrics = by_step[step]
        x = float(metrics.get(ELAPSED, step)) if job == "monitor" else float(step)
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                s = series.setdefault(name, Series([], []))
                s.x.append(x)
                s.y.append(float(value))
    return series


def load_run(path: Path, label: str = "") -> Run:
    """The run at `path`, with every job that has recorded metrics."""
    run = Run(path, label or path.name, read_overrides(path))
    for job in JOBS:
        if records := read_metrics(record_path(path, job)):
            run.metrics[job] = _series(records, job)
    run.alerts = read_alerts(path)
    return run


def label_runs(runs: list[Run]) -> None:
    """Label each run by the overrides that tell it apart from the others."""
    if len(runs) < 2:
        return
    common = set.intersection(*(set(r.overrides) for r in runs))
    for run in runs:
        distinct = [o for o in run.overrides if o not in common]
        run.label = ",".join(distinct) or ",".join(run.overrides) or run.path.name


def resolve(paths: list[Path]) -> list[tuple[Path, list[Path]]]:
    """(where the report goes, the runs it shows) for each path given; NotARun otherwise."""
    targets = []
    for path in paths:
        if is_run_dir(path):
            targets.append((path, [path]))
        elif jobs := sweep_jobs(path):
            targets.append((path, jobs))
        elif not path.exists():
            raise NotARun(f"{path}: no such directory")
        else:
            raise NotARun(f"{path}: not a run directory (no metrics/*.jsonl) nor a sweep directory "
                          "(no numbered job subdirectories with metrics/*.jsonl)")  # fmt: skip
    return targets
