"""Schema of the `trainer` group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlrun.schema import checked
from rlrun.tracking.config import JobLogExtrasConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo")  # TRL's names; see rlrun/trainer/loss.py
# Importance-sampling correction of the sampler/trainer mismatch; see rlrun/trainer/loss.py.
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_mask")


@dataclass
class TrainerConfig:
    num_ranks: int = checked(1, gt=0)
    lr: float = checked(3e-3, gt=0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_coef: float = checked(0.0, ge=0)
    loss_type: str = checked("dapo", one_of=LOSS_TYPES)  # TRL's names: grpo, bnpo, dr_grpo, dapo, gspo, cispo
    mask_truncated_completions: bool = False  # no loss on completions cut off at max_tokens (DAPO, TRL)
    is_correction: str = checked("none", one_of=IS_CORRECTIONS)
    is_cap: float = checked(2.0, gt=1)  # TIS's cap on a token's weight; the masks keep ratios in [1/cap, cap]
    optimizer_from_sft: bool = True  # after an SFT stage, go on with its AdamW state (at trainer.lr)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    device: str = checked("cpu", one_of=("cpu", "cuda"))  # ranks use gloo on cpu, nccl on cuda
    checkpoint_interval: int = checked(20, ge=0)  # steps; 0 disables
    keep_last: int = checked(3, ge=2)  # weights/step_<n> kept on disk
    num_threads: int = 1  # torch intra-op threads per rank
    micro_batch_size: Optional[int] = None  # rows per forward/backward pass; None: the rank's whole batch
    log_extras: JobLogExtrasConfig = field(default_factory=JobLogExtrasConfig)
