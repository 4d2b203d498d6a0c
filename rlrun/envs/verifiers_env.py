"""verifiers: any installed verifiers environment (0.4, `verifiers.v1` tasksets), single-turn.

    task=verifiers task.env_id=<id> [+task.env_args.<field>=<value> ...]

`env_id` is what `vf-eval <id>` takes: an installed package importable as `<id with - -> _>`
whose `__all__` exports one `vf.Taskset` subclass (or a built-in taskset of verifiers).
`env_args` are that taskset's config fields (`vf.taskset_config_type(id)`; unknown fields
are an error, as in verifiers), e.g. `env_args: {num_tasks: 500, task: {rewards: ...}}`.

Tasks: the taskset is loaded once per process, lazily, and materialized (an `INFINITE`
taskset is refused). The held-out set is `num_eval_prompts` tasks picked with a fixed seed
(the same for every run and seed: a taskset is often ordered by source or difficulty, so
not simply its last tasks), always in the same order and never drawn for training; training
draws the other tasks with the run's rng (without replacement within a call when there are
enough). verifiers 0.4 tasksets have no train/eval split of their own.

Prompts: `Example.messages` is the task's system prompt (if any) and its prompt as chat
messages, for models with a chat template; `Example.prompt`, what a plain model (no chat
template, e.g. the tiny model) sees, is the same text joined as `"<system>\\n\\n<prompt>"`
(just the prompt without a system prompt). `answer` is the task data's `answer` field when
it has one (the sample tables show it), else "". `info` holds the task's position and key
only: the env workers rebuild the taskset themselves and find the task by position (and
check its key: a taskset whose `load()` is not deterministic fails loudly).

Scoring: the completion, cut at its first end-of-sequence text, is the sampled assistant
reply of a one-turn trace (system?, prompt, reply), scored offline by the task's own
`Task.score` (its `@vf.reward` methods, rewards plugged through `env_args.task.rewards`,
and judges). Rewards that need a runtime (a sandbox: a `runtime` parameter without default)
are skipped, as `Task.score` does without one, with a warning. Scores: each reward's score
(unweighted), and `reward` = the environment's own weighted total (`trace.reward`).
`task.reward_weights.<fn>` replaces the environment's weight of that reward (e.g. 0: report
it, leave it out of `reward`). A reward function's exception propagates (as verifiers'
`TaskError`): the env worker pool scores that completion 0 and counts it.

A reward that returns keyed sub-scores (a mapping) counts in `reward` under its keys; its
own `rewards/<fn>/*` is the sum of those sub-scores when it is the only such reward of the
task (else 0: the keys cannot be told apart).

Multi-turn tasks (tools, environment responses, a user simulator) are not supported: a
task is one prompt and one sampled reply.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import random
import re
from typing import Any

from rlrun.envs.base import Environment, Example, cut_at_eos, plain

EVAL_SEED = 20_240_611  # which tasks are held out: the same for every run and seed
_BUILTIN_GROUP = "verifiers.v1.tasksets"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- finding environments


def module_name(env_id: str) -> str:
    """The module an id imports, as verifiers resolves it (`owner/name@version` -> `name`)."""
    return env_id.rsplit("/", 1)[-1].split("@", 1)[0].replace("-", "_").lower()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_environments() -> list[str]:
    """Ids of the installed verifiers environment packages: distributions that require
    `verifiers` (not through an extra) and whose id resolves to a module that exists. Reads
    package metadata only; imports none of them."""
    from importlib.metadata import distributions

    found: set[str] = set()
    for dist in distributions():
        name = dist.metadata.get("Name")
        if not name or _normalize(name) == "verifiers":
            continue
        for req in dist.requires or []:
            head, _, marker = req.partition(";")
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", head)
            if match and _normalize(match.group(1)) == "verifiers" and "extra" not in marker:
                if _find_spec(module_name(name)):
                    found.add(name)
                break
    return sorted(found, key=str.lower)


def builtin_tasksets() -> list[str]:
    """The tasksets that ship with verifiers (`verifiers.v1.tasksets`; most need its extras)."""
    import pkgutil

    try:
        from verifiers.v1 import tasksets
    except ImportError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(tasksets.__path__))


def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent does not exist
        return False


def _is_installed(env_id: str) -> bool:
    module = module_name(env_id)
    return bool(module) and (_find_spec(f"{_BUILTIN_GROUP}.{module}") or _find_spec(module))


def taskset_config(env_id: str, env_args: dict[str, Any]):
    """The taskset's own config (its narrowed class) for `env_args`; ValueError naming the
    field for settings it does not take or values it rejects."""
    import verifiers.v1 as vf
    from pydantic import ValidationError

    config_cls = vf.taskset_config_type(env_id)
    if "id" in env_args:
        raise ValueError(f"env_args.id: set env_id instead (env_id={env_id!r})")
    try:
        return config_cls.model_validate({**env_args, "id": env_id})
    except ValidationError as exc:
        problems = "; ".join(
            f"env_args.{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err.get("type") != "missing" and "input" in err else "")
            for err in exc.errors()
        )
        accepted = ", ".join(f for f in config_cls.model_fields if f != "id")
        raise ValueError(f"{problems}; {env_id} ({config_cls.__name__}) takes: {accepted}") from None


def reward_hooks(task_cls: type, task_config: Any) -> tuple[list, list[str]]:
    """The reward functions `Task.score` runs without a runtime, and the names of those it
    skips (they need a sandbox), found without any task data: verifiers' own `Task.hooks`
    on a bare instance (decorated methods, config-plugged rewards) plus the config's judges."""
    import inspect

    inst = task_cls.__new__(task_cls)  # no data needed: hooks reads the class and the config
    inst.config = task_config
    fns = list(task_cls.hooks(inst, "reward"))
    fns += [_JudgeHook(judge) for judge in task_cls.plugged_judges(inst)]

    def requires_runtime(fn) -> bool:
        param = inspect.signature(fn).parameters.get("runtime")
        return param is not None and param.default is inspect.Parameter.empty

    return [fn for fn in fns if not requires_runtime(fn)], [fn.__name__ for fn in fns if requires_runtime(fn)]


