"""Comet backend: one Comet offline experiment per job, archived as zips under the run directory.

Each job is its own experiment (`<name>-<job>`) in the project `logger.comet.project`, kept as
Comet's offline archive `<dir>/<key>.zip` (`experiment.json`: key, project, workspace, tags,
start and stop times; `messages.json`: one JSON message a line; the files of tables,
histograms and texts beside them), which `comet upload <dir>/*.zip` sends to a Comet server
later (the server is the viewer: Comet has no local UI). A resumed job writes one more zip of
the same experiment, `<dir>/<key>-<suffix>.zip` (Comet's own resume form, uploaded into the
same experiment): an experiment is all the zips of its key (`read_archives`).

What goes where (Comet's own types):
- scalars: `log_metrics(step=...)`, names kept as they are (`/` and `@` included: Comet keeps
  both); a name longer than Comet's 100 characters (which Comet would cut) is refused
  (ValueError) before anything of that batch is sent. Steps are rlrun's, unshifted. Comet takes
  no timestamp: a metric's `local_timestamp` is the time it was written, not rlrun's.
- hyperparams: `log_parameters`, flat dotted keys, values as they are (Comet keeps their type).
- samples: `log_table("samples-step-<step>.csv")`, Comet's table (shown in its Data panel), at
  its step, with a `step` column first; the newest `max_table_rows` rows of that call. CSV: the
  values come back as text. (`log_table` takes a file of that name in the working directory,
  if there is one, instead of the rows: such a file is refused, ValueError.)
- distributions: `log_histogram_3d(values, name, step)`, Comet's 3D histogram (its own fixed
  logarithmic bins; `comet_ml.Histogram.from_json` reads the file back).
- alerts: Comet has no alert type: `log_text(alert.text(), step=alert.step)` (the Text tab),
  with the alert's fields and `level` (error when the doctor stops the run, else warning) as
  the text's metadata. (`log_other` would keep only the newest value per key.)
Comet adds its own: a `curr_step` parameter per step logged, the `offline_experiment` / `Name`
others and, at `end()`, a `process duration` metric (seconds) at the last step (not under pytest).

Only what is logged is archived at `end()` (`finish()`): until then the session is a folder
`<dir>/.<key>-<random>/` written by Comet's streamer thread, which the zip replaces. A job that
dies before `finish()` leaves that folder and no zip: its session never reaches Comet (the
jsonl record keeps everything anyway), and its resumed attempt, which reads only the zips,
sends its steps again from the checkpoint on. If `<dir>` cannot be written at `end()`, Comet
puts the zip in a temporary directory: `finish()` then raises, saying where it is. Comet logs
its own errors (a refused table, a message its streamer could not write) instead of raising.

Offline and quiet: `OfflineExperiment` never contacts a server, and every automatic logger is
off: `log_env_*` (details, gpu, cpu, network, disk, host: system metrics, hostname, user, pip
packages), `auto_*` (metrics, params, stdout, histograms, CO2), `log_git_*`, `log_code`,
`log_graph`, `parse_args` (argv) and the summary. Importing comet_ml is process-wide, so
before it (and it is imported here only) `open()` sets COMET_ERROR_TRACKING_ENABLE=false (else
half of the imports start Sentry, which sends Comet's logged errors to sentry.io; if comet_ml was
imported before, a Sentry client with Comet's DSN is dropped), COMET_DISABLE_AUTO_LOGGING=1
(else it installs an import hook that patches torch, tensorboard, mlflow, ... when imported)
and, unless set, MPLCONFIGDIR=<dir>/.matplotlib (comet_ml imports matplotlib, which else writes
~/.config/matplotlib and ~/.cache/matplotlib). The import also draws one number from `random`
(Sentry's sampling): the state is restored after it. It still wraps `sys.excepthook` (to mark
its experiment crashed). Comet's own temporary folder (`tempfile.mkdtemp()`, under /tmp) is
moved to `<dir>` (`_LocalExperiment`): nothing is written outside `<dir>`, nothing to HOME.
A resume passes Comet's `_resume_strategy` itself, as `ExistingOfflineExperiment` does: that
class refuses `log_env_network` and the `auto_histogram_*` switches. Tested with comet_ml 3.58.8.

Re-delivery and resume are harmless: each metric is sent only for steps above the last one the
experiment holds for it, tables and histograms only for steps they do not have, an alert only
if no text of the experiment is its text, and a parameter only if its value changed; what a
resumed job's experiment holds is read back from its zips on `open()`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin

COMET_MAX_NAME_LENGTH = 100  # comet_ml.config.MAXIMAL_KEY_LENGTH: longer metric names are cut
SAMPLES_PREFIX = "samples-step-"
_OFF = dict(
    log_code=False, log_graph=False, auto_param_logging=False, auto_metric_logging=False, parse_args=False,
    auto_output_logging=False, log_env_details=False, log_git_metadata=False, log_git_patch=False,
    log_env_gpu=False, log_env_host=False, log_env_cpu=False, log_env_network=False, log_env_disk=False,
    display_summary_level=0, auto_log_co2=False, auto_histogram_tensorboard_logging=False,
    auto_histogram_weight_logging=False, auto_histogram_gradient_logging=False,
    auto_histogram_activation_logging=False,
)  # fmt: skip


@dataclass
class CometLoggerConfig:
    enabled: bool = False
    project: str = "rlrun"
    workspace: Optional[str] = None  # where `comet upload` files it; default: the API key's
    name: Optional[str] = None  # experiments are `<name>-<job>`; default: the experiment name
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # offline archives; default: <output_dir>/comet


# What the `rlrun.trackers` entry point `comet` names (this module imports no comet_ml).
PLUGIN = TrackerPlugin(CometLoggerConfig, "rlrun.tracking.backends.comet:CometBackend")


def archives(root: Path, key: str) -> list[Path]:
    """The zips of one experiment: the first attempt's, then each resume's, in start order."""
    paths = [p for p in Path(root).glob(f"{key}*.zip") if p.stem == key or p.stem.startswith(f"{key}-")]
    return sorted(paths, key=lambda p: json.loads(zipfile.ZipFile(p).read("experiment.json"))["start_time"])


def read_archives(root: Path, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(each zip's `experiment.json`, every message of the experiment in order), as `comet upload`
    reads them; a `file_upload` message gets its file's bytes under `"data"`."""
    metas, messages = [], []
    for path in archives(root, key):
        with zipfile.ZipFile(path) as zf:
            metas.append(json.loads(zf.read("experiment.json")))
            for line in zf.read("messages.json").decode().splitlines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if message["type"] == "file_upload":
                    message["data"] = zf.read(message["payload"]["file_path"])
                messages.append(message)
    return metas, messages


