"""Schemas of the `task` and `env_workers` groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlrun.envs import ENVIRONMENTS
from rlrun.schema import checked

LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


@dataclass
class TaskConfig:
    name: str = checked("reverse_text", one_of=tuple(ENVIRONMENTS))
    min_chars: int = checked(3, gt=0)
    max_chars: int = 6  # >= min_chars
    alphabet: str = "abcdefgh"
    num_eval_prompts: int = 64
    # Weight of each named reward function in the total reward; missing names weigh 1.
    reward_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class EnvWorkersConfig:
    num_workers: int = checked(1, gt=0)
    file_logs: bool = True  # logs/env_workers/<env>.log
    level: str = checked("INFO", one_of=LEVELS)
    env_level: str = checked("WARNING", one_of=LEVELS)  # level of the environment library's own loggers
