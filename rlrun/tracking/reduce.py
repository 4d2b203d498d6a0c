"""Reduce a step's metrics across ranks with ONE collective.

Each rank packs its values into one float64 tensor; a single all_gather brings every
rank's tensor to every rank, and each metric is then reduced locally with its declared
reduction (mean, max, min, sum). The first element is a checksum of the metric names so
ranks that logged different keys fail loudly instead of mixing values.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping

REDUCTIONS = ("mean", "max", "min", "sum")


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
    if "torch.distributed" not in sys.modules:  # no process group can exist: skip importing torch
        return {k: float(v) for k, v in metrics.items()}
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {k: float(v) for k, v in metrics.items()}

    keys = sorted(metrics)
    checksum = float(zlib.crc32("\0".join(keys).encode()))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.tensor([checksum] + [float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()  # [world, 1 + n]
    if not bool((table[:, 0] == checksum).all()):
        raise RuntimeError(f"ranks logged different metric names at this step (rank {dist.get_rank()} has {keys})")
    out: dict[str, float] = {}
    for i, key in enumerate(keys, start=1):
        column = table[:, i]
        op = reductions.get(key) or default_reduction(key)
        value = {"mean": column.mean, "max": column.max, "min": column.min, "sum": column.sum}[op]()
        out[key] = float(value)
    return out
