"""Writer threads: deliver queued tracker events to one backend, never losing any.

The training thread only calls `BackendWorker.submit`: a deque append that wakes no
thread (waking one per call let the woken writer preempt the caller on a busy machine).
The worker thread looks for new events every `WAKE_INTERVAL_S` (at once for a flush or a
stop) and owns everything slow: opening the backend, batching consecutive metric points
into one call, retrying a failing backend with exponential backoff, keeping what it could
not deliver in a FIFO backlog that spills to disk past `max_in_memory` events, and
warning about failures at most once per `warn_interval_s`.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlrun.tracking.base import Backend, MetricPoint

log = logging.getLogger("rlrun.tracking")

# How often an idle writer thread looks for new events: the most a point waits before its
# backend gets it. Waking per event instead would cost the caller a thread wake-up on every
# call, and the writer a backend call per step rather than one per batch.
WAKE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Event:
    kind: str  # metrics | hyperparams | samples | distribution | alert | model
    payload: Any


class _Control:
    """A flush or stop request; done when every event submitted before it is delivered."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.done = threading.Event()
        self.target_seq = 0


class Backlog:
    """FIFO of undelivered events: in memory up to a bound, then in a spill file on disk.

    Once anything is on disk, new events go to disk too, so order is kept: memory holds
    the oldest events, the file the newer ones, read back in chunks as memory drains.
    """

    def __init__(self, max_in_memory: int, spill_path: Path) -> None:
        self.max_in_memory = max(1, max_in_memory)
        self.spill_path = spill_path
        self._mem: deque[Event] = deque()
        self._on_disk = 0
        self._writer = None
        self._reader = None

    def __len__(self) -> int:
        return len(self._mem) + self._on_disk

    @property
    def on_disk(self) -> int:
        return self._on_disk

    def append(self, event: Event) -> None:
        if self._on_disk == 0 and len(self._mem) < self.max_in_memory:
            self._mem.append(event)
            return
        if self._writer is None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = open(self.spill_path, "ab")
        pickle.dump(event, self._writer, protocol=pickle.HIGHEST_PROTOCOL)
        self._on_disk += 1

    def head(self, limit: int) -> list[Event]:
        if not self._mem and self._on_disk:
            self._refill()
        out = []
        for event in self._mem:
            if len(out) >= limit:
                break
            out.append(event)
        return out

    def pop(self, count: int) -> None:
        for _ in range(count):
            self._mem.popleft()

    def _refill(self) -> None:
        assert self._writer is not None
        self._writer.flush()
        if self._reader is None:
            self._reader = open(self.spill_path, "rb")
        while self._on_disk and len(self._mem) < self.max_in_memory:
            self._mem.append(pickle.load(self._reader))
            self._on_disk -= 1
        if self._on_disk == 0:  # file fully read back: start the next spill afresh
            self._reader.close()
            self._writer.close()
            self._reader = self._writer = None
            self.spill_path.unlink(missing_ok=True)

    def persist(self) -> Path | None:
        """Write everything still undelivered to the spill file (at shutdown); return it."""
        if not len(self):
            return None
        remaining = list(self._mem)
        if self._on_disk:
            self._writer.flush()  # type: ignore[union-attr]
            reader = self._reader or open(self.spill_path, "rb")
            remaining += [pickle.load(reader) for _ in range(self._on_disk)]
            reader.close()
            self._writer.close()  # type: ignore[union-attr]
            self._reader = self._writer = None
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)  # nothing may have spilled before
        with open(self.spill_path, "wb") as f:
            for event in remaining:
                pickle.dump(event, f, protocol=pickle.HIGHEST_PROTOCOL)
        return self.spill_path


