"""ClearML backend: one offline ClearML task per job, its session folder under the run directory.

Each job is its own task (`<name>-<job>`, type `training`) in the project `logger.clearml.project`,
kept as ClearML's offline session: `<dir>/<task id>/` (`task.json`: the task and its
hyperparams; `metrics.jsonl`: the reported events, one JSON list of events a line) and, at
`finish()`, `<dir>/<task id>.zip`, which `clearml-task`'s `Task.import_offline_session(<zip>)`
uploads to a ClearML server later (the server is the viewer: ClearML has no local UI).

What goes where (ClearML's own types):
- scalars: `report_scalar(title, series)`, title = the name up to its last `/`, series = its
  last part (`rewards/lcs/mean` -> `rewards/lcs` / `mean`); a name without `/` is title and
  series both (`loss` -> `loss` / `loss`, ClearML's way for a single line). Two names that map
  to one pair (`x` and `x/x`) are refused (ValueError) before anything of that batch is sent.
  Iterations are rlrun's steps, as they are: no offset (Task.init's continue would resume at
  last iteration + 1; we never call it, see below);
- hyperparams: section `rlrun` of the task's hyperparams (`rlrun/<key>`); ClearML keeps every
  value as a string with its type name (`get_parameters(cast=True)` gives them back typed);
- samples: `report_table` (a plotly table, title and series `samples`) at their step, with a
  `step` column first; the newest `max_table_rows` rows of that call;
- distributions: `report_histogram` (ClearML takes counts, not values): 64 equal bins between
  the values' min and max, x labels the bins' left edges (`repr` of the float);
- alerts: a console-log line of the task (`report_text`, level ERROR when the doctor stops the
  run, else WARNING), the task's log being ClearML's place for text.

Offline and quiet. `Task.set_offline(True)` is process-wide (it also sets CLEARML_OFFLINE_MODE
for child processes): no API server is contacted, whatever `clearml.conf` says. We never call
`Task.init`: it makes the task the process's one main task (a second job in the process would
get the first one's), reseeds `random` / numpy / torch with the task's seed (1337), patches
`os.fork`, `sys.excepthook` and the signal handlers (SIGTERM is the supervisor's), hooks
argparse / Hydra / frameworks, captures stdout, the script, its git diff and installed packages
(`auto_connect_*`, `detect_repository`), and checks `https://updates.clear.ml` for a new version
(no setting switches that off: only skipping repository detection does). Instead we build the
task as `Task.init` does inside (`Task(private=..., project_name=..., task_name=...)`, then
`started()`), in a subclass (`_LocalTask`) that keeps its session folder under `dir` (ClearML's
own is `~/.clearml/cache/offline`, or CLEARML_CACHE_DIR, both process-wide) and writes events
from a thread, not from the reporter subprocess `development.report_use_subprocess` forks on
Linux (it makes closing take ~10 s). Nothing is written to HOME (`~/.clearml/.session.json`
is Task.init's), and no argv or environment is recorded. The task's `comment` is ClearML's
"Auto-generated at <time> by <user>@<host>". Tested with clearml 2.1.12.

Events are written by ClearML's reporter thread: each call flushes and waits for it, so what a
call returns from is in `metrics.jsonl`; a write error inside that thread is logged by ClearML,
not raised. Event timestamps are the writing time (ClearML takes none from the caller).

Re-delivery and resume are harmless: each (title, series) is sent only for steps above the last
one `metrics.jsonl` holds for it (read back on resume), tables and histograms likewise per
step, and an alert only if the log has no line with its text. A resumed job
(`resume_ids["clearml_task_id"]`) reloads the task from its `task.json` and appends to the same
`metrics.jsonl`; the zip is rewritten at `finish()`.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin
from rlrun.tracking.names import clearml_pair

SAMPLES_KEY = "samples"
PARAMS_SECTION = "rlrun"
HISTOGRAM_BINS = 64
_EVENTS_FILE = "metrics.jsonl"  # clearml.backend_interface.metrics.Metrics' offline file


@dataclass
class ClearmlLoggerConfig:
    enabled: bool = False
    project: str = "rlrun"
    name: Optional[str] = None  # tasks are `<name>-<job>`; default: the experiment name
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # offline sessions; default: <output_dir>/clearml


# What the `rlrun.trackers` entry point `clearml` names (this module imports no clearml).
PLUGIN = TrackerPlugin(ClearmlLoggerConfig, "rlrun.tracking.backends.clearml:ClearmlBackend")




def read_events(session_dir: Path) -> list[dict[str, Any]]:
    """Every event of an offline session, in order, as `Metrics.report_offline_session` reads them."""
    path = Path(session_dir) / _EVENTS_FILE
    if not path.exists():
        return []
    with open(path, "rt") as f:
        return [event for line in f if line.strip() for event in json.loads(line)]


def _local_task_class(session_root: Path, task_id: str) -> type:
    """clearml.Task with its offline folder at `<session_root>/<task id>`, the id drawn by us
    (so `run_identity()` knows it before `open()`), and no reporter subprocess."""
    from clearml import Task

    class _LocalTask(Task):
        _report_subprocess_enabled = False

        def get_offline_mode_folder(self) -> Optional[Path]:
            return session_root / self.task_id if self.task_id else None

        def _auto_generate(self, *args: Any, **kwargs: Any) -> str:
            super()._auto_generate(*args, **kwargs)  # offline: no request, ClearML draws an id
            return task_id

    return _LocalTask


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


class ClearmlBackend(Backend):
    name = "clearml"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        ids = ctx.resume_ids
        base_name = getattr(cfg, "name", None) or ctx.run_name
        self.root = Path(ids.get("clearml_dir") or getattr(cfg, "dir", None) or Path(ctx.output_dir) / "clearml")
        self.project = str(getattr(cfg, "project", None) or "rlrun")
        self.task_name = f"{base_name}-{ctx.job}" if ctx.job else str(base_name)
        self.tags = [str(t) for t in (getattr(cfg, "tags", None) or [])]
        self.resuming = "clearml_task_id" in ids
        self.task_id = ids.get("clearml_task_id") or f"offline-{uuid.uuid4().hex}"  # ClearML's offline id form
        self.max_rows = int(ctx.max_table_rows)
        self._task: Any = None
        self._last: dict[tuple[str, str], int] = {}  # (title, series) -> last iteration of its scalars
        self._plotted: set[tuple[str, str, int]] = set()  # (title, series, iteration) of tables / histograms
        self._logged: set[str] = set()  # text of every log line
        self._names: dict[tuple[str, str], str] = {}  # (title, series) -> the one metric name it holds

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        import importlib.util

        if importlib.util.find_spec("clearml") is None:
            raise RuntimeError("logger.clearml is on but clearml is not installed: `pip install clearml`")

    @property
    def session_dir(self) -> Path:
        return self.root / self.task_id

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._task is not None:
            return
        from clearml import Task

        Task.set_offline(True)  # before any task exists: no server, no session
        self.root.mkdir(parents=True, exist_ok=True)
        cls = _local_task_class(self.root.absolute(), self.task_id)
        if self.resuming:
            self._read_back()
            task = cls(private=Task._Task__create_protection, task_id=self.task_id, log_to_backend=True)
        else:
            task = cls(private=Task._Task__create_protection, project_name=self.project, task_name=self.task_name,
                       task_type=Task.TaskTypes.training, log_to_backend=True)  # fmt: skip
            if self.tags:
                task.add_tags(self.tags)
        task.started()
        self._task = task

    def _read_back(self) -> None:
        """What the session already holds: a resumed job sends none of it again."""
        for event in read_events(self.session_dir):
            kind, key = event.get("type"), (event.get("metric"), event.get("variant"))
            if kind == "training_stats_scalar":
                self._last[key] = max(self._last.get(key, -1), int(event["iter"]))
            elif kind == "plot":
                self._plotted.add((*key, int(event["iter"])))
            elif kind == "log":
                self._logged.add(event.get("msg", ""))

    def run_identity(self) -> dict[str, str]:
        return {"clearml_task_id": self.task_id, "clearml_dir": str(self.root.absolute())}

    def finish(self) -> None:
        if self._task is not None:
            # Flushes, marks nothing (not the main task) and writes <dir>/<task id>.zip.
            self._task.close()
            self._task = None

    def _flush(self) -> None:
        self._task.flush(wait_for_uploads=True)  # the reporter thread has written the events

    # ------------------------------------------------------------ data

    def _pairs(self, names: list[str]) -> dict[str, tuple[str, str]]:
        pairs = {name: clearml_pair(name) for name in dict.fromkeys(names)}
        taken = dict(self._names)
        for name, pair in pairs.items():
            if taken.setdefault(pair, name) != name:
                raise ValueError(f"clearml: metrics {taken[pair]!r} and {name!r} are both title/series {pair}")
        self._names = taken
        return pairs

    def log_metrics(self, points: list[MetricPoint]) -> None:
        pairs = self._pairs([name for point in points for name in point.metrics])
        logger = self._task.get_logger()
        sent = False
        for point in points:
            for name, value in point.metrics.items():
                title, series = pairs[name]
                if point.step <= self._last.get((title, series), -1):
                    continue  # delivered before (a retry, or the previous attempt of a resumed job)
                logger.report_scalar(title, series, float(value), iteration=point.step)
                self._last[(title, series)] = point.step
                sent = True
        if sent:
            self._flush()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        # Merged into task.json (rewritten whole): a retry is harmless.
        self._task.update_parameters({f"{PARAMS_SECTION}/{k}": _cell(v) for k, v in params.items()})

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows or (SAMPLES_KEY, SAMPLES_KEY, step) in self._plotted:
            return
        data = [{"step": step, **{k: _cell(v) for k, v in row.items()}} for row in rows[-self.max_rows :]]
        columns = list(dict.fromkeys(k for row in data for k in row))
        table = [columns, *([row.get(c, "") for c in columns] for row in data)]
        self._task.get_logger().report_table(SAMPLES_KEY, SAMPLES_KEY, iteration=step, table_plot=table)
        self._plotted.add((SAMPLES_KEY, SAMPLES_KEY, step))
        self._flush()

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        title, series = self._pairs([name])[name]
        if (title, series, step) in self._plotted:
            return
        counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=HISTOGRAM_BINS)
        self._task.get_logger().report_histogram(
            title, series, values=counts.tolist(), iteration=step, xlabels=[repr(float(e)) for e in edges[:-1]],
            xaxis=name, yaxis="count",
        )  # fmt: skip
        self._plotted.add((title, series, step))
        self._flush()

    def log_alert(self, alert: Alert) -> None:
        text = alert.text()
        if text in self._logged:
            return
        # print_console=False: into the task's log only (at WARNING and above ClearML sends it).
        self._task.get_logger().report_text(text, level=logging.ERROR if alert.stop else logging.WARNING,
                                            print_console=False)  # fmt: skip
        self._logged.add(text)
        self._flush()
