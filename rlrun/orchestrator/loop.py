"""The orchestrator loop: prompts -> completions -> rewards -> advantages -> a batch per step.

Per step, in `Orchestrator.step`: wait until the trainer is at most
`orchestrator.max_async_steps` behind and have every inference server load the newest
weights; sample prompts and ask for `group_size` completions each, spread over the servers
(`Rollout`s); score them in the env
workers; compute GRPO advantages and write `rollouts/step_<n>/`; every
`orchestrator.eval_interval` steps (and at the last) evaluate the policy on held-out prompts
(`eval.py`); every `orchestrator.log_extras.interval` steps log sample rows and
distributions (`extras.py`). One `log_metrics` call per step carries the step's metrics,
`eval/*` included.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlrun.job import StopFlag
from rlrun.rundir import latest_step, prune, resume_step, step_dir, wait_for

if TYPE_CHECKING:
    from rlrun.orchestrator.rollout import Rollout


def step_rng(seed: int, step: int) -> random.Random:
    """The random source of one step's prompts and sampling seed: a resumed step (or anyone
    replaying the run, e.g. to find strings it never trained on) gets the same prompts."""
    return random.Random(seed * 1_000_003 + step)


class Orchestrator:
    """The task, the inference client, the env workers and the tracker; `run()` to `max_steps`."""

    def __init__(self, cfg: Any, run_dir: Path, stop: StopFlag) -> None:
        from rlrun.envs import env_configs, load_task
        from rlrun.envs.workers import EnvWorkerPool
        from rlrun.inference.auth import read_token
        from rlrun.inference.client import InferenceServers
        from rlrun.inference.launch import server_jobs, server_url
        from rlrun.log import get_logger
        from rlrun.model import load_tokenizer, special_token_bias, wait_for_policy
        from rlrun.orchestrator.eval import Evaluator
        from rlrun.tracking import Tracker
        from rlrun.tracking.record import read_metrics

        self.cfg, self.ocfg, self.run_dir, self.stop = cfg, cfg.orchestrator, run_dir, stop
        self.xcfg = self.ocfg.log_extras  # this job's log_extras (the top-level group unless overridden)
        self.log = get_logger()
        policy = wait_for_policy(cfg, run_dir, cfg.inference.startup_timeout_s, check=stop.check)  # built by inference or trainer
        self.tokenizer = load_tokenizer(policy, cfg.model.trust_remote_code)
        self.env = load_task(cfg.task)  # a Mixture of the task's environments (often one)
        # What is emitted is what is scored: no special token but EOS unless asked for.
        self.logit_bias = {} if self.ocfg.allow_special_tokens else special_token_bias(self.tokenizer)
        self.evaluator = None  # the held-out prompts, tokenized once
        if self.ocfg.eval_interval > 0:
            self.evaluator = Evaluator(self.env, self.tokenizer, self.env.num_eval_prompts, self.ocfg.max_tokens,
                                       self.ocfg.num_val_samples_to_print, self.logit_bias,
                                       self.ocfg.eval_samples_per_prompt, list(self.ocfg.eval_pass_k),
                                       self.ocfg.temperature)  # fmt: skip
        # Every server: each step's prompts spread over them, new weights loaded into all of them.
        urls = list(cfg.inference.urls) or [server_url(cfg.inference.host, cfg.inference.port)]  # a config of old
        self.client = InferenceServers(urls, server_jobs(len(urls)), timeout=self.ocfg.request_timeout_s,
                                       token=read_token(run_dir))  # fmt: skip
        self.client.wait_healthy(cfg.inference.startup_timeout_s, check=stop.check)  # inference may still be loading
        self.start = resume_step(run_dir) + 1
        self.tracker = Tracker(cfg.logger, job="orchestrator", output_dir=run_dir, run_name=cfg.name,
                               max_table_rows=self.xcfg.max_rows, doctor=cfg.doctor, on_stop=stop.request)  # fmt: skip
        # One pool of workers per environment, each with its own log file.
        self.pools = {key: EnvWorkerPool(env_cfg, cfg.env_workers, run_dir / "logs", name=key)
                      for key, env_cfg in env_configs(cfg.task).items()}  # fmt: skip
        previous = [r for r in read_metrics(self.tracker.jsonl_file) if r["step"] < self.start]
        self.num_tokens = previous[-1]["metrics"].get("num_tokens", 0.0) if previous else 0.0  # TRL's is cumulative
        self.loaded_version = 0  # inference starts from the initial model

    def run(self) -> None:
        """Generate steps `start..max_steps`; raises StopRequested on a stop signal."""
        ocfg = self.ocfg
        try:
            if self.start == 1:
                self.tracker.log_hyperparams(self.cfg)
            self.log.info(f"orchestrator: steps {self.start}..{self.cfg.max_steps}, "
                          f"{ocfg.batch_size} prompts x {ocfg.group_size} completions")  # fmt: skip
            for step in range(self.start, self.cfg.max_steps + 1):
                self.step(step)
        finally:
            for pool in self.pools.values():
                pool.close()
            self.tracker.finish()
            self.client.close()

    def step(self, step: int) -> None:
        """One step: fresh weights, rollouts, rewards, advantages, the batch, then eval and metrics."""
        from rlrun.batch import write_batch
        from rlrun.model import encode_example
        from rlrun.orchestrator.eval import is_eval_step
        from rlrun.orchestrator.extras import is_logging_step, log_rollout_extras
        from rlrun.orchestrator.rollout import (
            Rollout, build_batch, completion_metrics, group_advantages, per_env, reward_metrics,
        )  # fmt: skip

        cfg, ocfg, tracker = self.cfg, self.ocfg, self.tracker
        step_start = time.perf_counter()
        # Off-policy bound: generating step s needs the policy after s-1-max_async_steps updates.
        self._sync_weights(step - 1 - ocfg.max_async_steps)

        rng = step_rng(cfg.seed, step)
        examples = self.env.sample(rng, ocfg.batch_size)
        prompt_ids = [encode_example(self.tokenizer, ex) for ex in examples]
        with tracker.timer("generate") as generate:
            groups = self.client.complete(prompt_ids, n=ocfg.group_size, max_tokens=ocfg.max_tokens,
                                          temperature=ocfg.temperature, seed=rng.randrange(2**31),
                                          logit_bias=self.logit_bias)  # fmt: skip
        rollouts = [Rollout(ex, ids, c) for ex, ids, group in zip(examples, prompt_ids, groups) for c in group]
        with tracker.timer("score"):
            self._score(rollouts)
        advantages = group_advantages([r.reward for r in rollouts], ocfg.group_size, ocfg.scale_rewards)
        for rollout, advantage in zip(rollouts, advantages):
            rollout.advantage = advantage
        with tracker.timer("write_batch"):
            meta = {"policy_version": self.loaded_version, "temperature": ocfg.temperature,
                    "logit_bias": {str(t): b for t, b in self.logit_bias.items()}}  # the trainer's logprobs use it too
            write_batch(self.run_dir, step, build_batch(rollouts, int(self.tokenizer.pad_token_id)), meta)
            # The trainer may still read steps down to step - max_async_steps.
            prune(self.run_dir / "rollouts", max(ocfg.keep_last, ocfg.max_async_steps + 2))
        # Once its batch is written the step is logged, also when a stop came meanwhile: the
        # trainer may train (and checkpoint) it, and a resume starts after that checkpoint.
        # A stop skips only the evaluation and the extras.
        stopping = bool(self.stop)

        # The trainer already has this step's batch; evaluate the policy that generated it
        # (at the last step, the final weights: what the run leaves behind).
        eval_metrics: dict[str, float] = {}
        if not stopping and self.evaluator is not None and is_eval_step(step, ocfg.eval_interval, cfg.max_steps):
            if step == cfg.max_steps:  # the final evaluation scores the final weights
                self._sync_weights(step)
            with tracker.timer("eval"):
                eval_metrics = self.evaluator.evaluate(step, self.client, self, self.log, self.loaded_version)
        if not stopping and (self.xcfg.samples or self.xcfg.distributions) and is_logging_step(step, self.xcfg.interval):
            log_rollout_extras(tracker, self.xcfg, step, random.Random(f"{cfg.seed}/samples/{step}"), rollouts)

        generated = sum(len(r.completion_ids) for r in rollouts)
        sampled_by = meta["policy_version"]
        self.num_tokens += generated + sum(len(r.prompt_ids) for r in rollouts)
        def step_metrics(rs: list[Rollout]) -> dict[str, float]:  # the batch's, and each env's
            return {**reward_metrics([r.scores for r in rs], ocfg.group_size),
                    **completion_metrics([r.completion for r in rs])}  # fmt: skip

        metrics = {
            **step_metrics(rollouts),
            **per_env(step_metrics, rollouts),
            **self._error_counts(),
            "num_tokens": self.num_tokens,
            "tokens/s": generated / max(generate.seconds, 1e-9),
            "off_policy_steps": float(step - 1 - sampled_by),
            # The share of the step inference and the orchestrator waited for the trainer's weights.
            "idle/inference_wait_frac": tracker.timer.seconds("wait_for_weights")
            / max(time.perf_counter() - step_start, 1e-9),
            "time/step": time.perf_counter() - step_start,
            **eval_metrics,
        }
        tracker.log_metrics(metrics, step)
        self.log.info(
            f"step {step}/{cfg.max_steps} | reward {metrics['reward']:.3f} | "
            f"len {metrics['completions/mean_length']:.1f} | policy v{sampled_by} | "
            f"generate {generate.seconds:.2f}s | e.g. {rollouts[0].example.prompt!r} -> {rollouts[0].text!r}"
        )
        self.stop.check()

    # ------------------------------------------------------------ the step's parts

    def _sync_weights(self, needed: int) -> None:
        """Have inference serve the newest weights, waiting for `weights/step_<needed>` at least.

        After a resume, never anything older than the checkpoint; 0 is the initial model.
        """
        needed = max(needed, self.start - 1)
        weights = self.run_dir / "weights"

        def newest() -> int | None:
            self.stop.check()
            version = latest_step(weights) or 0
            return version if version >= needed else None

        with self.tracker.timer("wait_for_weights"):
            version = wait_for(newest, f"weights/step_{needed} from the trainer")
        if version > self.loaded_version:
            with self.tracker.timer("update_weights"):
                self.client.update_weights(step_dir(weights, version))
            self.loaded_version = version

    def _score(self, rollouts: list[Rollout]) -> None:
        """Each rollout's text and rewards, scored in its environment's workers."""
        from rlrun.model import decode_completion

        for r in rollouts:
            r.text = decode_completion(self.tokenizer, r.completion_ids)
        for r, s in zip(rollouts, self.score([r.text for r in rollouts], [r.example for r in rollouts]), strict=True):
            r.scores = s

    def _error_counts(self) -> dict[str, float]:
        """Per env, scoring errors since the last step: `<env>/errors/{score,timeout,worker_restarts}`."""
        return {f"{key}/errors/{kind}": float(n) for key, pool in self.pools.items()
                for kind, n in pool.take_error_counts().items()}  # fmt: skip

    def score(self, texts: list[str], examples: list[Any]) -> list[dict[str, float]]:
        """Scores in input order, each completion scored by the pool of its example's env."""
        scores: list[dict[str, float] | None] = [None] * len(texts)
        for key, pool in self.pools.items():
            mine = [i for i, ex in enumerate(examples) if ex.env == key]
            for i, s in zip(mine, pool.score([texts[i] for i in mine], [examples[i] for i in mine]), strict=True):
                scores[i] = s
        return scores  # type: ignore[return-value]
