"""The trainer's ranks: joining torchrun's process group and the few collectives the loop needs.

One process without torchrun is world 1 and every helper is then free (no collective).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def init_distributed(device: str) -> Ranks:
    """Join torchrun's process group (gloo on cpu, nccl on cuda); one process without torchrun."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu")
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Ranks(rank, world, local_rank, dev)


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when `flag` is true on any (one small all_reduce)."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ranks.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_ranks(value: float, ranks: Ranks) -> float:
    """`value` summed over all ranks (one small all_reduce)."""
    if ranks.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def gather_token_values(values: dict[str, list[torch.Tensor]], ranks: Ranks) -> dict[str, torch.Tensor]:
    """`forward_backward`'s per-token values of every rank, concatenated (rank order) on rank 0.

    Other ranks get {}. Two collectives (the counts, then the values padded to the largest
    count), on every rank together: call it on the same steps everywhere.
    """
    names = sorted(values)
    local = torch.stack([torch.cat(values[name]).float() for name in names])  # [K, n]: every rank the same K
    if ranks.world == 1:
        return {name: row.cpu() for name, row in zip(names, local)}
    counts = [torch.zeros(1, dtype=torch.long, device=ranks.device) for _ in range(ranks.world)]
    dist.all_gather(counts, torch.tensor([local.shape[1]], dtype=torch.long, device=ranks.device))
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((len(names), max(sizes)), device=ranks.device)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(ranks.world)] if ranks.rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if ranks.rank != 0:
        return {}
    merged = torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1).cpu()
    return dict(zip(names, merged))


def run_ranked_job(job: str, prog: str, description: str, argv: list[str] | None, make: Callable[..., Any],
                   num_threads: Callable[[Any], int]) -> int:  # fmt: skip
    """The entrypoint of a job with ranks (`trainer`, `sft`): its config, its log per rank, the
    process group, `make(cfg, run_dir, stop, ranks).run()`, a clean stop on every rank together.

    Exit code 0 when done or stopped (SIGTERM / SIGINT), `EXIT_DOCTOR` when the run doctor
    stopped it, 1 on an error (logged with its traceback).
    """
    from rlrun.job import StopFlag, StopRequested, load_job_config, parse_job_args
    from rlrun.launcher.node import record_rank
    from rlrun.log import setup_logger
    from rlrun.rundir import job_log

    stop = StopFlag().install()
    args = parse_job_args(prog, description, argv)
    cfg = load_job_config(args, prog)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else Path(args.config).resolve().parent
    rank = int(os.environ.get("RANK", "0"))
    log = setup_logger(cfg.log_level, job_log(run_dir, job, rank), job=f"{job}[{rank}]")
    node = record_rank(run_dir, job, rank)  # deployment=slurm: the parent can tell which node a rank ran on
    if node is not None:
        log.info(f"{job} rank {rank} on node {node} (SLURMD_NODENAME={os.environ.get('SLURMD_NODENAME')}, "
                 f"pid {os.getpid()})")  # fmt: skip
    torch.set_num_threads(num_threads(cfg))
    ranks = Ranks()
    code = 0
    try:
        ranks = init_distributed(cfg.trainer.device)
        make(cfg, run_dir, stop, ranks).run()
        barrier(ranks)
    except StopRequested as stopped:
        log.info(f"{stopped}; {job} exiting cleanly")
        barrier(ranks)  # every rank agreed to stop at the same step
        code = stop.exit_code()
    except Exception:
        log.exception(f"{job} failed")
        code = 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code
