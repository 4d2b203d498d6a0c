"""One step's data, top to bottom: the `Rollout` record, group-relative advantages, the batch
tensors, the metrics.

Metric names follow TRL's GRPO trainer where one exists (`reward`, `reward_std`,
`rewards/<fn>/mean`, `frac_reward_zero_std`, `completions/*`, `num_tokens`). A task of several
environments also gets each env's own under `<env>/` (`<env>/reward`, `<env>/rewards/<fn>/mean`,
`<env>/completions/*`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlrun.batch import pad_sequences
from rlrun.envs.base import Example
from rlrun.inference import Completion
from rlrun.orchestrator.config import SCALE_REWARDS


@dataclass
class Rollout:
    """One sampled completion and what the step learns about it, from sampling to the batch."""

    example: Example  # the prompt's text and reference answer
    prompt_ids: list[int]
    completion: Completion  # token ids, the sampler's logprobs, finish reason
    text: str = ""  # the completion as the scorer saw it
    scores: dict[str, float] = field(default_factory=dict)  # each reward function, plus the total `reward`
    advantage: float = 0.0

    @property
    def env(self) -> str:
        """The key of the environment that scores it."""
        return self.example.env

    @property
    def reward(self) -> float:
        return self.scores["reward"]

    @property
    def completion_ids(self) -> list[int]:
        return self.completion.token_ids


def _std(values: Sequence[float]) -> float:
    """Bessel-corrected standard deviation (as TRL's); 0 for fewer than two values. A NaN reward
    gives NaN (`statistics.stdev` raises on one), for the run doctor's `nan` rule to report."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def group_advantages(rewards: Sequence[float], group_size: int, scale: str = "group", eps: float = 1e-4) -> list[float]:
    """GRPO: each reward minus its group's mean, divided by a std (+eps) as `scale` says.

    `scale` is TRL's `scale_rewards`: `group` (the group's std), `batch` (the whole batch's
    std) or `none` (Dr. GRPO: no division). Stds are Bessel-corrected, as TRL's. A group
    whose completions all scored the same gets advantage 0 everywhere: it carries no signal
    about which completion is better.
    """
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale={scale!r}: must be one of {SCALE_REWARDS}")
    batch_std = _std(rewards)
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = statistics.fmean(group)
        std = {"group": _std(group), "batch": batch_std, "none": None}[scale]
        out.extend((r - mean) / (std + eps) if std is not None else r - mean for r in group)
    return out


def build_batch(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors in `rlrun.batch`'s format, one row per rollout: prompt then completion."""
    rows = [(r.prompt_ids, r.completion_ids) for r in rollouts]
    return {
        **pad_sequences(rows, pad_id, [r.completion.logprobs for r in rollouts]),
        "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
        "truncated": torch.tensor([float(r.completion.finish_reason == "length") for r in rollouts]),
    }


def reward_metrics(scores: Sequence[dict[str, float]], group_size: int) -> dict[str, float]:
    """`reward` (mean), `reward_std` (mean within-group std), per-function mean/std, zero-std groups."""
    rewards = [s["reward"] for s in scores]
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    group_stds = [_std(g) for g in groups]
    metrics = {
        "reward": statistics.fmean(rewards),
        "reward_std": statistics.fmean(group_stds),
        "frac_reward_zero_std": sum(std < 1e-8 for std in group_stds) / len(groups),
    }
    for fn in sorted(k for k in scores[0] if k != "reward"):
        values = [s[fn] for s in scores]
        metrics[f"rewards/{fn}/mean"] = statistics.fmean(values)
        metrics[f"rewards/{fn}/std"] = _std(values)
    return metrics


def completion_metrics(completions: Sequence[Completion]) -> dict[str, float]:
    """Lengths of all completions, of those that ended with EOS, and how many hit max_tokens."""
    lengths = [len(c.token_ids) for c in completions]
    terminated = [len(c.token_ids) for c in completions if c.finish_reason == "stop"]
    return {
        "completions/mean_length": statistics.fmean(lengths),
        "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)),
        "completions/clipped_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "completions/mean_terminated_length": statistics.fmean(terminated) if terminated else 0.0,
        "completions/min_terminated_length": float(min(terminated)) if terminated else 0.0,
        "completions/max_terminated_length": float(max(terminated)) if terminated else 0.0,
    }


def per_env(metrics_of, rollouts: Sequence[Rollout]) -> dict[str, float]:
    """`metrics_of(env's rollouts)` for each environment of a task with several, under `<env>/`."""
    envs = list(dict.fromkeys(r.env for r in rollouts))
    if len(envs) < 2:
        return {}
    return {f"{env}/{name}": value for env in envs
            for name, value in metrics_of([r for r in rollouts if r.env == env]).items()}  # fmt: skip