class BackendWorker:
    """One backend, one thread, one backlog. `observer`, if given, sees each batch of metric
    points once the backend took them (the run doctor reads the jsonl record's stream)."""

    def __init__(self, backend: Backend, delivery_cfg: Any, spill_dir: Path,
                 observer: Callable[[list[MetricPoint]], None] | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.observer = observer
        self.cfg = delivery_cfg
        self.name = backend.name
        self.inbox: deque[Event | _Control] = deque()  # append/popleft are atomic
        self._wake = threading.Event()  # set for flush and stop requests only
        self.backlog = Backlog(delivery_cfg.max_in_memory, spill_dir / f"{backend.name}.spill")
        self.failures = 0  # failed delivery attempts
        self.failing_since: float | None = None  # monotonic time of the current streak's first failure
        self._received = 0
        self._opened = False
        self._waiting: list[_Control] = []
        self._next_try = 0.0
        self._retry_delay = 0.0
        self._last_warn = float("-inf")
        self._suppressed = 0
        self._thread = threading.Thread(target=self._run, name=f"tracker-{self.name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side

    def submit(self, event: Event) -> None:
        self.inbox.append(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is delivered; False on timeout."""
        control = _Control(stop=False)
        self.inbox.append(control)
        self._wake.set()
        return control.done.wait(timeout)

    def request_stop(self) -> threading.Event:
        """Ask the thread to deliver what it has (within `flush_timeout_s`), finish the backend and end."""
        control = _Control(stop=True)
        self.inbox.append(control)
        self._wake.set()
        return control.done

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---------------------------------------------------------------- worker side

    def _run(self) -> None:
        stopping: _Control | None = None
        deadline = float("inf")
        while True:
            wait = self._wait_time()
            if stopping is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            self._take(wait)
            for control in list(self._waiting):
                if control.stop and stopping is None:
                    stopping = control
                    deadline = time.monotonic() + float(self.cfg.flush_timeout_s)
            if time.monotonic() >= self._next_try:
                self._deliver()
            self._release_done()
            if stopping is not None and (not len(self.backlog) or time.monotonic() >= deadline):
                self._shutdown(stopping)
                return

    def _wait_time(self) -> float | None:
        if not len(self.backlog):
            return None if not self._waiting else 0.0
        return max(0.0, self._next_try - time.monotonic())

    def _take(self, wait: float | None) -> None:
        """Move inbox items to the backlog, first sleeping up to `wait` (None: until the next
        wake-up) unless a flush or stop request comes in."""
        timeout = WAKE_INTERVAL_S if wait is None else min(wait, WAKE_INTERVAL_S)
        if timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()  # a request appended before this is drained below
        while self.inbox:
            item = self.inbox.popleft()
            if isinstance(item, _Control):
                item.target_seq = self._received
                self._waiting.append(item)
            else:
                self._received += 1
                self.backlog.append(item)

    def _deliver(self) -> None:
        while len(self.backlog):
            events = self._next_unit()
            try:
                if not self._opened:
                    self.backend.open()
                    self._opened = True
                self._send(events)
            except Exception as exc:  # any backend failure: keep the data, retry later
                self._failed(exc)
                return
            self.backlog.pop(len(events))
            self.failing_since = None
            if self.failures and self._retry_delay:
                log.warning("tracker backend %s recovered; delivery resumed (%d queued)", self.name, len(self.backlog))
            self._retry_delay = 0.0
            self._release_done()

    def _next_unit(self) -> list[Event]:
        """The head event, or as many consecutive metric events as fit one backend call."""
        head = self.backlog.head(1)
        if head[0].kind != "metrics":
            return head
        unit: list[Event] = []
        count = 0
        for event in self.backlog.head(4096):
            if event.kind != "metrics":
                break
            size = len(event.payload.metrics)
            if unit and count + size > self.backend.max_batch_metrics:
                break
            unit.append(event)
            count += size
        return unit

    def _send(self, events: list[Event]) -> None:
        first = events[0]
        if first.kind == "metrics":
            max_n = self.backend.max_batch_metrics
            points: list[MetricPoint] = [e.payload for e in events]
            if len(points) == 1 and len(points[0].metrics) > max_n:  # one huge step: split it
                items = list(points[0].metrics.items())
                for i in range(0, len(items), max_n):
                    self.backend.log_metrics([points[0]._replace(metrics=dict(items[i : i + max_n]))])
            else:
                self.backend.log_metrics(points)
            if self.observer is not None:
                self._observe(points)
        elif first.kind == "hyperparams":
            self.backend.log_hyperparams(first.payload)
        elif first.kind == "samples":
            rows, step = first.payload
            self.backend.log_samples(rows, step)
        elif first.kind == "distribution":
            name, values, step = first.payload
            self.backend.log_distribution(name, values, step)
        elif first.kind == "alert":
            self.backend.log_alert(first.payload)
        elif first.kind == "model":
            self.backend.log_model(*first.payload)
        else:
            raise ValueError(f"unknown tracker event {first.kind!r}")

    def _observe(self, points: list[MetricPoint]) -> None:
        """The observer's failure is its own: the points are delivered, never sent again for it."""
        try:
            self.observer(points)  # type: ignore[misc]
        except Exception as exc:
            log.error("%s: the observer of tracker backend %s failed: %s: %s", type(self.observer).__name__,
                      self.name, type(exc).__name__, exc)  # fmt: skip

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        initial, cap = float(self.cfg.retry_initial_s), float(self.cfg.retry_max_s)
        self._retry_delay = min(cap, self._retry_delay * 2 if self._retry_delay else initial)
        self._next_try = time.monotonic() + self._retry_delay
        now = time.monotonic()
        if now - self._last_warn >= float(self.cfg.warn_interval_s):
            more = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
            log.warning(
                "tracker backend %s failed: %s: %s; %d events kept (%d on disk), retrying in %.1fs%s",
                self.name, type(exc).__name__, str(exc)[:300], len(self.backlog),
                self.backlog.on_disk, self._retry_delay, more,
            )
            self._last_warn = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def _release_done(self) -> None:
        delivered_seq = self._received - len(self.backlog)
        for control in list(self._waiting):
            if delivered_seq >= control.target_seq and not control.stop:
                control.done.set()
                self._waiting.remove(control)

    def _shutdown(self, stopping: _Control) -> None:
        """Keep what is undelivered on disk, finish the backend; whatever fails, release every
        waiter (a job's `finish()` must never hang on a backend)."""
        try:
            if len(self.backlog):
                try:
                    where = f"kept in {self.backlog.persist()}"
                except OSError as exc:
                    where = f"not kept ({type(exc).__name__}: {exc})"
                log.error("tracker backend %s: %d events could not be delivered before shutdown; %s "
                          "(the jsonl record has them all)", self.name, len(self.backlog), where)  # fmt: skip
            if self._opened:
                self.backend.finish()
        except Exception as exc:
            log.error("tracker backend %s failed to finish: %s: %s", self.name, type(exc).__name__, exc)
        finally:
            for control in self._waiting:
                control.done.set()
            self._waiting.clear()
