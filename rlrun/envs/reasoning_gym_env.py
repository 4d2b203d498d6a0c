"""reasoning_gym: procedurally generated tasks from reasoning-gym, scored by their own scorers.

    task:
      name: reasoning_gym
      datasets:                      # dataset name -> {weight, <the dataset's own config fields>}
        spell_backward: {weight: 1.0, min_word_len: 3, max_word_len: 6}
        letter_counting: {weight: 0.5}
      answer_format: raw             # raw | answer_tag
      num_eval_prompts: 64

Prompts. Each training example's dataset is drawn by `weight` with the step's random source,
then an item index of that dataset's training pool (the dataset built with `seed` 1 and `size`
100,000, or the `seed` / `size` its fields set; items are generated lazily from `seed + index`).
`split="eval"` is a separate held-out set: items 0, 1, 2, ... of each dataset built with seed
`EVAL_SEED` (datasets again drawn by weight, from a fixed random source), without repeated
questions, the same for every run. A training item whose question is a held-out question is
drawn again, so evaluation items stay out of training (after `_MAX_REDRAWS` held-out draws in a
row, a dataset too small for that, it is taken anyway).

The policy sees, as text (`Example.prompt`, for plain models such as the built-in tiny one),
the dataset's question followed by a newline (`SEPARATOR`): the one fixed boundary a
character-level model learns to answer after. Models with a chat template get
`Example.messages` instead: the question as the user's message, preceded with
`answer_format=answer_tag` by a system prompt asking for the answer inside
`<answer>...</answer>` (reasoning-gym's own `direct` prompt).

Reward `score`: the dataset's own `score_answer(answer, entry)` (in [0, 1]) on the answer
extracted from the completion as emitted:
1. the completion up to its first end-of-sequence text (`</s>`, `<|endoftext|>`,
   `<|im_end|>`, `<eos>`, as reverse_text); nothing after it counts;
2. `raw`: all of that, surrounding whitespace stripped;
   `answer_tag`: the inner text of its last `<answer>...</answer>`, surrounding whitespace
   stripped (reasoning-gym's `extract_answer`); no such tag: no answer, which scores 0.
Scorers are otherwise strict (spell_backward compares position by position, so a leading
space costs every character), which is why step 2 strips.

`Example.answer` is the reference completion (what SFT trains on): the dataset's answer, inside
`<answer>...</answer>` with `answer_format=answer_tag`. `Example.info` holds `dataset` (its
name), `index` (the item's index), `split` and `entry` (reasoning-gym's item: question, answer,
metadata), which is what the scorer reads.

Datasets are built once per process (each worker builds its own; spell_backward reads a
1.3 MB word list). Importing this module imports no reasoning-gym: `pip install 'rlrun[envs]'`.
"""

from __future__ import annotations

import json
import random
import warnings
from typing import Any

from rlrun.envs.base import Environment, Example, cut_at_eos, plain

SEPARATOR = "\n"  # between the question and the answer in the plain-text prompt
TRAIN_SEED = 1  # the training pool of every dataset whose fields set no `seed`
TRAIN_SIZE = 100_000  # its size when its fields set no `size` (some datasets precompute per item)
EVAL_SEED = 20_240_612  # the held-out set: the same for every run and seed, never trained on
_MAX_REDRAWS = 100  # held-out draws in a row after which a training item is taken anyway
_DATASETS: dict[str, Any] = {}  # this process's datasets, by name and settings


def dataset_specs(cfg: Any) -> dict[str, tuple[float, dict[str, Any]]]:
    """`cfg.datasets` as name -> (weight, the dataset's own config fields)."""
    specs = {}
    for name, spec in (plain(cfg.datasets) or {}).items():
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"datasets.{name}={spec!r}: must be a mapping ({{weight: ..., <config fields>}})")
        fields = dict(spec or {})
        weight = fields.pop("weight", 1.0)
        try:
            specs[str(name)] = (float(weight), fields)
        except (TypeError, ValueError):
            raise ValueError(f"datasets.{name}.weight={weight!r}: must be a number") from None
    return specs


def get_dataset(name: str, seed: int, size: int, fields: dict[str, Any]):
    """reasoning-gym's dataset `name` with these settings, built once per process."""
    key = json.dumps([name, seed, size, fields], sort_keys=True, default=repr)
    if key not in _DATASETS:
        import reasoning_gym

        _DATASETS[key] = reasoning_gym.create_dataset(name, **{**fields, "seed": seed, "size": size})
    return _DATASETS[key]


