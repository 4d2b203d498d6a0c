"""The Tracker: one per job, fanning out to the backends the `logger` config selects.

Calls from the training loop only reduce across ranks (one collective per step, when
distributed) and enqueue; each backend has its own writer thread (`delivery.py`), so a
slow or dead backend delays nothing, not even the other backends. The jsonl backend is
always on: it is the local record that keeps everything. With a `doctor` config, the run
doctor (`rlrun.doctor`) reads the points the jsonl record took, on the jsonl writer's thread
(no thread of its own: on a busy 2-core machine each extra waking thread cost the step time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rlrun.redact import flatten, redact
from rlrun.tracking.backends import backend_class, enabled_backends
from rlrun.tracking.backends.jsonl import jsonl_path
from rlrun.tracking.base import Alert, MetricPoint, TrackerContext
from rlrun.tracking.delivery import BackendWorker, Event
from rlrun.tracking.record import last_logged_step
from rlrun.tracking.reduce import process_group, reduce_metrics
from rlrun.tracking.timing import StepTimer

log = logging.getLogger("rlrun.tracking")

def _dist_rank() -> int:
    dist = process_group()  # never imports torch just to learn we are rank 0
    return dist.get_rank() if dist is not None else 0


class Tracker:
    """Non-blocking metrics, hyperparams, samples and distributions for one job."""

    def __init__(
        self,
        logger_cfg: Any,
        *,
        job: str,
        output_dir: str | Path,
        run_name: str = "rlrun",
        rank: int | None = None,
        doctor: Any = None,
        on_stop: Callable[[str], None] | None = None,
        **context: Any,
    ) -> None:
        """`doctor`: the run's `doctor` config (None: no doctor); `on_stop(reason)` is called, from
        the jsonl writer's thread (where the doctor runs), for a finding of a rule in
        `doctor.stop_on`. `context`: the other fields of `TrackerContext` (resume_ids, ...)."""
        self.job = job
        self.rank = _dist_rank() if rank is None else rank
        self.timer = StepTimer()
        self.workers: dict[str, BackendWorker] = {}
        self.on_stop = on_stop
        self._identity: dict[str, str] = {}
        self._finished = False
        output_dir = Path(output_dir)
        ctx = TrackerContext(job=job, output_dir=output_dir, run_name=run_name, **context)
        self.jsonl_file = jsonl_path(logger_cfg.jsonl, ctx)
        # Steps already in this job's record (a resumed job) are not logged again.
        self.last_logged_step = last_logged_step(self.jsonl_file)
        if self.rank != 0:
            return
        backends = []
        for name in enabled_backends(logger_cfg):
            cls = backend_class(name)
            cls.preflight(logger_cfg[name], ctx)  # e.g. W&B online without credentials: fail now
            backends.append(cls(logger_cfg[name], ctx))
        spill_dir = self.jsonl_file.parent / ".spill" / job
        observer = None
        if doctor is not None and doctor.enabled:
            from rlrun.doctor.doctor import Doctor

            observer = Doctor(doctor, job, self._alert, self._failing)
        for backend in backends:
            self._identity.update(backend.run_identity())
            watched = observer if backend.name == "jsonl" else None
            self.workers[backend.name] = BackendWorker(backend, logger_cfg.delivery, spill_dir, watched)

    # ---------------------------------------------------------------- the interface

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int, reductions: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """Log a step's metrics (plus timings recorded with `timer`); returns the reduced values.

        Distributed: every rank must call this at every step with the same keys.
        """
        values = {k: float(v) for k, v in metrics.items()}
        values.update(self.timer.take())
        values = reduce_metrics(values, reductions)
        if self.rank != 0:
            return values
        if self.last_logged_step is not None and step <= self.last_logged_step:
            log.debug("%s: step %d was already logged before the resume; not logging it again", self.job, step)
            return values
        self._submit(Event("metrics", MetricPoint(step, values, time.time())))
        return values

    def log_hyperparams(self, params: Any) -> None:
        """The config (DictConfig or mapping), resolved, flattened and redacted."""
        if self.rank != 0:
            return
        if not isinstance(params, Mapping):
            params = dict(params)
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(params, DictConfig):
                params = OmegaConf.to_container(params, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        self._submit(Event("hyperparams", flatten(redact(params))))

    def log_samples(self, rows: list[Mapping[str, Any]], step: int) -> None:
        if self.rank != 0 or not rows:
            return
        plain = [{k: _plain(v) for k, v in row.items()} for row in rows]
        self._submit(Event("samples", (plain, step)))

    def log_distribution(self, name: str, values: Any, step: int) -> None:
        if self.rank != 0:
            return
        if hasattr(values, "tolist"):
            values = values.tolist()
        # The one place non-finite values are dropped: no backend can bin NaN / inf.
        floats = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if floats:
            self._submit(Event("distribution", (name, floats, step)))

    def wants_model(self, final: bool) -> bool:
        """Does any backend store the model at this step (`logger.<backend>.log_model`)?"""
        return any(w.backend.wants_model(final) for w in self.workers.values())

    def log_model(self, path: str | Path, step: int, final: bool) -> None:
        """Hand a complete model directory to each backend that stores models now. The
        directory must stay until `finish()` (the writer threads upload it later)."""
        if self.rank != 0:
            return
        event = Event("model", (Path(path), step, final))
        for worker in self.workers.values():
            if worker.backend.wants_model(final):
                worker.submit(event)

    def run_identity(self) -> dict[str, str]:
        """Each backend's run id, so a resumed job continues the same tracker runs."""
        return dict(self._identity)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is delivered (True) or the timeout passes. The
        jsonl record first: the doctor's findings about it then reach the other backends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for worker in self.workers.values():  # jsonl is the first
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = worker.flush(left) and ok
        return ok

    def finish(self) -> None:
        """Deliver what is queued (failing backends get `delivery.flush_timeout_s`), close all."""
        if self._finished:
            return
        self._finished = True
        if "jsonl" in self.workers and self.workers["jsonl"].observer is not None:
            # The doctor sees every point first, so its last findings go out with the rest below.
            self.workers["jsonl"].flush(float(self.workers["jsonl"].cfg.flush_timeout_s))
        stopped = [worker.request_stop() for worker in self.workers.values()]  # all in parallel
        for done in stopped:
            done.wait()
        for worker in self.workers.values():
            worker.join()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _alert(self, alert: Alert) -> None:
        """A doctor finding (on the jsonl writer's thread): to every backend; a stop if the rule says so."""
        for worker in self.workers.values():
            worker.submit(Event("alert", alert))
        if alert.stop and self.on_stop is not None:
            self.on_stop(alert.text())

    def _failing(self) -> dict[str, float]:
        """Each backend now failing: seconds since the first failure of its current streak."""
        now = time.monotonic()
        return {name: now - since for name, w in self.workers.items() if (since := w.failing_since) is not None}

    def _submit(self, event: Event) -> None:
        if self._finished:
            raise RuntimeError(f"tracker of job {self.job!r} is finished; nothing more can be logged")
        for worker in self.workers.values():
            worker.submit(event)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
