"""Which GPUs this process may use: the one reader of `CUDA_VISIBLE_DEVICES`.

Imports no torch and no NVML: the parent, the sweep and the monitor all ask here.
"""

from __future__ import annotations

import os


def _valid(item: str) -> bool:
    return item.isdigit() or item.startswith(("GPU-", "MIG-"))


def cuda_visible_devices() -> list[str] | None:
    """The devices `CUDA_VISIBLE_DEVICES` names, in CUDA's order (None when it is unset).

    Ordinals (`0`) and UUIDs (`GPU-...`, `MIG-...`) as written; like CUDA, the list ends at
    the first entry that is neither (`-1` and `NoDevFiles` hide every GPU).
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    devices = []
    for item in (s.strip() for s in value.split(",")):
        if not _valid(item):
            break
        devices.append(item)
    return devices


def allocated_gpu_count() -> int | None:
    """GPUs visible to this process by its environment (CUDA, else Slurm); None: not said."""
    devices = cuda_visible_devices()
    if devices is not None:
        return len(devices)
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    return int(gpus) if gpus and gpus.isdigit() else None
