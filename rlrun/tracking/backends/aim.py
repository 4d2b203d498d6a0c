"""Aim backend: one Aim run per job in a local Aim repo, scalars, hparams, texts, histograms.

Each job gets its own run (`<experiment>-<job>`, e.g. `exp-trainer`) in the repo
`<output_dir>/aim` (or `logger.aim.repo`), grouped under one Aim experiment (the run's
name), so `aim up --repo <output_dir>/aim` shows the trainer and the orchestrator side by
side. An Aim run has one writer at a time (a run lock), so two jobs never share one.

What goes where:
- metrics: `run.track({...}, step=...)`, names kept as they are (`rewards/lcs/mean`,
  `eval/pass@4`); Aim takes any name (its own series, system metrics and logs, are named
  `__...`);
- hyperparameters: under `run["hparams"]`, dotted keys nested (`trainer.lr` is
  `run["hparams"]["trainer"]["lr"]`, queried as `run.hparams.trainer.lr`);
- samples: Aim has no table type; each row becomes one `aim.Text` (the row as JSON), the
  rows of a step one list under `samples` (a second call for the same step adds its rows):
  the Text explorer shows them by step and index;
- distributions: `aim.Distribution` (64 bins) at the step;
- alerts: `run.log_warning` (`log_error` when the doctor stops the run), Aim's own run log
  records, which its notifier (`aim-watcher`) can forward to Slack / Workplace; the alert's
  fields go with it (job, rule, metric, step, value).

The run hash (Aim's run id) is fixed in the constructor, as W&B's id is, so the tracker can
put it in the checkpoint before the writer thread opens anything; a resumed job opens the
same run by that hash and skips the steps each metric already has, and the alerts it has.
Aim has no API to create a run under a given hash: `open()` swaps Aim's hash generator
(`aim.sdk.base_run.generate_run_hash`) for the moment it creates the run, and fails if the
run got another hash (an Aim that no longer draws it there).

Caveats:
- Aim stamps a value with the time it was tracked (here: when the writer thread delivers it),
  not the time the step was logged: `run.track` takes no timestamp.
- Aim indexes runs for its SDK queries and UI lazily: `aim up` indexes new runs in the
  background, and `aim.Repo(path).iter_runs()` sees a run only after it was indexed
  (`aim storage --repo <dir> reindex --yes` does it at once).
- Offline only: a local repo, no telemetry (the Aim SDK has none; the UI's flag is off);
  system metrics, terminal capture and system params (which would dump the environment
  variables) are all off. Aim's "safe mode" (`aim.ext.exception_resistant.enable_safe_mode`)
  would make Aim swallow its errors instead of raising them here: leave it off.
- A run left locked by a job that died on another machine cannot be reopened until the
  lock is released (`aim runs close --force <hash>`) or `logger.aim.force_resume=true`;
  Aim frees locks of dead processes on the same machine by itself.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin

SAMPLES_NAME = "samples"
HISTOGRAM_BINS = 64
HASH_KEY = "aim_run_hash"

# Aim gives a new run a hash it draws itself (`aim.sdk.base_run.generate_run_hash`); we
# create ours under a hash drawn in the constructor, so this lock keeps two of our backends
# from drawing each other's while one swaps that function for a moment.
_CREATE_LOCK = threading.Lock()


@dataclass
class AimLoggerConfig:
    enabled: bool = False
    repo: Optional[str] = None  # default: <output_dir>/aim
    experiment: Optional[str] = None  # default: the run's name; runs are <experiment>-<job>
    system_tracking_interval: int = 0  # seconds between Aim's CPU/GPU samples; 0: off (the monitor job has them)
    force_resume: bool = False  # reopen a run still locked by a dead job on another machine


PLUGIN = TrackerPlugin(AimLoggerConfig, "rlrun.tracking.backends.aim:AimBackend")


def _nested(params: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) pairs, dotted keys split into paths. A key whose path would be both a
    leaf and a branch ("a" next to "a.b") stays whole, so no value replaces another."""
    paths = {key: tuple(str(key).split(".")) for key in params}
    leaves = set(paths.values())
    branches = {path[:i] for path in leaves for i in range(1, len(path))}
    out = []
    for key, value in params.items():
        path = paths[key]
        clash = path in branches or any(path[:i] in leaves for i in range(1, len(path))) or "" in path
        out.append(((str(key),) if clash else path, _param_value(value)))
    return out


def _param_value(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_param_value(v) for v in value]
    return str(value)


