"""Schema of the `doctor` group: which rules watch each job's metrics, their thresholds, and
which findings stop the run. `conf/doctor/{default,strict,off}.yaml` set the values."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from rlrun.schema import ConfigError, checked


@dataclass
class SustainedRule:
    """`metric` >= `above` (or <= `below`) on `steps` consecutive steps."""

    metric: str
    above: Optional[float] = None
    below: Optional[float] = None
    steps: int = checked(10, gt=0)
    enabled: bool = True


@dataclass
class SpikeRule:
    """`metric` above `factor` x the largest of its previous `window` values (after `min_steps`).
    The largest, not the median: late in a run most groups carry no signal and the median
    gradient norm is tiny, so healthy runs reach 15x their median but stay within 2.5x the max."""

    metric: str
    factor: float = checked(5.0, gt=1)
    window: int = checked(50, gt=0)
    min_steps: int = checked(10, gt=0)
    enabled: bool = True


@dataclass
class FlatRule:
    """`metric` moved by at most `tolerance` (max - min) over the last `steps` steps."""

    metric: str
    steps: int = checked(50, gt=1)
    tolerance: float = checked(1e-3, ge=0)
    enabled: bool = True


@dataclass
class NonFiniteRule:
    """Any of `metrics` NaN or +/-inf."""

    metrics: list[str] = field(default_factory=lambda: ["loss", "grad_norm", "reward"])
    enabled: bool = True


@dataclass
class TrackerRule:
    """A tracker backend failing (its data kept and retried) for `after_s` seconds."""

    after_s: float = checked(60.0, gt=0)
    enabled: bool = True


@dataclass
class DoctorConfig:
    enabled: bool = True
    stop_on: list[str] = field(default_factory=list)  # rule names whose finding stops the run
    no_eos: SustainedRule = field(default_factory=lambda: SustainedRule("completions/clipped_ratio", above=0.9))
    entropy_collapse: SustainedRule = field(default_factory=lambda: SustainedRule("entropy", below=0.02, steps=20))
    no_signal: SustainedRule = field(default_factory=lambda: SustainedRule("frac_reward_zero_std", above=0.9, steps=20))
    mismatch: SustainedRule = field(default_factory=lambda: SustainedRule("mismatch/kl", above=0.05))
    trainer_starved: SustainedRule = field(
        default_factory=lambda: SustainedRule("idle/trainer_wait_frac", above=0.9, steps=20)
    )
    inference_starved: SustainedRule = field(
        default_factory=lambda: SustainedRule("idle/inference_wait_frac", above=0.9, steps=20)
    )
    grad_spike: SpikeRule = field(default_factory=lambda: SpikeRule("grad_norm"))
    reward_flat: FlatRule = field(default_factory=lambda: FlatRule("reward"))
    nan: NonFiniteRule = field(default_factory=NonFiniteRule)
    tracker: TrackerRule = field(default_factory=TrackerRule)


# Each rule's name and schema (which says how it judges the stream: rules.RULE_KINDS).
RULE_SCHEMAS: dict[str, type] = {
    f.name: type(f.default_factory()) for f in fields(DoctorConfig) if f.name not in ("enabled", "stop_on")  # type: ignore[misc]
}
RULES = tuple(RULE_SCHEMAS)


def check_doctor(cfg: object) -> None:
    """`doctor.stop_on` names rules; a sustained rule has a threshold on exactly one side."""
    for name in cfg.stop_on:  # type: ignore[attr-defined]
        if name not in RULES:
            raise ConfigError(f"doctor.stop_on: {name!r} is not a doctor rule; the rules: {', '.join(RULES)}")
    for name in RULES:
        rule = getattr(cfg, name)
        if hasattr(rule, "above") and (rule.above is None) == (rule.below is None):
            raise ConfigError(f"doctor.{name}: set exactly one of above={rule.above} / below={rule.below}")