def _train_settings(fields: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """(seed, size, other fields) of a dataset's training pool."""
    rest = {k: v for k, v in fields.items() if k not in ("seed", "size")}
    seed, size = fields.get("seed"), fields.get("size")
    return int(TRAIN_SEED if seed is None else seed), int(TRAIN_SIZE if size is None else size), rest


def extract(completion: str, answer_format: str) -> str | None:
    """The answer a completion gives: see the module docstring (None: it gives none)."""
    completion = cut_at_eos(completion)
    if answer_format == "answer_tag":
        from reasoning_gym.utils import extract_answer

        return extract_answer(completion, tag_name="answer", strip=True)
    return completion.strip()


class ReasoningGym(Environment):
    name = "reasoning_gym"
    reward_names = ("score",)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Every dataset exists and takes the fields given, with valid values (nothing is built)."""
        import reasoning_gym.factory

        specs = dataset_specs(cfg)
        if not specs:
            raise ValueError("datasets: name at least one reasoning-gym dataset, e.g. "
                             "datasets: {spell_backward: {max_word_len: 6}}")  # fmt: skip
        known = sorted(reasoning_gym.factory.DATASETS)
        for name, (weight, fields) in specs.items():
            if name not in reasoning_gym.factory.DATASETS:
                raise ValueError(f"datasets.{name}: no such reasoning-gym dataset; there are: {', '.join(known)}")
            if name == "composite":
                raise ValueError("datasets.composite: name each dataset under `datasets` instead, with its weight")
            if not weight > 0:
                raise ValueError(f"datasets.{name}.weight={weight}: must be > 0")
            _, config_cls = reasoning_gym.factory.DATASETS[name]
            try:
                seed, size, rest = _train_settings(fields)
            except (TypeError, ValueError):
                raise ValueError(f"datasets.{name}: seed={fields.get('seed')!r}, size={fields.get('size')!r}: "
                                 "must be integers") from None
            try:
                config = config_cls(**rest, seed=seed, size=size)
            except TypeError as exc:  # an unknown field: the dataclass names it
                accepted = list(getattr(config_cls, "__dataclass_fields__", {}))
                raise ValueError(f"datasets.{name}: {exc}; {name} takes: weight, {', '.join(accepted)}") from None
            validate = getattr(config, "validate", None)
            if callable(validate):
                try:
                    validate()
                except (AssertionError, ValueError, TypeError) as exc:
                    raise ValueError(f"datasets.{name}: {exc or 'invalid settings'} ({rest})") from None

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.answer_format = str(cfg.answer_format)
        self.specs = dataset_specs(cfg)
        if not self.specs:
            raise ValueError("reasoning_gym: task.datasets names no dataset")
        self.names = list(self.specs)
        self.weights = [weight for weight, _ in self.specs.values()]
        self.reward_fns = {self.reward_names[0]: self.score_fn}
        self._eval = self._make_eval_set(int(cfg.num_eval_prompts))
        self._held_out = {ex.info["entry"]["question"] for ex in self._eval}
        self._warned: set[str] = set()

    @property
    def library_loggers(self) -> list[str]:
        return ["reasoning_gym"]

    def train_dataset(self, name: str):
        seed, size, rest = _train_settings(self.specs[name][1])
        return get_dataset(name, seed, size, rest)

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        if split == "eval":
            return self._eval[:n]
        if split != "train":
            raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
        examples = []
        for _ in range(n):
            name = rng.choices(self.names, weights=self.weights)[0]
            dataset = self.train_dataset(name)
            for _ in range(_MAX_REDRAWS):
                index = rng.randrange(len(dataset))
                entry = dataset[index]
                if entry["question"] not in self._held_out:
                    break
            else:
                self._warn_starved(name)
            examples.append(self.make_example(name, index, entry, "train"))
        return examples

    def score_fn(self, completion: str, example: Example) -> float:
        """The dataset's own score of the extracted answer; no answer scores 0."""
        answer = extract(completion, self.answer_format)
        if answer is None:
            return 0.0
        return float(self.train_dataset(example.info["dataset"]).score_answer(answer, example.info["entry"]))

    def make_example(self, name: str, index: int, entry: dict[str, Any], split: str) -> Example:
        question, answer = str(entry["question"]), str(entry["answer"])
        messages = [{"role": "user", "content": question}]
        if self.answer_format == "answer_tag":
            from reasoning_gym.utils import SYSTEM_PROMPTS

            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS["direct"]})
            answer = f"<answer>{answer}</answer>"
        return Example(prompt=question + SEPARATOR, answer=answer, messages=messages,
                       info={"dataset": name, "index": index, "split": split, "entry": entry})  # fmt: skip

    def _make_eval_set(self, size: int) -> list[Example]:
        """The held-out set: items 0, 1, ... of each dataset built with EVAL_SEED, datasets drawn
        by weight from a fixed random source; a repeated question is skipped while others come."""
        rng = random.Random(EVAL_SEED)
        pool_size = 100 + 10 * size  # items of each held-out dataset to go through
        datasets = {name: get_dataset(name, EVAL_SEED, pool_size, _train_settings(fields)[2])
                    for name, (_, fields) in self.specs.items()}  # fmt: skip
        next_index = dict.fromkeys(self.names, 0)
        examples: list[Example] = []
        seen: set[str] = set()
        while len(examples) < size:
            name = rng.choices(self.names, weights=self.weights)[0]
            index = next_index[name]
            next_index[name] += 1
            entry = datasets[name][index % pool_size]
            if entry["question"] in seen and index < pool_size:
                continue
            seen.add(entry["question"])
            examples.append(self.make_example(name, index % pool_size, entry, "eval"))
        return examples

    def _warn_starved(self, name: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"reasoning_gym: {_MAX_REDRAWS} training items of {name!r} in a row were held-out "
                          "questions; taking such items (lower num_eval_prompts or widen the dataset)",
                          stacklevel=2)  # fmt: skip
