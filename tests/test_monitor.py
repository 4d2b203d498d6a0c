"""The usage monitor: real processes sampled with psutil, NVML's absence, a fake and a real NVML."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
from conftest import metrics
from omegaconf import OmegaConf

from rlrun.config import LoggerConfig, MonitorConfig
from rlrun.launcher import monitor as monitor_module
from rlrun.launcher.monitor import Monitor, start_monitor
from rlrun.rundir import wait_for
from rlrun.tracking import Tracker

FAST = {"collection_interval": 0.05, "flush_interval": 0.2}


def _tracker(run_dir: Path, job: str = "monitor") -> Tracker:
    return Tracker(OmegaConf.structured(LoggerConfig), job=job, output_dir=run_dir, rank=0)


def _records(run_dir: Path) -> list[dict]:
    return metrics(run_dir, "monitor")


def _run(monitor: Monitor, seconds: float) -> None:
    monitor.start()
    time.sleep(seconds)
    monitor.close()


def _run_until(monitor: Monitor, samples: int) -> None:
    """Run the monitor's thread until it has taken `samples` samples (close() takes one more)."""
    monitor.start()
    wait_for(lambda: monitor.samples >= samples, f"{samples} monitor samples", timeout_s=60)
    monitor.close()


class _Clock:
    """The monitor module's clock (its one use of `time`: `time.monotonic()`), in virtual seconds
    that move only when the test or the monitor's own waits move them: the sampling and flushing
    schedule is then exact, however loaded the machine is."""

    def __init__(self, monkeypatch, now: float = 1000.0) -> None:
        self.now = now
        monkeypatch.setattr(monitor_module, "time", self)

    def monotonic(self) -> float:
        return self.now


class _VirtualStop(threading.Event):
    """The monitor's stop event on a `_Clock`: a wait returns at once, `timeout` virtual seconds
    later; the loop stops by itself once the clock reaches `until`."""

    def __init__(self, clock: _Clock, until: float) -> None:
        super().__init__()
        self.clock, self.until = clock, until

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += timeout or 0.0
        if self.clock.now >= self.until:
            self.set()
        return self.is_set()


CHILD = "import time; data = b'x' * (30 * 2**20); print('ready', flush=True); time.sleep(60)"
JOB = f"""
import subprocess, sys, time
data = b'x' * (60 * 2**20)  # touched, so it is resident
child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print('ready', flush=True)
time.sleep(60)
"""


