"""trackio backend: one trackio run per job, in a local trackio store (SQLite) under the run directory.

Each job is its own run (`<name>-<job>`) in the project `logger.trackio.project`, grouped by
the experiment name, so trackio's dashboard shows trainer and orchestrator side by side:
`TRACKIO_DIR=<run dir>/trackio trackio show --project <project>`.

We write through trackio's storage layer (`trackio.sqlite_storage.SQLiteStorage`, what a
local `trackio.Run` flushes to from its own thread), never through `trackio.init` / `Run`:
- `trackio.init` asks the Hugging Face Hub who the user is (`huggingface_hub.whoami`) as soon
  as an HF token is around, even for a local run; it also prints, and may start a dashboard;
- `Run.log` queues, and its thread drops a batch it cannot write with a warning; here each
  call writes synchronously and raises, so the delivery layer retries it.
Retries and resumes are harmless: every row carries a deterministic id (trackio's `log_id` /
`alert_id`, unique in its store, inserted with INSERT OR IGNORE), and a resumed run skips
steps at or below the last step the run already holds.

Local only: nothing here opens a connection. The store's one network path
(`SQLiteStorage._ensure_hub_loaded`, which downloads a Space's data when TRACKIO_BUCKET_ID or
TRACKIO_DATASET_ID is set) is refused in `preflight` and `open`. trackio reads its directory
(TRACKIO_DIR) once at import into module globals; each write points them at this run's
directory under a process-wide lock and puts them back after (`trackio_dir`), so several
backends (and tests, and other trackio users in the process) can use different directories.

Mapping, as `trackio.log` does it: names trackio reserves (`step`, `time`, `timestamp`,
`project`, `run`, `metrics`) and names starting with `__` get a `__` prefix; `/` is kept.
Hyperparams are the run's config (keys starting with `_` are trackio's own, so a param key
`_x` becomes `param_x`); samples are a `trackio.Table` under `samples` at their step;
distributions a `trackio.Histogram` under their name; alerts trackio's own alerts (level
`error` when the doctor stops the run, else `warn`). Tested with trackio 0.43.0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin

SAMPLES_KEY = "samples"
HISTOGRAM_BINS = 64  # trackio.Histogram's default
RESERVED_KEYS = frozenset({"project", "run", "timestamp", "step", "time", "metrics"})  # trackio.utils.RESERVED_KEYS
# Set, these make trackio's store download a Space's data from the Hub on first use.
_REMOTE_VARS = ("TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")
# trackio keeps its directory in module globals: one `trackio_dir` block at a time.
_STORE_LOCK = threading.Lock()


@dataclass
class TrackioLoggerConfig:
    enabled: bool = False
    project: str = "rlrun"
    name: Optional[str] = None  # runs are `<name>-<job>`; default: the experiment name
    group: Optional[str] = None  # default: the name
    dir: Optional[str] = None  # the trackio store; default: <output_dir>/trackio


# What the `rlrun.trackers` entry point `trackio` names (this module imports no trackio).
PLUGIN = TrackerPlugin(TrackioLoggerConfig, "rlrun.tracking.backends.trackio:TrackioBackend")


def _refuse_remote_env() -> None:
    found = [var for var in _REMOTE_VARS if os.environ.get(var)]
    if found:
        raise RuntimeError(
            f"the trackio backend logs locally only, but {', '.join(found)} is set: trackio would sync "
            "with the Hugging Face Hub. Unset it for this run (or leave logger.trackio off)."
        )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _key(name: str) -> str:
    return f"__{name}" if name in RESERVED_KEYS or name.startswith("__") else name


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


_DIR_ATTRS = {"TRACKIO_DIR": "", "MEDIA_DIR": "media", "ARTIFACTS_DIR": "artifacts"}
_dir_refs: tuple[int, list[tuple[Any, str]]] = (-1, [])  # (len(sys.modules), [(module, attr)])


def _trackio_dir_refs() -> list[tuple[Any, str]]:
    """Where trackio keeps its directory: TRACKIO_DIR (read once, at import) and the paths
    derived from it, copied into the globals of several modules (`trackio.utils`,
    `trackio.sqlite_storage`, `trackio.table`, ...). Looked up again when modules were imported."""
    global _dir_refs
    if _dir_refs[0] != len(sys.modules):
        refs = [
            (module, attr)
            for module_name, module in sys.modules.copy().items()
            if module is not None and (module_name == "trackio" or module_name.startswith("trackio."))
            for attr in _DIR_ATTRS
            if isinstance(getattr(module, attr, None), Path)
        ]
        _dir_refs = (len(sys.modules), refs)
    return _dir_refs[1]


@contextlib.contextmanager
def trackio_dir(directory: Path) -> Iterator[None]:
    """trackio's store and readers use `directory` inside this block (process-wide: one
    block at a time); trackio's own setting is back after it, for any other user of trackio."""
    with _STORE_LOCK:
        refs = _trackio_dir_refs()
        saved = [getattr(module, attr) for module, attr in refs]
        try:
            for module, attr in refs:
                setattr(module, attr, directory / _DIR_ATTRS[attr])  # directory / "" is directory
            yield
        finally:
            for (module, attr), value in zip(refs, saved):
                setattr(module, attr, value)


