"""Reverse a short string: `abcd=` -> `dcba`. Tasks come from a seed (no data files, no network).

Rewards: `exact` (weight 1.0): the reply is the reverse; `length_match` (weight 0.5): the
reply is as long as the answer. With `raise_on` set, `length_match` raises ValueError for a
reply that contains it (a buggy reward function, for the error-handling tests). With
`nan_after` = n > 0, `exact` returns NaN from its (n+1)-th call in a process on (a reward
function that divides by zero, for the run doctor's tests).
"""

from __future__ import annotations

import itertools
import random

import verifiers.v1 as vf


class ReverseData(vf.TaskData):
    answer: str


_EXACT_CALLS = itertools.count(1)


class ReverseTask(vf.Task[ReverseData]):
    raise_on: str = ""  # set by the taskset from its config
    nan_after: int = 0

    @vf.stop
    async def single_turn(self, trace: vf.Trace) -> bool:
        return trace.num_turns >= 1

    @vf.reward(weight=1.0)
    async def exact(self, trace: vf.Trace) -> float:
        if self.nan_after and next(_EXACT_CALLS) > self.nan_after:
            return float("nan")
        return float(trace.last_reply == self.data.answer)

    @vf.reward(weight=0.5)
    async def length_match(self, task: ReverseData, trace: vf.Trace) -> float:
        reply = trace.last_reply
        if self.raise_on and self.raise_on in reply:
            raise ValueError(f"length_match: refusing to score a reply containing {self.raise_on!r}")
        return float(len(reply) == len(task.answer))


class ReverseConfig(vf.TasksetConfig):
    num_tasks: int = 200
    seed: int = 0
    min_chars: int = 3
    max_chars: int = 5
    alphabet: str = "abcdefgh"
    instruction: str = ""  # the tasks' system prompt ("": none)
    raise_on: str = ""  # length_match raises for replies containing this ("": never)
    nan_after: int = 0  # exact is NaN after this many calls in a process (0: never)


class ReverseTaskset(vf.Taskset[ReverseTask, ReverseConfig]):
    def load(self) -> list[ReverseTask]:
        cfg = self.config
        if cfg.max_chars < cfg.min_chars:
            raise ValueError(f"max_chars={cfg.max_chars} < min_chars={cfg.min_chars}")
        rng = random.Random(cfg.seed)
        tasks = []
        for i in range(cfg.num_tasks):
            text = "".join(rng.choice(cfg.alphabet) for _ in range(rng.randint(cfg.min_chars, cfg.max_chars)))
            system = cfg.instruction or None
            data = ReverseData(id=f"rev-{i}", prompt=text + "=", answer=text[::-1], system_prompt=system)
            task = ReverseTask(data, cfg.task)
            task.raise_on = cfg.raise_on
            task.nan_after = cfg.nan_after
            tasks.append(task)
        return tasks


async def ends(task: ReverseData, trace: vf.Trace) -> dict[str, float]:
    """Keyed sub-scores, for plugging through the config: `task: {rewards: {ends: {fn:
    "rlrun_test_reverse.taskset:ends", weight: 0.25}}}`: the first and the last character right."""
    reply, answer = trace.last_reply, task.answer
    return {"first": float(reply[:1] == answer[:1]), "last": float(reply[-1:] == answer[-1:])}
