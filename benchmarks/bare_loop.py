"""rlrun against the loop a researcher would write in a notebook: what does its plumbing cost?

The bare loop is one process with no HTTP, no files, no subprocesses and no tracker: sample
a batch with rlrun's own engine (`rlrun.inference.engine.Engine`), score it with the task's
environment in-process, take the same GRPO step (`rlrun.trainer.step`), repeat, on one
model object, with torch using both cores. Its settings are the default run's RL stage,
read from `python -m rlrun --cfg job` with the same overrides (model, task, batch, group
size, lengths, lr, loss, seed), so the two cannot drift apart. rlrun runs the same
experiment end to end (`python -m rlrun`, async: generation of step s+1 overlaps training
on step s). Both sides skip evaluation (`orchestrator.eval_interval=0`: extra work, not
plumbing); rlrun keeps its checkpoints, weight hand-over and metrics.

Per repeat (rlrun and bare alternating, each after the machine is quiet, its load kept):
samples/s in steady state (steps after --skip), the mean reward over the last 20 steps
(equal reward after the same number of samples is the condition), and where the time goes:
bare per-phase times (generate / score+batch / train), rlrun's per-job phase times and each
job's CPU (the monitor's `system/job_cpu_percent/<job>`). Target: rlrun >= 1.2x bare.

    python benchmarks/bare_loop.py [--steps 200] [--skip 10] [--repeats 3] [--threads 2]
    python benchmarks/bare_loop.py --bare-only --steps 200   # the bare loop alone, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RL_STAGE, ROOT, machine, read_metrics, run_rlrun, summarize, table, wait_quiet, write_json,
)  # fmt: skip

TARGET_RATIO = 1.2
OVERRIDES = [*RL_STAGE, "orchestrator.eval_interval=0"]


def run_config(overrides: list[str]):
    """The resolved config `python -m rlrun` would run with these overrides."""
    from omegaconf import OmegaConf

    out = subprocess.run([sys.executable, "-m", "rlrun", "--cfg", "job", *overrides], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return OmegaConf.create(out)


def bare_loop(cfg, steps: int, threads: int) -> dict:
    """The notebook loop; per-step records (time, reward, phase seconds)."""
    import torch

    from rlrun.envs import load_task
    from rlrun.inference.engine import Engine
    from rlrun.model import bias_tensor, build_tiny_model, decode_completion, encode_example, load_model, special_token_bias
    from rlrun.orchestrator.loop import step_rng
    from rlrun.orchestrator.rollout import Rollout, build_batch, group_advantages
    from rlrun.trainer.step import forward_backward, optimizer_step

    o, t = cfg.orchestrator, cfg.trainer
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="rlrun-bare-") as tmp:
        model, tok = load_model(build_tiny_model(Path(tmp) / "model", cfg.model, cfg.seed), cfg.model.dtype)
    engine = Engine(model, tok, max_batch_size=cfg.inference.max_batch_size)
    env = load_task(cfg.task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    bias = special_token_bias(tok)
    bias_t = bias_tensor(bias, model.get_output_embeddings().weight.shape[0])

    class Log:  # optimizer_step reports a skipped update here
        warning = staticmethod(print)

    records = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        rng = step_rng(cfg.seed, step)
        examples = env.sample(rng, o.batch_size)
        prompt_ids = [encode_example(tok, ex) for ex in examples]
        model.eval()
        groups = engine.generate(prompt_ids, n=o.group_size, max_tokens=o.max_tokens, temperature=o.temperature,
                                 seed=rng.randrange(2**31), logit_bias=bias)  # fmt: skip
        t1 = time.perf_counter()
        rollouts = [Rollout(ex, ids, c) for ex, ids, group in zip(examples, prompt_ids, groups) for c in group]
        for r in rollouts:
            r.text = decode_completion(tok, r.completion_ids)
            r.scores = env.score(r.text, r.example)
        for r, a in zip(rollouts, group_advantages([r.reward for r in rollouts], o.group_size, o.scale_rewards)):
            r.advantage = a
        batch = build_batch(rollouts, int(tok.pad_token_id))
        if t.mask_truncated_completions:
            batch["loss_mask"] = batch["loss_mask"] * (1.0 - batch["truncated"])[:, None]
        t2 = time.perf_counter()
        model.train()
        forward_backward(model, batch, o.temperature, t.clip_eps_low, t.clip_eps_high, t.kl_coef, None,
                         t.micro_batch_size, loss_type=t.loss_type, max_tokens=o.max_tokens, logit_bias=bias_t,
                         is_correction=t.is_correction, is_cap=t.is_cap)  # fmt: skip
        optimizer_step(model, optimizer, t.max_grad_norm, Log, step)
        t3 = time.perf_counter()
        records.append({"step": step, "time": time.time(), "reward": statistics.fmean(r.reward for r in rollouts),
                        "generate_s": t1 - t0, "score_batch_s": t2 - t1, "train_s": t3 - t2})  # fmt: skip
    return {"records": records}


def bare_run(steps: int, threads: int) -> dict:
    """The bare loop in a fresh process (as rlrun's jobs are), after the machine is quiet."""
    before = wait_quiet()
    proc = subprocess.run([sys.executable, __file__, "--bare-only", f"--steps={steps}", f"--threads={threads}"],
                          cwd=ROOT, check=True, capture_output=True, text=True)  # fmt: skip
    out = json.loads(proc.stdout.splitlines()[-1])
    out["machine_before"], out["loadavg_1m_after"] = before, os.getloadavg()[0]
    return out


def summarize_bare(run: dict, skip: int, samples_per_step: int) -> dict:
    recs = [r for r in run["records"] if r["step"] > skip]
    step_s = (recs[-1]["time"] - recs[0]["time"]) / (recs[-1]["step"] - recs[0]["step"])
    phase = {k: statistics.fmean(r[k] for r in recs) for k in ("generate_s", "score_batch_s", "train_s")}
    return {"step_s": step_s, "samples_per_s": samples_per_step / step_s, **phase,
            "reward_last20": statistics.fmean(r["reward"] for r in run["records"][-20:]),
            "machine_before": run["machine_before"], "loadavg_1m_after": run["loadavg_1m_after"]}  # fmt: skip


def job_cpu(run_dir: Path, skip_s: float = 5.0) -> dict[str, float]:
    """Each job's mean CPU (%, 100 = one core) in the monitor's samples after the first seconds."""
    samples = [r for r in read_metrics(run_dir / "metrics" / "monitor.jsonl")
               if r["metrics"].get("system/elapsed_s", 0) > skip_s]  # fmt: skip
    prefix = "system/job_cpu_percent/"
    keys = {k for r in samples for k in r["metrics"] if k.startswith(prefix)}
    return {k[len(prefix):]: statistics.fmean(r["metrics"][k] for r in samples if k in r["metrics"]) for k in sorted(keys)}


def rlrun_run(steps: int, skip: int, samples_per_step: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlrun-bench-bare-") as tmp:
        run = run_rlrun(Path(tmp) / "run", [*OVERRIDES, f"max_steps={steps}"])
        cpu = job_cpu(Path(tmp) / "run")
    s = summarize(run, skip)
    return {"step_s": s["step_s"], "samples_per_s": samples_per_step / s["step_s"],
            "reward_last20": statistics.fmean(r["metrics"]["reward"] for r in run["orchestrator"][-20:]),
            "orchestrator": s["orchestrator"], "trainer": s["trainer"], "job_cpu_percent": cpu,
            "machine_before": run["machine_before"], "loadavg_1m_after": run["loadavg_1m_after"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the bare loop (both cores)")
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cfg = run_config([*OVERRIDES, f"max_steps={args.steps}"])
    if args.bare_only:
        print(json.dumps(bare_loop(cfg, args.steps, args.threads)))
        return 0

    per_step = int(cfg.orchestrator.batch_size) * int(cfg.orchestrator.group_size)
    repeats = []
    for i in range(args.repeats):  # alternate which side goes first
        pair = {}
        for side in (("rlrun", "bare") if i % 2 == 0 else ("bare", "rlrun")):
            if side == "rlrun":
                pair["rlrun"] = rlrun_run(args.steps, args.skip, per_step)
            else:
                pair["bare"] = summarize_bare(bare_run(args.steps, args.threads), args.skip, per_step)
        pair["ratio"] = pair["rlrun"]["samples_per_s"] / pair["bare"]["samples_per_s"]
        repeats.append(pair)
        print(f"repeat {i + 1}: rlrun {pair['rlrun']['samples_per_s']:.0f} samples/s, "
              f"bare {pair['bare']['samples_per_s']:.0f}, ratio {pair['ratio']:.2f}", flush=True)  # fmt: skip

    med = lambda xs: statistics.median(xs)  # noqa: E731
    ratios = [r["ratio"] for r in repeats]
    mid = sorted(repeats, key=lambda r: r["ratio"])[len(repeats) // 2]  # its phases explain the median
    result = {
        "rlrun_samples_per_s": med([r["rlrun"]["samples_per_s"] for r in repeats]),
        "bare_samples_per_s": med([r["bare"]["samples_per_s"] for r in repeats]),
        "ratio": med(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target_ratio": TARGET_RATIO,
        "met": med(ratios) >= TARGET_RATIO,
        "rlrun_reward_last20": med([r["rlrun"]["reward_last20"] for r in repeats]),
        "bare_reward_last20": med([r["bare"]["reward_last20"] for r in repeats]),
        "median_repeat": mid,
        "repeats": repeats,
        "settings": {"overrides": [*OVERRIDES, f"max_steps={args.steps}"], "skip": args.skip,
                     "bare_threads": args.threads, "samples_per_step": per_step,
                     "rlrun_threads": {"inference": int(cfg.inference.num_threads), "trainer": int(cfg.trainer.num_threads)}},
        "machine": machine(),
    }  # fmt: skip
    path = write_json("bare_loop", result)
    b, r = mid["bare"], mid["rlrun"]
    print(table([["rlrun (async, 3 jobs)", result["rlrun_samples_per_s"], result["rlrun_reward_last20"]],
                 ["bare loop (1 process)", result["bare_samples_per_s"], result["bare_reward_last20"]]],
                ["side", "samples/s (median)", "reward, last 20 steps"]))  # fmt: skip
    print(f"ratio {result['ratio']:.2f} (min {result['ratio_min']:.2f}, max {result['ratio_max']:.2f}); "
          f"target >= {TARGET_RATIO}: {'met' if result['met'] else 'MISSED'}")
    print("\nwhere the time goes (median repeat, s per step):")
    print(table([["bare: generate", b["generate_s"]], ["bare: score + batch", b["score_batch_s"]], ["bare: train", b["train_s"]],
                 ["rlrun orchestrator: generate", r["orchestrator"]["generate_s"]],
                 ["rlrun orchestrator: score", r["orchestrator"]["score_s"]],
                 ["rlrun orchestrator: write batch", r["orchestrator"]["write_batch_s"]],
                 ["rlrun orchestrator: update weights", r["orchestrator"]["update_weights_s"]],
                 ["rlrun orchestrator: wait for weights", r["orchestrator"]["wait_for_weights_s"]],
                 ["rlrun trainer: forward/backward", r["trainer"]["forward_backward_s"]],
                 ["rlrun trainer: optimizer", r["trainer"]["optimizer_step_s"]],
                 ["rlrun trainer: save weights", r["trainer"]["save_weights_s"]],
                 ["rlrun trainer: wait for batch", r["trainer"]["wait_for_batch_s"]]], ["phase", "s"]))  # fmt: skip
    print("rlrun jobs' CPU (%, 100 = one core): " + ", ".join(f"{k} {v:.0f}" for k, v in r["job_cpu_percent"].items()))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