def _local_experiment_class(session_root: Path, key: str) -> type:
    """comet_ml.OfflineExperiment with its temporary folder under `session_root` (not /tmp)."""
    from comet_ml import OfflineExperiment

    class _LocalExperiment(OfflineExperiment):
        @property
        def tmpdir(self) -> str:
            return self.__dict__["_rlrun_tmpdir"]

        @tmpdir.setter
        def tmpdir(self, path: str) -> None:
            if "_rlrun_tmpdir" not in self.__dict__:  # BaseExperiment's mkdtemp(), still empty
                os.rmdir(path)
                path = tempfile.mkdtemp(prefix=f".{key}-", dir=session_root)
            self.__dict__["_rlrun_tmpdir"] = path

    return _LocalExperiment


def _import_comet() -> Any:
    os.environ["COMET_ERROR_TRACKING_ENABLE"] = "false"
    os.environ["COMET_DISABLE_AUTO_LOGGING"] = "1"
    state = random.getstate()
    try:
        import comet_ml
    finally:
        random.setstate(state)
    _stop_comet_sentry(comet_ml)
    return comet_ml


def _stop_comet_sentry(comet_ml: Any) -> None:
    """comet_ml imported earlier, by someone else, may have started Sentry with Comet's DSN: its
    client is dropped, with what it had queued (rlrun uses no Sentry; another DSN is left alone)."""
    import sentry_sdk

    client = sentry_sdk.get_client()
    dsn = comet_ml.get_config().get_string(None, "comet.internal.sentry_dsn")
    if client.is_active() and dsn and client.dsn == dsn:
        if client.transport is not None:
            client.transport.kill()
        sentry_sdk.get_global_scope().set_client(None)


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


