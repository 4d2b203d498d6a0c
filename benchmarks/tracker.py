"""How long does metrics logging block the training loop? Direct calls vs rlrun's Tracker.

The same STEPS steps x METRICS metrics go to W&B (offline), MLflow (SQLite store) and
TensorBoard, two ways:

- direct: what a training loop does without a tracker layer (verl, NeMo-RL style): per
  step, `wandb_run.log(metrics, step=step)`, `mlflow.log_metrics(metrics, step=step)`
  (one synchronous `log_batch` per step) and `SummaryWriter.add_scalar` per metric;
- tracker: `Tracker.log_metrics(metrics, step)` with tensorboard, mlflow and wandb
  (offline) enabled, plus the always-on jsonl record.

Reported: the caller's blocked time per step (p50/p99), the time until everything is
durable (from before the backends are set up until the direct loop has finished/closed
every backend, or until `Tracker.finish()` returns) and the points lost, counted by
reading every store back with its own reader (MlflowClient.get_metric_history,
TensorBoard's EventAccumulator, `wandb leet inspect --json`, rlrun's jsonl reader).

Each mode runs in a fresh subprocess, all files under a temporary directory that is
removed afterwards (`--keep` keeps it). Results: benchmarks/results/tracker.json.

    python benchmarks/tracker.py [--steps 1000] [--metrics 20] [--step-work-ms 0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tracker.json"
JOB = "bench"
# W&B's system-metrics sampler, requirements and git capture are not what we measure.
WANDB_SETTINGS = {"console": "off", "silent": True, "x_disable_stats": True, "x_save_requirements": False, "disable_git": True}


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


def run_direct(work: Path, steps: int, names: list[str], step_work: float) -> dict:
    t_setup = time.perf_counter()
    import mlflow
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-direct")
    mlflow_run = mlflow.start_run(run_name="direct")
    wandb_run = wandb.init(
        project="rlrun-bench", id="direct", dir=str(work / "wandb_root"), mode="offline",
        settings=wandb.Settings(**WANDB_SETTINGS),
    )  # fmt: skip
    writer = SummaryWriter(log_dir=str(work / "tensorboard"))

    def log_directly(metrics: dict[str, float], step: int) -> None:  # as verl / NeMo-RL do
        wandb_run.log(metrics, step=step)
        mlflow.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)

    t_loop = time.perf_counter()
    blocked = timed_steps(steps, names, step_work, log_directly)
    loop_s = time.perf_counter() - t_loop
    writer.flush()
    writer.close()
    wandb_run.finish()
    mlflow.end_run()
    durable_s = time.perf_counter() - t_setup
    from_loop_s = time.perf_counter() - t_loop

    lost = {
        "mlflow": mlflow_lost(uri, mlflow_run.info.run_id, names, steps, prefix=""),
        "tensorboard": tensorboard_lost(work / "tensorboard", names, steps),
        "wandb": wandb_lost(work / "wandb_root", "direct", names, steps),
    }
    return {"blocked": blocked, "loop_s": loop_s, "durable_s": durable_s, "from_loop_s": from_loop_s, "lost": lost}


def run_tracker(work: Path, steps: int, names: list[str], step_work: float) -> dict:
    t_setup = time.perf_counter()
    from omegaconf import OmegaConf

    from rlrun.config import RunConfig
    from rlrun.tracking import Tracker

    cfg = OmegaConf.structured(RunConfig)
    cfg.name = "bench"
    log_cfg = cfg.logger
    log_cfg.tensorboard.enabled = True
    log_cfg.mlflow.enabled = True
    log_cfg.mlflow.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    log_cfg.mlflow.experiment_name = "bench-tracker"
    log_cfg.wandb.enabled = True
    log_cfg.wandb.offline = True
    log_cfg.wandb.project = "rlrun-bench"
    log_cfg.wandb.id = "tracker"
    log_cfg.wandb.dir = str(work / "wandb_root")
    settings = {k: v for k, v in WANDB_SETTINGS.items() if k not in ("console", "silent")}
    tracker = Tracker(log_cfg, job=JOB, output_dir=work / "run", wandb_settings=settings)

    t_loop = time.perf_counter()
    blocked = timed_steps(steps, names, step_work, tracker.log_metrics)
    loop_s = time.perf_counter() - t_loop
    tracker.finish()
    durable_s = time.perf_counter() - t_setup
    from_loop_s = time.perf_counter() - t_loop

    from rlrun.tracking.record import read_records

    mlflow_run_id = tracker.workers["mlflow"].backend.run_id  # created by the writer thread
    records = [r for r in read_records(tracker.jsonl_file) if r["type"] == "metrics"]
    seen = {(r["step"], k) for r in records for k, v in r["metrics"].items() if k in names and v == value(names.index(k), r["step"])}
    lost = {
        "jsonl": steps * len(names) - len(seen),
        "mlflow": mlflow_lost(log_cfg.mlflow.tracking_uri, mlflow_run_id, names, steps, prefix=f"{JOB}/"),
        "tensorboard": tensorboard_lost(work / "run" / "tensorboard" / JOB, names, steps),
        "wandb": wandb_lost(work / "wandb_root", tracker.run_identity()["wandb_run_id"], names, steps),
    }
    return {"blocked": blocked, "loop_s": loop_s, "durable_s": durable_s, "from_loop_s": from_loop_s, "lost": lost}


# ---------------------------------------------------------------- reading the stores back


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
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir / f"run-{run_id}.wandb")],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=300, check=True,
    )  # fmt: skip
    seen = set()
    for line in out.stdout.splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("type") == "history":
            step = int(record["history"]["step"].get("num", 0))
            item = record["history"]["item"]
            seen.update((step, k) for k, v in item.items() if k in names and v == value(names.index(k), step))
    return steps * len(names) - len(seen)


# ---------------------------------------------------------------- the parent


def summarize(raw: dict, step_work_s: float) -> dict:
    blocked = raw["blocked"]
    return {
        # What logging cost the loop in all: blocked time plus any time the loop lost
        # otherwise (e.g. waiting for the GIL while writer threads run).
        "loop_overhead_s": raw["loop_s"] - len(blocked) * step_work_s,
        "p50_s": statistics.median(blocked),
        "p99_s": percentile(blocked, 99),
        "max_s": max(blocked),
        "mean_s": statistics.fmean(blocked),
        "loop_s": raw["loop_s"],
        "durable_s": raw["durable_s"],
        "from_loop_s": raw["from_loop_s"],
        "lost": raw["lost"],
    }


def run_mode(mode: str, work: Path, args: argparse.Namespace) -> dict:
    work.mkdir(parents=True)
    out_file = work / "result.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_MODE": "offline",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(work / name.lower())
    cmd = [
        sys.executable, __file__, "--mode", mode, "--work", str(work), "--steps", str(args.steps),
        "--metrics", str(args.metrics), "--step-work-ms", str(args.step_work_ms),
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, timeout=900)
    return summarize(json.loads(out_file.read_text()), args.step_work_ms / 1000)


def report(args: argparse.Namespace, direct: dict, tracker: dict) -> dict:
    from rich.console import Console
    from rich.table import Table

    ratio = direct["p99_s"] / tracker["p99_s"] if tracker["p99_s"] > 0 else float("inf")
    result = {
        "steps": args.steps,
        "metrics_per_step": args.metrics,
        "step_work_s": args.step_work_ms / 1000,
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
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    table = Table(
        title=f"{args.steps} steps x {args.metrics} metrics -> tensorboard + mlflow (sqlite) + wandb (offline), "
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
    console = Console()
    console.print(table)
    verdict = "met" if result["target_met"] else "MISSED"
    console.print(f"p99 ratio direct/tracker: {ratio:.0f}x (target >= 100x: {verdict})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument(
        "--step-work-ms", type=float, default=5.0,
        help="simulated compute before each step's logging (a sleep: it releases the GIL, as torch ops do); "
        "0 logs back to back, so the writer threads hardly run while the loop does",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--mode", choices=("direct", "tracker"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = metric_names(args.metrics)

    if args.mode:  # a child: one mode, raw results to <work>/result.json
        fn = run_direct if args.mode == "direct" else run_tracker
        raw = fn(args.work, args.steps, names, args.step_work_ms / 1000)
        (args.work / "result.json").write_text(json.dumps(raw))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="rlrun-bench-"))
    try:
        direct = run_mode("direct", tmp / "direct", args)
        tracker = run_mode("tracker", tmp / "tracker", args)
        result = report(args, direct, tracker)
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