@pytest.fixture
def job_process():
    """A real job: a python process holding ~60 MB whose child holds ~30 MB."""
    proc = subprocess.Popen([sys.executable, "-c", JOB], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_system_metrics_of_a_real_job_reach_the_tracker_in_batches(tmp_path, job_process, monkeypatch):
    trainer = _tracker(tmp_path, job="trainer")  # the trainer's record gives the train_step axis
    for step in range(1, 8):
        trainer.log_metrics({"loss": 1.0}, step)
    trainer.finish()

    # The monitor's thread runs 2 virtual seconds: a sample every 1/8 s, a hand-over every 1/2 s.
    clock = _Clock(monkeypatch)
    start = clock.now
    tracker = _tracker(tmp_path)
    calls: list[float] = []  # when (virtual time) each sample was handed to the tracker
    log_metrics = tracker.log_metrics

    def counted(*args, **kwargs):
        calls.append(clock.now - start)
        return log_metrics(*args, **kwargs)

    tracker.log_metrics = counted  # type: ignore[method-assign]
    monitor = Monitor(tracker, tmp_path, system=True, pids=lambda: {"worker": job_process.pid},
                      collection_interval=0.125, flush_interval=0.5)  # fmt: skip
    monitor._stop = stop = _VirtualStop(clock, until=start + 2.0)
    monitor.start()
    wait_for(stop.is_set, "the monitor's loop to reach 2 virtual seconds", timeout_s=60)
    monitor.close()  # and a last sample, at 2.0

    records = _records(tmp_path)
    assert len(records) == monitor.samples == 17, "one sample per collection_interval, and close()'s"
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "the step is the sample counter"
    for r in records:
        m = r["metrics"]
        assert 0.0 <= m["system/cpu_percent"] <= 100.0
        assert 0.0 < m["system/ram_used_gb"] and 0.0 < m["system/ram_percent"] < 100.0
        assert m["system/rss_mb/worker"] >= 90.0, "the resident memory of the job and its child"
        assert "system/job_cpu_percent/worker" in m
        assert m["system/disk_used_gb"] > 0.0 and 0.0 < m["system/disk_percent"] <= 100.0
        assert m["system/run_dir_gb"] >= 0.0
        assert m["system/train_step"] == 7.0, "the trainer's newest step"
    elapsed = [r["metrics"]["system/elapsed_s"] for r in records]
    assert elapsed == [0.125 * i for i in range(17)], "the wall-clock axis: seconds since the monitor started"

    # Batching: the samples reach the tracker in bursts, one per flush_interval plus close()'s,
    # not one call per collection.
    assert len(calls) == len(records)
    assert sorted(set(calls)) == [0.5, 1.0, 1.5, 2.0]
    assert monitor.flushes == 4


def test_a_sample_costs_next_to_nothing(tmp_path, job_process, monkeypatch):
    """Counted, not timed (the speed of a machine is for benchmarks/): between the rare rescans of
    a job's process tree and walks of the run directory, a sample reads only each process's own
    counters, and never waits on a CPU-percent interval. Samples every 2 s (the default), on a
    virtual clock."""
    clock = _Clock(monkeypatch)
    scans: list[int] = []
    walks: list[Path] = []
    intervals: list[float | None] = []
    children, tree_size = psutil.Process.children, monitor_module._tree_size
    cpu_percent, process_cpu_percent = psutil.cpu_percent, psutil.Process.cpu_percent

    def spy_children(self, *args, **kwargs):
        scans.append(self.pid)
        return children(self, *args, **kwargs)

    def spy_tree_size(root):
        walks.append(root)
        return tree_size(root)

    def spy_cpu_percent(interval=None, *args, **kwargs):
        intervals.append(interval)
        return cpu_percent(interval, *args, **kwargs)

    def spy_process_cpu_percent(self, interval=None):
        intervals.append(interval)
        return process_cpu_percent(self, interval)

    monkeypatch.setattr(psutil.Process, "children", spy_children)
    monkeypatch.setattr(monitor_module, "_tree_size", spy_tree_size)
    monkeypatch.setattr(psutil, "cpu_percent", spy_cpu_percent)
    monkeypatch.setattr(psutil.Process, "cpu_percent", spy_process_cpu_percent)

    monitor = Monitor(_tracker(tmp_path), tmp_path, system=True, pids=lambda: {"worker": job_process.pid})
    monitor.sample()  # the first one finds the job's processes and walks the run directory
    assert (scans, walks) == ([job_process.pid], [tmp_path])
    for _ in range(20):
        clock.now += 2.0
        sample = monitor.sample()
        assert sample["system/rss_mb/worker"] >= 90.0, "the job and its child, read from the kept processes"
    span = 20 * 2.0
    assert len(scans) == 1 + span // monitor_module.TREE_RESCAN_S, scans
    assert len(walks) == 1 + span // monitor_module.RUN_DIR_SIZE_EVERY_S, walks
    assert intervals and not any(intervals), f"a CPU reading waited: {intervals}"
    monitor.close()


def test_a_job_that_ends_just_drops_out(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    monitor = Monitor(_tracker(tmp_path), tmp_path, pids=lambda: {"gone": proc.pid, "self": os.getpid()}, **FAST)
    _run(monitor, 0.3)
    records = _records(tmp_path)
    assert records and all("system/rss_mb/gone" not in r["metrics"] for r in records)
    assert all(r["metrics"]["system/rss_mb/self"] > 10.0 for r in records)


def test_resumed_monitor_continues_steps_and_elapsed_time(tmp_path):
    _run(Monitor(_tracker(tmp_path), tmp_path, **FAST), 0.3)
    first = _records(tmp_path)
    _run(Monitor(_tracker(tmp_path), tmp_path, **FAST), 0.3)
    records = _records(tmp_path)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(records) + 1)) and len(records) > len(first), "no step logged twice"
    elapsed = [r["metrics"]["system/elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 0.5, "the resumed axis continues, it does not restart at 0"


# ---------------------------------------------------------------- GPUs


class _NvmlError(Exception):
    pass


def _fake_nvml(count: int = 2, *, init_error: bool = False, no_power: tuple[int, ...] = (),
               processes: dict[int, list[tuple[int, int | None]]] | None = None) -> types.ModuleType:  # fmt: skip
    """Enough of pynvml (nvidia-ml-py) for the monitor: `count` GPUs of 80 GiB; `processes`:
    per GPU, the (pid, bytes) NVML's per-process list gives (bytes None: NVML cannot say)."""
    nv = types.ModuleType("pynvml")
    nv.NVML_TEMPERATURE_GPU = 0
    nv.shutdowns = 0

    def init():
        if init_error:
            raise _NvmlError("NVML Shared Library Not Found")

    def shutdown():
        nv.shutdowns += 1

    def power(handle):
        if handle in no_power:
            raise _NvmlError("Not Supported")
        return 100_000 + 50_000 * handle  # milliwatts

    nv.nvmlInit, nv.nvmlShutdown = init, shutdown
    nv.nvmlDeviceGetCount = lambda: count
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 + 20 * h, memory=5)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 40 + 5 * h
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in (processes or {}).get(h, [])
    ]
    return nv