class CometBackend(Backend):
    name = "comet"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        ids = ctx.resume_ids
        base_name = getattr(cfg, "name", None) or ctx.run_name
        self.root = Path(ids.get("comet_dir") or getattr(cfg, "dir", None) or Path(ctx.output_dir) / "comet")
        self.project = str(getattr(cfg, "project", None) or "rlrun")
        self.workspace = getattr(cfg, "workspace", None)
        self.exp_name = f"{base_name}-{ctx.job}" if ctx.job else str(base_name)
        self.tags = [str(t) for t in (getattr(cfg, "tags", None) or [])]
        self.resuming = "comet_experiment_key" in ids
        self.key = ids.get("comet_experiment_key") or uuid.uuid4().hex  # Comet takes 32-50 alphanumerics
        self.max_rows = int(ctx.max_table_rows)
        self._exp: Any = None
        self._last: dict[str, int] = {}  # metric name -> last step the experiment holds
        self._assets: set[tuple[str, int]] = set()  # (table file / histogram name, step)
        self._texts: set[str] = set()
        self._params: dict[str, Any] = {}

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        import importlib.util

        if importlib.util.find_spec("comet_ml") is None:
            raise RuntimeError("logger.comet is on but comet_ml is not installed: `pip install comet_ml`")

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._exp is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)  # Comet makes only the last folder
        os.environ.setdefault("MPLCONFIGDIR", str((self.root / ".matplotlib").absolute()))
        _import_comet()
        from comet_ml.constants import RESUME_STRATEGY_GET

        extra = {"_resume_strategy": RESUME_STRATEGY_GET} if self.resuming else {}
        if self.resuming:
            self._read_back()
        cls = _local_experiment_class(self.root.absolute(), self.key)
        exp = cls(offline_directory=str(self.root.absolute()), experiment_key=self.key, project_name=self.project,
                  workspace=self.workspace, **_OFF, **extra)  # fmt: skip
        if not self.resuming:
            exp.set_name(self.exp_name)
            if self.tags:
                exp.add_tags(self.tags)
        self._exp = exp

    def _read_back(self) -> None:
        """What the experiment's zips hold: a resumed job sends none of it again."""
        for message in read_archives(self.root, self.key)[1]:
            payload = message["payload"]
            if message["type"] == "metric_msg":
                metric = payload["metric"]
                self._last[metric["metricName"]] = max(self._last.get(metric["metricName"], -1), int(metric["step"]))
            elif message["type"] == "parameter_msg" and payload["param"].get("source") == "manual":
                self._params[payload["param"]["paramName"]] = payload["param"]["paramValue"]
            elif message["type"] == "file_upload":
                extra = payload["additional_params"]
                if extra.get("type") == "text-sample":
                    self._texts.add(message["data"].decode())
                elif extra.get("step") is not None:
                    self._assets.add((extra["fileName"], int(extra["step"])))

    def run_identity(self) -> dict[str, str]:
        return {"comet_experiment_key": self.key, "comet_dir": str(self.root.absolute())}

    def finish(self) -> None:
        if self._exp is None:
            return
        exp, self._exp = self._exp, None
        exp.end()  # waits for the streamer, writes the zip, removes the session folder
        where = Path(exp.offline_directory).absolute()
        if where != self.root.absolute():
            raise RuntimeError(f"comet: {self.root} could not be written; the experiment's zip is in {where}")

    # ------------------------------------------------------------ data

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for name in {name for point in points for name in point.metrics}:
            if len(name) > COMET_MAX_NAME_LENGTH:
                raise ValueError(f"comet: metric {name!r} is longer than Comet's {COMET_MAX_NAME_LENGTH} characters")
        for point in points:
            new = {k: float(v) for k, v in point.metrics.items() if point.step > self._last.get(k, -1)}
            if not new:
                continue  # delivered before (a retry, or the previous attempt of a resumed job)
            self._exp.log_metrics(new, step=point.step)
            self._last.update(dict.fromkeys(new, point.step))

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        new = {k: _cell(v) for k, v in params.items() if k not in self._params or self._params[k] != _cell(v)}
        if new:
            self._exp.log_parameters(new)
            self._params.update(new)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        filename = f"{SAMPLES_PREFIX}{step}.csv"
        if not rows or (filename, step) in self._assets:
            return
        if os.path.isfile(filename):
            raise ValueError(f"comet: log_table would send the file {os.path.abspath(filename)} instead of the rows")
        data = [{"step": step, **{k: _cell(v) for k, v in row.items()}} for row in rows[-self.max_rows :]]
        columns = list(dict.fromkeys(k for row in data for k in row))
        self._exp.set_step(step)  # log_table takes no step: the table is filed at the current one
        self._exp.log_table(filename, tabular_data=[[row.get(c, "") for c in columns] for row in data],
                            headers=columns)  # fmt: skip
        self._assets.add((filename, step))

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        if (name, step) in self._assets:
            return
        self._exp.log_histogram_3d([float(v) for v in values], name=name, step=step)
        self._assets.add((name, step))

    def log_alert(self, alert: Alert) -> None:
        text = alert.text()
        if text in self._texts:
            return
        meta = {k: getattr(alert, k) for k in ("job", "rule", "metric", "value", "stop", "time")}
        self._exp.log_text(text, step=alert.step, metadata={**meta, "level": "error" if alert.stop else "warning"})
        self._texts.add(text)


def table_rows(data: bytes) -> list[list[str]]:
    """A samples table's CSV, header first, as Comet stores it."""
    return list(csv.reader(io.StringIO(data.decode(), newline="")))

