"""The environment interface: prompts, and one or more named reward functions.

Adding an environment:

    # mypkg/my_env.py
    from rlrun.envs.base import Environment, Example

    class MyEnv(Environment):
        name = "my_env"

        def __init__(self, cfg):
            super().__init__(cfg)
            self.reward_fns = {"correct": self.correct, "short": self.short}

        def sample(self, rng, n, split="train"):
            return [Example(prompt=..., answer=..., info={}) for _ in range(n)]

        def correct(self, completion, example): ...   # -> float
        def short(self, completion, example): ...     # -> float

then register it in `rlrun/envs/__init__.py`: `ENVIRONMENTS["my_env"] = "mypkg.my_env:MyEnv"`
and add `conf/task/my_env.yaml` (`name: my_env`). `task.reward_weights.<fn>` weighs each
function in the total `reward` (default 1.0). Environments are constructed in the env-worker
processes too, so keep their module imports light (no torch).
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[[str, "Example"], float]
# End-of-sequence texts of common tokenizers: a completion is scored up to the first one
# (it is decoded with every token shown, so EOS arrives as text).
EOS_TEXTS = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>")


def plain(value: Any) -> Any:
    """A config node (OmegaConf or dataclass) as plain dicts and lists, anything else as it is:
    picklable for the spawned env workers, and what libraries' own config classes take."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def cut_at_eos(completion: str) -> str:
    """The completion up to its first end-of-sequence text: nothing after it counts."""
    for eos in EOS_TEXTS:
        completion = completion.split(eos, 1)[0]
    return completion


@dataclass
class Example:
    prompt: str  # the text the policy sees (tokenized by rlrun.model.encode_prompt)
    answer: str  # the reference completion: what reward functions compare against and SFT trains on
    info: dict[str, Any] = field(default_factory=dict)
    env: str = ""  # the key of the environment it came from (set by the task's Mixture)
    # The prompt as chat messages ([{"role", "content"}]), for models with a chat template;
    # None: `prompt` is the text the policy sees.
    messages: list[dict[str, str]] | None = None


class Environment(ABC):
    name: str = ""
    reward_fns: dict[str, RewardFn]
    # The reward functions' names when the class knows them before loading (None: only the
    # loaded environment does): the launcher checks their metric names against the trackers.
    reward_names: tuple[str, ...] | None = None
    # Weights of reward functions that are not 1 unless `task.reward_weights` says otherwise
    # (0: reported as `rewards/<fn>/*`, not part of `reward`).
    default_reward_weights: dict[str, float] = {}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ValueError, naming the key and what exists, for settings this environment
        cannot use (an unknown dataset or id). Runs in the launcher before any job starts."""

    def __init__(self, cfg: Any):
        """`cfg` is this environment's config node (rlrun.envs.config.EnvConfig)."""
        self.cfg = cfg
        self.reward_weights: dict[str, float] = dict(getattr(cfg, "reward_weights", None) or {})

    @abstractmethod
    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        """`n` examples; `split="eval"` gives the fixed held-out set, always in the same order."""

    def score(self, completion: str, example: Example) -> dict[str, float]:
        """Each named reward, plus `reward`: their sum weighted by `task.reward_weights`."""
        if "reward" in self.reward_fns:
            raise ValueError(f"{type(self).__name__}: a reward function may not be named 'reward'")
        unknown = set(self.reward_weights) - set(self.reward_fns)
        if unknown:
            raise ValueError(f"task.reward_weights names unknown reward functions {sorted(unknown)}; "
                             f"{self.name} has {sorted(self.reward_fns)}")
        scores = {name: float(fn(completion, example)) for name, fn in self.reward_fns.items()}
        weights = {**self.default_reward_weights, **self.reward_weights}
        scores["reward"] = sum(weights.get(name, 1.0) * value for name, value in scores.items())
        return scores

    def solved(self, scores: dict[str, float], example: Example | None = None) -> bool:
        """Whether a completion with these scores solves its prompt (pass@k's "correct"):
        by default a total reward of at least 1."""
        return scores["reward"] >= 1.0 - 1e-9

    @property
    def library_loggers(self) -> list[str]:
        """Stdlib loggers of the environment's own code, set to `env_workers.env_level` in workers."""
        return [type(self).__module__.split(".")[0]]
