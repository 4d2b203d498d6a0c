"""Evaluation on held-out prompts, every `orchestrator.eval_interval` steps and at the last.

The held-out set is the environment's fixed `split="eval"` set (`task.num_eval_prompts`
prompts, the same for every run and seed). Each prompt gets one **greedy** completion
(temperature 0) from the policy inference currently serves: the one that generated the
step, and at the last step the final weights (the orchestrator waits for them), so the
run's last `eval/*` figures describe the model it leaves behind. Greedy decoding is
deterministic, so `eval/reward` moves only when the policy does, with none of the sampling
noise that one T=1 sample per prompt would add, and it is comparable across runs and seeds. Training's sampling is untouched: eval draws from no
training random state (the engine seeds each row on its own).

Metrics are the training names under `eval/` (`eval/reward`, `eval/reward_std` across
prompts, `eval/rewards/<fn>/mean`, `eval/completions/mean_length`, ...), returned to be
merged into the step's one `log_metrics` call; the tracker times the pass as `time/eval`. A
task of several environments evaluates each env's own held-out set and reports it under
`<env>/eval/*` too.
`orchestrator.num_val_samples_to_print` (NeMo-RL's name) samples, the best and the worst,
go to the orchestrator's log as a table.

With `orchestrator.eval_samples_per_prompt` = n > 1, each held-out prompt also gets n sampled
completions (at `orchestrator.temperature`, seeded): `eval/avg@n` is their mean reward and
`eval/pass@k`, for each k <= n in `orchestrator.eval_pass_k`, the unbiased estimator of the
chance that at least one of k samples solves the prompt (`Environment.solved`), averaged over
prompts (`<env>/eval/...` too for a task of several envs).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rlrun.inference import Completion
from rlrun.log import render_table
from rlrun.model import decode_completion
from rlrun.orchestrator.extras import best_and_worst
from rlrun.orchestrator.rollout import completion_metrics, reward_metrics

EVAL_TEMPERATURE = 0.0  # greedy (the local engine and vLLM both read T=0 as argmax)
EVAL_SEED = 0


def is_eval_step(step: int, eval_interval: int, max_steps: int) -> bool:
    """Every `eval_interval` steps and at the last step; never with eval_interval=0."""
    return eval_interval > 0 and (step % eval_interval == 0 or step == max_steps)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 0 < k <= n = {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_metrics(rewards: Sequence[Sequence[float]], solved: Sequence[Sequence[bool]], ks: Sequence[int]
                    ) -> dict[str, float]:  # fmt: skip
    """`avg@n` and `pass@k` (each k <= n) over prompts, from each prompt's n samples."""
    n = len(rewards[0])
    metrics = {f"avg@{n}": statistics.fmean(r for row in rewards for r in row)}
    for k in sorted({k for k in ks if 0 < k <= n}):
        metrics[f"pass@{k}"] = statistics.fmean(pass_at_k(n, sum(row), k) for row in solved)
    return metrics


def eval_metrics(scores: Sequence[Mapping[str, float]], completions: Sequence[Completion]) -> dict[str, float]:
    """Training's reward and completion metrics over the held-out set, under `eval/`.

    The set is one group (one completion per prompt), so `eval/reward_std` is the std
    across prompts; the zero-std-group fraction means nothing here and is left out.
    """
    metrics = {**reward_metrics(scores, group_size=len(scores)), **completion_metrics(completions)}
    metrics.pop("frac_reward_zero_std")
    return {f"eval/{name}": value for name, value in metrics.items()}


def eval_table(
    step: int, prompts: Sequence[str], texts: Sequence[str], rewards: Sequence[float], k: int
) -> str:
    """The `k` best and worst held-out samples as a plain-text table ('' when k is 0)."""
    picks = best_and_worst(rewards, k)
    if not picks:
        return ""
    rows = [(i, prompts[i], texts[i], float(rewards[i])) for i in picks]
    return render_table(f"eval samples at step {step} (best and worst)", ["#", "prompt", "completion", "reward"], rows)


