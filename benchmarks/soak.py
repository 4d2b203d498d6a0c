"""A long run with every tracker and every extra: does anything grow that should not?

Runs the default model and task (RL stage: `sft.max_steps=0`) for --steps RL steps (10,000)
or --minutes (30), whichever comes first (then a SIGTERM: the run's own graceful stop),
with `logger=all` (console, TensorBoard, MLflow on a SQLite file, W&B offline) and
`log_extras=all` (sample tables and distributions). Every --interval seconds it samples,
for every process of the run (grouped by job: a helper process such as wandb-core counts
under the job that started it): resident memory, open files and threads, and the size of
the run directory (each top-level folder). Afterwards it reads every step back from every
backend with the tracker's own reader (jsonl, TensorBoard's EventAccumulator, MlflowClient,
`wandb leet inspect`) and counts steps missing or logged twice.

Targets: each job's RSS within +10% of its value after warm-up (the median of the first
minute after --warmup-steps), open files and threads constant after warm-up, the run
directory's pruned folders (rollouts, weights, checkpoints) bounded, every step in every
backend exactly once. Results: benchmarks/results/soak.json and soak.png.

    python benchmarks/soak.py [--steps 10000] [--minutes 30] [--interval 5] [--warmup-steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RL_STAGE, ROOT, machine, read_metrics, table, wandb_records, write_json  # noqa: E402

JOBS = ("inference", "orchestrator", "trainer", "zygote")
PRUNED = ("rollouts", "weights", "checkpoints", "exports")
RSS_TARGET = 0.10


def job_of(proc: psutil.Process) -> str | None:
    """The job a process is (from its command line: forked jobs show their own, see zygote.py)."""
    cmd = " ".join(proc.cmdline())
    if "rlrun.launcher.zygote" in cmd:
        return "zygote"
    for job in JOBS:
        if f"rlrun.{job}" in cmd:
            return job
    return None


def sample_processes(root: psutil.Process) -> dict[str, dict[str, float]]:
    """RSS (MB), open files and threads per job; a helper process counts as `<job>+<its name>`."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"rss_mb": 0.0, "fds": 0, "threads": 0, "procs": 0})
    owner: dict[int, str] = {root.pid: "rl"}
    for proc in [root, *root.children(recursive=True)]:
        try:
            job = "rl" if proc.pid == root.pid else job_of(proc)
            if job is None:  # an env worker, wandb-core, a torchrun agent...: its nearest job's
                parent = proc.ppid()
                helper = "env_worker" if "multiprocessing" in " ".join(proc.cmdline()) else proc.name()
                job = f"{owner.get(parent, 'rl').split('+')[0]}+{helper}"
            owner[proc.pid] = job
            with proc.oneshot():
                out[job]["rss_mb"] += proc.memory_info().rss / 2**20
                out[job]["fds"] += proc.num_fds()
                out[job]["threads"] += proc.num_threads()
                out[job]["procs"] += 1
        except psutil.Error:
            continue
    return dict(out)


def dir_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total / 2**20


