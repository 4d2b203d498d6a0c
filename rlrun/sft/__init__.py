"""The SFT job: supervised fine-tuning on prompt/completion pairs, before RL or on its own.

- `loop.py`: `SftTrainer`, set-up and the step loop (`SftTrainer.step` reads top to bottom).
- `data.py`: the pairs: the task's reference answers, or a jsonl of `{"prompt", "completion"}`.
- `config.py`: the `sft` config group's schema.
- `python -m rlrun.sft --config <run>/config.yaml`: the entrypoint, under `torchrun` for
  several ranks. As a stage of a run (`sft.max_steps > 0`) the parent starts it before RL,
  and RL starts from the weights it leaves in `<run>/sft/model`.

Importing this package imports nothing heavy (no torch).
"""

from pathlib import Path

SFT_OPTIMIZER_FILE = "optimizer.pt"  # AdamW's state at the end of SFT, beside the model


def sft_model_dir(run_dir: str | Path) -> Path:
    """Where the SFT stage leaves the policy (the model RL then starts from)."""
    return Path(run_dir) / "sft" / "model"
