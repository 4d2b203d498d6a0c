"""Schemas of the `task` and `env_workers` groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rlrun.envs import ENVIRONMENTS, MIXTURE
from rlrun.schema import checked

LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
ANSWER_FORMATS = ("raw", "answer_tag")  # what of a completion is the answer: all of it, or the last <answer>...</answer>


@dataclass
class EnvConfig:
    """One environment: which (`name`), its settings, its share of a mixture's prompts."""

    name: str = checked("reverse_text", one_of=tuple(ENVIRONMENTS))
    weight: float = checked(1.0, gt=0)  # in a mixture: this env's share of each step's prompts
    num_eval_prompts: int = checked(64, ge=0)
    # Weight of each named reward function in the total reward; missing names weigh 1
    # (or what the environment itself says, as verifiers environments do).
    reward_weights: dict[str, float] = field(default_factory=dict)
    # reverse_text
    min_chars: int = checked(3, gt=0)
    max_chars: int = 6  # >= min_chars
    alphabet: str = "abcdefgh"
    # reasoning_gym: dataset name -> {weight: <sampling weight>, <the dataset's own config fields>}
    datasets: dict[str, Any] = field(default_factory=dict)
    answer_format: str = checked("raw", one_of=ANSWER_FORMATS)
    # verifiers: an installed environment's id (its package name) and its taskset's settings
    env_id: Optional[str] = None
    env_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig(EnvConfig):
    """The run's task: one environment, or (`name: mixture`) several under `envs`."""

    name: str = checked("reverse_text", one_of=(*ENVIRONMENTS, MIXTURE))
    # name=mixture: env key -> its config. The key names the env's log file, metrics
    # (`<env>/reward`) and sample-table rows.
    envs: dict[str, EnvConfig] = field(default_factory=dict)


@dataclass
class EnvWorkersConfig:
    num_workers: int = checked(1, gt=0)  # per environment
    file_logs: bool = True  # logs/env_workers/<env>.log
    per_worker_logs: bool = False  # logs/env_workers/<env>/worker_<n>.log instead
    level: str = checked("INFO", one_of=LEVELS)
    env_level: str = checked("WARNING", one_of=LEVELS)  # level of the environment library's own loggers
    score_timeout_s: float = checked(30.0, gt=0)  # a completion still being scored after this scores 0
