"""SFT pairs as token ids: the task's prompts with their reference answers, or a jsonl file.

A completion is trained on up to and including EOS, so the policy learns where to stop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlrun.model import encode_example


def tokenize_pair(tokenizer: Any, prompt: Any, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids as sampling sees them, completion ids + EOS); `prompt`: text or a task Example."""
    ids = tokenizer.encode(completion, add_special_tokens=False)
    return encode_example(tokenizer, prompt), [*ids, int(tokenizer.eos_token_id)]


def read_jsonl_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Every `{"prompt": ..., "completion": ...}` line of a jsonl file; a bad line is an error naming it."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((str(record["prompt"]), str(record["completion"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a {{'prompt', 'completion'}} record ({exc})") from None
    if not pairs:
        raise ValueError(f"{path}: no prompt/completion pairs")
    return pairs


def batches(env: Any, data: str | None, batch_size: int, seed: int) -> Iterator[list[tuple[Any, str]]]:
    """Endless batches of (prompt, completion): fresh task examples (the Example itself as the
    prompt, for its chat messages), or the file's text pairs shuffled per epoch."""
    rng = random.Random(f"{seed}/sft")
    if data is None:
        while True:
            examples = env.sample(rng, batch_size)
            if missing := sorted({ex.env or env.name for ex in examples if not ex.answer}):
                raise ValueError(f"environment(s) {missing} give no reference answers to train on; "
                                 "give the SFT stage sft.data=<a jsonl of prompt/completion pairs>")
            yield [(ex, ex.answer) for ex in examples]
    pairs = read_jsonl_pairs(data)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = rng.sample(range(len(pairs)), len(pairs))
            batch.append(pairs[order.pop()])
        yield batch
