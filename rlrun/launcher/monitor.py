"""GPU and system usage, sampled in the background and recorded like any other metric.

The parent (`rl`) runs one `Monitor` thread for the whole run: it knows every job's pid, so
it can attribute memory to jobs, and it costs the jobs nothing. Every `collection_interval`
seconds it takes a sample; every `flush_interval` seconds it hands the buffered samples to
its own Tracker (job `monitor`: `metrics/monitor.jsonl`, plus the configured trackers but
not the console), which delivers them to each backend in one batch. NeMo-RL's names.

Metrics (`system` on):

    system/cpu_percent              whole machine, 0-100
    system/ram_used_gb, system/ram_percent
    system/rss_mb/<job>             resident memory of the job's whole process tree (summed)
    system/job_cpu_percent/<job>    CPU of the job's process tree (100 = one core); not under
                                    system/cpu_percent/, which is itself a metric (MLflow's file
                                    store cannot keep a metric that is also a folder)
    system/disk_used_gb, system/disk_percent    the filesystem holding the run directory
    system/run_dir_gb               size of the run directory (walked at most every 30 s)

and (`gpu` on) for every visible GPU `i` (its CUDA ordinal, i.e. the position in
CUDA_VISIBLE_DEVICES when that is set), through NVML:

    gpu/<i>/utilization, gpu/<i>/memory_utilization      percent
    gpu/<i>/memory_used_gb, gpu/<i>/memory_total_gb
    gpu/<i>/power_w, gpu/<i>/temperature_c
    gpu/node/...                    this node: mean utilization, summed memory and power,
                                    hottest temperature, gpu/node/count
    gpu/<i>/job_memory_used_gb/<job>    GPU memory of the job's process tree on GPU i, from
                                    NVML's per-process list (jobs sharing one GPU, e.g. the
                                    local inference server and a one-rank trainer, each get
                                    theirs; the device's figures above are read once, never
                                    per job). Absent where NVML gives no per-process memory
                                    (some drivers, containers whose pids NVML does not see)

Two x-axes in every sample: `system/elapsed_s` (wall seconds since the run's monitor first
started; a resumed run continues from the last recorded value) and `system/train_step`
(the newest step in `metrics/trainer.jsonl`, read incrementally). The tracker `step` is a
sample counter: strictly increasing within a run and across resumes (it continues after
the last step in `monitor.jsonl`), which is what W&B and the Tracker's resume rule require;
training steps cannot be the step because many samples fall within one training step.

Without a usable GPU (no nvidia-ml-py, no driver, no device) `gpu=true` warns once and the
system metrics go on. No failure of the monitor ever stops the run.

Across several nodes (deployment=slurm) the parent sees only its own machine, which may not
even be one of the run's nodes: each node runs its own sampler (`python -m rlrun.launcher.node
sample`, this class with `storage=False`) that writes `metrics/nodes/<node>.jsonl` with the
same readings named by node (`system/<node>/cpu_percent`, `system/<node>/rss_mb/<job>`,
`gpu/<node>/<i>/utilization`, `gpu/<node>/utilization`, ...), and the parent's monitor
(`machine=False`, `nodes_dir` set) adds each node's newest sample to its own, so the one
`monitor` record and tracker runs hold every node, each reading once: the disk and run
directory (one shared filesystem) and the two x-axes come from the parent only.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from rlrun.gpus import cuda_visible_devices
from rlrun.tracking.record import RecordTail, last_metric, record_path

_log = logging.getLogger("rlrun.monitor")

GB = 1024**3
MB = 1024**2
RUN_DIR_SIZE_EVERY_S = 30.0  # walking the run directory: the costliest reading
TREE_RESCAN_S = 10.0  # finding a job's child processes scans the process table


class Monitor:
    """A daemon thread sampling usage; `start()` it, `close()` it (idempotent) at the end."""

    def __init__(
        self,
        tracker: Any,
        run_dir: str | Path,
        *,
        system: bool = True,
        gpu: bool = False,
        collection_interval: float = 2.0,
        flush_interval: float = 10.0,
        pids: Callable[[], Mapping[str, int]] | None = None,
        warn: Callable[[str], None] | None = None,
        machine: bool = True,
        storage: bool = True,
        nodes_dir: str | Path | None = None,
    ) -> None:
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.system = system
        self.machine = machine  # this machine's CPU, RAM and jobs (with `system`)
        self.storage = storage  # the run directory's disk and size (with `system`)
        self._nodes = _NodeSamples(Path(nodes_dir)) if nodes_dir is not None else None
        self.collection_interval = max(0.01, float(collection_interval))
        self.flush_interval = max(self.collection_interval, float(flush_interval))
        self.pids = pids or (lambda: {})
        self.warn = warn or _log.warning
        self._gpu = _Gpus(self.warn) if gpu else None
        self._trainer = _LatestStep(record_path(self.run_dir, "trainer"))
        self._trees: dict[str, tuple[int, float, list[psutil.Process]]] = {}  # job -> (pid, read at, tree)
        self._run_dir_gb: float | None = None
        self._run_dir_at = -float("inf")
        self._buffer: list[tuple[int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._errors: set[str] = set()
        last = getattr(tracker, "last_logged_step", None)
        self._step = int(last) if last is not None else 0  # the next sample is _step + 1
        self._elapsed_offset = (last_metric(getattr(tracker, "jsonl_file", None), "system/elapsed_s") or 0.0) if last else 0.0
        self._t0 = time.monotonic()
        self.samples = 0  # taken by this Monitor
        self.flushes = 0  # hand-overs to the tracker that carried samples

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Monitor":
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        self._thread = threading.Thread(target=self._loop, name="rlrun-monitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop sampling, take a last sample, hand over what is buffered, finish the tracker."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # A last sample, so the record reaches the end of the run (e.g. the final train_step);
        # then everything to the tracker. Each is tried: the run's exit code never depends on them.
        for action in (self._collect, self._flush, self.tracker.finish):
            try:
                action()
            except Exception as exc:
                self.warn(f"monitor: {type(exc).__name__} while closing: {exc}")
        if self._gpu is not None:
            self._gpu.close()

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        next_sample = time.monotonic()
        next_flush = next_sample + self.flush_interval
        while not self._stop.is_set():
            try:
                self._collect()
                if time.monotonic() >= next_flush:
                    self._flush()
                    next_flush = max(next_flush + self.flush_interval, time.monotonic())
            except Exception as exc:  # never let monitoring take the run down; each error said once
                if (message := f"monitor: {type(exc).__name__}: {exc}") not in self._errors:
                    self._errors.add(message)
                    self.warn(message)
            next_sample += self.collection_interval
            delay = next_sample - time.monotonic()
            if delay < 0:  # fell behind (a slow walk, a suspended process): skip, don't burst
                next_sample = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def _collect(self) -> None:
        self._buffer.append((self._step + 1, self.sample()))
        self._step += 1
        self.samples += 1

    def _flush(self) -> None:
        buffered, self._buffer = self._buffer, []
        for step, metrics in buffered:
            self.tracker.log_metrics(metrics, step)
        if buffered:
            self.flushes += 1

    # ------------------------------------------------------------ one sample

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "system/elapsed_s": self._elapsed_offset + time.monotonic() - self._t0,
            "system/train_step": float(self._trainer.latest()),
        }
        if self.system:
            metrics.update(self._system())
        if self._gpu is not None:
            metrics.update(self._gpu.sample())
            metrics.update(self._gpu_per_job())
        if self._nodes is not None:
            metrics.update(self._nodes.newest())
        return metrics

    def _gpu_per_job(self) -> dict[str, float]:
        """`gpu/<i>/job_memory_used_gb/<job>`: NVML's per-process memory summed over each job's tree."""
        jobs = self.pids()
        used = self._gpu.process_memory() if self._gpu is not None and jobs else {}
        if not any(used.values()):
            return {}
        m: dict[str, float] = {}
        for job, pid in jobs.items():
            tree = self._job_tree(job, pid)
            if not tree:
                continue
            pids = {p.pid for p in tree}
            for i, by_pid in used.items():
                mine = [b for p, b in by_pid.items() if p in pids]
                if mine:
                    m[f"gpu/{i}/job_memory_used_gb/{job}"] = sum(mine) / GB
        return m

    def _system(self) -> dict[str, float]:
        m: dict[str, float] = {}
        if self.machine:
            vm = psutil.virtual_memory()
            m["system/cpu_percent"] = psutil.cpu_percent(interval=None)
            m["system/ram_used_gb"] = (vm.total - vm.available) / GB
            m["system/ram_percent"] = vm.percent
            for job, pid in self.pids().items():
                usage = self._job_usage(job, pid)
                if usage is not None:
                    m[f"system/rss_mb/{job}"], m[f"system/job_cpu_percent/{job}"] = usage
        if self.storage:
            m.update(self._storage())
        return m

    def _storage(self) -> dict[str, float]:
        m: dict[str, float] = {}
        try:
            disk = shutil.disk_usage(self.run_dir)
            m["system/disk_used_gb"] = disk.used / GB
            m["system/disk_percent"] = 100.0 * disk.used / disk.total if disk.total else 0.0
        except OSError:
            pass
        now = time.monotonic()
        if now - self._run_dir_at >= RUN_DIR_SIZE_EVERY_S:
            self._run_dir_at = now
            self._run_dir_gb = _tree_size(self.run_dir) / GB
        if self._run_dir_gb is not None:
            m["system/run_dir_gb"] = self._run_dir_gb
        return m

    def _job_tree(self, job: str, pid: int) -> list[psutil.Process] | None:
        """The job's process and its descendants (the job's first); None once it has ended.

        Finding a tree's processes scans the whole process table, so the tree is re-read
        every TREE_RESCAN_S (jobs start their ranks and workers early) or when the job's
        pid changes; in between the cached list is used. The Process objects are kept, so
        each has its cpu_percent baseline from the last sample.
        """
        now = time.monotonic()
        cached = self._trees.get(job)
        if cached is None or cached[0] != pid or now - cached[1] >= TREE_RESCAN_S:
            try:
                root = cached[2][0] if cached is not None and cached[0] == pid else psutil.Process(pid)
                found = [root, *root.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._trees.pop(job, None)
                return None
            known = {p.pid: p for p in cached[2]} if cached is not None else {}
            cached = self._trees[job] = (pid, now, [known.get(p.pid, p) for p in found])
        return cached[2]

    def _job_usage(self, job: str, pid: int) -> tuple[float, float] | None:
        """(RSS in MB, CPU %) summed over a job's process tree (`_job_tree`); None once the job has ended.

        Between tree rescans a sample reads just each process's own counters.
        """
        tree = self._job_tree(job, pid)
        if tree is None:
            return None
        rss = cpu = 0.0
        for i, proc in enumerate(tree):
            try:
                used = proc.memory_info().rss  # 0 for a zombie (exited, not yet reaped)
                if used == 0 and i == 0:
                    raise psutil.ZombieProcess(proc.pid)
                rss += used
                cpu += proc.cpu_percent(interval=None)  # 0.0 the first time a process is seen
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                if i == 0:  # the job itself has ended
                    self._trees.pop(job, None)
                    return None
        return rss / MB, cpu


# ---------------------------------------------------------------- GPUs through NVML


class _Gpus:
    """Every visible GPU through NVML; disables itself (one warning) when there is none."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.nvml: Any = None
        self.handles: list[Any] = []
        self._warned: set[str] = set()
        try:
            import pynvml  # nvidia-ml-py; imported only when monitor.gpu is on

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.warn(f"monitor.gpu: no GPU metrics, NVML is not available ({type(exc).__name__}: {exc}); "
                      "system metrics go on")  # fmt: skip
            return
        self.nvml = pynvml
        try:
            self.handles = _visible_handles(pynvml)
        except Exception as exc:
            self.handles = []
            self.warn(f"monitor.gpu: could not list GPUs through NVML ({type(exc).__name__}: {exc})")
            self.close()
            return
        if not self.handles:
            self.warn("monitor.gpu: NVML found no visible GPU; system metrics go on")
            self.close()

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None
            self.handles = []

    def sample(self) -> dict[str, float]:
        if self.nvml is None:
            return {}
        nv = self.nvml
        m: dict[str, float] = {}
        util, mem_used, mem_total, power, temp = [], [], [], [], []
        for i, handle in enumerate(self.handles):
            p = f"gpu/{i}/"
            if (rates := self._read(i, "utilization", nv.nvmlDeviceGetUtilizationRates, handle)) is not None:
                m[p + "utilization"] = float(rates.gpu)
                m[p + "memory_utilization"] = float(rates.memory)
                util.append(float(rates.gpu))
            if (mem := self._read(i, "memory", nv.nvmlDeviceGetMemoryInfo, handle)) is not None:
                m[p + "memory_used_gb"] = mem.used / GB
                m[p + "memory_total_gb"] = mem.total / GB
                mem_used.append(mem.used / GB)
                mem_total.append(mem.total / GB)
            if (mw := self._read(i, "power", nv.nvmlDeviceGetPowerUsage, handle)) is not None:
                m[p + "power_w"] = mw / 1000.0
                power.append(mw / 1000.0)
            t = self._read(i, "temperature", nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
            if t is not None:
                m[p + "temperature_c"] = float(t)
                temp.append(float(t))
        m["gpu/node/count"] = float(len(self.handles))
        if util:
            m["gpu/node/utilization"] = sum(util) / len(util)
        if mem_used:
            m["gpu/node/memory_used_gb"] = sum(mem_used)
            m["gpu/node/memory_total_gb"] = sum(mem_total)
        if power:
            m["gpu/node/power_w"] = sum(power)
        if temp:
            m["gpu/node/temperature_c"] = max(temp)
        return m

    def process_memory(self) -> dict[int, dict[int, int]]:
        """Per GPU `i`, the bytes each compute process holds there ({pid: bytes}), from NVML's
        per-process list; a process whose memory NVML does not give (None) is left out."""
        list_processes = getattr(self.nvml, "nvmlDeviceGetComputeRunningProcesses", None)  # None: an old binding
        if list_processes is None:
            return {}
        out: dict[int, dict[int, int]] = {}
        for i, handle in enumerate(self.handles):
            procs = self._read(i, "per-process memory", list_processes, handle)
            out[i] = {int(p.pid): int(p.usedGpuMemory) for p in procs or () if p.usedGpuMemory is not None}
        return out

    def _read(self, i: int, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML reading; a reading a GPU does not support is skipped (warned once)."""
        try:
            return fn(*args)
        except Exception as exc:
            key = f"{i}/{what}"
            if key not in self._warned:
                self._warned.add(key)
                self.warn(f"monitor.gpu: GPU {i} gives no {what} ({type(exc).__name__}: {exc}); skipping it")
            return None


def _visible_handles(nv: Any) -> list[Any]:
    """NVML handles of the GPUs CUDA would use, in CUDA order (CUDA_VISIBLE_DEVICES honoured)."""
    count = nv.nvmlDeviceGetCount()
    visible = cuda_visible_devices()
    if visible is None:
        return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for item in visible:
        if item.isdigit():
            if int(item) >= count:
                break  # CUDA stops at the first invalid ordinal
            handles.append(nv.nvmlDeviceGetHandleByIndex(int(item)))
        else:  # GPU-<uuid> (MIG-<uuid> and uuid prefixes are not resolved)
            try:
                handles.append(nv.nvmlDeviceGetHandleByUUID(item))
            except Exception:
                break
    return handles


# ---------------------------------------------------------------- small helpers


class _NodeSamples:
    """The newest sample of each node's sampler (`metrics/nodes/<node>.jsonl`), read incrementally.

    A node's sample is taken once: a node whose sampler has stopped adds nothing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tails: dict[Path, RecordTail] = {}

    def newest(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for path in sorted(self.directory.glob("*.jsonl")) if self.directory.is_dir() else []:
            tail = self.tails.setdefault(path, RecordTail(path))
            records = tail.new_records()
            if records:
                merged.update(records[-1].get("metrics", {}))
        return merged


class _LatestStep:
    """The newest step of a job's jsonl record, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.tail = RecordTail(path)
        self.step = 0

    def latest(self) -> int:
        for record in self.tail.new_records():
            self.step = max(self.step, int(record.get("step", 0)))
        return self.step


def _tree_size(root: Path) -> int:
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:  # removed while we walked (pruned rollouts, temp files)
                        continue
        except OSError:
            continue
    return total


def start_monitor(cfg: Any, run_dir: str | Path, pids: Callable[[], Mapping[str, int]],
                  warn: Callable[[str], None] | None = None, nodes_dir: str | Path | None = None) -> Monitor | None:  # fmt: skip
    """The run's monitor per `cfg.monitor`, started; None when it is off or cannot start.

    With `nodes_dir` (the jobs run on other nodes, each with its own sampler) it reads no
    usage of this machine, only the run directory's disk, and merges the nodes' samples.

    Its tracker is `cfg.logger` without the console backend (usage lines every few seconds
    would bury the progress bar and the jobs' own lines).
    """
    mon = cfg.monitor
    if not (mon.system or mon.gpu):
        return None
    warn = warn or _log.warning
    machine = nodes_dir is None
    try:
        from omegaconf import OmegaConf

        from rlrun.tracking import Tracker

        logger_cfg = OmegaConf.create(OmegaConf.to_container(cfg.logger, resolve=True))
        logger_cfg.console.enabled = False
        tracker = Tracker(logger_cfg, job="monitor", output_dir=run_dir, run_name=cfg.name, rank=0)
        monitor = Monitor(
            tracker, run_dir, system=bool(mon.system), gpu=bool(mon.gpu) and machine, pids=pids, warn=warn,
            collection_interval=float(mon.collection_interval), flush_interval=float(mon.flush_interval),
            machine=machine, nodes_dir=nodes_dir,
        )  # fmt: skip
        return monitor.start()
    except Exception as exc:  # monitoring is an observer: the run goes on without it
        warn(f"monitor: not started ({type(exc).__name__}: {exc}); the run goes on without usage metrics")
        return None
