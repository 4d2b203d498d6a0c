"""How long does metrics logging block the training loop? Direct calls vs rlrun's Tracker.

The same STEPS steps x METRICS metrics go to W&B (offline), MLflow (SQLite store),
TensorBoard, Aim (local repo), DVCLive (plain files), SwanLab (offline), trackio (local
SQLite store), ClearML (offline session) and Comet (offline archive), two ways:

- direct: what a training loop does without a tracker layer (verl, NeMo-RL style): per
  step, each library's documented logging call, timed one by one:
  `wandb_run.log(metrics, step=step)`, `mlflow.log_metrics(metrics, step=step)` (one
  synchronous `log_batch` per step), `SummaryWriter.add_scalar` per metric,
  `aim_run.track(metrics, step=step)`, DVCLive's `live.log_metric` per metric then
  `live.sync()` (what `next_step()` does, minus its VS Code signal file; `Live` as rlrun's
  backend makes it: `save_dvc_exp=False, dvcyaml=None`, DVC and Studio set-up skipped),
  `swanlab_run.log(metrics, step=step)` (mode offline, probes off) and
  `trackio.log(metrics, step=step)` (`trackio.init` with no HF token and no Space: local
  only, and it makes no network attempt, see `network_attempts`),
  `task.get_logger().report_scalar(title, series, value, iteration=step)` per metric (ClearML
  offline, `Task.set_offline(True)`, no `Task.init`: the task built as rlrun's backend builds
  it, its `_LocalTask`, session folder in the work directory, reporter thread not subprocess;
  no flush per step, the reporter thread writes as it goes and `task.close()` flushes) and
  `experiment.log_metrics(metrics, step=step)` (Comet `OfflineExperiment` with every
  auto-logging / env / git switch off as in rlrun's backend, imported as the backend imports
  it: Sentry and the auto-logging import hook off; archived to a zip at `end()`);
- tracker: `Tracker.log_metrics(metrics, step)` with the same backends enabled
  (`logger.<name>.enabled=True` on `OmegaConf.structured(rlrun.config.LoggerConfig)`), plus
  the always-on jsonl record.

`--backends` picks a subset (default: all nine). Each mode is one process, so SwanLab's
one run per process holds in both.

Reported: the caller's blocked time per step (p50/p99; in direct mode also per library),
the time until everything is durable (from before the backends are set up until the direct
loop has finished/closed every backend, or until `Tracker.finish()` returns) and the points
lost, counted by reading every store back with its own reader (MlflowClient.get_metric_history,
TensorBoard's EventAccumulator, `wandb leet inspect --json`, `aim.Repo` after `aim storage
reindex`, `dvclive.utils.parse_tsv`, SwanLab's `DataStoreReader`, trackio's
`SQLiteStorage.get_logs`, the ClearML session's `metrics.jsonl` as `Task.import_offline_session`
reads it (`rlrun.tracking.backends.clearml.read_events`), the Comet zips as `comet upload`
reads them (`rlrun.tracking.backends.comet.read_archives`), rlrun's jsonl reader). Every
connection or DNS lookup off this machine is refused in the children and counted
(`network_attempts`).

Each mode runs in a fresh subprocess (working directory, HOME and HF_HOME inside its own
folder, no HF token or tracker API key), all files under a temporary directory that is
removed afterwards (`--keep` keeps it). `--repeats` pairs (default 3), the first of each pair
alternating: benchmarks/results/tracker.json holds the repeat with the median ratio, whole,
each repeat's headline figures and load, and the medians (`*_median`).

    python benchmarks/tracker.py [--steps 1000] [--metrics 20] [--step-work-ms 5] [--backends all] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import wandb_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tracker.json"
JOB = "bench"
BACKENDS = ("tensorboard", "mlflow", "wandb", "aim", "dvclive", "swanlab", "trackio", "clearml", "comet")
# W&B's system-metrics sampler, requirements and git capture are not what we measure.
WANDB_SETTINGS = {"console": "off", "silent": True, "x_disable_stats": True, "x_save_requirements": False, "disable_git": True}
TRACKIO_PROJECT = "rlrun-bench"
CLEARML_PROJECT = "rlrun-bench"
COMET_PROJECT = "rlrun-bench"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}
NETWORK_ATTEMPTS: list[str] = []


def metric_names(n: int) -> list[str]:
    return [f"m{i:02d}" for i in range(n)]


def step_metrics(names: list[str], step: int) -> dict[str, float]:
    return {name: value(i, step) for i, name in enumerate(names)}


def value(i: int, step: int) -> float:
    return step * 0.001 + i


def same(stored: float, expected: float) -> bool:
    """TensorBoard stores float32; the others keep the float64 exactly."""
    return math.isclose(stored, expected, rel_tol=1e-6)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def refuse_network() -> None:
    """In a child: every connection or DNS lookup off this machine fails and is counted."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in _LOCAL_HOSTS:
            NETWORK_ATTEMPTS.append(str(address))
            raise OSError(f"benchmark: no network ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and host not in _LOCAL_HOSTS:
            NETWORK_ATTEMPTS.append(str(host))
            raise socket.gaierror(f"benchmark: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]


# ---------------------------------------------------------------- the two modes (subprocesses)


def timed_steps(steps: int, names: list[str], step_work: float, log: Callable[[dict[str, float], int], Any]) -> list[float]:
    """The training loop both sides share: work, then `log(metrics, step)`, timed per step."""
    blocked = []
    for step in range(steps):
        if step_work:
            time.sleep(step_work)
        metrics = step_metrics(names, step)
        start = time.perf_counter()
        log(metrics, step)
        blocked.append(time.perf_counter() - start)
    return blocked


def swanlab_settings() -> Any:
    """Offline, nothing probed or watched (as rlrun's backend sets it up)."""
    import swanlab

    off = dict(hardware=False, runtime=False, requirements=False, conda=False, git=False, swanlab=False, monitor=False)
    return swanlab.Settings(
        interactive=False,
        probe=swanlab.Settings.Probe(**off),
        terminal=swanlab.Settings.Terminal(proxy_type="none"),
        integration=swanlab.Settings.Integration(webhook={"url": ""}),
    )


def open_direct(name: str, work: Path) -> tuple[Callable[[dict[str, float], int], None], Callable[[], None], Callable[[list[str], int], int]]:
    """One library, as a training loop uses it directly: (log per step, close, points lost)."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(work / "tensorboard"))

        def log(metrics: dict[str, float], step: int) -> None:
            for key, val in metrics.items():
                writer.add_scalar(key, val, global_step=step)

        def close() -> None:
            writer.flush()
            writer.close()

        return log, close, lambda names, steps: tensorboard_lost(work / "tensorboard", names, steps)
    if name == "mlflow":
        import mlflow

        uri = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench-direct")
        mlflow_run = mlflow.start_run(run_name="direct")
        return (
            lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            mlflow.end_run,
            lambda names, steps: mlflow_lost(uri, mlflow_run.info.run_id, names, steps, prefix=""),
        )
    if name == "wandb":
        import wandb

        wandb_run = wandb.init(
            project="rlrun-bench", id="direct", dir=str(work / "wandb_root"), mode="offline",
            settings=wandb.Settings(**WANDB_SETTINGS),
        )  # fmt: skip
        return (
            lambda metrics, step: wandb_run.log(metrics, step=step),
            wandb_run.finish,
            lambda names, steps: wandb_lost(work / "wandb_root", "direct", names, steps),
        )
    if name == "aim":
        import aim

        (work / "aim").mkdir(parents=True, exist_ok=True)
        repo = aim.Repo.from_path(str(work / "aim"), init=True)
        aim_run = aim.Run(repo=repo, experiment="bench-direct", system_tracking_interval=None,
                          log_system_params=False, capture_terminal_logs=False)  # fmt: skip
        run_hash = aim_run.hash
        return (
            lambda metrics, step: aim_run.track(metrics, step=step),
            aim_run.close,
            lambda names, steps: aim_lost(work / "aim", run_hash, names, steps),
        )
    if name == "dvclive":
        from rlrun.tracking.backends.dvclive import _local_live_class

        live = _local_live_class()(dir=str(work / "dvclive"), report=None, save_dvc_exp=False, dvcyaml=None,
                                   monitor_system=False)  # fmt: skip

        def log(metrics: dict[str, float], step: int) -> None:
            live.step = step
            for key, val in metrics.items():
                live.log_metric(key, val)
            live.sync()  # next_step(): make_summary (+ report, Studio: off), without the VS Code signal file

        return log, live.make_summary, lambda names, steps: dvclive_lost(work / "dvclive", names, steps)
    if name == "swanlab":
        import swanlab

        swanlab_run = swanlab.init(mode="offline", log_dir=str(work / "swanlog"), project="rlrun-bench", name="direct",
                                   id="direct", settings=swanlab_settings())  # fmt: skip
        return (
            lambda metrics, step: swanlab_run.log(metrics, step=step),
            swanlab_run.finish,
            lambda names, steps: swanlab_lost(work / "swanlog", "direct", names, steps),
        )
    if name == "trackio":
        import trackio  # TRACKIO_DIR (read at import) is <work>/trackio: run_mode sets it

        trackio_run = trackio.init(project=TRACKIO_PROJECT, name="direct", embed=False, auto_log_cpu=False,
                                   auto_log_gpu=False)  # fmt: skip
        return (
            lambda metrics, step: trackio.log(metrics, step=step),
            trackio.finish,
            lambda names, steps: trackio_lost(work / "trackio", trackio_run.id, names, steps),
        )
    if name == "clearml":
        import uuid

        from clearml import Task

        from rlrun.tracking.backends.clearml import _local_task_class
        from rlrun.tracking.names import clearml_pair

        Task.set_offline(True)  # no server, no session; never Task.init (see rlrun's backend)
        root, task_id = (work / "clearml").absolute(), f"offline-{uuid.uuid4().hex}"
        root.mkdir(parents=True, exist_ok=True)
        task = _local_task_class(root, task_id)(private=Task._Task__create_protection, project_name=CLEARML_PROJECT,
                                                task_name="direct", task_type=Task.TaskTypes.training,
                                                log_to_backend=True)  # fmt: skip
        task.started()
        clearml_logger = task.get_logger()
        pairs: dict[str, tuple[str, str]] = {}

        def log(metrics: dict[str, float], step: int) -> None:
            for key, val in metrics.items():
                title, series = pairs.get(key) or pairs.setdefault(key, clearml_pair(key))
                clearml_logger.report_scalar(title, series, val, iteration=step)

        return log, task.close, lambda names, steps: clearml_lost(root / task_id, names, steps)
    if name == "comet":
        import uuid

        from rlrun.tracking.backends.comet import _OFF, _import_comet

        root, key = (work / "comet").absolute(), uuid.uuid4().hex
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MPLCONFIGDIR", str(root / ".matplotlib"))  # as the backend: not ~/.config
        comet_ml = _import_comet()  # Sentry and the auto-logging import hook off, as the backend imports it
        experiment = comet_ml.OfflineExperiment(offline_directory=str(root), experiment_key=key,
                                                project_name=COMET_PROJECT, **_OFF)  # fmt: skip
        experiment.set_name("direct")
        return (
            lambda metrics, step: experiment.log_metrics(metrics, step=step),
            experiment.end,
            lambda names, steps: comet_lost(root, key, names, steps),
        )
    raise ValueError(f"unknown backend {name!r}")


def run_direct(work: Path, steps: int, names: list[str], step_work: float, backends: list[str]) -> dict:
    t_setup = time.perf_counter()
    opened = {name: open_direct(name, work) for name in backends}
    per_backend: dict[str, list[float]] = {name: [] for name in backends}

    def log_directly(metrics: dict[str, float], step: int) -> None:  # as verl / NeMo-RL do
        for name, (log, _, _) in opened.items():
            start = time.perf_counter()
            log(metrics, step)
            per_backend[name].append(time.perf_counter() - start)

    t_loop = time.perf_counter()
    blocked = timed_steps(steps, names, step_work, log_directly)
    loop_s = time.perf_counter() - t_loop
    close_s = {}
    for name, (_, close, _) in opened.items():
        start = time.perf_counter()
        close()
        close_s[name] = time.perf_counter() - start
    durable_s = time.perf_counter() - t_setup
    from_loop_s = time.perf_counter() - t_loop

    lost = {name: lost_fn(names, steps) for name, (_, _, lost_fn) in opened.items()}
    return {"blocked": blocked, "loop_s": loop_s, "durable_s": durable_s, "from_loop_s": from_loop_s, "lost": lost,
            "per_backend": per_backend, "close_s": close_s}  # fmt: skip


def run_tracker(work: Path, steps: int, names: list[str], step_work: float, backends: list[str]) -> dict:
    t_setup = time.perf_counter()
    from omegaconf import OmegaConf

    from rlrun.config import LoggerConfig
    from rlrun.tracking import Tracker

    log_cfg = OmegaConf.structured(LoggerConfig)
    for name in backends:
        log_cfg[name].enabled = True
    log_cfg.tensorboard.log_dir = str(work / "run" / "tensorboard")
    log_cfg.mlflow.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    log_cfg.mlflow.experiment_name = "bench-tracker"
    log_cfg.mlflow.run_name = "bench"  # `${name}` has no run config to resolve against here
    log_cfg.wandb.offline = True
    log_cfg.wandb.project = "rlrun-bench"
    log_cfg.wandb.name = "bench"
    log_cfg.wandb.id = "tracker"
    log_cfg.wandb.dir = str(work / "wandb_root")
    log_cfg.aim.repo = str(work / "aim")
    log_cfg.dvclive.dir = str(work / "dvclive")
    log_cfg.swanlab.log_dir = str(work / "swanlog")
    log_cfg.swanlab.project = "rlrun-bench"
    log_cfg.trackio.dir = str(work / "trackio")
    log_cfg.trackio.project = TRACKIO_PROJECT
    log_cfg.clearml.dir = str(work / "clearml")
    log_cfg.clearml.project = CLEARML_PROJECT
    log_cfg.comet.dir = str(work / "comet")
    log_cfg.comet.project = COMET_PROJECT
    settings = {k: v for k, v in WANDB_SETTINGS.items() if k not in ("console", "silent")}
    tracker = Tracker(log_cfg, job=JOB, output_dir=work / "run", run_name="bench", wandb_settings=settings)

    t_loop = time.perf_counter()
    blocked = timed_steps(steps, names, step_work, tracker.log_metrics)
    loop_s = time.perf_counter() - t_loop
    tracker.finish()
    durable_s = time.perf_counter() - t_setup
    from_loop_s = time.perf_counter() - t_loop

    from rlrun.tracking.record import read_records

    ids = tracker.run_identity()
    records = [r for r in read_records(tracker.jsonl_file) if r["type"] == "metrics"]
    seen = {(r["step"], k) for r in records for k, v in r["metrics"].items() if k in names and v == value(names.index(k), r["step"])}
    lost = {"jsonl": steps * len(names) - len(seen)}
    for name in backends:
        if name == "mlflow":
            mlflow_run_id = tracker.workers["mlflow"].backend.run_id  # created by the writer thread
            lost[name] = mlflow_lost(log_cfg.mlflow.tracking_uri, mlflow_run_id, names, steps, prefix=f"{JOB}/")
        elif name == "tensorboard":
            lost[name] = tensorboard_lost(work / "run" / "tensorboard" / JOB, names, steps)
        elif name == "wandb":
            lost[name] = wandb_lost(work / "wandb_root", ids["wandb_run_id"], names, steps)
        elif name == "aim":
            lost[name] = aim_lost(work / "aim", ids["aim_run_hash"], names, steps)
        elif name == "dvclive":
            lost[name] = dvclive_lost(Path(ids["dvclive_dir"]), names, steps)
        elif name == "swanlab":
            lost[name] = swanlab_lost(work / "swanlog", ids["swanlab_run_id"], names, steps)
        elif name == "trackio":
            lost[name] = trackio_lost(Path(ids["trackio_dir"]), ids["trackio_run_id"], names, steps)
        elif name == "clearml":
            lost[name] = clearml_lost(Path(ids["clearml_dir"]) / ids["clearml_task_id"], names, steps)
        elif name == "comet":
            lost[name] = comet_lost(Path(ids["comet_dir"]), ids["comet_experiment_key"], names, steps)
    return {"blocked": blocked, "loop_s": loop_s, "durable_s": durable_s, "from_loop_s": from_loop_s, "lost": lost}


# ---------------------------------------------------------------- reading the stores back


def count_lost(got: set[tuple[int, str]], names: list[str], steps: int) -> int:
    return steps * len(names) - len(got)


def mlflow_lost(uri: str, run_id: str, names: list[str], steps: int, prefix: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    lost = 0
    for i, name in enumerate(names):
        got = {(m.step, m.value) for m in client.get_metric_history(run_id, prefix + name)}
        lost += sum((s, value(i, s)) not in got for s in range(steps))
    return lost


def tensorboard_lost(log_dir: Path, names: list[str], steps: int) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    lost = 0
    for i, name in enumerate(names):
        got = {e.step for e in acc.Scalars(name) if same(e.value, value(i, e.step))} if name in scalars else set()
        lost += sum(s not in got for s in range(steps))
    return lost


def wandb_lost(root: Path, run_id: str, names: list[str], steps: int) -> int:
    (run_dir,) = (root / "wandb").glob(f"offline-run-*-{run_id}")
    seen = set()
    for record in wandb_records(run_dir / f"run-{run_id}.wandb"):
        if record.get("type") == "history":
            step = int(record["history"]["step"].get("num", 0))
            item = record["history"]["item"]
            seen.update((step, k) for k, v in item.items() if k in names and v == value(names.index(k), step))
    return steps * len(names) - len(seen)


def aim_lost(repo_dir: Path, run_hash: str, names: list[str], steps: int) -> int:
    """Aim's SDK sees a run once the repo's index has it: `aim storage reindex` first."""
    import aim
    from aim.cli.cli import cli_entry_point
    from aim.storage.context import Context
    from click.testing import CliRunner

    result = CliRunner().invoke(cli_entry_point, ["storage", "--repo", str(repo_dir), "reindex", "--yes"])
    if result.exit_code != 0:
        raise RuntimeError(f"aim storage reindex failed: {result.output}")
    run = aim.Repo(str(repo_dir)).get_run(run_hash)
    seen = set()
    for i, name in enumerate(names):
        metric = run.get_metric(name, Context({}))
        if metric is None:
            continue
        got_steps, (values,) = metric.data.view("val").items_list()
        seen.update((s, name) for s, v in zip(got_steps, values) if 0 <= s < steps and same(v, value(i, s)))
    return count_lost(seen, names, steps)


def dvclive_lost(run_dir: Path, names: list[str], steps: int) -> int:
    from dvclive.utils import parse_tsv

    seen = set()
    for i, name in enumerate(names):
        path = run_dir / "plots" / "metrics" / f"{name}.tsv"
        rows = parse_tsv(path) if path.exists() else []
        seen.update((int(r["step"]), name) for r in rows if 0 <= int(r["step"]) < steps and same(float(r[name]), value(i, int(r["step"]))))
    return count_lost(seen, names, steps)


def swanlab_lost(log_dir: Path, run_id: str, names: list[str], steps: int) -> int:
    """SwanLab's own record reader (the one `swanlab sync` uses; SwanLab has no public one)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    seen = set()
    for path in sorted(log_dir.glob("run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(str(path))
        records = []
        try:
            for data in reader:
                record = Record()
                record.ParseFromString(data)
                records.append(record)
        finally:
            reader.close()
        if not records or records[0].start.id != run_id:
            continue
        for r in records:
            if r.WhichOneof("record_type") == "scalar" and r.scalar.key in names:
                s, key = int(r.scalar.step), r.scalar.key
                if 0 <= s < steps and same(r.scalar.value.number, value(names.index(key), s)):
                    seen.add((s, key))
    return count_lost(seen, names, steps)


def trackio_lost(store_dir: Path, run_id: str, names: list[str], steps: int) -> int:
    from trackio.sqlite_storage import SQLiteStorage

    from rlrun.tracking.backends.trackio import trackio_dir

    with trackio_dir(store_dir):
        logs = SQLiteStorage.get_logs(TRACKIO_PROJECT, run_id=run_id)
    seen = set()
    for row in logs:
        s = int(row.get("step", -1))
        seen.update((s, k) for k, v in row.items() if k in names and 0 <= s < steps and isinstance(v, float) and same(v, value(names.index(k), s)))
    return count_lost(seen, names, steps)


def clearml_lost(session_dir: Path, names: list[str], steps: int) -> int:
    """The offline session's events, as `Task.import_offline_session` reads them."""
    from rlrun.tracking.backends.clearml import read_events
    from rlrun.tracking.names import clearml_pair

    by_pair = {clearml_pair(name): name for name in names}
    seen = set()
    for e in read_events(session_dir):
        name = by_pair.get((e.get("metric"), e.get("variant")))
        if e.get("type") == "training_stats_scalar" and name is not None:
            s = int(e["iter"])
            if 0 <= s < steps and same(float(e["value"]), value(names.index(name), s)):
                seen.add((s, name))
    return count_lost(seen, names, steps)


def comet_lost(root: Path, key: str, names: list[str], steps: int) -> int:
    """Every zip of the experiment, as `comet upload` reads them."""
    from rlrun.tracking.backends.comet import read_archives

    seen = set()
    for m in read_archives(root, key)[1]:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            name, s = metric["metricName"], int(metric["step"])
            if name in names and 0 <= s < steps and same(float(metric["metricValue"]), value(names.index(name), s)):
                seen.add((s, name))
    return count_lost(seen, names, steps)


# ---------------------------------------------------------------- the parent


def stats(blocked: list[float]) -> dict:
    return {"p50_s": statistics.median(blocked), "p99_s": percentile(blocked, 99), "max_s": max(blocked),
            "mean_s": statistics.fmean(blocked)}  # fmt: skip


def summarize(raw: dict, step_work_s: float) -> dict:
    blocked = raw["blocked"]
    out = {
        # What logging cost the loop in all: blocked time plus any time the loop lost
        # otherwise (e.g. waiting for the GIL while writer threads run).
        "loop_overhead_s": raw["loop_s"] - len(blocked) * step_work_s,
        **stats(blocked),
        "loop_s": raw["loop_s"],
        "durable_s": raw["durable_s"],
        "from_loop_s": raw["from_loop_s"],
        "lost": raw["lost"],
        "network_attempts": raw.get("network_attempts", []),
        "wall_s": raw.get("wall_s"),
    }
    if "per_backend" in raw:
        out["per_backend"] = {name: {**stats(times), "close_s": raw["close_s"][name]} for name, times in raw["per_backend"].items()}
    return out


def run_mode(mode: str, work: Path, args: argparse.Namespace) -> dict:
    work.mkdir(parents=True)
    (work / "home").mkdir()
    out_file = work / "result.json"
    env = {
        k: v for k, v in os.environ.items()
        # No HF token (trackio.init would ask the Hub who it is), no remote trackio store.
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL",
                     "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID", "SWANLAB_API_KEY", "DVC_STUDIO_TOKEN",
                     "COMET_API_KEY", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")
    }  # fmt: skip
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HOME": str(work / "home"),
        "HF_HOME": str(work / "home" / "hf"),
        "TRACKIO_DIR": str(work / "trackio"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_MODE": "offline",
        "SWANLAB_MODE": "offline",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "OMP_NUM_THREADS": "1",
    })  # fmt: skip
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(work / name.lower())
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--work", str(work), "--steps", str(args.steps),
        "--metrics", str(args.metrics), "--step-work-ms", str(args.step_work_ms), "--backends", ",".join(args.backend_list),
    ]  # fmt: skip
    start = time.perf_counter()
    # The working directory is the mode's own: SwanLab reads ./.env and ./swanlab.yaml there.
    subprocess.run(cmd, env=env, cwd=work, check=True, timeout=1800)
    raw = json.loads(out_file.read_text())
    raw["wall_s"] = time.perf_counter() - start
    return summarize(raw, args.step_work_ms / 1000)


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def report(args: argparse.Namespace, direct: dict, tracker: dict, machine: dict) -> dict:
    from rich.console import Console
    from rich.table import Table

    ratio = direct["p99_s"] / tracker["p99_s"] if tracker["p99_s"] > 0 else float("inf")
    per_backend = {
        name: {
            "direct_p50_s": d["p50_s"],
            "direct_p99_s": d["p99_s"],
            "direct_max_s": d["max_s"],
            "direct_mean_s": d["mean_s"],
            "direct_close_s": d["close_s"],
            # The Tracker's one call feeds every backend: its p99 is the whole of it.
            "ratio_to_tracker_p99": d["p99_s"] / tracker["p99_s"] if tracker["p99_s"] > 0 else float("inf"),
            "direct_points_lost": direct["lost"][name],
            "tracker_points_lost": tracker["lost"][name],
        }
        for name, d in direct["per_backend"].items()
    }
    result = {
        "steps": args.steps,
        "metrics_per_step": args.metrics,
        "step_work_s": args.step_work_ms / 1000,
        "backends": list(args.backend_list),
        "direct_p50_s": direct["p50_s"],
        "direct_p99_s": direct["p99_s"],
        "direct_max_s": direct["max_s"],
        "tracker_p50_s": tracker["p50_s"],
        "tracker_p99_s": tracker["p99_s"],
        "tracker_max_s": tracker["max_s"],
        "ratio": ratio,
        "target_ratio": 100.0,
        "target_met": ratio >= 100.0,
        "direct_loop_s": direct["loop_s"],
        "tracker_loop_s": tracker["loop_s"],
        "direct_loop_overhead_s": direct["loop_overhead_s"],
        "tracker_loop_overhead_s": tracker["loop_overhead_s"],
        # From before the backends are set up (imports included) until everything is durable.
        "direct_total_s": direct["durable_s"],
        "tracker_durable_s": tracker["durable_s"],
        # From the loop's first step until everything is durable.
        "direct_loop_to_durable_s": direct["from_loop_s"],
        "tracker_loop_to_durable_s": tracker["from_loop_s"],
        "points_lost": sum(tracker["lost"].values()),
        "points_lost_by_backend": tracker["lost"],
        "direct_points_lost": sum(direct["lost"].values()),
        "direct_points_lost_by_backend": direct["lost"],
        # Per library: its own call's blocked time in the direct loop (all libraries called
        # each step, one after the other), against the Tracker's one call for all of them.
        "per_backend": per_backend,
        "backends_meeting_target": sorted(n for n, b in per_backend.items() if b["ratio_to_tracker_p99"] >= 100.0),
        "network_attempts": {"direct": direct["network_attempts"], "tracker": tracker["network_attempts"]},
        "wall_s": {"direct": direct["wall_s"], "tracker": tracker["wall_s"], "total": machine["wall_s"]},
        "machine": {"load_avg_before": machine["load_before"], "load_avg_after": machine["load_after"]},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    table = Table(
        title=f"{args.steps} steps x {args.metrics} metrics -> {' + '.join(args.backend_list)}, "
        f"{args.step_work_ms:g} ms step work"
    )
    table.add_column("")
    table.add_column("direct (synchronous)", justify="right")
    table.add_column("rlrun Tracker", justify="right")
    table.add_row("blocked per step, p50", ms(direct["p50_s"]), ms(tracker["p50_s"]))
    table.add_row("blocked per step, p99", ms(direct["p99_s"]), ms(tracker["p99_s"]))
    table.add_row("blocked per step, max", ms(direct["max_s"]), ms(tracker["max_s"]))
    table.add_row("loop (with step work)", f"{direct['loop_s']:.2f} s", f"{tracker['loop_s']:.2f} s")
    table.add_row("loop beyond step work", f"{direct['loop_overhead_s']:.2f} s", f"{tracker['loop_overhead_s']:.2f} s")
    table.add_row("setup -> everything durable", f"{direct['durable_s']:.2f} s", f"{tracker['durable_s']:.2f} s")
    table.add_row("first step -> everything durable", f"{direct['from_loop_s']:.2f} s", f"{tracker['from_loop_s']:.2f} s")
    table.add_row(
        "points lost (read back)",
        f"{result['direct_points_lost']} {direct['lost']}",
        f"{result['points_lost']} {tracker['lost']}",
    )
    by_backend = Table(title="per library: its direct call vs the Tracker's one call (p99)")
    for col in ("backend", "direct p50", "direct p99", "direct close", "p99 ratio", "lost direct / tracker"):
        by_backend.add_column(col, justify="right")
    for name, b in per_backend.items():
        by_backend.add_row(name, ms(b["direct_p50_s"]), ms(b["direct_p99_s"]), f"{b['direct_close_s']:.2f} s",
                           f"{b['ratio_to_tracker_p99']:.1f}x", f"{b['direct_points_lost']} / {b['tracker_points_lost']}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(by_backend)
    verdict = "met" if result["target_met"] else "MISSED"
    console.print(f"p99 ratio direct/tracker: {ratio:.0f}x (target >= 100x: {verdict}); "
                  f"per library >= 100x: {result['backends_meeting_target']}")  # fmt: skip
    if direct["network_attempts"] or tracker["network_attempts"]:
        console.print(f"network attempts (refused): {result['network_attempts']}")
    return result


def with_medians(runs: list[dict]) -> dict:
    """The repeat with the median ratio, whole, plus every repeat's headline figures and their
    medians (points lost summed over all repeats)."""
    import statistics

    out = dict(sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2])
    out["repeats"] = [{"direct_p99_s": r["direct_p99_s"], "tracker_p99_s": r["tracker_p99_s"], "ratio": r["ratio"],
                       "per_backend_ratio": {n: b["ratio_to_tracker_p99"] for n, b in r["per_backend"].items()},
                       "points_lost": r["points_lost"], "direct_points_lost": r["direct_points_lost"],
                       "machine": r["machine"]} for r in runs]  # fmt: skip
    for key in ("direct_p99_s", "tracker_p99_s", "ratio"):
        out[f"{key}_median"] = statistics.median(r[key] for r in runs)
    out["per_backend_ratio_median"] = {
        name: statistics.median(r["per_backend"][name]["ratio_to_tracker_p99"] for r in runs) for name in out["per_backend"]
    }
    out["points_lost"] = sum(r["points_lost"] for r in runs)
    out["direct_points_lost"] = sum(r["direct_points_lost"] for r in runs)
    out["target_met"] = out["ratio_median"] >= out["target_ratio"] and out["points_lost"] == 0
    out["backends_meeting_target"] = sorted(n for n, v in out["per_backend_ratio_median"].items() if v >= 100.0)
    return out


def parse_backends(text: str) -> list[str]:
    chosen = list(BACKENDS) if text == "all" else [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)} or 'all'")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument(
        "--step-work-ms", type=float, default=5.0,
        help="simulated compute before each step's logging (a sleep: it releases the GIL, as torch ops do); "
        "0 logs back to back, so the writer threads hardly run while the loop does",
    )  # fmt: skip
    parser.add_argument("--backends", type=parse_backends, default=list(BACKENDS), dest="backend_list",
                        help=f"comma-separated, or 'all' (default): {','.join(BACKENDS)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3,
                        help="direct/tracker pairs, the first of each pair alternating; medians reported")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--mode", choices=("direct", "tracker"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = metric_names(args.metrics)

    if args.mode:  # a child: one mode, raw results to <work>/result.json
        refuse_network()
        fn = run_direct if args.mode == "direct" else run_tracker
        raw = fn(args.work, args.steps, names, args.step_work_ms / 1000, args.backend_list)
        raw["network_attempts"] = NETWORK_ATTEMPTS
        (args.work / "result.json").write_text(json.dumps(raw))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="rlrun-bench-"))
    runs = []
    try:
        for i in range(args.repeats):
            start, load_before, raw = time.perf_counter(), load_avg(), {}
            for mode in ("direct", "tracker") if i % 2 == 0 else ("tracker", "direct"):
                raw[mode] = run_mode(mode, tmp / f"{mode}_{i}", args)
            machine = {"wall_s": time.perf_counter() - start, "load_before": load_before, "load_after": load_avg()}
            runs.append(report(args, raw["direct"], raw["tracker"], machine))
        result = with_medians(runs)
    finally:
        if args.keep:
            print(f"files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["points_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
