"""SwanLab backend: one offline SwanLab run per job, uploaded later with `swanlab sync`.

Each job gets its own run (name `<name>-<job>`, id `<id>-<job>`, job_type `<job>`) in
one project and group, written under `<output_dir>/swanlog` (or `logger.swanlab.log_dir`):
a folder `run-<time>-<id>` holding the record file `run-<id>.swanlab`, `files/config.yaml`
and `media/` (SwanLab writes `_` for `-` and `.` of the id in these names).
`swanlab sync <folder>` uploads one later, to the same run id.

What goes where:
- metrics: `run.log({...}, step=...)`, names kept as they are (`rewards/lcs/mean`,
  `eval/pass@4`); SwanLab itself trims leading/trailing `/`, `.` and blanks from a key and
  cuts it at 512 characters, and refuses control characters;
- hyperparameters: `run.config` (flat dotted keys, in `files/config.yaml`);
- samples: an ECharts table (`swanlab.echarts.Table`) per step under `samples`;
- distributions: SwanLab has no histogram type: the statistics `<name>/p5`, `p50`, `p95`,
  `mean`, `std`, `min`, `max` as scalars (as for MLflow), and a bar chart of the histogram
  (`swanlab.echarts.Bar`, 30 bins) under `<name>`;
- alerts: SwanLab has no alert or event record: a `swanlab.Text` under `alerts/<rule>` at
  the alert's step, the title as its caption.

SwanLab drops a value for a key and step it already has. A second media record (table,
chart, text) for a key and step this job already logged goes to the key's next free step
rather than being dropped.

Resume: SwanLab's offline mode writes a resumed run into a new folder with the same run id
(`swanlab sync` merges them into one run). Before opening it, the backend reads the earlier
folders of that id with SwanLab's own record reader and skips each key's steps already there.

Offline only, nothing phones home: mode "offline" (no login, no upload), the webhook off
(`integration.webhook.url` = "", which wins over SWANLAB_WEBHOOK), no interactive prompt, and
every probe off (hardware, runtime, requirements, conda, git, swanlab version, system monitor:
they would record the host, pip freeze and git remotes), terminal capture off.

Caveats:
- SwanLab keeps one run per process (`swanlab.init` refuses a second): two jobs in one
  process cannot both log to SwanLab; `open()` says so. rlrun runs each job as its own process.
- SwanLab's `run.log` hands data to a background thread and logs (does not raise) most of
  its own errors: a failed write is in `<run folder>/debug/debug.log`, not retried here.
- An exception that reaches the main thread's top makes SwanLab's excepthook finish the run
  as crashed; what is delivered after that fails (the run is closed) and stays in the
  delivery backlog.
- While a run is open SwanLab replaces `sys.excepthook` and registers an atexit hook (both
  undone by `finish()`); its file watcher leaves watchdog's shared inotify thread (one idle
  daemon thread per process) running after `finish()`.
"""

from __future__ import annotations

import importlib.util
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin
from rlrun.tracking.names import DISTRIBUTION_STATS

SAMPLES_KEY = "samples"
HISTOGRAM_BINS = 30
ID_KEY = "swanlab_run_id"


@dataclass
class SwanlabLoggerConfig:
    enabled: bool = False
    project: str = "rlrun"
    name: Optional[str] = None  # default: the run's name; each job's run is <name>-<job>
    group: Optional[str] = None  # default: the name
    tags: list[str] = field(default_factory=list)
    id: Optional[str] = None  # each job's run id is <id>-<job>; default: drawn per job
    log_dir: Optional[str] = None  # default: <output_dir>/swanlog


PLUGIN = TrackerPlugin(SwanlabLoggerConfig, "rlrun.tracking.backends.swanlab:SwanlabBackend")


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _param(value: Any) -> Any:
    return [_cell(v) for v in value] if isinstance(value, (list, tuple)) else _cell(value)


