"""The trainer job: reads each step's batch, takes a GRPO step, writes weights and checkpoints.

- `rlrun.trainer.loss`: the clipped policy-gradient loss, one function with the math visible.
- `rlrun.trainer.train`: the training loop (ranks, resume, the step, weights and checkpoints).
- `python -m rlrun.trainer --config <run>/config.yaml [key=value ...]`: the entrypoint,
  under `torchrun` for several ranks.

Importing this package imports nothing heavy (no torch): the parent only needs its name.
"""
