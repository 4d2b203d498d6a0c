"""Log extras of the orchestrator: which rollouts to show, the rows and histograms it logs,
and a rich table rendered to plain text for the job's log.

Every `orchestrator.log_extras.interval` steps (`step % interval == 0`):

- samples (`log_extras.samples`): up to `samples_per_step` rollouts of the step, chosen to
  be informative by `select_samples` (best and worst reward, shortest and longest
  completion, then random ones), one row each (`sample_rows`: step, why it was picked, the
  environment, prompt, completion, one column per reward function of any env in the task
  (NaN where a row's env has no such function), reward, advantage, token counts);
- distributions (`log_extras.distributions`): every rollout's reward, advantage and
  completion length, under `distributions/<name>`.

Nothing is kept between steps: the only accumulating table is the W&B backend's, bounded
by `log_extras.max_rows`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from rlrun.orchestrator.rollout import Rollout


def is_logging_step(step: int, interval: int) -> bool:
    """Log extras at this step? (every `interval` steps, as `step % interval == 0`)."""
    return interval > 0 and step % interval == 0


def select_samples(
    rewards: Sequence[float], lengths: Sequence[int], k: int, rng: random.Random
) -> list[tuple[int, str]]:
    """Up to `k` informative rollouts as (index, why), no index twice.

    In this order: the best reward, the worst reward, the shortest completion, the longest
    completion (ties: the first such index), then random others until there are `k`. With
    `rng` seeded the same, the same rollouts come out.
    """
    n = len(rewards)
    if len(lengths) != n:
        raise ValueError(f"{n} rewards but {len(lengths)} lengths")
    k = max(0, min(k, n))
    indices = range(n)
    informative = [
        ("best reward", max(indices, key=lambda i: rewards[i])),
        ("worst reward", min(indices, key=lambda i: rewards[i])),
        ("shortest", min(indices, key=lambda i: lengths[i])),
        ("longest", max(indices, key=lambda i: lengths[i])),
    ] if n else []  # fmt: skip
    picked: dict[int, str] = {}
    for why, i in informative:
        if len(picked) < k and i not in picked:
            picked[i] = why
    others = [i for i in indices if i not in picked]
    for i in rng.sample(others, k - len(picked)):
        picked[i] = "random"
    return list(picked.items())


def best_and_worst(rewards: Sequence[float], k: int) -> list[int]:
    """Indices of the ceil(k/2) best and floor(k/2) worst rewards, best first (ties: lower index first)."""
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    k = max(0, min(k, len(order)))
    best, worst = order[: (k + 1) // 2], order[len(order) - k // 2 :]
    return best + worst


def sample_rows(step: int, picks: Sequence[tuple[int, str]], rollouts: Sequence[Rollout]) -> list[dict[str, Any]]:
    """One table row per pick (`select_samples`' output: indices into `rollouts`)."""
    names = sorted({fn for i, _ in picks for fn in rollouts[i].scores if fn != "reward"})  # same columns in every row
    rows = []
    for i, why in picks:
        r = rollouts[i]
        rows.append({
            "step": step,
            "selected_as": why,
            "env": r.env,
            "prompt": r.example.prompt,
            "completion": r.text,
            **{fn: float(r.scores.get(fn, math.nan)) for fn in names},
            "reward": float(r.reward),
            "advantage": float(r.advantage),
            "prompt_tokens": len(r.prompt_ids),
            "completion_tokens": len(r.completion_ids),
        })  # fmt: skip
    return rows


def log_rollout_extras(tracker: Any, extras_cfg: Any, step: int, rng: random.Random, rollouts: Sequence[Rollout]) -> None:
    """The step's sample rows and distributions, as `extras_cfg` (a job's log_extras) asks."""
    rewards = [r.reward for r in rollouts]
    lengths = [len(r.completion_ids) for r in rollouts]
    if extras_cfg.samples:
        picks = select_samples(rewards, lengths, extras_cfg.samples_per_step, rng)
        tracker.log_samples(sample_rows(step, picks, rollouts), step)
    if extras_cfg.distributions:
        tracker.log_distribution("distributions/reward", rewards, step)
        tracker.log_distribution("distributions/advantage", [r.advantage for r in rollouts], step)
        tracker.log_distribution("distributions/completion_length", lengths, step)