@pytest.mark.parametrize("nvml", ["missing", "no_library", "no_device", "this_machine"])
def test_gpu_without_a_usable_gpu_warns_once_and_keeps_system_metrics(tmp_path, monkeypatch, nvml):
    if nvml == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed: ImportError
    elif nvml == "no_library":
        monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(init_error=True))
    elif nvml == "no_device":
        monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(count=0))
    elif _nvml_gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    warnings: list[str] = []
    monitor = Monitor(_tracker(tmp_path), tmp_path, system=True, gpu=True, warn=warnings.append, **FAST)
    _run_until(monitor, samples=3)
    assert len(warnings) == 1, warnings
    assert "GPU" in warnings[0] and "system metrics go on" in warnings[0]
    records = _records(tmp_path)
    assert len(records) >= 3
    assert all("system/cpu_percent" in r["metrics"] for r in records)
    assert not any(k.startswith("gpu/") for r in records for k in r["metrics"])


def test_gpu_metrics_per_gpu_and_per_node(tmp_path, monkeypatch):
    nv = _fake_nvml(count=2, no_power=(1,))
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    warnings: list[str] = []
    monitor = Monitor(_tracker(tmp_path), tmp_path, system=False, gpu=True, warn=warnings.append, **FAST)
    _run(monitor, 0.3)
    assert len(warnings) == 1 and "GPU 1 gives no power" in warnings[0], "an unsupported reading: warned once"
    assert nv.shutdowns == 1
    m = _records(tmp_path)[-1]["metrics"]
    assert m["gpu/0/utilization"] == 10 and m["gpu/1/utilization"] == 30
    assert m["gpu/0/memory_used_gb"] == 1.0 and m["gpu/1/memory_used_gb"] == 2.0
    assert m["gpu/0/memory_total_gb"] == 80.0 and m["gpu/0/power_w"] == 100.0 and "gpu/1/power_w" not in m
    assert m["gpu/0/temperature_c"] == 40.0 and m["gpu/1/temperature_c"] == 45.0
    assert m["gpu/node/count"] == 2 and m["gpu/node/utilization"] == 20.0
    assert m["gpu/node/memory_used_gb"] == 3.0 and m["gpu/node/memory_total_gb"] == 160.0
    assert m["gpu/node/power_w"] == 100.0 and m["gpu/node/temperature_c"] == 45.0
    assert "system/cpu_percent" not in m and "system/elapsed_s" in m, "system off: only the axes"