class _JudgeHook:
    """A plugged judge seen as a reward function: its reward name, weight and signature."""

    def __init__(self, judge: Any):
        import inspect

        self.__name__ = judge.reward_name
        self._vf_weight = float(judge.config.weight)
        self.__signature__ = inspect.signature(judge.score)


# ---------------------------------------------------------------- the environment


class Verifiers(Environment):
    name = "verifiers"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The id names an installed environment, env_args fit its config, reward_weights
        name its rewards. Imports the environment's module; loads no task."""
        env_id = getattr(cfg, "env_id", None)
        if not env_id:
            raise ValueError(
                "env_id: required with name=verifiers (an installed verifiers environment's id, "
                f"e.g. task.env_id=<id>); installed: {_listing()}"
            )
        import verifiers.v1  # noqa: F401 - an ImportError here: verifiers is not installed

        if not _is_installed(str(env_id)):
            raise ValueError(
                f"env_id={env_id!r}: no installed verifiers environment by that id (it would import "
                f"{module_name(str(env_id))!r}); installed: {_listing()}"
            )
        from verifiers.v1.utils.loaders import taskset_class

        try:  # the module imports and exports one Taskset subclass
            taskset_cls = taskset_class(str(env_id))
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"env_id={env_id!r}: not a usable verifiers environment: {exc}") from None
        config = taskset_config(str(env_id), dict(plain(cfg.env_args) or {}))
        if taskset_cls.INFINITE:
            raise ValueError(f"env_id={env_id!r}: {taskset_cls.__name__} is an infinite taskset; "
                             "rlrun needs a finite one (it holds some tasks out for evaluation)")  # fmt: skip
        names, weights, _ = _rewards(taskset_cls.task_type(), config.task)
        if not names:
            raise ValueError(f"env_id={env_id!r}: its task ({taskset_cls.task_type().__name__}) has no reward "
                             "that can be scored without a runtime")  # fmt: skip
        if "reward" in names:
            raise ValueError(f"env_id={env_id!r}: a reward named 'reward' clashes with rlrun's total")
        unknown = set(plain(cfg.reward_weights) or {}) - set(names)
        if unknown:
            raise ValueError(f"reward_weights names unknown reward functions {sorted(unknown)}; "
                             f"{env_id} has {names} (weights {weights})")  # fmt: skip

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if not getattr(cfg, "env_id", None):
            raise ValueError("verifiers: task.env_id is required")
        self.env_id = str(cfg.env_id)
        self.env_args: dict[str, Any] = dict(plain(cfg.env_args) or {})
        self.num_eval_prompts = int(cfg.num_eval_prompts)
        self._tasks: list | None = None
        self._examples: dict[int, Example] = {}

    @property
    def library_loggers(self) -> list[str]:
        return ["verifiers"]

    # -------------------------------------------------------- what the environment holds

    @functools.cached_property
    def _config(self):
        return taskset_config(self.env_id, self.env_args)

    @functools.cached_property
    def _reward_info(self) -> tuple[list[str], dict[str, float]]:
        import verifiers.v1 as vf

        names, weights, skipped = _rewards(vf.task_type(self.env_id), self._config.task)
        if skipped:
            log.warning("%s: rewards %s need a runtime (sandbox), which rlrun does not provide: skipped",
                        self.env_id, skipped)  # fmt: skip
        return names, weights

    @property
    def reward_fns(self) -> dict[str, Any]:  # type: ignore[override]
        """Each reward's name -> a function scoring just that reward (found without scoring)."""
        return {name: functools.partial(self._one_score, name) for name in self._reward_info[0]}

    @property
    def default_reward_weights(self) -> dict[str, float]:  # type: ignore[override]
        """The environment's own weight of each reward."""
        return dict(self._reward_info[1])

    def _one_score(self, name: str, completion: str, example: Example) -> float:
        return self.score(completion, example)[name]

    def tasks(self) -> list:
        """The taskset's tasks in its order (loaded on first use, once per process)."""
        if self._tasks is None:
            import verifiers.v1 as vf

            self._tasks = list(vf.load_taskset(self._config))
        return self._tasks

    @functools.cached_property
    def _split(self) -> tuple[list[int], list[int]]:
        """(eval positions in their fixed order, train positions)."""
        n = len(self.tasks())
        if n <= self.num_eval_prompts:
            raise ValueError(
                f"verifiers env {self.env_id!r}: its taskset has {n} tasks and num_eval_prompts="
                f"{self.num_eval_prompts} would leave none to train on; lower task.num_eval_prompts "
                "or load more tasks (task.env_args)"
            )
        order = list(range(n))
        random.Random(EVAL_SEED).shuffle(order)
        held_out = order[: self.num_eval_prompts]
        taken = set(held_out)
        return held_out, [i for i in range(n) if i not in taken]

    # -------------------------------------------------------- prompts

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        held_out, train = self._split
        if split == "eval":
            return [self._example(i) for i in held_out[:n]]
        if split != "train":
            raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
        picks = rng.sample(train, n) if n <= len(train) else [rng.choice(train) for _ in range(n)]
        return [self._example(i) for i in picks]

    def _example(self, index: int) -> Example:
        if index not in self._examples:
            task = self.tasks()[index]
            messages = prompt_messages(task.data)
            prompt = "\n\n".join(m["content"] for m in messages)
            answer = getattr(task.data, "answer", None)
            self._examples[index] = Example(
                prompt=prompt,
                answer="" if answer is None else str(answer),
                info={"task_index": index, "task_key": task.key},
                messages=messages,
            )
        return self._examples[index]

    # -------------------------------------------------------- scoring

    def task_for(self, example: Example):
        """The task an example came from (this process's own copy of the taskset)."""
        index = int(example.info["task_index"])
        tasks = self.tasks()
        if not 0 <= index < len(tasks):
            raise ValueError(f"{self.env_id}: task {index} is out of range ({len(tasks)} tasks)")
        task = tasks[index]
        key = example.info.get("task_key")
        if key is not None and task.key != key:
            raise ValueError(
                f"{self.env_id}: task {index} differs between processes (key {task.key[:12]} vs "
                f"{str(key)[:12]}): its taskset's load() must give the same tasks for the same env_args"
            )
        return task

    def score(self, completion: str, example: Example) -> dict[str, float]:
        """Each reward's score and `reward`, their weighted total (see the module docstring)."""
        task = self.task_for(example)
        trace = completion_trace(task, cut_at_eos(completion))
        asyncio.run(task.score(trace))  # a reward's exception propagates (verifiers' TaskError)
        names, own_weights = self._reward_info
        recorded = {key: r for key, r in trace.rewards.items() if r is not None}
        scores = {name: recorded[name].score if name in recorded else 0.0 for name in names}
        # Keyed sub-scores of a mapping-returning reward: attributed when only one reward is unaccounted for.
        extra = [key for key in recorded if key not in scores]
        missing = [name for name in names if name not in recorded]
        owner = {key: missing[0] for key in extra} if len(missing) == 1 else {}
        if extra and len(missing) == 1:
            scores[missing[0]] = sum(recorded[key].score for key in extra)
        if self.reward_weights:
            scores["reward"] = sum(
                r.score * self.reward_weights.get(owner.get(key, key), r.weight) for key, r in recorded.items()
            )
        else:
            scores["reward"] = float(trace.reward)
        return scores


