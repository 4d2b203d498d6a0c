"""A task made of environments: each step's prompts split across them by weight.

Every run's task is a `Mixture` (one environment: a mixture of one), so the orchestrator,
the SFT job and evaluation see one interface. Each example it hands out carries the key of
the environment it came from (`Example.env`): the orchestrator scores it in that env's
worker pool and reports it under `<env>/...` beside the totals.
"""

from __future__ import annotations

import dataclasses
import random

from rlrun.envs.base import Environment, Example


def split_by_weight(n: int, weights: dict[str, float]) -> dict[str, int]:
    """`n` items shared by weight, largest remainder first (ties: in key order); sums to `n`."""
    total = sum(weights.values())
    exact = {key: n * w / total for key, w in weights.items()}
    counts = {key: int(x) for key, x in exact.items()}
    by_remainder = sorted(weights, key=lambda key: -(exact[key] - counts[key]))
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


class Mixture(Environment):
    """Environments by key, with their sampling weights."""

    def __init__(self, envs: dict[str, Environment], weights: dict[str, float]) -> None:
        if not envs:
            raise ValueError("a mixture needs at least one environment (task.envs)")
        self.envs, self.weights = envs, weights
        self.name = next(iter(envs)) if len(envs) == 1 else "mixture"
        self.reward_fns = {}

    @property
    def num_eval_prompts(self) -> int:
        return sum(int(env.cfg.num_eval_prompts) for env in self.envs.values())

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        """Train: `n` prompts split by weight, each env's in a block. Eval: each env's own
        held-out set (`num_eval_prompts` each), in env order, at most `n` in all."""
        examples: list[Example] = []
        if split == "eval":
            for key, env in self.envs.items():
                examples += self._tag(key, env.sample(rng, int(env.cfg.num_eval_prompts), split="eval"))
            return examples[:n]
        for key, count in split_by_weight(n, self.weights).items():
            if count:
                examples += self._tag(key, self.envs[key].sample(rng, count, split))
        return examples

    def score(self, completion: str, example: Example) -> dict[str, float]:
        return self.envs[example.env].score(completion, example)

    def solved(self, scores: dict[str, float], example: Example | None = None) -> bool:
        return self.envs[example.env].solved(scores, example)

    @property
    def library_loggers(self) -> list[str]:
        return sorted({name for env in self.envs.values() for name in env.library_loggers})

    @staticmethod
    def _tag(key: str, examples: list[Example]) -> list[Example]:
        return [dataclasses.replace(ex, env=key) for ex in examples]