def test_gpu_indices_follow_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(count=4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
    monitor = Monitor(_tracker(tmp_path), tmp_path, system=False, gpu=True, **FAST)
    m = monitor.sample()
    monitor.close()
    assert m["gpu/node/count"] == 2
    assert m["gpu/0/utilization"] == 50 and m["gpu/1/utilization"] == 30, "gpu/<i> is the CUDA ordinal"


def test_jobs_sharing_one_gpu_each_get_their_memory_and_the_gpu_is_read_once(tmp_path, monkeypatch, job_process):
    """Inference and trainer on one GPU: the device's figures once, each job's memory from NVML's
    per-process list summed over its process tree (the trainer's rank is its child here)."""
    inference = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rank = psutil.Process(job_process.pid).children()[0].pid  # the trainer job's child: its "rank"
        nv = _fake_nvml(count=1, processes={0: [(inference.pid, 3 * 2**30), (job_process.pid, 2**30),
                                                (rank, 4 * 2**30), (999_999_999, 7 * 2**30)]})  # fmt: skip
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        jobs = {"inference": inference.pid, "trainer": job_process.pid}
        monitor = Monitor(_tracker(tmp_path), tmp_path, system=True, gpu=True, pids=lambda: jobs, **FAST)
        m = monitor.sample()
        monitor.close()
    finally:
        inference.kill()
        inference.wait()
    assert m["gpu/node/count"] == 1 and m["gpu/0/memory_used_gb"] == 1.0, "the device read once, as NVML gives it"
    assert m["gpu/0/job_memory_used_gb/inference"] == 3.0
    assert m["gpu/0/job_memory_used_gb/trainer"] == 5.0, "the job's own process and its child"
    assert not [k for k in m if k.startswith("gpu/") and k.count("/") > 2 and not k.startswith("gpu/0/job_memory")]


def test_no_per_process_memory_from_nvml_logs_none(tmp_path, monkeypatch, job_process):
    """NVML lists the process but cannot say its memory (None), or the binding has no per-process list."""
    jobs = {"trainer": job_process.pid}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for nv in (_fake_nvml(count=1, processes={0: [(job_process.pid, None)]}), _fake_nvml(count=1)):
        if not nv.nvmlDeviceGetComputeRunningProcesses(0):
            del nv.nvmlDeviceGetComputeRunningProcesses  # an old nvidia-ml-py
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        warnings: list[str] = []
        monitor = Monitor(_tracker(tmp_path), tmp_path, system=False, gpu=True, pids=lambda: jobs,
                          warn=warnings.append, **FAST)  # fmt: skip
        m = monitor.sample()
        monitor.close()
        assert "gpu/0/utilization" in m and not [k for k in m if "job_memory" in k] and not warnings, (m, warnings)


def _nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


@pytest.mark.gpu
def test_real_gpu_through_nvml(tmp_path):
    warnings: list[str] = []
    monitor = Monitor(_tracker(tmp_path), tmp_path, system=True, gpu=True, warn=warnings.append, **FAST)
    _run(monitor, 0.5)
    m = _records(tmp_path)[-1]["metrics"]
    assert m["gpu/0/memory_total_gb"] > 0
    assert 0 <= m["gpu/0/utilization"] <= 100 and 0 <= m["gpu/0/memory_used_gb"] <= m["gpu/0/memory_total_gb"]
    assert m["gpu/node/count"] >= 1 and m["gpu/node/memory_total_gb"] >= m["gpu/0/memory_total_gb"]
    assert "system/cpu_percent" in m
    assert not any("utilization" in w or "memory" in w for w in warnings), warnings


@pytest.mark.gpu
def test_real_gpu_memory_of_a_job_through_nvml(tmp_path):
    """A real job holding 1 GiB of CUDA memory: NVML's per-process list gives it to that job."""
    code = ("import torch, time; x = torch.empty(2**30, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize(); "
            "print('ready', flush=True); time.sleep(60)")  # fmt: skip
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "ready"
        monitor = Monitor(_tracker(tmp_path), tmp_path, system=False, gpu=True, pids=lambda: {"trainer": job.pid}, **FAST)
        listed = monitor._gpu.process_memory()
        m = monitor.sample()
        monitor.close()
    finally:
        job.kill()
        job.wait()
    if not any(listed.values()):
        pytest.skip("NVML gives no per-process memory here (the metric is then left out, as designed)")
    assert m["gpu/0/job_memory_used_gb/trainer"] >= 1.0, (m, listed)


# ---------------------------------------------------------------- wiring


def test_start_monitor_follows_the_monitor_group_and_leaves_the_console_alone(tmp_path):
    logger = OmegaConf.structured(LoggerConfig)
    logger.console.enabled = True
    cfg = OmegaConf.create({"name": "exp", "logger": logger, "monitor": OmegaConf.structured(MonitorConfig)})
    assert start_monitor(cfg, tmp_path, dict) is None, "monitor=off: no thread, no record"

    cfg.monitor.system = True
    cfg.monitor.collection_interval, cfg.monitor.flush_interval = 0.05, 0.1
    monitor = start_monitor(cfg, tmp_path, dict)
    assert monitor is not None
    assert set(monitor.tracker.workers) == {"jsonl"}, "usage lines stay off the console"
    time.sleep(0.3)
    monitor.close()
    monitor.close()  # idempotent
    assert _records(tmp_path)


def test_across_nodes_each_node_sampled_by_its_own_sampler_and_merged_once(tmp_path, job_process):
    """deployment=slurm: a sampler per node (names by node, no run-wide readings) and the parent's
    monitor that reads no machine of its own and adds each node's newest sample exactly once."""
    from rlrun.launcher.node import NodeSampleWriter

    nodes_dir = tmp_path / "metrics" / "nodes"
    samplers = {node: Monitor(NodeSampleWriter(nodes_dir / f"{node}.jsonl", node), tmp_path, system=True, storage=False,
                              pids=lambda: {"trainer": job_process.pid}, collection_interval=0.05,
                              flush_interval=0.05)  # fmt: skip
                for node in ("n2", "n3")}
    parent = Monitor(_tracker(tmp_path), tmp_path, system=True, machine=False, nodes_dir=nodes_dir, **FAST)
    for sampler in samplers.values():
        sampler._collect()
        sampler._flush()
    first = parent.sample()
    assert {"system/n2/cpu_percent", "system/n3/ram_used_gb", "system/n2/rss_mb/trainer",
            "system/n3/job_cpu_percent/trainer", "system/disk_used_gb", "system/elapsed_s"} <= set(first)
    assert first["system/n2/rss_mb/trainer"] > 1.0  # the real process's memory, read on "its" node
    assert not {"system/cpu_percent", "system/ram_used_gb", "system/rss_mb/trainer", "system/n2/disk_used_gb",
                "system/n2/elapsed_s", "system/n2/train_step"} & set(first)  # fmt: skip
    assert not any(name.startswith("system/n") for name in parent.sample())  # no new node sample: nothing again
    samplers["n3"]._collect()
    samplers["n3"]._flush()
    again = parent.sample()
    assert "system/n3/cpu_percent" in again and "system/n2/cpu_percent" not in again
    parent.tracker.finish()