def _row_text(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


class AimBackend(Backend):
    name = "aim"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.repo_path = Path(getattr(cfg, "repo", None) or Path(ctx.output_dir) / "aim")
        self.experiment = getattr(cfg, "experiment", None) or ctx.run_name
        self.run_name = f"{self.experiment}-{ctx.job}" if ctx.job else self.experiment
        # Aim's own hash format (uuid4 hex, 24 characters), drawn here so run_identity() is
        # known before open(); a resumed job gets the hash its checkpoint saved.
        self.run_hash = ctx.resume_ids.get(HASH_KEY) or uuid.uuid4().hex[:24]
        self._run: Any = None
        self._done: dict[str, int] = {}  # metric -> last step the run already had when opened
        self._alerts: set[str] = set()  # alert texts already in the run's log records
        self._alerts_unsure = False  # a log_alert raised: it may have been recorded anyway
        self._samples: tuple[int, list[str]] | None = None  # the last step's rows (a step's calls add up)

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        """Fail before any training work when the library is missing (found, not imported)."""
        if importlib.util.find_spec("aim") is None:
            raise RuntimeError("logger.aim is enabled but the aim package is not installed (pip install aim)")

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._run is not None:
            return
        import aim
        from aim.sdk import base_run

        self.repo_path.mkdir(parents=True, exist_ok=True)
        repo = aim.Repo.from_path(str(self.repo_path), init=True)
        options = {
            "repo": repo,
            "system_tracking_interval": int(getattr(self.cfg, "system_tracking_interval", 0) or 0) or None,
            "log_system_params": False,  # would store every environment variable
            "capture_terminal_logs": False,
            "force_resume": bool(getattr(self.cfg, "force_resume", False)),
        }
        # Aim lists a repo's runs (the folders <repo>/.aim/meta/chunks/<hash>) through a cache
        # kept 0.5 s: stale for a run created or resumed a moment ago in this process.
        forget_runs = getattr(type(repo)._all_run_hashes, "cache_clear", lambda: None)
        forget_runs()
        resumed = repo.run_exists(self.run_hash)
        if resumed:
            run = aim.Run(self.run_hash, **options)
        else:
            with _CREATE_LOCK:
                draw = base_run.generate_run_hash
                base_run.generate_run_hash = lambda *a, **k: self.run_hash
                try:
                    run = aim.Run(experiment=self.experiment, **options)
                finally:
                    base_run.generate_run_hash = draw
            forget_runs()
        try:
            if run.hash != self.run_hash:  # Aim no longer draws hashes there: ours would not reopen it
                raise RuntimeError(f"aim: created run {run.hash}, not the requested {self.run_hash}")
            run.name = self.run_name
            if resumed:
                self._load_progress(run)
        except BaseException:
            run.close()  # releases the run lock, or the retried open() would wait for it
            raise
        self._run = run

    def _load_progress(self, run: Any) -> None:
        """What a resumed run already has: each metric's last step, the alerts logged."""
        for info in run.collect_sequence_info("metric").get("metric", []):
            self._done[info["name"]] = int(info["values"].get("last_step", -1))
        self._refresh_alerts(run)

    def _refresh_alerts(self, run: Any) -> None:
        records = run.get_log_records()
        if records is not None:
            _, (values,) = records.data.view("val").items_list()
            self._alerts.update(record.message for record in values)

    def run_identity(self) -> dict[str, str]:
        return {HASH_KEY: self.run_hash}

    def finish(self) -> None:
        if self._run is not None:
            # Stops the heartbeat thread, writes the end time and releases the run lock.
            self._run.close()
            self._run = None

    # ------------------------------------------------------------ data

    def log_metrics(self, points: list[MetricPoint]) -> None:
        done = self._done
        for point in points:
            values = {k: v for k, v in point.metrics.items() if k not in done or point.step > done[k]}
            if values:
                # One atomic write for all of the step's metrics; a retry rewrites the same keys.
                self._run.track(values, step=point.step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        for path, value in _nested(params):
            self._run.set(("hparams", *path), value, strict=False)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        import aim

        texts = [_row_text({"step": step, **row}) for row in rows]  # a row's own "step" wins
        if self._samples is not None and self._samples[0] == step:
            texts = self._samples[1] + texts  # a second call for one step adds rows, not replaces them
        self._run.track([aim.Text(t) for t in texts], name=SAMPLES_NAME, step=step)
        self._samples = (step, texts)  # only once tracked: a retried call does not add its rows twice

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        import aim

        self._run.track(aim.Distribution(samples=values, bin_count=HISTOGRAM_BINS), name=name, step=step)

    def log_alert(self, alert: Alert) -> None:
        text = alert.text()
        if self._alerts_unsure:
            self._refresh_alerts(self._run)  # did the attempt that raised record it after all?
            self._alerts_unsure = False
        if text in self._alerts:
            return
        log_record = self._run.log_error if alert.stop else self._run.log_warning
        self._alerts_unsure = True
        log_record(text, job=alert.job, rule=alert.rule, metric=alert.metric, step=alert.step, value=alert.value)
        self._alerts_unsure = False
        self._alerts.add(text)
