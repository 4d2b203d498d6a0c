"""rlrun against TRL's GRPOTrainer on the same tiny model, task, reward and batch, on CPU.

Both sides: the tiny Llama rlrun builds (rlrun.model.build_tiny_model, seed 0, the same
initial weights), reverse_text prompts (the exact prompts rlrun samples at each step, in
order), the `lcs` reward of rlrun.envs.reverse_text alone, 16 prompts x 8 completions per
optimizer step, at most 12 completion tokens, temperature 1.0 (no top-k/top-p), no special
token sampled but EOS (rlrun's logit_bias; TRL's generation `suppress_tokens`), AdamW at a
constant lr 3e-3, grad-norm clip 1.0, clip eps 0.2/0.28, no KL, token-level loss mean
(`loss_type="dapo"` on both sides), advantages (r - group mean) / group std with Bessel's
correction (`scale_rewards="group"` on both sides), float32, no evaluation, no checkpoints,
no activation checkpointing (TRL's default is on), RL from the untrained model (no SFT
stage), --steps optimizer steps each. One difference is left: TRL scores its logprobs
without the suppression, rlrun under the same bias as its sampler.

rlrun: `python -m rlrun` (its default split into inference + orchestrator + trainer
processes, one torch thread each, max_async_steps=1). TRL: one process, GRPOTrainer with
transformers' generate, torch threads = all cores. Samples/s = 128 / steady-state step time
(steps after --skip); reward = mean training reward of the last 10 steps. Where the time
goes, per step: TRL's own phases (`_generate`, `_generate_and_score_completions`, the whole
training step), timed in a GRPOTrainer subclass, next to rlrun's per-job phase times (its
generation and training overlap: each job has one core). --repeats pairs
(rlrun then TRL, alternating, each after an idle CPU, the load recorded); the figures are
medians, the ratio's spread over the pairs is kept.
Results: benchmarks/results/trl.json. Needs the bench extra: pip install -e '.[bench]'.

    python benchmarks/trl_compare.py [--steps 60] [--skip 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RL_STAGE, ROOT, machine, mean, run_rlrun, summarize, table, wait_quiet, write_json  # noqa: E402

BATCH, GROUP, MAX_TOKENS, LR, SEED = 16, 8, 12, 3e-3, 0
TARGET_RATIO = 1.5


# ---------------------------------------------------------------- the TRL side (a subprocess)


def trl_child(out: Path, steps: int, skip: int) -> None:
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlrun.config import ModelConfig, TaskConfig
    from rlrun.envs import load_environment
    from rlrun.model import build_tiny_model, encode_prompt, special_token_bias
    from rlrun.orchestrator.loop import step_rng

    torch.manual_seed(SEED)
    model_dir = build_tiny_model(out / "model", OmegaConf.structured(ModelConfig()), SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    env = load_environment(OmegaConf.structured(TaskConfig()))

    rows = []  # rlrun's prompts, step by step
    for step in range(1, steps + 1):
        for ex in env.sample(step_rng(SEED, step), BATCH):
            rows.append({"prompt": ex.prompt, "answer": ex.answer, "text": ex.info["text"]})
    # TRL tokenizes prompts with the tokenizer's special tokens; give it rlrun's [bos] + ids.
    probe = rows[0]["prompt"]
    if tokenizer(probe)["input_ids"] != encode_prompt(tokenizer, probe):
        bos = tokenizer.bos_token or ""
        if tokenizer(bos + probe, add_special_tokens=True)["input_ids"] == encode_prompt(tokenizer, probe):
            rows = [{**r, "prompt": bos + r["prompt"]} for r in rows]
    prompts_match = tokenizer(rows[0]["prompt"])["input_ids"] == encode_prompt(tokenizer, probe)

    def lcs(prompts, completions, **kwargs):
        from rlrun.envs.base import Example

        return [env.lcs(c, Example(prompt=p, answer=a, info={})) for p, c, a in zip(prompts, completions, kwargs["answer"])]

    times: list[float] = []

    config = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=BATCH * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=MAX_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"suppress_tokens": sorted(special_token_bias(tokenizer))},
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, shuffle_dataset=False, seed=SEED, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    phases: dict[str, list[float]] = {"generate": [], "generate_and_score": [], "step": []}

    class TimedGRPOTrainer(GRPOTrainer):
        """Times TRL's own phases: sampling (`_generate`), sampling + rewards + advantages, and
        the whole training step (the rest of it is the forward/backward and optimizer)."""

        def _generate(self, *a, **k):
            t = time.perf_counter()
            out = super()._generate(*a, **k)
            phases["generate"].append(time.perf_counter() - t)
            return out

        def _generate_and_score_completions(self, *a, **k):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **k)
            phases["generate_and_score"].append(time.perf_counter() - t)
            return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phases.setdefault("_begin", []).append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())
            phases["step"].append(times[-1] - phases["_begin"][-1])

    trainer = TimedGRPOTrainer(model=model, reward_funcs=[lcs], args=config, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer, callbacks=[StepTimes()])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    steady = (times[-1] - times[skip - 1]) / (len(times) - skip) if len(times) > skip else float("nan")
    (out / "trl_result.json").write_text(json.dumps({
        "step_s": steady, "train_wall_s": total, "steps": len(times), "rewards": rewards,
        "mean_lengths": lengths, "torch_threads": torch.get_num_threads(), "prompts_match_rlrun": prompts_match,
        "example_prompt_ids": tokenizer(rows[0]["prompt"])["input_ids"],
        "phases_s": {k: statistics.fmean(v[skip:]) for k, v in phases.items() if not k.startswith("_") and v[skip:]},
        "settings": {"torch_threads": torch.get_num_threads(), "generation": "transformers generate, the whole "
                     f"batch of {BATCH * GROUP} at once", "gradient_checkpointing": False, "dtype": "float32",
                     "dataloader_num_workers": 0},
    }))


# ---------------------------------------------------------------- the comparison


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rlrun/TRL pairs, alternating; figures are medians")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trl_child(Path(args.child), args.steps, args.skip)
        return 0

    samples = BATCH * GROUP
    rl_overrides = [*RL_STAGE, "+task.reward_weights.exact=0.0", f"max_steps={args.steps}", f"seed={SEED}",
                    f"orchestrator.batch_size={BATCH}", f"orchestrator.group_size={GROUP}",
                    f"orchestrator.max_tokens={MAX_TOKENS}", "orchestrator.temperature=1.0",
                    "orchestrator.scale_rewards=group", "trainer.loss_type=dapo", f"trainer.lr={LR}",
                    "orchestrator.eval_interval=0", "trainer.checkpoint_interval=0"]
    settings = {"steps": args.steps, "skip": args.skip, "batch_size": BATCH, "group_size": GROUP,
                "max_tokens": MAX_TOKENS, "lr": LR, "seed": SEED, "rlrun_overrides": rl_overrides,
                "samples_per_step": samples}
    print(f"settings: {settings}")
    result: dict = {"rlrun_samples_per_s": None, "trl_samples_per_s": None, "ratio": None, "rlrun_reward": None,
                    "trl_reward": None, "target_ratio": TARGET_RATIO, "settings": settings, "pairs": []}
    try:
        import trl

        result["trl_version"] = trl.__version__
    except ImportError as exc:  # no TRL (pip install -e '.[bench]'): say so, keep rlrun's figures
        result["trl_error"] = f"{type(exc).__name__}: {exc}"
    for _ in range(args.repeats):  # rlrun then TRL, alternating, each after an idle CPU
        pair = {"rlrun": rlrun_side(rl_overrides, samples, args.skip)}
        if "trl_error" not in result:
            pair["trl"] = trl_side(args.steps, args.skip, samples)
            pair["ratio"] = pair["rlrun"]["samples_per_s"] / pair["trl"]["samples_per_s"]
        result["pairs"].append(pair)

    def median(side: str, key: str) -> float:
        return statistics.median(p[side][key] for p in result["pairs"])

    result["rlrun_samples_per_s"] = median("rlrun", "samples_per_s")
    result["rlrun_reward"] = median("rlrun", "reward_last10")
    rows = [["rlrun", result["rlrun_samples_per_s"], [round(p["rlrun"]["samples_per_s"]) for p in result["pairs"]],
             result["rlrun_reward"]]]  # fmt: skip
    if "trl_error" not in result:
        result["trl_samples_per_s"] = median("trl", "samples_per_s")
        result["trl_reward"] = median("trl", "reward_last10")
        ratios = [p["ratio"] for p in result["pairs"]]
        result.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        result["met"] = result["ratio"] >= TARGET_RATIO and result["rlrun_reward"] >= result["trl_reward"]
        rows.append([f"TRL {result['trl_version']} GRPOTrainer", result["trl_samples_per_s"],
                     [round(p["trl"]["samples_per_s"]) for p in result["pairs"]], result["trl_reward"]])  # fmt: skip
    result["machine"] = machine()
    print(table(rows, ["system", "samples/s (median)", "each run", "reward, last 10 steps (median)"]))
    if result["ratio"] is not None:
        print(f"rlrun / TRL samples/s: median {result['ratio']:.2f} over {args.repeats} pairs "
              f"({result['ratio_min']:.2f}-{result['ratio_max']:.2f}); target >= {TARGET_RATIO} with at least equal "
              f"reward: {'met' if result['met'] else 'missed'}")
    if result["pairs"] and "trl" in result["pairs"][0]:  # the median pair's phases explain the ratio
        mid = sorted(result["pairs"], key=lambda p: p["ratio"])[len(result["pairs"]) // 2]
        result["median_pair_phases_s"] = {"rlrun": mid["rlrun"]["phases_s"], "trl": mid["trl"].get("phases_s", {})}
        print("\nwhere a step's time goes, median pair (s per step; rlrun's two jobs run at once, each on one core):")
        print(table([[f"rlrun {k}", v] for k, v in mid["rlrun"]["phases_s"].items()]
                    + [[f"TRL {k}", v] for k, v in mid["trl"].get("phases_s", {}).items()]
                    + [["rlrun step", mid["rlrun"]["step_s"]], ["TRL step", mid["trl"]["step_s"]]], ["phase", "s"]))
    print(f"wrote {write_json('trl', result)}")
    return 0


def rlrun_side(overrides: list[str], samples: int, skip: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlrun-bench-trl-") as tmp:
        run = run_rlrun(Path(tmp) / "run", overrides)  # waits for an idle CPU, records the load
    s = summarize(run, skip)
    rewards = [r["metrics"]["reward"] for r in run["orchestrator"]]
    o, t = s["orchestrator"], s["trainer"]
    phases = {"generate": o["generate_s"], "score": o["score_s"], "write_batch": o["write_batch_s"],
              "update_weights": o["update_weights_s"], "wait_for_weights": o["wait_for_weights_s"],
              "forward_backward": t["forward_backward_s"], "optimizer_step": t["optimizer_step_s"],
              "save_weights": t["save_weights_s"], "wait_for_batch": t["wait_for_batch_s"]}  # fmt: skip
    return {"samples_per_s": samples / s["step_s"], "step_s": s["step_s"], "phases_s": phases,
            "reward_last10": mean(rewards[-10:]),
            "rewards": rewards, "wall_s": run["wall_s"], "machine_before": run["machine_before"],
            "loadavg_1m_after": run["loadavg_1m_after"]}  # fmt: skip


def trl_side(steps: int, skip: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlrun-bench-trl-") as tmp:
        before = wait_quiet()
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", tmp, "--steps", str(steps), "--skip", str(skip)],
                              cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        wall = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        res = json.loads((Path(tmp) / "trl_result.json").read_text())
    return {**res, "samples_per_s": samples / res["step_s"], "reward_last10": mean(res["rewards"][-10:]),
            "wall_s": wall, "machine_before": before, "loadavg_1m_after": os.getloadavg()[0]}


if __name__ == "__main__":
    sys.exit(main())
