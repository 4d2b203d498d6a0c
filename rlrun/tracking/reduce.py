"""Reduce a step's metrics across ranks with ONE collective.

Each rank packs its values into one float64 tensor; a single all_gather brings every
rank's tensor to every rank, and each metric is then reduced locally with its declared
reduction (mean, max, min, sum). The first element is a checksum of the metric names so
ranks that logged different keys fail loudly instead of mixing values. The tensor is
padded to a multiple of `PAD` elements: ranks whose key counts differ (but stay within
one block) still send equal sizes, so they get that RuntimeError too, rather than a
collective size mismatch (gloo aborts the process; nccl's behaviour is undefined).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping
from typing import Any

REDUCTIONS = ("mean", "max", "min", "sum")
PAD = 64


def process_group() -> Any:
    """`torch.distributed` when a default process group is initialized, else None.

    Never imports torch, and never waits for it: while another thread (e.g. the TensorBoard
    writer) is importing torch, `torch.distributed` is already in sys.modules but not done,
    and `import torch.distributed` here would block on the import lock for as long as that
    import takes (seconds). A half-imported module has no process group yet, so it reads
    as None.
    """
    dist = sys.modules.get("torch.distributed")
    is_initialized = getattr(dist, "is_initialized", None)
    if is_initialized is None or not dist.is_available() or not is_initialized():
        return None
    return dist


def default_reduction(name: str) -> str:
    """Timings reduce with max (the slowest rank sets the step time); others with mean."""
    return "max" if name.startswith("time/") else "mean"


def reduce_metrics(
    metrics: Mapping[str, float], reductions: Mapping[str, str] | None = None
) -> dict[str, float]:
    """All ranks call this with the same keys; every rank gets the reduced values."""
    reductions = reductions or {}
    for name, op in reductions.items():
        if op not in REDUCTIONS:
            raise ValueError(f"metric {name!r}: unknown reduction {op!r}; use one of {REDUCTIONS}")
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return {k: float(v) for k, v in metrics.items()}
    import torch  # fully imported: a process group exists

    keys = sorted(metrics)
    checksum = float(zlib.crc32("\0".join(keys).encode()))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = [checksum] + [float(metrics[k]) for k in keys]
    values += [0.0] * (-len(values) % PAD)
    local = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()  # [world, 1 + n + padding]
    if not bool((table[:, 0] == checksum).all()):
        raise RuntimeError(f"ranks logged different metric names at this step (rank {dist.get_rank()} has {keys})")
    out: dict[str, float] = {}
    for i, key in enumerate(keys, start=1):
        column = table[:, i]
        op = reductions.get(key) or default_reduction(key)
        value = {"mean": column.mean, "max": column.max, "min": column.min, "sum": column.sum}[op]()
        out[key] = float(value)
    return out
