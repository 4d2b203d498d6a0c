"""Overlap of generation and training: `orchestrator.max_async_steps=0` (strictly sequential)
against `=1` (generation of step s+1 runs while the trainer trains on step s).

Two configurations, each run end to end (`python -m rlrun`) --repeats times per setting
(sequential and async alternating; each run waits for an idle CPU and records the load):

- default: the default experiment (tiny Llama, reverse_text, 16 prompts x 8, 12 tokens);
- heavy: a larger model and longer completions, so that both generation and training take
  a substantial share of a step (--heavy-overrides).

Reported per run (steady state: steps after --skip): step time (wall time between the
trainer's step records), samples/s, generated tokens/s, and each job's phase times: the
trainer's `time/wait_for_batch`, the orchestrator's `time/wait_for_weights`,
`time/update_weights`, `time/generate`, ... Target: async step time <= 0.6 x sequential.
The figures are the medians over the repeats (the repeat with the median ratio gives the
phase breakdown); every repeat's step times, ratio and load are kept under `repeats`.
Results: benchmarks/results/overlap.json (top-level keys: the default experiment's medians).

    python benchmarks/overlap.py [--steps 200] [--heavy-steps 40] [--skip 5] [--repeats 3] [--configs default,heavy]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RL_STAGE, machine, run_rlrun, summarize, table, write_json  # noqa: E402

TARGET_RATIO = 0.6
HEAVY = ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=384",
         "orchestrator.max_tokens=24", "orchestrator.eval_interval=0", "trainer.checkpoint_interval=0"]


def measure(name: str, overrides: list[str], steps: int, skip: int, samples_per_step: int) -> dict:
    out = {}
    for mode, k in (("sequential", 0), ("async", 1)):
        with tempfile.TemporaryDirectory(prefix=f"rlrun-bench-overlap-{name}-") as tmp:
            run = run_rlrun(Path(tmp) / "run", [*RL_STAGE, *overrides, f"max_steps={steps}",
                                                f"orchestrator.max_async_steps={k}"])  # fmt: skip
        s = summarize(run, skip)
        s["samples_per_s"] = samples_per_step / s["step_s"]
        s["gen_tokens_per_s"] = samples_per_step * s["gen_tokens_per_sample"] / s["step_s"]
        s["wall_s"] = run["wall_s"]
        s["machine_before"] = run["machine_before"]
        s["loadavg_1m_after"] = run["loadavg_1m_after"]
        out[mode] = s
    out["ratio"] = out["async"]["step_s"] / out["sequential"]["step_s"]
    out["met"] = out["ratio"] <= TARGET_RATIO
    # What perfect overlap could give: the longer of the two jobs' busy time per step.
    seq = out["sequential"]
    orch_busy = seq["orchestrator"]["step_s"] - seq["orchestrator"]["wait_for_weights_s"]
    train_busy = seq["trainer"]["step_s"] - seq["trainer"]["wait_for_batch_s"]
    out["sequential_orchestrator_busy_s"] = orch_busy
    out["sequential_trainer_busy_s"] = train_busy
    out["best_possible_ratio"] = max(orch_busy, train_busy) / seq["step_s"]
    return out


def measure_repeated(name: str, overrides: list[str], steps: int, skip: int, samples_per_step: int,
                     repeats: int) -> dict:  # fmt: skip
    """`measure` `repeats` times: the repeat with the median ratio, plus every repeat's figures and the medians."""
    import statistics

    runs = [measure(name, overrides, steps, skip, samples_per_step) for _ in range(repeats)]
    runs.sort(key=lambda r: r["ratio"])
    out = dict(runs[len(runs) // 2])
    out["repeats"] = [{"sequential_step_s": r["sequential"]["step_s"], "async_step_s": r["async"]["step_s"],
                       "ratio": r["ratio"], "loadavg_1m_before": [r[m]["machine_before"]["loadavg_1m"]
                                                                 for m in ("sequential", "async")],
                       "loadavg_1m_after": [r[m]["loadavg_1m_after"] for m in ("sequential", "async")]}
                      for r in runs]  # fmt: skip
    for key in ("sequential_step_s", "async_step_s", "ratio"):
        values = [r[key] for r in out["repeats"]]
        out[f"{key}_median"], out[f"{key}_min"], out[f"{key}_max"] = statistics.median(values), min(values), max(values)
    out["met"] = out["ratio_median"] <= TARGET_RATIO
    return out


def print_config(name: str, res: dict) -> None:
    rows = []
    for mode in ("sequential", "async"):
        s = res[mode]
        o, t = s["orchestrator"], s["trainer"]
        rows.append([mode, s["step_s"], s["samples_per_s"], s["gen_tokens_per_s"], t["wait_for_batch_s"],
                     o["wait_for_weights_s"], o["update_weights_s"], o["generate_s"], o["score_s"] + o["write_batch_s"],
                     o["eval_s_per_step"], t["forward_backward_s"] + t["optimizer_step_s"] + t["save_weights_s"],
                     s["reward_last10"]])
    print(f"\n[{name}] async/sequential step time = {res['ratio']:.3f} (target <= {TARGET_RATIO}: "
          f"{'met' if res['met'] else 'missed'}); best possible with perfect overlap = {res['best_possible_ratio']:.3f}")
    print(table(rows, ["mode", "step s", "samples/s", "gen tok/s", "trainer wait batch s", "orch wait weights s",
                       "update_weights s", "generate s", "score+write s", "eval s/step", "train compute s",
                       "reward last10"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--heavy-steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the figures are medians")
    parser.add_argument("--configs", default="default,heavy",
                        help="which to (re)measure; the others are kept from an existing overlap.json")
    args = parser.parse_args()
    samples = 16 * 8
    configs = {"default": ([], args.steps), "heavy": (HEAVY, args.heavy_steps)}
    chosen = [c for c in args.configs.split(",") if c]
    settings = {"default": {"overrides": [], "steps": args.steps},
                "heavy": {"overrides": HEAVY, "steps": args.heavy_steps}, "skip": args.skip,
                "samples_per_step": samples, "compared": "orchestrator.max_async_steps=0 vs 1"}
    print(f"settings: {settings}")
    path = RESULTS / "overlap.json"
    result = json.loads(path.read_text()) if path.exists() and set(chosen) != set(configs) else {}
    for name in chosen:
        overrides, steps = configs[name]
        result[name] = measure_repeated(name, overrides, steps, args.skip, samples, args.repeats)
        print_config(name, result[name])
        r = result[name]
        print(f"[{name}] over {args.repeats} repeats: sequential {r['sequential_step_s_median']:.4f} s "
              f"({r['sequential_step_s_min']:.4f}-{r['sequential_step_s_max']:.4f}), async {r['async_step_s_median']:.4f} s "
              f"({r['async_step_s_min']:.4f}-{r['async_step_s_max']:.4f}), ratio {r['ratio_median']:.3f} "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
        if name == "default":
            result.update(sequential_step_s=r["sequential_step_s_median"], async_step_s=r["async_step_s_median"],
                          ratio=r["ratio_median"], target_ratio=TARGET_RATIO, met=r["met"])
        result["settings"] = settings
        result["machine"] = machine()
        write_json("overlap", result)
    for name in configs:
        if name not in chosen and name in result:
            print(f"\n(kept from the previous run of this benchmark: {name})")
            print_config(name, result[name])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
