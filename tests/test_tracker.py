"""The Tracker and its delivery layer: jsonl record, non-blocking calls, retries, spill, resume."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import metrics, records
from omegaconf import OmegaConf

from rlrun.config import DeliveryConfig, LoggerConfig
from rlrun.rundir import wait_for
from rlrun.tracking import Tracker, enabled_backends
from rlrun.tracking.base import Backend, MetricPoint
from rlrun.tracking.delivery import BackendWorker, Event


def _logger_cfg(**enabled: bool):
    cfg = OmegaConf.structured(LoggerConfig)
    for name, on in enabled.items():
        cfg[name].enabled = on
    return cfg


def test_jsonl_record_holds_every_call(tmp_path):
    tracker = Tracker(_logger_cfg(), job="trainer", output_dir=tmp_path)
    tracker.log_hyperparams({"trainer": {"lr": 0.1}, "logger": {"wandb": {"api_key": "abc"}}})
    for step in range(1, 6):
        with tracker.timer("train"):
            time.sleep(0.001)
        tracker.log_metrics({"loss": 1.0 / step, "reward": step * 0.5}, step)
    tracker.log_samples([{"prompt": "ab=", "completion": "ba", "reward": 1.0}], step=5)
    tracker.log_distribution("rewards", [0.0, 0.5, float("nan"), 1.0, float("-inf")], step=5)
    tracker.log_distribution("nothing_finite", [float("inf"), float("nan")], step=5)  # no backend sees it
    tracker.finish()

    steps = metrics(tmp_path, "trainer")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["metrics"]["loss"] for r in steps] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert all(r["metrics"]["time/train"] >= 0.001 for r in steps), "timer() recorded time/train each step"
    (hp,) = records(tmp_path, "trainer", "hyperparams")
    assert hp["params"] == {"trainer.lr": 0.1, "logger.wandb.api_key": "<redacted>"}
    (samples,) = records(tmp_path, "trainer", "samples")
    assert samples["rows"] == [{"prompt": "ab=", "completion": "ba", "reward": 1.0}]
    (dist,) = records(tmp_path, "trainer", "distribution")
    assert dist["values"] == [0.0, 0.5, 1.0], "non-finite values dropped"
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log_metrics({"loss": 0.0}, 6)


def test_resumed_job_does_not_log_steps_twice(tmp_path):
    first = Tracker(_logger_cfg(), job="orchestrator", output_dir=tmp_path)
    for step in range(1, 8):
        first.log_metrics({"x": step}, step)
    first.finish()
    # The job crashed after step 7 but its last checkpoint was step 5: it redoes 6 and 7.
    resumed = Tracker(_logger_cfg(), job="orchestrator", output_dir=tmp_path)
    for step in range(6, 11):
        resumed.log_metrics({"x": step * 10}, step)
    resumed.finish()
    steps = metrics(tmp_path, "orchestrator")
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["metrics"]["x"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 80, 90, 100]


def test_enabled_backends_follow_config():
    assert enabled_backends(_logger_cfg()) == ["jsonl"]
    assert enabled_backends(_logger_cfg(wandb=True, mlflow=True)) == ["jsonl", "mlflow", "wandb"]


def test_backend_libraries_imported_only_when_chosen(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from rlrun.config import LoggerConfig\n"
        "from rlrun.tracking import Tracker\n"
        "cfg = OmegaConf.structured(LoggerConfig); cfg.console.enabled = True\n"
        f"t = Tracker(cfg, job='j', output_dir={str(tmp_path)!r})\n"
        "t.log_metrics({'a': 1.0}, 1); t.finish()\n"
        "print(sorted(m for m in ('torch', 'wandb', 'mlflow', 'tensorboard') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- delivery layer


class FlakyBackend(Backend):
    """A real backend (keeps what it receives) that fails while `down` is set, and, given a
    `gate`, blocks in every call until the test opens it."""

    name = "flaky"
    max_batch_metrics = 50

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.down = threading.Event()
        self.gate = gate
        self.entered = threading.Event()  # set when a call starts
        self.threads: set[threading.Thread] = set()  # the threads that called it
        self.points: list[MetricPoint] = []
        self.calls = 0
        self.other: list[tuple[str, Any]] = []
        self.finished = False

    def _check(self) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        if self.down.is_set():
            raise ConnectionError("server unreachable")

    def log_metrics(self, points):
        self._check()
        assert sum(len(p.metrics) for p in points) <= self.max_batch_metrics or len(points) == 1
        self.points.extend(points)

    def log_hyperparams(self, params):
        self._check()
        self.other.append(("hyperparams", params))

    def log_samples(self, rows, step):
        self._check()
        self.other.append(("samples", step))

    def log_distribution(self, name, values, step):
        self._check()
        self.other.append(("distribution", step))

    def log_alert(self, alert):
        self._check()
        self.other.append(("alert", alert.step))

    def finish(self):
        self.finished = True


def _delivery(**kw) -> Any:
    return OmegaConf.structured(DeliveryConfig(**{"retry_initial_s": 0.01, "retry_max_s": 0.05, **kw}))


def test_slow_backend_never_blocks_the_caller(tmp_path):
    """A backend stuck in a call (here: until the test opens its gate) holds up no caller."""
    gate = threading.Event()
    backend = FlakyBackend(gate)
    worker = BackendWorker(backend, _delivery(), tmp_path)
    worker.submit(Event("metrics", MetricPoint(0, {"a": 0.0}, time.time())))
    wait_for(backend.entered.is_set, "the writer thread's first backend call", timeout_s=30)
    for step in range(1, 200):  # each returns while the backend is still blocked in that call
        worker.submit(Event("metrics", MetricPoint(step, {"a": float(step)}, time.time())))
    assert backend.calls == 1 and backend.points == [], "199 submits returned behind a blocked backend"
    assert threading.current_thread() not in backend.threads, "the caller never runs the backend"
    gate.set()
    assert worker.flush(timeout=30)
    assert [p.step for p in backend.points] == list(range(200))
    assert backend.calls < 100, "consecutive points are batched into few backend calls"
    worker.request_stop().wait(10)


def test_outage_keeps_everything_in_order_and_spills_to_disk(tmp_path, caplog):
    backend = FlakyBackend()
    backend.down.set()
    worker = BackendWorker(backend, _delivery(max_in_memory=20, warn_interval_s=60), tmp_path)
    for step in range(100):
        worker.submit(Event("metrics", MetricPoint(step, {"a": float(step), "b": 1.0}, time.time())))
        if step == 50:
            worker.submit(Event("samples", ([{"p": "x"}], step)))
    wait_for(lambda: backend.calls > 3 and worker.backlog.on_disk > 0, "retries and a spill", timeout_s=30)
    assert backend.points == [] and backend.calls > 3, "retried while down"
    assert worker.backlog.on_disk > 0, "bounded memory: the rest went to the spill file"
    warnings = [r for r in caplog.records if "flaky failed" in r.getMessage()]
    assert len(warnings) == 1, "warnings are rate-limited, not one per retry"
    backend.down.clear()
    assert worker.flush(timeout=30)
    assert [p.step for p in backend.points] == list(range(100))
    assert backend.other == [("samples", 50)]
    assert not (tmp_path / "flaky.spill").exists(), "spill file removed once drained"
    worker.request_stop().wait(10)
    assert backend.finished


def test_one_huge_step_is_split_into_backend_sized_calls(tmp_path):
    backend = FlakyBackend()
    worker = BackendWorker(backend, _delivery(), tmp_path)
    worker.submit(Event("metrics", MetricPoint(1, {f"m{i}": float(i) for i in range(120)}, time.time())))
    assert worker.flush(timeout=10)
    assert backend.calls == 3
    merged = {k: v for p in backend.points for k, v in p.metrics.items()}
    assert merged == {f"m{i}": float(i) for i in range(120)}
    worker.request_stop().wait(10)


def test_shutdown_with_dead_backend_persists_backlog(tmp_path):
    backend = FlakyBackend()
    backend.down.set()
    spill_dir = tmp_path / ".spill" / "trainer"  # as in a run: created only when something spills
    worker = BackendWorker(backend, _delivery(flush_timeout_s=0.2), spill_dir)
    for step in range(10):
        worker.submit(Event("metrics", MetricPoint(step, {"a": 1.0}, time.time())))
    # Given 0.2 s: it stops long before the default flush_timeout_s (120 s), let alone never.
    assert worker.request_stop().wait(60), "finish() gives a dead backend flush_timeout_s, not forever"
    assert (spill_dir / "flaky.spill").stat().st_size > 0


def test_shutdown_releases_the_job_even_when_the_backlog_cannot_be_kept(tmp_path, caplog):
    backend = FlakyBackend()
    backend.down.set()
    (tmp_path / "file").write_text("")  # the spill folder cannot be created under a file
    worker = BackendWorker(backend, _delivery(flush_timeout_s=0.2), tmp_path / "file" / "spill")
    worker.submit(Event("metrics", MetricPoint(1, {"a": 1.0}, time.time())))
    assert worker.request_stop().wait(60), "a job's finish() never hangs on its trackers"
    assert any("1 events could not be delivered before shutdown; not kept" in r.getMessage() for r in caplog.records)


def test_step_timer_sums_a_phase_within_the_step():
    """`timer.seconds(name)`: every block of the phase since the step's metrics were last taken."""
    from rlrun.tracking.timing import StepTimer

    timer = StepTimer()
    for _ in range(2):
        with timer("wait") as phase:
            time.sleep(0.01)
    assert timer.seconds("wait") == pytest.approx(timer.take()["time/wait"]) and timer.seconds("wait") == 0.0
    assert phase.seconds >= 0.01 and timer.seconds("never") == 0.0
