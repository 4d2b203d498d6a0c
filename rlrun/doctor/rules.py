"""The doctor's rules: each watches one job's metric stream, step by step, and reports a
finding once when its condition starts to hold (again after it cleared). A rule whose metric
a job does not log never fires in that job."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

from rlrun.doctor.config import FlatRule, NonFiniteRule, SpikeRule, SustainedRule

# Per rule: what the finding means, then what to try (the end of each finding's line).
HINTS = {
    "no_eos": "completions run to orchestrator.max_tokens without EOS. Try: read the samples "
    "(python -m rlrun.report RUN --samples), start from SFT (sft.max_steps), keep EOS reachable "
    "(orchestrator.allow_special_tokens=false), lower trainer.lr",
    "entropy_collapse": "the policy became near-deterministic. Try: lower trainer.lr, add trainer.kl_coef, "
    "raise orchestrator.temperature",
    "no_signal": "most groups have equal rewards, so zero advantage: the task is too easy or too hard for the "
    "policy. Try: raise orchestrator.group_size, change the task's difficulty",
    "mismatch": "the trainer's logprobs disagree with the sampler's. Try: check the inference dtype and "
    "temperature, lower orchestrator.max_async_steps, correct it with trainer.is_correction=token_truncate",
    "trainer_starved": "the trainer waits for batches: generation is the bottleneck. Try: raise "
    "orchestrator.max_async_steps, give inference more compute",
    "inference_starved": "inference waits for the trainer's weights. Try: raise orchestrator.max_async_steps, "
    "give the trainer more compute",
    "grad_spike": "one step's gradient is far above the usual. Try: lower trainer.lr or trainer.max_grad_norm, "
    "read the step's samples",
    "reward_flat": "the reward stopped moving: nothing left to learn (see frac_reward_zero_std) or learning "
    "stalled. Try: a harder task, a higher trainer.lr",
    "nan": "a non-finite loss, gradient or reward (the trainer skips updates with a non-finite gradient norm). "
    "Try: check the reward functions, lower trainer.lr",
    "tracker": "a tracker backend keeps failing; its data is kept and retried. Try: check its server or credentials",
}


class Finding(NamedTuple):
    metric: str
    value: float
    detail: str  # what was seen, after the value


class Rule:
    def __init__(self, name: str, cfg: Any) -> None:
        self.name = name
        self.cfg = cfg
        self.firing = False

    def check(self, metrics: dict[str, float]) -> Finding | None:
        """The condition on this step (None: it does not hold, or the metric is absent)."""
        raise NotImplementedError

    def observe(self, metrics: dict[str, float]) -> Finding | None:
        """A finding when the condition starts to hold; None while it goes on or is absent."""
        finding = self.check(metrics)
        fire = finding is not None and not self.firing
        self.firing = finding is not None
        return finding if fire else None


class Sustained(Rule):
    def __init__(self, name: str, cfg: Any) -> None:
        super().__init__(name, cfg)
        self.count = 0

    def check(self, metrics: dict[str, float]) -> Finding | None:
        value = metrics.get(self.cfg.metric)
        if value is None:
            return None
        cfg = self.cfg
        bad = value >= cfg.above if cfg.above is not None else value <= cfg.below
        self.count = self.count + 1 if bad else 0
        if self.count < cfg.steps:
            return None
        side = f">= {cfg.above:g}" if cfg.above is not None else f"<= {cfg.below:g}"
        return Finding(cfg.metric, value, f"({side} for {self.count} steps)")


class Spike(Rule):
    def __init__(self, name: str, cfg: Any) -> None:
        super().__init__(name, cfg)
        self.history: deque[float] = deque(maxlen=cfg.window)

    def check(self, metrics: dict[str, float]) -> Finding | None:
        value = metrics.get(self.cfg.metric)
        if value is None or not math.isfinite(value):  # non-finite values are the `nan` rule's
            return None
        finding = None
        if len(self.history) >= self.cfg.min_steps:
            largest = max(self.history)
            if value > self.cfg.factor * largest:
                finding = Finding(self.cfg.metric, value, f"({value / largest:.1f}x the largest {largest:.4g} "
                                                          f"of the previous {len(self.history)} steps)")  # fmt: skip
        self.history.append(value)
        return finding


class Flat(Rule):
    def __init__(self, name: str, cfg: Any) -> None:
        super().__init__(name, cfg)
        self.history: deque[float] = deque(maxlen=cfg.steps)

    def check(self, metrics: dict[str, float]) -> Finding | None:
        value = metrics.get(self.cfg.metric)
        if value is None:
            return None
        self.history.append(value)
        if len(self.history) < self.cfg.steps:
            return None
        spread = max(self.history) - min(self.history)
        if not spread <= self.cfg.tolerance:  # NaN spreads are the `nan` rule's
            return None
        return Finding(self.cfg.metric, value, f"(moved {spread:.2g} <= {self.cfg.tolerance:g} over {self.cfg.steps} steps)")


class NonFinite(Rule):
    def check(self, metrics: dict[str, float]) -> Finding | None:
        for name in self.cfg.metrics:
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                return Finding(name, value, "(not finite)")
        return None


RULE_KINDS: dict[type, type[Rule]] = {
    SustainedRule: Sustained, SpikeRule: Spike, FlatRule: Flat, NonFiniteRule: NonFinite,
}  # fmt: skip