class Evaluator:
    """Holds the held-out prompts (tokenized once) and runs the pass."""

    def __init__(self, env: Any, tokenizer: Any, num_prompts: int, max_tokens: int, num_to_print: int,
                 logit_bias: dict[int, float] | None = None, samples_per_prompt: int = 1,
                 pass_k: Sequence[int] = (), temperature: float = 1.0) -> None:  # fmt: skip
        import random

        from rlrun.model import encode_example

        self.examples = env.sample(random.Random(EVAL_SEED), num_prompts, split="eval")
        self.prompt_ids = [encode_example(tokenizer, ex) for ex in self.examples]
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.num_to_print = num_to_print
        self.logit_bias = dict(logit_bias or {})  # as training samples: the same tokens are off limits
        self.env, self.samples_per_prompt, self.pass_k, self.temperature = env, samples_per_prompt, pass_k, temperature

    def evaluate(self, step: int, client: Any, pool: Any, log: Any, version: int | None = None) -> dict[str, float]:
        """Generate, score and summarise; logs a line and the sample table; returns `eval/*` metrics."""
        if not self.examples:
            return {}
        groups = client.complete(
            self.prompt_ids, n=1, max_tokens=self.max_tokens, temperature=EVAL_TEMPERATURE, seed=EVAL_SEED,
            logit_bias=self.logit_bias,
        )
        completions = [group[0] for group in groups]
        texts = [decode_completion(self.tokenizer, c.token_ids) for c in completions]
        scores = pool.score(texts, self.examples)
        metrics = eval_metrics(scores, completions)
        envs = list(dict.fromkeys(ex.env for ex in self.examples))
        for env in envs if len(envs) > 1 else ():
            mine = [i for i, ex in enumerate(self.examples) if ex.env == env]
            own = eval_metrics([scores[i] for i in mine], [completions[i] for i in mine])
            metrics.update({f"{env}/{name}": value for name, value in own.items()})
        if self.samples_per_prompt > 1:
            metrics.update(self._sampled(client, pool))
        log.info(
            f"eval at step {step}{'' if version is None else f' (weights v{version})'}: reward "
            f"{metrics['eval/reward']:.3f} over {len(self.examples)} held-out prompts (greedy), "
            f"len {metrics['eval/completions/mean_length']:.1f}, ended with EOS "
            f"{1 - metrics['eval/completions/clipped_ratio']:.0%}"
        )
        table = eval_table(step, [ex.prompt for ex in self.examples], texts, [s["reward"] for s in scores],
                           self.num_to_print)  # fmt: skip
        if table:
            log.info("\n" + table)
        return metrics

    def _sampled(self, client: Any, pool: Any) -> dict[str, float]:
        """`eval/avg@n` and `eval/pass@k` from n sampled completions per held-out prompt."""
        n = self.samples_per_prompt
        groups = client.complete(self.prompt_ids, n=n, max_tokens=self.max_tokens, temperature=self.temperature,
                                 seed=EVAL_SEED, logit_bias=self.logit_bias)  # fmt: skip
        texts = [decode_completion(self.tokenizer, c.token_ids) for group in groups for c in group]
        scores = pool.score(texts, [ex for ex in self.examples for _ in range(n)])
        rewards = [[s["reward"] for s in scores[i * n : (i + 1) * n]] for i in range(len(self.examples))]
        solved = [[self.env.solved(s, ex) for s in scores[i * n : (i + 1) * n]] for i, ex in enumerate(self.examples)]
        metrics = {f"eval/{k}": v for k, v in sampled_metrics(rewards, solved, self.pass_k).items()}
        envs = list(dict.fromkeys(ex.env for ex in self.examples))
        for env in envs if len(envs) > 1 else ():
            mine = [i for i, ex in enumerate(self.examples) if ex.env == env]
            own = sampled_metrics([rewards[i] for i in mine], [solved[i] for i in mine], self.pass_k)
            metrics.update({f"{env}/eval/{k}": v for k, v in own.items()})
        return metrics