class SwanlabBackend(Backend):
    name = "swanlab"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        job = ctx.job
        name = getattr(cfg, "name", None) or ctx.run_name
        self.run_name = f"{name}-{job}" if job else name
        self.group = getattr(cfg, "group", None) or name
        self.log_dir = Path(getattr(cfg, "log_dir", None) or Path(ctx.output_dir) / "swanlog")
        cfg_id = getattr(cfg, "id", None) or secrets.token_hex(4)
        self.run_id = ctx.resume_ids.get(ID_KEY) or (f"{cfg_id}-{job}" if job else str(cfg_id))
        self._run: Any = None
        self._done: dict[str, int] = {}  # key -> last step an earlier attempt's folders have
        self._media_steps: dict[str, set[int]] = {}  # key -> steps this attempt logged media at

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        """Fail before any training work when the library is missing (found, not imported)."""
        if importlib.util.find_spec("swanlab") is None:
            raise RuntimeError("logger.swanlab is enabled but the swanlab package is not installed (pip install swanlab)")

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._run is not None:
            return
        import swanlab

        if swanlab.has_run():
            current = swanlab.get_run()
            if current.id == self.run_id:  # an earlier open() raised after SwanLab started the run
                self._run = current
                return
            raise RuntimeError(
                f"swanlab: another SwanLab run ({current.id}) is open in this process; SwanLab "
                f"keeps one run per process, so the {self.ctx.job} job cannot open {self.run_id}"
            )
        self._done = self._earlier_steps()
        off = dict(hardware=False, runtime=False, requirements=False, conda=False, git=False, swanlab=False, monitor=False)
        settings = swanlab.Settings(
            interactive=False,
            probe=swanlab.Settings.Probe(**off),
            terminal=swanlab.Settings.Terminal(proxy_type="none"),
            integration=swanlab.Settings.Integration(webhook={"url": ""}),
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._run = swanlab.init(
            mode="offline",
            log_dir=str(self.log_dir),
            project=getattr(self.cfg, "project", None) or "rlrun",
            name=self.run_name,
            group=self.group,
            job_type=self.ctx.job or None,
            tags=[str(t) for t in (getattr(self.cfg, "tags", None) or [])] or None,
            id=self.run_id,
            resume="allow",  # `swanlab sync` of a later folder continues this run id
            settings=settings,
        )

    def _earlier_steps(self) -> dict[str, int]:
        """Each key's last step in the earlier folders of this run id (a resumed job)."""
        files = sorted(self.log_dir.glob("run-*/run-*.swanlab")) if self.log_dir.is_dir() else []
        if not files:
            return {}
        # SwanLab's own reader of its record files (a LevelDB-style log of protobuf Records),
        # the one `swanlab sync` uses; SwanLab has no public reader. Folders and files are
        # named after a mangled run id ("-" becomes "_"), so the start record says whose they are.
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
        from swanlab.sdk.internal.core_python.store import DataStoreReader

        done: dict[str, int] = {}
        record = Record()
        for path in files:
            reader = DataStoreReader()
            reader.open(str(path))
            try:
                first = reader.scan()
                if first is None:
                    continue
                record.ParseFromString(first)
                if record.WhichOneof("record_type") != "start" or record.start.id != self.run_id:
                    continue
                for data in reader:
                    record.ParseFromString(data)
                    kind = record.WhichOneof("record_type")
                    if kind in ("scalar", "media"):
                        item = getattr(record, kind)
                        done[item.key] = max(done.get(item.key, -1), int(item.step))
            finally:
                reader.close()
        return done

    def run_identity(self) -> dict[str, str]:
        return {ID_KEY: self.run_id}

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()  # flushes the record file, restores sys.excepthook
            self._run = None

    # ------------------------------------------------------------ data

    def _new(self, key: str, step: int) -> bool:
        """Not in the earlier attempt's folders (those steps are replays)."""
        return key not in self._done or step > self._done[key]

    def _log_media(self, key: str, value: Any, step: int) -> None:
        if not self._new(key, step):
            return
        used = self._media_steps.setdefault(key, set())
        if step in used:
            step = max(used) + 1  # SwanLab would drop a second record at the same step
        self._run.log({key: value}, step=step)
        used.add(step)  # only once logged: a retried call does not move to another step

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for point in points:
            values = {k: v for k, v in point.metrics.items() if self._new(k, point.step)}
            if values:
                self._run.log(values, step=point.step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._run.config.update({key: _param(value) for key, value in params.items()})

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        import swanlab

        rows = [{"step": step, **row} for row in rows]  # a row's own "step" wins
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = swanlab.echarts.Table().add(columns, [[_cell(row.get(c, "")) for c in columns] for row in rows])
        self._log_media(SAMPLES_KEY, table, step)

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        import numpy as np
        import swanlab

        finite = np.asarray(values, dtype=np.float64)
        p5, p50, p95 = np.percentile(finite, [5, 50, 95])
        stats = (p5, p50, p95, finite.mean(), finite.std(), finite.min(), finite.max())
        scalars = {f"{name}/{s}": float(v) for s, v in zip(DISTRIBUTION_STATS, stats) if self._new(f"{name}/{s}", step)}
        if scalars:
            self._run.log(scalars, step=step)  # a retry is dropped by SwanLab as a duplicate step
        counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
        chart = swanlab.echarts.Bar()
        chart.add_xaxis([f"{edges[i]:.4g}" for i in range(len(counts))])  # each bar's lower edge
        chart.add_yaxis("count", counts.tolist())
        self._log_media(name, chart, step)

    def log_alert(self, alert: Alert) -> None:
        import swanlab

        self._log_media(f"alerts/{alert.rule}", swanlab.Text(alert.text(), caption=alert.title), alert.step)
