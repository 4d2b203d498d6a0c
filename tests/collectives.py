"""Counting torch.distributed collectives: the proof of "one collective per step" (tests, benchmarks)."""

from __future__ import annotations

# Every torch.distributed collective, for `count_collectives`.
COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced", "all_reduce",
    "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "_all_gather_base", "_reduce_scatter_base",
)  # fmt: skip


def count_collectives(counts: dict[str, int]) -> None:
    """From now on, count this process's calls of every collective into `counts`.

    Wraps each function at `torch.distributed` and at `distributed_c10d`, so a collective is
    counted however it is reached; tests and benchmarks use it to prove one collective per step.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        real = getattr(c10d, name, None) or getattr(dist, name, None)
        if real is None:
            continue

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, spy)
