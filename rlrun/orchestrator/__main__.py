"""`python -m rlrun.orchestrator --config <run>/config.yaml [key=value ...]`

Per step: wait until the trainer is at most `orchestrator.max_async_steps` behind, have
inference load the newest weights, sample prompts, ask for `group_size` completions each,
score them in the env workers, compute GRPO advantages and write `rollouts/step_<n>/`;
every `orchestrator.eval_interval` steps (and at the last) evaluate the policy on held-out
prompts (`eval.py`); every `orchestrator.log_extras.interval` steps log sample rows and
distributions (`extras.py`). One `log_metrics` call per step carries the step's metrics,
`eval/*` included.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from rlrun.job import StopFlag, StopRequested, load_job_config, parse_job_args
from rlrun.rundir import job_log, latest_step, prune, resume_step, step_dir, wait_for

PROG = "python -m rlrun.orchestrator"


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag().install()
    args = parse_job_args(PROG, __doc__.splitlines()[0], argv)
    cfg = load_job_config(args, PROG)

    from rlrun.log import setup_logger

    run_dir = Path(cfg.output_dir)
    log = setup_logger(cfg.log_level, job_log(run_dir, "orchestrator"), job="orchestrator")
    try:
        run(cfg, run_dir, stop)
    except StopRequested:
        log.info("stop requested; orchestrator exiting cleanly")
    except Exception:
        log.exception("orchestrator failed")
        return 1
    return 0


def run(cfg, run_dir: Path, stop: StopFlag) -> None:
    from rlrun.batch import write_batch
    from rlrun.envs import load_environment
    from rlrun.envs.workers import EnvWorkerPool
    from rlrun.inference.client import InferenceClient
    from rlrun.log import get_logger
    from rlrun.model import encode_prompt, load_tokenizer, resolve_model_path
    from rlrun.orchestrator.eval import Evaluator, is_eval_step
    from rlrun.orchestrator.extras import is_logging_step, log_rollout_extras
    from rlrun.orchestrator.rollout import build_batch, completion_metrics, group_advantages, reward_metrics
    from rlrun.tracking import Tracker
    from rlrun.tracking.record import read_metrics

    log = get_logger()
    ocfg = cfg.orchestrator
    xcfg = ocfg.log_extras  # this job's log_extras (the top-level group unless overridden)
    weights_root = run_dir / "weights"
    tokenizer = load_tokenizer(resolve_model_path(cfg.model, run_dir, cfg.seed), cfg.model.trust_remote_code)
    pad_id = int(tokenizer.pad_token_id)
    env = load_environment(cfg.task)
    evaluator = None  # the held-out prompts, tokenized once
    if ocfg.eval_interval > 0:
        evaluator = Evaluator(env, tokenizer, cfg.task.num_eval_prompts, ocfg.max_tokens, ocfg.num_val_samples_to_print)
    client = InferenceClient(f"http://{cfg.inference.host}:{cfg.inference.port}", timeout=ocfg.request_timeout_s)
    client.wait_healthy(cfg.inference.startup_timeout_s, check=stop.check)  # inference may still be loading

    start = resume_step(run_dir) + 1
    tracker = Tracker(
        cfg.logger, job="orchestrator", output_dir=run_dir, run_name=cfg.name, max_table_rows=xcfg.max_rows
    )
    pool = EnvWorkerPool(cfg.task, cfg.env_workers, run_dir / "logs")
    previous = [r for r in read_metrics(tracker.jsonl_file) if r["step"] < start]
    num_tokens = previous[-1]["metrics"].get("num_tokens", 0.0) if previous else 0.0  # TRL's is cumulative
    loaded_version = 0  # inference starts from the initial model
    try:
        if start == 1:
            tracker.log_hyperparams(cfg)
        log.info(f"orchestrator: steps {start}..{cfg.max_steps}, {ocfg.batch_size} prompts x {ocfg.group_size} completions")
        for step in range(start, cfg.max_steps + 1):
            step_start = time.perf_counter()
            # Off-policy bound: generating step s needs the policy after s-1-max_async_steps
            # updates; after a resume, never anything older than the checkpoint.
            needed = max(step - 1 - ocfg.max_async_steps, start - 1)
            with tracker.timer("wait_for_weights"):
                version = wait_for(
                    lambda: _newest_at_least(weights_root, needed, stop), f"weights/step_{needed} from the trainer"
                )
            stop.check()
            if version > loaded_version:
                with tracker.timer("update_weights"):
                    client.update_weights(step_dir(weights_root, version))
                loaded_version = version

            rng = random.Random(cfg.seed * 1_000_003 + step)  # a resumed step samples the same prompts
            examples = env.sample(rng, ocfg.batch_size)
            prompt_ids = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
            with tracker.timer("generate") as generate:
                groups = client.complete(
                    prompt_ids, n=ocfg.group_size, max_tokens=ocfg.max_tokens,
                    temperature=ocfg.temperature, seed=rng.randrange(2**31),
                )  # fmt: skip
            completions = [c for group in groups for c in group]
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
            row_examples = [ex for ex in examples for _ in range(ocfg.group_size)]
            row_prompts = [ids for ids in prompt_ids for _ in range(ocfg.group_size)]
            with tracker.timer("score"):
                scores = pool.score(texts, row_examples)
            advantages = group_advantages([s["reward"] for s in scores], ocfg.group_size)
            with tracker.timer("write_batch"):
                tensors = build_batch(row_prompts, completions, advantages, pad_id)
                write_batch(run_dir, step, tensors, {"policy_version": loaded_version, "temperature": ocfg.temperature})
                # The trainer may still read steps down to step - max_async_steps.
                prune(run_dir / "rollouts", max(ocfg.keep_last, ocfg.max_async_steps + 2))
            stop.check()

            # The trainer already has this step's batch; evaluate the policy that generated it.
            eval_metrics: dict[str, float] = {}
            if evaluator is not None and is_eval_step(step, ocfg.eval_interval, cfg.max_steps):
                with tracker.timer("eval"):
                    eval_metrics = evaluator.evaluate(step, client, pool, log)
            if (xcfg.samples or xcfg.distributions) and is_logging_step(step, xcfg.interval):
                log_rollout_extras(
                    tracker, xcfg, step, random.Random(f"{cfg.seed}/samples/{step}"),  # apart from the prompts' rng
                    [ex.prompt for ex in row_examples], texts, scores, advantages,
                    [len(p) for p in row_prompts], [len(c.token_ids) for c in completions],
                )  # fmt: skip

            generated = sum(len(c.token_ids) for c in completions)
            num_tokens += generated + sum(len(p) for p in row_prompts)
            metrics = {
                **reward_metrics(scores, ocfg.group_size),
                **completion_metrics(completions),
                "num_tokens": num_tokens,
                "tokens/s": generated / max(generate.seconds, 1e-9),
                "off_policy_steps": float(step - 1 - loaded_version),
                "time/step": time.perf_counter() - step_start,
                **eval_metrics,
            }
            tracker.log_metrics(metrics, step)
            log.info(
                f"step {step}/{cfg.max_steps} | reward {metrics['reward']:.3f} | "
                f"len {metrics['completions/mean_length']:.1f} | policy v{loaded_version} | "
                f"generate {generate.seconds:.2f}s | e.g. {examples[0].prompt!r} -> {texts[0]!r}"
            )
    finally:
        pool.close()
        tracker.finish()
        client.close()


def _newest_at_least(weights_root: Path, needed: int, stop: StopFlag) -> int | None:
    """The newest weights version if it is >= `needed` (0 = the initial model), else None."""
    stop.check()
    newest = latest_step(weights_root) or 0
    return newest if newest >= needed else None


if __name__ == "__main__":
    sys.exit(main())