class TrackioBackend(Backend):
    name = "trackio"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        ids = ctx.resume_ids
        base_name = getattr(cfg, "name", None) or ctx.run_name
        # A resumed job keeps the run it had: same store, project, name and id.
        self.dir = Path(ids.get("trackio_dir") or getattr(cfg, "dir", None) or Path(ctx.output_dir) / "trackio")
        self.project = ids.get("trackio_project") or str(getattr(cfg, "project", None) or "rlrun")
        self.run_name = ids.get("trackio_run_name") or (f"{base_name}-{ctx.job}" if ctx.job else str(base_name))
        self.group = getattr(cfg, "group", None) or base_name
        self.resuming = "trackio_run_id" in ids
        self.run_id = ids.get("trackio_run_id") or uuid.uuid4().hex  # known before open()
        self._config: dict[str, Any] | None = None  # the run's config as stored; None until open()
        self._resumed_through = -1  # the run's last step when this attempt opened it

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        import importlib.util

        if importlib.util.find_spec("trackio") is None:
            raise RuntimeError("logger.trackio is on but trackio is not installed: `pip install trackio`")
        _refuse_remote_env()

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        from trackio.sqlite_storage import SQLiteStorage  # imports trackio: only when this backend is on

        with trackio_dir(self.dir):
            yield SQLiteStorage

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._config is not None:
            return
        _refuse_remote_env()
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._store() as store:
            store.validate_project_name(self.project)
            config: dict[str, Any] = {}
            if self.resuming:
                last = store.get_max_step_for_run(self.project, run_id=self.run_id)
                self._resumed_through = -1 if last is None else int(last)
                config = store.get_run_config(self.project, run_id=self.run_id) or {}
            config = {**config, "_Group": self.group}
            config.setdefault("_Created", datetime.now(timezone.utc).isoformat())
            self._write_config(store, config)
        self._config = config

    def _write_config(self, store: Any, config: dict[str, Any]) -> None:
        # trackio stores a run's config beside a metrics row (its runs are their rows): one
        # empty row at step 0 with a fixed id, written once; the config is replaced whole.
        store.bulk_log(
            project=self.project,
            run=self.run_name,
            run_id=self.run_id,
            metrics_list=[{}],
            steps=[0],
            log_ids=[f"{self.run_id}:run"],
            config=config,
        )

    def run_identity(self) -> dict[str, str]:
        return {
            "trackio_run_id": self.run_id,
            "trackio_run_name": self.run_name,
            "trackio_project": self.project,
            "trackio_dir": str(self.dir.absolute()),
        }

    def finish(self) -> None:
        self._config = None  # every call already wrote synchronously: nothing is buffered

    # ------------------------------------------------------------ data

    def _write_rows(self, rows: list[tuple[int, dict[str, Any], str, float | None]]) -> None:
        """(step, values, log_id, time) rows, one transaction."""
        if not rows:
            return
        with self._store() as store:
            store.bulk_log(
                project=self.project,
                run=self.run_name,
                run_id=self.run_id,
                metrics_list=[values for _, values, _, _ in rows],
                steps=[step for step, _, _, _ in rows],
                log_ids=[log_id for _, _, log_id, _ in rows],
                timestamps=[_iso(t) if t is not None else datetime.now(timezone.utc).isoformat() for *_, t in rows],
            )

    def log_metrics(self, points: list[MetricPoint]) -> None:
        rows = []
        for point in points:
            if point.step <= self._resumed_through:
                continue  # the run has this step from the previous attempt
            values = {_key(name): float(value) for name, value in point.metrics.items()}
            # Same step and same names: same id, so a retried batch inserts nothing twice.
            rows.append((point.step, values, f"{self.run_id}:m:{point.step}:{_digest(sorted(values))}", point.time))
        self._write_rows(rows)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        assert self._config is not None, "open() first"
        # Keys starting with "_" are trackio's own (_Group, _Created): keep params out of them.
        config = {**self._config, **{(f"param{k}" if k.startswith("_") else k): _cell(v) for k, v in params.items()}}
        with self._store() as store:
            self._write_config(store, config)
        self._config = config

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows or step <= self._resumed_through:
            return
        from trackio.table import Table

        data = [{"step": step, **{k: _cell(v) for k, v in row.items()}} for row in rows]  # a row's own "step" wins
        table = Table(data=data)._to_dict(project=self.project, run=self.run_name, step=step)  # how trackio.log stores it
        self._write_rows([(step, {SAMPLES_KEY: table}, f"{self.run_id}:samples:{step}:{_digest(data)}", None)])

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        if step <= self._resumed_through:
            return
        from trackio.histogram import Histogram

        histogram = Histogram(values, num_bins=HISTOGRAM_BINS)._to_dict()  # a digest of the bins: cheaper than of the values
        self._write_rows([(step, {_key(name): histogram}, f"{self.run_id}:dist:{name}:{step}:{_digest(histogram)}", None)])

    def log_alert(self, alert: Alert) -> None:
        text = alert.text()
        with self._store() as store:
            store.bulk_alert(
                project=self.project,
                run=self.run_name,
                run_id=self.run_id,
                titles=[alert.title],
                texts=[text],
                levels=["error" if alert.stop else "warn"],  # trackio.AlertLevel values
                steps=[alert.step],
                timestamps=[_iso(alert.time)],
                alert_ids=[f"{self.run_id}:alert:{alert.rule}:{alert.step}:{_digest(text)}"],
            )
