"""Weights for inference and resumable checkpoints, written atomically into the run directory.

- `weights/step_<n>/`: the policy after n updates, for inference (newest `trainer.keep_last` kept);
- `checkpoints/step_<n>/`: model.safetensors, optimizer.pt and state.json (the tracker run
  ids), the newest `CHECKPOINTS_KEPT` kept. Only rank 0 writes either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlrun.rundir import latest_step, prune, publish_dir, read_json, staging_dir, step_dir, write_json

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINTS_KEPT = 2


def publish_weights(model: torch.nn.Module, run_dir: Path, step: int, keep_last: int, dtype: str | None = None) -> Path:
    """`weights/step_<step>/` for inference (atomic), its floating tensors in `dtype` (inference's;
    None: as the model holds them), then drop all but the newest `keep_last`."""
    from rlrun.model import save_weights

    out = save_weights(model, step_dir(run_dir / "weights", step), metadata={"step": str(step)}, dtype=dtype)
    prune(run_dir / "weights", keep_last)  # keep_last >= 2 (validated): the newest always stays
    return out


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """`checkpoints/step_<step>/`: model.safetensors, optimizer.pt, state.json; newest two kept."""
    from rlrun.model import save_weights

    final = step_dir(run_dir / "checkpoints", step)
    tmp = staging_dir(final)
    save_weights(model, tmp, metadata={"step": str(step)})  # replaces the empty staging folder
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_json(tmp / STATE_FILE, {"step": step, **state})
    publish_dir(tmp, final)
    prune(run_dir / "checkpoints", CHECKPOINTS_KEPT)
    return final


def load_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any] | None:
    """Restore the newest checkpoint into `model` and `optimizer`; its state.json, or None."""
    from rlrun.model import load_weights

    step = latest_step(run_dir / "checkpoints")
    if step is None:
        return None
    folder = step_dir(run_dir / "checkpoints", step)
    load_weights(model, folder)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True))
    state = read_json(folder / STATE_FILE)
    state["step"] = step  # the folder name is what the parent and the orchestrator go by
    return state
