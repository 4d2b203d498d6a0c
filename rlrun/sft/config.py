"""Schema of the `sft` group: a supervised warm-up before RL (0 steps: none)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlrun.schema import checked


@dataclass
class SftConfig:
    max_steps: int = checked(0, ge=0)  # 0: no SFT stage; RL starts from the model as it is
    lr: float = checked(1e-3, gt=0)
    batch_size: int = checked(64, gt=0)  # prompt/completion pairs per step, over every rank
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_ranks: int = checked(1, gt=0)
    # A jsonl of {"prompt": ..., "completion": ...} lines; None: the task's own prompts and
    # reference answers (each completion ends with the tokenizer's EOS).
    data: Optional[str] = None
    eval_interval: int = checked(50, ge=0)  # greedy evaluation on the task's held-out prompts; 0: at the end only
    num_threads: int = 1  # torch intra-op threads per rank
