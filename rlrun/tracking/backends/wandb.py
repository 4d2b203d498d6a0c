"""Weights & Biases backend: one W&B run per job, grouped by the experiment name.

Trainer and orchestrator get their own runs (`<name>-trainer`, `<name>-orchestrator`) in
one group, so W&B's grouping shows them side by side. The run id is fixed in the
constructor (`rlrun.tracking.runs.wandb_run_id`), so the tracker knows the identity a
resumed job needs before anything connects.

Uses only the run object (`run.log`, `run.config`), never the global `wandb.log`, and
`reinit="create_new"`, so several runs can be open in one process. wandb.init works
from the writer thread (it needs no main thread, and console capture is off).

`define_metric` gives each run its axes and summaries: training metrics over the job's own
step (every `run.log` carries it), the monitor's `system/*` and `gpu/*` over
`system/elapsed_s` (wall seconds; `system/train_step` is there to switch to), and the run
table's summary of `SUMMARIES` is their best value rather than the last.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import wandb

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.runs import wandb_run_id

log = logging.getLogger(__name__)

SAMPLES_KEY = "samples"
# (metric, summary) per job: what users compare runs by.
SUMMARIES = {
    "orchestrator": (("reward", "max"), ("eval/reward", "max"), ("eval/rewards/exact/mean", "max")),
    "trainer": (("loss", "min"),),
    "sft": (("loss", "min"), ("eval/reward", "max")),
}
ELAPSED = "system/elapsed_s"
_OFFLINE_MODES = {"offline", "dryrun", "disabled"}
_CREDENTIAL_VARS = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE")


def _has_netrc_entry(host: str) -> bool:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _is_offline(cfg: Any) -> bool:
    return bool(getattr(cfg, "offline", False)) or os.environ.get("WANDB_MODE", "").lower() in _OFFLINE_MODES


class WandbBackend(Backend):
    name = "wandb"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        job = ctx.job
        cfg_name = getattr(cfg, "name", None)
        self.run_id = wandb_run_id(cfg, job, ctx.resume_ids)
        self.run_name: str | None = (f"{cfg_name}-{job}" if job else str(cfg_name)) if cfg_name else None
        self.group: str | None = getattr(cfg, "group", None) or cfg_name
        self.dir = Path(getattr(cfg, "dir", None) or ctx.output_dir)
        self.max_rows = int(ctx.max_table_rows)
        self._rows: deque[dict[str, Any]] = deque(maxlen=self.max_rows)
        self._run: Any = None

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        """Fail before any training work when an online run could never authenticate."""
        if _is_offline(cfg):
            return
        if getattr(cfg, "api_key", None) or any(os.environ.get(v) for v in _CREDENTIAL_VARS):
            return
        base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        host = urlparse(base_url).hostname or base_url
        if _has_netrc_entry(host):
            return
        raise RuntimeError(
            f"W&B logging is online but no W&B credentials were found for {host} "
            "(no logger.wandb.api_key, no WANDB_API_KEY, no entry in ~/.netrc or $NETRC). "
            "Run `wandb login`, or set WANDB_API_KEY, or log offline with `logger.wandb.offline=true` "
            "(sync later with `wandb sync <run dir>/wandb`)."
        )

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._run is not None:
            return
        cfg = self.cfg
        settings: dict[str, Any] = {"console": "off", "silent": True, "quiet": True}
        settings.update(self.ctx.wandb_settings)
        api_key = getattr(cfg, "api_key", None)
        if api_key:
            # Handed to this run's login only: never written to .netrc, config or logs.
            settings["api_key"] = str(api_key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=getattr(cfg, "project", None),
            entity=getattr(cfg, "entity", None),
            name=self.run_name,
            group=self.group,
            job_type=self.ctx.job or None,
            tags=[str(t) for t in (getattr(cfg, "tags", None) or [])] or None,
            id=self.run_id,
            dir=str(self.dir),
            # None lets WANDB_MODE decide (online by default); offline=true always wins.
            mode="offline" if getattr(cfg, "offline", False) else None,
            resume="allow",
            reinit="create_new",  # several runs per process (trainer + orchestrator in tests)
            config=None,
            settings=wandb.Settings(**settings),
        )
        self._define_metrics()

    def _define_metrics(self) -> None:
        if self.ctx.job == "monitor":
            self._run.define_metric(ELAPSED)
            for pattern in ("system/*", "gpu/*"):
                self._run.define_metric(pattern, step_metric=ELAPSED)
        for name, summary in SUMMARIES.get(self.ctx.job, ()):
            self._run.define_metric(name, summary=summary)

    def run_identity(self) -> dict[str, str]:
        return {"wandb_run_id": self.run_id}

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    # ------------------------------------------------------------ data

    def _current_step(self) -> int:
        """The step W&B will accept next; it drops anything lower (e.g. after a resume)."""
        return int(self._run.step)

    def log_metrics(self, points: list[MetricPoint]) -> None:
        for point in points:
            current = self._current_step()
            if point.step < current:
                log.debug("wandb: step %d is behind the run's step %d; not logged again", point.step, current)
                continue
            self._run.log(dict(point.metrics), step=point.step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        # One table of the last `max_rows` samples, re-logged whole under one key. We build
        # it fresh from a bounded deque each time: wandb's log_mode="INCREMENTAL" only writes
        # the new rows, but its Table keeps every row ever added in client memory.
        kept = deque(self._rows, maxlen=self.max_rows)
        kept.extend({"step": step, **row} for row in rows)
        columns = list(dict.fromkeys(key for row in kept for key in row))
        table = wandb.Table(
            columns=columns,
            data=[[row.get(c) for c in columns] for row in kept],
            allow_mixed_types=True,
        )
        self._run.log({SAMPLES_KEY: table}, step=max(step, self._current_step()))
        self._rows = kept  # only once logged, so a retried call does not add its rows twice

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        # A late distribution (step behind the run) goes to the current step rather than
        # being dropped by W&B.
        self._run.log({name: wandb.Histogram(np.asarray(values, dtype=np.float64))}, step=max(step, self._current_step()))

    def log_alert(self, alert: Alert) -> None:
        # W&B mails or posts it (Slack) where the user set that up. Title < 64 chars; wait_duration 1 s:
        # the doctor already raises each finding once, W&B must not drop a second one of the same rule.
        level = "ERROR" if alert.stop else "WARN"
        self._run.alert(title=alert.title[:63], text=alert.text(), level=level, wait_duration=1)

    def wants_model(self, final: bool) -> bool:
        mode = getattr(self.cfg, "log_model", "off")
        return mode == "checkpoints" or (mode == "final" and final)

    def log_model(self, path: Path, step: int, final: bool) -> None:
        """An artifact of type `model` (the whole directory), aliased `step-<n>` (and `final`)."""
        if not path.is_dir():
            log.warning("wandb: model export %s was pruned before it could be logged; skipping it", path)
            return
        artifact = wandb.Artifact(f"{self.run_id}-model", type="model", metadata={"step": step, "final": final})
        artifact.add_dir(str(path))
        self._run.log_artifact(artifact, aliases=[f"step-{step}", *(["final"] if final else [])])