def _rewards(task_cls: type, task_config: Any) -> tuple[list[str], dict[str, float], list[str]]:
    """(reward names in verifiers' order, their own weights, names skipped for want of a runtime)."""
    fns, skipped = reward_hooks(task_cls, task_config)
    return [fn.__name__ for fn in fns], {fn.__name__: float(getattr(fn, "_vf_weight", 1.0)) for fn in fns}, skipped


def _listing() -> str:
    found = installed_environments()
    installed = ", ".join(found) if found else "none (pip install an environment package)"
    builtin = builtin_tasksets()
    return installed + (f"; built into verifiers: {', '.join(builtin)}" if builtin else "")


def prompt_messages(data: Any) -> list[dict[str, str]]:
    """A task's prompt as chat messages: its system prompt, then its prompt (text or messages)."""
    from verifiers.v1.types import content_text

    messages = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if data.prompt is None:
        raise ValueError(f"task {data.idx}: has no prompt (a user opens the conversation); rlrun needs one")
    if isinstance(data.prompt, str):
        return [*messages, {"role": "user", "content": data.prompt}]
    return [*messages, *({"role": m.role, "content": content_text(m.content)} for m in data.prompt)]


def completion_trace(task: Any, reply: str):
    """A one-turn trace of `task`: its system prompt and prompt, then `reply` as the sampled
    assistant message (as verifiers' own rollouts record it)."""
    import verifiers.v1 as vf
    from verifiers.v1.state import state_cls

    prompt: list = []
    if task.data.system_prompt:
        prompt.append(vf.SystemMessage(content=task.data.system_prompt))
    if isinstance(task.data.prompt, str):
        prompt.append(vf.UserMessage(content=task.data.prompt))
    else:
        prompt.extend(task.data.prompt or [])
    nodes = [vf.MessageNode(parent=i - 1 if i else None, message=m) for i, m in enumerate(prompt)]
    nodes.append(vf.MessageNode(parent=len(nodes) - 1 if nodes else None,
                                message=vf.AssistantMessage(content=reply), sampled=True))  # fmt: skip
    return vf.Trace(
        task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        state=state_cls(type(task))(),
        agent=vf.AgentInfo(config=vf.AgentConfig(), name="rlrun", trainable=True),
        nodes=nodes,
    )
