"""Schema of the `orchestrator` group."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlrun.schema import checked
from rlrun.tracking.config import JobLogExtrasConfig

SCALE_REWARDS = ("group", "batch", "none")  # TRL's scale_rewards; see rlrun/orchestrator/rollout.py


@dataclass
class OrchestratorConfig:
    batch_size: int = checked(16, gt=0)  # prompts per step
    group_size: int = checked(8, gt=0)  # completions per prompt
    max_tokens: int = checked(12, gt=0)
    temperature: float = checked(1.0, gt=0)
    allow_special_tokens: bool = False  # false: the sampler never emits a special token other than EOS
    scale_rewards: str = checked("group", one_of=SCALE_REWARDS)  # advantages divided by the group's / batch's std, or not
    max_async_steps: int = checked(1, ge=0)  # how many steps generation may run ahead of training
    keep_last: int = checked(3, ge=1)  # rollouts/step_<n> kept on disk
    request_timeout_s: float = 300.0
    eval_interval: int = checked(50, ge=0)  # steps between evaluations on held-out prompts (and at the end); 0: off
    num_val_samples_to_print: int = checked(4, ge=0)  # evaluation samples shown as a table in the log
    # n > 1: n sampled completions per held-out prompt too -> eval/avg@n and eval/pass@k (k <= n)
    eval_samples_per_prompt: int = checked(1, gt=0)
    eval_pass_k: list[int] = field(default_factory=lambda: [1, 4, 8])
    log_extras: JobLogExtrasConfig = field(default_factory=JobLogExtrasConfig)
