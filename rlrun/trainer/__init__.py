"""The trainer job: reads each step's batch, takes a GRPO step, writes weights and checkpoints.

- `loop.py`: `Trainer`, set-up and the step loop (`Trainer.step` reads top to bottom).
- `step.py`: one rank's forward and backward; `loss.py`: the clipped policy-gradient loss.
- `dist.py`: ranks and collectives; `checkpoint.py`: weights for inference, resumable checkpoints.
- `python -m rlrun.trainer --config <run>/config.yaml [key=value ...]`: the entrypoint,
  under `torchrun` for several ranks.

Importing this package imports nothing heavy (no torch): the parent only needs its name.
"""
