"""reverse_text: reverse a short random string.

Prompt: the string followed by `=`, e.g. `"abcd="`; answer: `"dcba"`; a perfect completion
is `dcba</s>`. Reward `lcs`: the longest-common-subsequence ratio
`2 * LCS(answer, completion) / (len(answer) + len(completion))`, in [0, 1]: 1 for the exact
reverse, 0 for an empty completion or one sharing no character in order. `exact`: 1 when the
completion, up to its end-of-sequence, is the reverse and nothing else. `reward` is their sum
(0..2; `task.reward_weights.<fn>` reweighs, e.g. `exact: 0` for the LCS ratio alone). Both see
the completion as emitted (special tokens as text), cut at the first EOS.
"""

from __future__ import annotations

import random
import string

from rlrun.envs.base import Environment, Example, cut_at_eos

SEPARATOR = "="
EVAL_SEED = 20_240_611  # the held-out set is the same for every run and seed


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def lcs_ratio(answer: str, completion: str) -> float:
    total = len(answer) + len(completion)
    return 2.0 * lcs_length(answer, completion) / total if total else 1.0


class ReverseText(Environment):
    name = "reverse_text"
    reward_names = ("lcs", "exact")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.max_chars < cfg.min_chars:
            raise ValueError(f"max_chars={cfg.max_chars}: must be >= min_chars ({cfg.min_chars})")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alphabet = str(cfg.alphabet)
        self.min_chars, self.max_chars = int(cfg.min_chars), int(cfg.max_chars)
        self.reward_fns = dict(zip(self.reward_names, (self.lcs, self.exact)))
        # Trailing whitespace is noise unless the alphabet itself has it.
        self._strip = "".join(c for c in string.whitespace if c not in self.alphabet)
        self._eval = self._make_eval_set(int(cfg.num_eval_prompts))
        eval_texts = {ex.info["text"] for ex in self._eval}
        space = sum(len(self.alphabet) ** k for k in range(self.min_chars, self.max_chars + 1))
        # Keep training strings off the held-out set when there is room to (else it would starve).
        self._held_out = eval_texts if space > 4 * len(eval_texts) else set()

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        if split == "eval":
            return self._eval[:n]
        if split != "train":
            raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
        examples = []
        while len(examples) < n:
            text = self._random_text(rng)
            if text not in self._held_out:
                examples.append(self._example(text))
        return examples

    def lcs(self, completion: str, example: Example) -> float:
        return lcs_ratio(example.answer, self._content(completion))

    def exact(self, completion: str, example: Example) -> float:
        return float(self._content(completion) == example.answer)

    def solved(self, scores, example=None) -> bool:
        return scores["exact"] == 1.0

    def _content(self, completion: str) -> str:
        """The completion up to its end of sequence (nothing after it counts), less trailing noise."""
        return cut_at_eos(completion).rstrip(self._strip)

    def _random_text(self, rng: random.Random) -> str:
        length = rng.randint(self.min_chars, self.max_chars)
        return "".join(rng.choice(self.alphabet) for _ in range(length))

    def _example(self, text: str) -> Example:
        return Example(prompt=text + SEPARATOR, answer=text[::-1], info={"text": text})

    def _make_eval_set(self, size: int) -> list[Example]:
        rng = random.Random(EVAL_SEED)
        return [self._example(self._random_text(rng)) for _ in range(size)]
