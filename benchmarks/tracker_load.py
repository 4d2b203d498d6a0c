"""Tracker under load: N trainer ranks (gloo) x M metrics x S steps, reduced across ranks.

Extends benchmarks/tracker.py (one process) to the distributed case. Every rank builds a
`Tracker` (jsonl only, `--tensorboard` adds TensorBoard) and logs S steps of M metrics with
a mix of declared reductions (mean/max/min/sum; the `time/*` keys are left to their default,
max), timing each `log_metrics` call (the cross-rank reduction plus, on rank 0, the enqueue)
with perf_counter. A spy counts every torch.distributed collective called during each
`log_metrics`. Afterwards rank 0 gathers the timings and counts of all ranks, finishes the
tracker and reads the jsonl back: S records of M metrics, every value equal to its exact
reduction over the ranks.

The cost is compared with a training step of the default model: the trainer's compute
(`time/forward_backward` + `time/optimizer_step`, async run) from
benchmarks/results/overlap.json when present, else 0.054 s.

Caveat on a small machine: N ranks on fewer cores are oversubscribed; each all_gather waits
for ranks the OS has descheduled, so the per-call times here are mostly scheduling delay,
not the reduction's own cost (see `reduce_only_1rank_*` for that, measured without peers).

Results: benchmarks/results/tracker_load.json.

    python benchmarks/tracker_load.py [--ranks 8] [--metrics 200] [--steps 1000] [--tensorboard]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "tracker_load.json"
OVERLAP = ROOT / "benchmarks" / "results" / "overlap.json"
FALLBACK_TRAIN_STEP_S = 0.054  # forward+backward+optimizer of the default tiny model, measured earlier
JOB = "trainer"
OPS = ("mean", "max", "min", "sum")
N_TIME = 10  # how many of the metrics are time/* keys (default reduction: max)


# ---------------------------------------------------------------- what every rank logs


def metric_names(n: int) -> list[str]:
    plain = [f"m{i:03d}" for i in range(n - N_TIME)]
    return plain + [f"time/t{i:02d}" for i in range(N_TIME)]


def declared(names: list[str]) -> dict[str, str]:
    """mean/max/min/sum in turn for the plain metrics; time/* keys are left to the default (max)."""
    return {name: OPS[i % len(OPS)] for i, name in enumerate(names) if not name.startswith("time/")}


def value(rank: int, i: int, step: int) -> float:
    """Exact in float64 (multiples of 1/8), so reductions compare with ==; the rank order
    differs between metrics so max/min are not always the same rank."""
    r = (rank * 3 + i) % 8 if i % 2 else rank
    return step + 0.5 * i + 0.125 * r


def expected(ranks: int, i: int, step: int, op: str) -> float:
    vals = [value(r, i, step) for r in range(ranks)]
    return {"mean": sum(vals) / ranks, "max": max(vals), "min": min(vals), "sum": sum(vals)}[op]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------- the rank side


def rank_main(rank: int, args: argparse.Namespace, init_file: str, work: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.ranks, timeout=timedelta(seconds=300)
    )
    from omegaconf import OmegaConf

    from rlrun.config import RunConfig
    from rlrun.tracking import Tracker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from collectives import count_collectives  # the tests' diagnostic: one collective per step

    real_all_gather_object = dist.all_gather_object  # for the bookkeeping, uncounted
    cfg = OmegaConf.structured(RunConfig)
    cfg.name = "bench-load"
    cfg.logger.tensorboard.enabled = bool(args.tensorboard)
    tracker = Tracker(cfg.logger, job=JOB, output_dir=Path(work) / "run", run_name=cfg.name)

    names = metric_names(args.metrics)
    reductions = declared(names)
    counts: dict[str, int] = {}
    count_collectives(counts)
    per_step = [[value(rank, i, step) for i in range(len(names))] for step in range(args.steps)]

    dist.barrier()  # everyone starts together (not counted: counts are reset per step)
    times, collectives = [], []
    t_loop = time.perf_counter()
    for step in range(args.steps):
        if args.step_work_ms:
            time.sleep(args.step_work_ms / 1000)
        metrics = dict(zip(names, per_step[step]))
        counts.clear()
        start = time.perf_counter()
        tracker.log_metrics(metrics, step, reductions)
        times.append(time.perf_counter() - start)
        collectives.append(dict(counts))
    loop_s = time.perf_counter() - t_loop

    mine = {"rank": rank, "times": times, "collectives": collectives, "loop_s": loop_s}
    everyone: list = [None] * args.ranks
    real_all_gather_object(everyone, mine)
    if rank == 0:
        t_finish = time.perf_counter()
        tracker.finish()
        finish_s = time.perf_counter() - t_finish
        Path(work, "ranks.json").write_text(
            json.dumps({"ranks": everyone, "finish_s": finish_s, "jsonl": str(tracker.jsonl_file)})
        )
    else:
        tracker.finish()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the parent


def reduce_only_1rank(metrics: int, n: int = 2000) -> dict:
    """What reduce.py does per call, without peers to wait for: pack the values into one
    float64 tensor, a 1-rank gloo all_gather, reduce each column (reduce_metrics itself skips
    the collective at world size 1, so the steps are repeated here)."""
    import torch.distributed as dist

    with tempfile.NamedTemporaryFile(prefix="rlrun-pg-", delete=False) as f:
        init = f.name
    os.unlink(init)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    import torch

    names = metric_names(metrics)
    reductions = declared(names)
    vals = {name: value(0, i, 0) for i, name in enumerate(names)}
    t = []
    for _ in range(n):
        s = time.perf_counter()
        local = torch.tensor([0.0] + list(vals.values()), dtype=torch.float64)
        out = [torch.empty_like(local)]
        dist.all_gather(out, local)
        table = torch.stack(out)
        ops = {"mean": torch.Tensor.mean, "max": torch.Tensor.max, "min": torch.Tensor.min, "sum": torch.Tensor.sum}
        {k: float(ops[reductions.get(k, "max")](table[:, j + 1])) for j, k in enumerate(names)}
        t.append(time.perf_counter() - s)
    dist.destroy_process_group()
    return {"p50_s": statistics.median(t), "mean_s": statistics.fmean(t)}


def train_step() -> tuple[float, str]:
    if OVERLAP.exists():
        trainer = json.loads(OVERLAP.read_text())["default"]["async"]["trainer"]
        s = trainer["forward_backward_s"] + trainer["optimizer_step_s"]
        return s, "overlap.json default/async trainer: time/forward_backward + time/optimizer_step"
    return FALLBACK_TRAIN_STEP_S, "fallback 0.054 s (forward+backward+optimizer of the default tiny model)"


def check_jsonl(path: Path, ranks: int, metrics: int, steps: int) -> dict:
    from rlrun.tracking.record import read_records

    names = metric_names(metrics)
    reductions = declared(names)
    records = [r for r in read_records(path) if r["type"] == "metrics"]
    by_step = {r["step"]: r["metrics"] for r in records}
    wrong, missing = 0, 0
    for step in range(steps):
        got = by_step.get(step)
        if got is None:
            missing += metrics
            continue
        for i, name in enumerate(names):
            op = reductions.get(name, "max")
            if name not in got:
                missing += 1
            elif got[name] != expected(ranks, i, step, op):
                wrong += 1
    sample = {
        f"{names[i]} ({reductions.get(names[i], 'max')}) step {s}": [by_step[s][names[i]], expected(ranks, i, s, reductions.get(names[i], "max"))]
        for i, s in ((0, 0), (1, 500), (2, 999), (3, 7), (metrics - 1, 999))
        if s in by_step
    }  # fmt: skip
    return {
        "records": len(records),
        "steps_recorded": len(by_step),
        "metrics_per_record": sorted({len(m) for m in by_step.values()}),
        "points_checked": steps * metrics,
        "points_missing": missing,
        "points_wrong": wrong,
        "sample_got_vs_expected": sample,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--metrics", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--step-work-ms", type=float, default=0.0, help="sleep before each step's logging (0: back to back)")
    parser.add_argument("--tensorboard", action="store_true", help="TensorBoard as well as jsonl")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine, wait_quiet

    before = wait_quiet()
    work = Path(tempfile.mkdtemp(prefix="rlrun-bench-load-"))
    try:
        t0 = time.perf_counter()
        mp.spawn(rank_main, args=(args, str(work / "pg_init"), str(work)), nprocs=args.ranks, join=True)
        wall_s = time.perf_counter() - t0
        raw = json.loads((work / "ranks.json").read_text())
        check = check_jsonl(Path(raw["jsonl"]), args.ranks, args.metrics, args.steps)
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    solo = reduce_only_1rank(args.metrics)

    all_times = [t for r in raw["ranks"] for t in r["times"]]
    rank0 = raw["ranks"][0]["times"]
    per_step_counts = [sum(c.values()) for r in raw["ranks"] for c in r["collectives"]]
    kinds = sorted({k for r in raw["ranks"] for c in r["collectives"] for k in c})
    one_per_step = all(n == 1 for n in per_step_counts)
    step_s, step_source = train_step()
    mean_s = statistics.fmean(all_times)
    points_ok = check["points_missing"] == 0 and check["points_wrong"] == 0 and check["steps_recorded"] == args.steps
    result = {
        "ranks": args.ranks,
        "metrics": args.metrics,
        "steps": args.steps,
        "backends": ["jsonl"] + (["tensorboard"] if args.tensorboard else []),
        "step_work_s": args.step_work_ms / 1000,
        # per log_metrics call, pooled over all ranks and steps
        "reduce_log_p50_s": statistics.median(all_times),
        "reduce_log_p99_s": percentile(all_times, 99),
        "reduce_log_mean_s": mean_s,
        "reduce_log_max_s": max(all_times),
        "rank0_p50_s": statistics.median(rank0),
        "rank0_p99_s": percentile(rank0, 99),
        "per_rank_p50_s": [statistics.median(r["times"]) for r in raw["ranks"]],
        "loop_s_per_rank": [r["loop_s"] for r in raw["ranks"]],
        "collectives_per_step": max(per_step_counts) if one_per_step else statistics.fmean(per_step_counts),
        "collectives_per_step_min_max": [min(per_step_counts), max(per_step_counts)],
        "collective_kinds": kinds,
        "one_collective_per_step": one_per_step,
        "train_step_s": step_s,
        "train_step_source": step_source,
        "fraction_of_step": mean_s / step_s,
        "fraction_of_step_p50": statistics.median(all_times) / step_s,
        "reduce_only_1rank_p50_s": solo["p50_s"],
        "reduce_only_1rank_mean_s": solo["mean_s"],
        "points_ok": points_ok,
        "jsonl_check": check,
        "finish_s": raw["finish_s"],
        "wall_s": wall_s,
        "oversubscribed": args.ranks > (os.cpu_count() or 1),
        "caveat": (
            f"{args.ranks} ranks on {os.cpu_count()} cores: each all_gather waits for ranks the OS has "
            "descheduled, so the per-call times are mostly scheduling delay, not the reduction itself"
        ),
        "machine": machine(),
        "machine_before": before,
    }

    from rich.console import Console
    from rich.table import Table

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    table = Table(title=f"{args.ranks} gloo ranks x {args.metrics} metrics x {args.steps} steps, backends {result['backends']}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("log_metrics (reduce + log) p50, all ranks", ms(result["reduce_log_p50_s"]))
    table.add_row("log_metrics p99, all ranks", ms(result["reduce_log_p99_s"]))
    table.add_row("log_metrics mean, all ranks", ms(mean_s))
    table.add_row("log_metrics p50 / p99, rank 0 (writes)", f"{ms(result['rank0_p50_s'])} / {ms(result['rank0_p99_s'])}")
    table.add_row("pack + gather + reduce, 1 rank, p50", ms(solo["p50_s"]))
    table.add_row("collectives per step (min-max)", f"{min(per_step_counts)}-{max(per_step_counts)} {kinds}")
    table.add_row("training step (default model)", f"{ms(step_s)} ({step_source})")
    table.add_row("mean reduce+log / training step", f"{result['fraction_of_step']:.1%}")
    table.add_row("jsonl check", f"{check['steps_recorded']} records, {check['points_wrong']} wrong, {check['points_missing']} missing")
    table.add_row("wall (spawn to join)", f"{wall_s:.1f} s")
    console = Console()
    console.print(table)
    if result["oversubscribed"]:
        console.print(f"caveat: {result['caveat']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if points_ok and one_per_step else 1


if __name__ == "__main__":
    sys.exit(main())
