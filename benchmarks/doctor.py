"""The run doctor: silent on healthy runs, quick on a broken one, free for the training step.

1. Findings: the default experiment (SFT then RL) over `--seeds` seeds must leave no
   `alert` record; the RL-only experiment, whose completions never end, must get a `no_eos`
   finding within 30 steps.
2. Step time: the RL stage (`sft.max_steps=0`, `--steps` steps) with `doctor=default` and with
   `doctor=off`, `--repeats` pairs, which one goes first alternating (a run after an idle wait
   is not the same as the next one); the median wall time per step of each, their ratio and
   each pair's difference (the target is "not measurable": the medians' difference within the
   spread of repeated runs of one option).
3. The caller's cost: `Tracker.log_metrics` blocked time per call (60 metrics, jsonl only)
   with and without the doctor, in this process.

Results: benchmarks/results/doctor.json.

    python benchmarks/doctor.py [--seeds 3] [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RL_STAGE, machine, run_rlrun, summarize, table, write_json  # noqa: E402

NO_EOS_WITHIN = 30


def findings(seeds: int) -> dict:
    from rlrun.tracking.record import read_alerts

    out: dict = {"default": [], "rl_only": None}
    for seed in range(seeds):
        with tempfile.TemporaryDirectory(prefix="rlrun-bench-doctor-") as tmp:
            run = run_rlrun(Path(tmp) / "run", [f"seed={seed}"])
            alerts = read_alerts(Path(tmp) / "run")
        out["default"].append({"seed": seed, "alerts": [a["text"] for a in alerts], "wall_s": run["wall_s"],
                               "reward_last10": statistics.fmean(r["metrics"]["reward"]
                                                                 for r in run["orchestrator"][-10:])})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rlrun-bench-doctor-") as tmp:
        run_rlrun(Path(tmp) / "run", ["+experiment=reverse_text_rl_only", f"max_steps={NO_EOS_WITHIN}"])
        alerts = read_alerts(Path(tmp) / "run")
    no_eos = [a for a in alerts if a["rule"] == "no_eos"]
    out["rl_only"] = {"alerts": [a["text"] for a in alerts], "no_eos_step": no_eos[0]["step"] if no_eos else None}
    out["false_alarms"] = sum(len(r["alerts"]) for r in out["default"])
    out["met"] = out["false_alarms"] == 0 and bool(no_eos) and no_eos[0]["step"] <= NO_EOS_WITHIN
    return out


def step_time(steps: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"default": [], "off": []}
    for i in range(repeats):
        for option in ("default", "off") if i % 2 == 0 else ("off", "default"):
            with tempfile.TemporaryDirectory(prefix="rlrun-bench-doctor-") as tmp:
                run = run_rlrun(Path(tmp) / "run", [*RL_STAGE, f"max_steps={steps}", f"doctor={option}",
                                                    "orchestrator.eval_interval=0"])  # fmt: skip
            s = summarize(run, skip=10)
            runs[option].append({"step_s": s["step_s"], "loadavg_1m_before": run["machine_before"]["loadavg_1m"],
                                 "loadavg_1m_after": run["loadavg_1m_after"]})  # fmt: skip
    out: dict = {"steps": steps, "repeats": repeats, "runs": runs}
    for option, rs in runs.items():
        values = [r["step_s"] for r in rs]
        out[f"{option}_step_s_median"], out[f"{option}_step_s_min"], out[f"{option}_step_s_max"] = (
            statistics.median(values), min(values), max(values))
    out["ratio"] = out["default_step_s_median"] / out["off_step_s_median"]
    # "Not measurable": the difference is within the spread of repeated runs of one option.
    spread = max(out["off_step_s_max"] - out["off_step_s_min"], out["default_step_s_max"] - out["default_step_s_min"])
    out["difference_s"] = out["default_step_s_median"] - out["off_step_s_median"]
    out["pair_differences_s"] = [a["step_s"] - b["step_s"] for a, b in zip(runs["default"], runs["off"])]
    out["spread_s"] = spread
    out["met"] = abs(out["difference_s"]) <= spread
    return out


def caller_cost(calls: int = 5000, names: int = 60) -> dict:
    from omegaconf import OmegaConf

    from rlrun.doctor.config import DoctorConfig
    from rlrun.tracking import Tracker
    from rlrun.config import LoggerConfig

    out = {}
    for option, doctor in (("off", None), ("default", OmegaConf.structured(DoctorConfig))):
        with tempfile.TemporaryDirectory(prefix="rlrun-bench-doctor-") as tmp:
            tracker = Tracker(OmegaConf.structured(LoggerConfig), job="trainer", output_dir=tmp, doctor=doctor)
            blocked = []
            for step in range(1, calls + 1):
                metrics = {f"m{i:02d}": step * 1e-3 + i for i in range(names)}
                metrics.update(loss=0.01, grad_norm=1.0 + (step % 5) * 0.1, entropy=0.3)
                start = time.perf_counter()
                tracker.log_metrics(metrics, step)
                blocked.append(time.perf_counter() - start)
            tracker.finish()
        blocked.sort()
        out[option] = {"p50_s": blocked[len(blocked) // 2], "p99_s": blocked[int(0.99 * len(blocked))]}
    out["p50_added_s"] = out["default"]["p50_s"] - out["off"]["p50_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    result = {"machine": machine(), "caller": caller_cost(), "step_time": step_time(args.steps, args.repeats),
              "findings": findings(args.seeds)}  # fmt: skip
    path = write_json("doctor", result)
    f, st, c = result["findings"], result["step_time"], result["caller"]
    print(table([
        ["false alarms, default x%d seeds" % args.seeds, f["false_alarms"], "0", "met" if f["false_alarms"] == 0 else "missed"],
        ["rl_only: no_eos finding at step", f["rl_only"]["no_eos_step"], f"<= {NO_EOS_WITHIN}",
         "met" if f["met"] else "missed"],
        ["step s, doctor=default (median)", f"{st['default_step_s_median']:.4f}", "", ""],
        ["step s, doctor=off (median)", f"{st['off_step_s_median']:.4f}", "", ""],
        ["difference s (spread of repeats)", f"{st['difference_s']:+.4f} ({st['spread_s']:.4f})", "within spread",
         "met" if st["met"] else "missed"],
        ["log_metrics p50 s, doctor off / on", f"{c['off']['p50_s']:.2e} / {c['default']['p50_s']:.2e}", "", ""],
    ], ["check", "value", "target", ""]))  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