def last_step(path: Path) -> int:
    """The newest step in a metrics jsonl (read from its end)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        for line in reversed(f.read().splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" in record and record.get("type", "metrics") == "metrics":
                return int(record["step"])
    return 0


def count(steps: list[int], expected: set[int]) -> dict[str, int]:
    return {"missing": len(expected - set(steps)), "duplicates": len(steps) - len(set(steps)),
            "extra": len(set(steps) - expected)}  # fmt: skip


def read_back(run_dir: Path, uri: str) -> dict:
    """Each job's steps in every backend against its own jsonl."""
    from mlflow import MlflowClient
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = OmegaConf.load(run_dir / "config.yaml")
    client = MlflowClient(uri)
    out = {}
    for job, key in (("trainer", "loss"), ("orchestrator", "reward")):
        jsonl = [r["step"] for r in read_metrics(run_dir / "metrics" / f"{job}.jsonl") if r.get("type", "metrics") == "metrics"]
        expected = set(range(1, max(jsonl) + 1))
        acc = EventAccumulator(str(run_dir / "tensorboard" / job), size_guidance={"scalars": 0})
        acc.Reload()
        tb = [e.step for e in acc.Scalars(key)]
        ml = [m.step for m in client.get_metric_history(cfg.logger.mlflow.run_id, f"{job}/{key}")]
        (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{job}/run-*-{job}.wandb")
        wb = [int(r["history"]["step"].get("num", 0)) for r in wandb_records(run_file)
              if r.get("type") == "history" and key in r["history"]["item"]]  # fmt: skip
        out[job] = {"steps": max(jsonl), "jsonl": count(jsonl, expected), "tensorboard": count(tb, expected),
                    "mlflow": count(ml, expected), "wandb": count(wb, expected)}  # fmt: skip
    return out


def growth(series: list[dict], key: str, warm_t: float, relative: bool) -> dict[str, float]:
    """Per job: the baseline (median over the minute after warm-up), the max after it, the
    median of the last minute, and the growth: for RSS (`relative`) the max over the baseline,
    for counts (open files, threads) the last minute's median minus the baseline, so that a
    file open for a moment at one sample is not taken for a leak."""
    jobs = {j for s in series for j in s["procs"]}
    out = {}
    for job in sorted(jobs):
        after = [(s["t"], s["procs"][job][key]) for s in series if s["t"] >= warm_t and job in s["procs"]]
        if len(after) < 2:
            continue
        base = statistics.median(v for t, v in after if t < warm_t + 60.0)
        peak = max(v for _, v in after)
        end = statistics.median(v for t, v in after if t >= after[-1][0] - 60.0)
        out[job] = {"baseline": base, "max": peak, "end": end,
                    "growth": (peak / base - 1.0) if relative and base else end - base}  # fmt: skip
    return out


def plot(series: list[dict], warm_t: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    jobs = sorted({j for s in series for j in s["procs"]})
    for ax, key, title in ((axes[0][0], "rss_mb", "RSS (MB)"), (axes[0][1], "fds", "open files"),
                           (axes[1][0], "threads", "threads")):  # fmt: skip
        for job in jobs:
            pts = [(s["t"] / 60, s["procs"][job][key]) for s in series if job in s["procs"]]
            ax.plot(*zip(*pts), label=job)
        ax.set_title(title)
        ax.axvline(warm_t / 60, color="grey", ls=":")
    axes[0][0].legend(fontsize=7)
    ax = axes[1][1]
    for sub in sorted({k for s in series for k in s["dir_mb"]}):
        ax.plot([s["t"] / 60 for s in series], [s["dir_mb"].get(sub, 0.0) for s in series], label=sub)
    ax.set_title("run directory (MB)")
    ax.legend(fontsize=7)
    for a in axes[1]:
        a.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--warmup-steps", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rlrun-soak-") as tmp:
        run_dir, uri = Path(tmp) / "run", f"sqlite:///{tmp}/mlflow.db"
        overrides = [*RL_STAGE, f"max_steps={args.steps}", "logger=all", "logger.wandb.offline=true",
                     f"logger.mlflow.tracking_uri={uri}", "log_extras=all"]  # fmt: skip
        cmd = [sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", *overrides]
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root = psutil.Process(proc.pid)
        series, warm_t, stopped = [], None, False
        while proc.poll() is None:
            t = time.time() - start
            step = last_step(run_dir / "metrics" / "trainer.jsonl")
            subs = {p.name: dir_mb(p) for p in run_dir.iterdir() if p.is_dir()} if run_dir.is_dir() else {}
            series.append({"t": t, "step": step, "procs": sample_processes(root), "dir_mb": subs,
                           "loadavg_1m": os.getloadavg()[0]})  # fmt: skip
            if warm_t is None and step >= args.warmup_steps:
                warm_t = t
            if not stopped and t > args.minutes * 60:
                proc.send_signal(signal.SIGTERM)  # the run's graceful stop: trackers flush
                stopped = True
            time.sleep(args.interval)
        stderr = proc.stderr.read() if proc.stderr else ""
        wall = time.time() - start
        if proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
            raise RuntimeError(f"the soak run failed ({proc.returncode}):\n{stderr[-3000:]}")
        backends = read_back(run_dir, uri)
        final_mb = {p.name: dir_mb(p) for p in run_dir.iterdir() if p.is_dir()}

    warm_t = warm_t if warm_t is not None else series[len(series) // 4]["t"]
    rss = growth(series, "rss_mb", warm_t, relative=True)
    fds = growth(series, "fds", warm_t, relative=False)
    threads = growth(series, "threads", warm_t, relative=False)
    lost = sum(v["missing"] + v["duplicates"] for job in backends.values() for k, v in job.items() if k != "steps")
    pruned_max = {sub: max(s["dir_mb"].get(sub, 0.0) for s in series) for sub in PRUNED}
    result = {
        "steps": backends["trainer"]["steps"],
        "wall_s": wall,
        "stopped_by_time": stopped,
        "rss_growth": {job: v["growth"] for job, v in rss.items()},
        "fds_growth": {job: v["growth"] for job, v in fds.items()},
        "threads_growth": {job: v["growth"] for job, v in threads.items()},
        "run_dir_mb_max": max(sum(s["dir_mb"].values()) for s in series),
        "run_dir_mb_final": final_mb,
        "pruned_dirs_mb_max": pruned_max,
        "points_lost": lost,
        "backends": backends,
        "targets": {"rss_growth": RSS_TARGET, "fds_growth": 0, "threads_growth": 0, "points_lost": 0},
        "met": {"rss": all(g <= RSS_TARGET for g in (v["growth"] for v in rss.values())),
                "fds": all(v["growth"] <= 0 for v in fds.values()),
                "threads": all(v["growth"] <= 0 for v in threads.values()), "points_lost": lost == 0},
        "rss_mb": rss, "fds": fds, "threads": threads,
        "warmup_s": warm_t,
        "settings": {"overrides": overrides, "interval_s": args.interval, "warmup_steps": args.warmup_steps,
                     "max_minutes": args.minutes},
        "loadavg_1m": [s["loadavg_1m"] for s in series[:: max(1, len(series) // 20)]],
        "machine": machine(),
    }  # fmt: skip
    write_json("soak", result)
    plot(series, warm_t, RESULTS / "soak.png")
    print(f"{result['steps']} steps in {wall / 60:.1f} min (stopped by time: {stopped}); warm-up {warm_t:.0f} s")
    print(table([[job, rss[job]["baseline"], rss[job]["max"], rss[job]["growth"] * 100,
                  fds.get(job, {}).get("growth"), threads.get(job, {}).get("growth")] for job in rss],
                ["job", "RSS after warm-up (MB)", "RSS max (MB)", "RSS growth %", "fds +", "threads +"]))  # fmt: skip
    print(f"run directory max {result['run_dir_mb_max']:.0f} MB; pruned folders max {pruned_max}")
    print(f"steps missing or twice, all backends: {lost}  ({json.dumps(backends)})")
    print(f"met: {result['met']}\nwrote {RESULTS / 'soak.json'} and soak.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
