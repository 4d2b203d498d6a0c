"""Shared helpers of the benchmark scripts: run rlrun end to end, read its metrics back.

Every benchmark runs the real thing: `python -m rlrun hydra.run.dir=<tmp> <overrides>` in a
subprocess, then reads `metrics/orchestrator.jsonl` and `metrics/trainer.jsonl` of that run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The timing benchmarks measure RL steps: the default run without its SFT stage before them.
RL_STAGE = ["sft.max_steps=0"]


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def read_metrics(path: Path) -> list[dict]:
    """The `metrics` records of one jsonl file, in step order (the last record of a step wins)."""
    from rlrun.tracking.record import read_metrics as read_records

    by_step = {rec["step"]: rec for rec in read_records(path)}
    return [by_step[s] for s in sorted(by_step)]


def wait_quiet(max_wait_s: float = 30.0, busy_pct: float = 25.0, quiet_s: int = 3) -> dict:
    """Wait (at most max_wait_s) until the machine's CPU use stays below busy_pct for quiet_s
    seconds: on a 2-core box anything else running (a test suite) distorts every timing.
    Returns what was found, to be stored with the figures."""
    import psutil

    start, calm = time.monotonic(), 0
    while time.monotonic() - start < max_wait_s:
        calm = calm + 1 if psutil.cpu_percent(interval=1.0) < busy_pct else 0
        if calm >= quiet_s:
            break
    return {"waited_s": round(time.monotonic() - start, 1), "quiet": calm >= quiet_s,
            "loadavg_1m": os.getloadavg()[0]}


def run_rlrun(run_dir: Path, overrides: list[str], timeout: float = 900.0, quiet: bool = True) -> dict:
    """Run `python -m rlrun` to completion; returns wall times and both jobs' metrics records."""
    cmd = [sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", *overrides]
    before = wait_quiet() if quiet else None
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {
        "cmd": cmd,
        "start": start,
        "end": end,
        "wall_s": end - start,
        "machine_before": before,
        "loadavg_1m_after": os.getloadavg()[0],
        "orchestrator": read_metrics(run_dir / "metrics" / "orchestrator.jsonl"),
        "trainer": read_metrics(run_dir / "metrics" / "trainer.jsonl"),
    }


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def steady(records: list[dict], skip: int) -> list[dict]:
    """Records after the first `skip` steps (start-up, first weight loads, allocator warm-up)."""
    return [r for r in records if r["step"] > skip]


def summarize(run: dict, skip: int = 5) -> dict:
    """Steady-state figures of one run (steps > skip).

    step_s is the wall time per step measured on the trainer's clock: the time between the
    records of the first and last steady steps divided by the number of steps in between, so
    it counts everything, whichever of the two jobs is the bottleneck.
    """
    orch, train = steady(run["orchestrator"], skip), steady(run["trainer"], skip)
    if len(train) < 2:
        raise RuntimeError("too few steady-state steps to summarize")
    step_s = (train[-1]["time"] - train[0]["time"]) / (train[-1]["step"] - train[0]["step"])
    # Orchestrator steps carrying an evaluation are slower; the eval time is still in step_s above.
    om = lambda key: mean([r["metrics"].get(key, 0.0) for r in orch])  # noqa: E731
    tm = lambda key: mean([r["metrics"].get(key, 0.0) for r in train])  # noqa: E731
    gen_tokens = mean([r["metrics"]["completions/mean_length"] for r in orch])
    return {
        "steps_measured": len(train) - 1,
        "step_s": step_s,
        "gen_tokens_per_sample": gen_tokens,
        "orchestrator": {
            "step_s": om("time/step"),
            "wait_for_weights_s": om("time/wait_for_weights"),
            "update_weights_s": om("time/update_weights"),
            "generate_s": om("time/generate"),
            "score_s": om("time/score"),
            "write_batch_s": om("time/write_batch"),
            "eval_s_per_step": om("time/eval"),
            "generate_tokens_per_s": om("tokens/s"),
        },
        "trainer": {
            "step_s": tm("time/step"),
            "wait_for_batch_s": tm("time/wait_for_batch"),
            "forward_backward_s": tm("time/forward_backward"),
            "optimizer_step_s": tm("time/optimizer_step"),
            "save_weights_s": tm("time/save_weights"),
            "train_tokens_per_s": tm("tokens/s"),
        },
        "reward_last10": mean([r["metrics"]["reward"] for r in run["orchestrator"][-10:]]),
    }


def first_step_s(run: dict) -> float:
    """Process start to the trainer's step-1 record (its wall-clock `time`)."""
    return run["trainer"][0]["time"] - run["start"]


def wandb_records(run_file: str | Path) -> list[dict]:
    """The records of an offline W&B run's `run-<id>.wandb`, read with `wandb leet inspect --json`
    (wandb-core's reader), as the tests read them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def unseen_prompts(cfg, task, num_prompts: int, seed: int = 12345) -> tuple[list, int]:
    """`num_prompts` task examples the run never trained on or evaluated (its held-out set,
    SFT batches and RL steps replayed from their seeds and left out), and how many it saw."""
    import random

    from rlrun.orchestrator.loop import step_rng
    from rlrun.sft.data import batches

    seen = {ex.prompt for ex in task.sample(random.Random(0), task.num_eval_prompts, split="eval")}
    sft_batches = batches(task, None, cfg.sft.batch_size, cfg.seed)
    for _ in range(cfg.sft.max_steps if cfg.sft.data is None else 0):
        seen |= {ex.prompt for ex, _ in next(sft_batches)}
    for step in range(1, cfg.max_steps + 1):
        seen |= {ex.prompt for ex in task.sample(step_rng(cfg.seed, step), cfg.orchestrator.batch_size)}
    fresh, rng = {}, random.Random(seed)
    while len(fresh) < num_prompts:
        ex = task.sample(rng, 1)[0]
        if ex.prompt not in seen:
            fresh[ex.prompt] = ex
    return list(fresh.values()), len(seen)


def run_fields(run: dict) -> dict:
    """What every quality benchmark keeps of a run: its wall time, the machine's load before and
    after, and the training reward's first and last 10% of steps."""
    rewards = [r["metrics"]["reward"] for r in run["orchestrator"]]
    k = max(1, len(rewards) // 10)
    return {"wall_s": run["wall_s"], "machine_before": run["machine_before"],
            "loadavg_1m_after": run["loadavg_1m_after"], "reward_first10pct": mean(rewards[:k]),
            "reward_last10pct": mean(rewards[-k:])}  # fmt: skip


def load_policy(run_dir: Path, cfg) -> tuple:
    """(model, tokenizer): the run's starting policy (its SFT stage's output when it had one) in
    plain transformers, eval mode; `load_final_weights` then puts the run's last weights in."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from rlrun.model import load_tokenizer, policy_path

    hf_logging.disable_progress_bar()
    policy = policy_path(cfg, run_dir)
    return AutoModelForCausalLM.from_pretrained(policy).eval(), load_tokenizer(policy)


def load_final_weights(model, run_dir: Path) -> None:
    from rlrun.model import load_weights
    from rlrun.rundir import latest_step

    load_weights(model, run_dir / "weights" / f"step_{latest_step(run_dir / 'weights')}")


def greedy_ids(model, tokenizer, example, max_tokens: int) -> list[int]:
    """The completion's token ids, greedy, with no logit bias: what the weights themselves emit."""
    import torch

    from rlrun.model import encode_example

    ids = torch.tensor([encode_example(tokenizer, example)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()
