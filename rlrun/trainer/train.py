"""The trainer loop: one GRPO step per batch the orchestrator writes, weights back out.

Per step `n` (from 1, or from the newest checkpoint + 1):

1. wait for `rollouts/step_<n>/` (a stop signal ends the wait on every rank together),
2. each rank takes its rows (`i % world == rank`) and computes, in one forward pass (or a
   few micro-batches), `log_softmax(logits / temperature)` of every completion token,
   the same distribution the sampler recorded in `old_logprobs`, then the loss
   (`rlrun.trainer.loss.grpo_loss`) and its gradient (DDP averages it across ranks),
3. clip the gradient norm and take an AdamW step,
4. rank 0 writes `weights/step_<n>/` for inference (keeping the newest `trainer.keep_last`)
   and, every `trainer.checkpoint_interval` steps and at the last, `checkpoints/step_<n>/`
   (weights, optimizer state, `state.json`), keeping the newest two,
5. every rank logs the step's metrics (one collective reduces them across ranks); every
   `trainer.log_extras.interval` steps, with `log_extras.distributions`, the per-token
   entropy, importance ratio and loss of every masked token of the whole batch (gathered
   from all ranks onto rank 0, which logs them) as `distributions/<name>`. Other steps keep
   no per-token values at all.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlrun.batch import batch_ready, read_batch
from rlrun.job import StopFlag, StopRequested
from rlrun.rundir import latest_step, prune, publish_dir, read_json, staging_dir, step_dir, wait_for, write_json
from rlrun.trainer.loss import grpo_loss

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINTS_KEPT = 2
# Metrics that are not a mean over ranks (timings `time/*` reduce with max by default).
REDUCTIONS = {
    "clip_ratio/low_min": "min",
    "clip_ratio/high_max": "max",
    "num_loss_tokens": "sum",
    "tokens/s": "sum",
}


# ---------------------------------------------------------------- ranks


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


# ---------------------------------------------------------------- the step


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token t) under `log_softmax(logits[t-1] / temperature)`, and the entropy there.

    Both [B, T-1]: column j is about token j+1 (the logits at j predict it), so they line
    up with `loss_mask[:, 1:]` and `old_logprobs[:, 1:]`. The entropy carries no gradient.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [B, T-1, V]
    token_lp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():  # H = -sum_v p log p, one [B, T-1, V] buffer; 0 log 0 = 0
        entropy = -logp.exp().mul_(logp).nan_to_num_(0.0).sum(-1)
    return token_lp, entropy


def forward_backward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float = 0.0,
    ref_model: torch.nn.Module | None = None,
    micro_batch_size: int | None = None,
    loss_tokens: float | None = None,
    token_values: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Accumulate the gradient of this rank's rows' loss; its stats (token means over the rows).

    The loss is a sum over tokens divided by `loss_tokens` (default: this rank's token
    count). With several ranks, pass the mean count per rank (total / world): DDP averages
    gradients over ranks, so the gradient is then the token mean over the whole batch,
    exactly as in one process. Micro-batches weigh their token means by their share of the
    tokens, so they change nothing but memory; DDP syncs gradients on the last one only.

    `token_values` (pass `{}` on steps that log distributions, else None): gets the masked
    tokens' `entropy`, `importance_ratio` and `per_token_loss` appended per micro-batch as
    detached 1-D tensors on the model's device; None keeps nothing beyond the scalars.
    """
    rows = batch["input_ids"].shape[0]
    size = micro_batch_size or rows
    starts = list(range(0, rows, size))
    rank_tokens = float(batch["loss_mask"][:, 1:].sum().clamp(min=1))
    loss_tokens = loss_tokens or rank_tokens
    sums: dict[str, float] = {}
    for i, start in enumerate(starts):
        mb = {k: v[start : start + size] for k, v in batch.items()}
        mask = mb["loss_mask"][:, 1:]
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if no_sync is not None and i < len(starts) - 1 else nullcontext():
            logprobs, entropy = token_logprobs(model, mb["input_ids"], mb["attention_mask"], temperature)
            ref_logprobs = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logprobs, _ = token_logprobs(ref_model, mb["input_ids"], mb["attention_mask"], temperature)
            loss, stats = grpo_loss(
                logprobs, mb["old_logprobs"][:, 1:], mb["advantages"], mask,
                clip_eps_low, clip_eps_high, ref_logprobs, kl_coef, token_values,
            )  # fmt: skip
            mb_tokens = float(mask.sum())
            (loss * (mb_tokens / loss_tokens)).backward()
        # `loss` as a share of the whole batch's token mean: the mean over ranks is that mean.
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * mb_tokens / loss_tokens
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        if token_values is not None:
            token_values.setdefault("entropy", []).append(entropy[mask > 0])
        for name, value in stats.items():  # this rank's token means
            sums[name] = sums.get(name, 0.0) + float(value) * mb_tokens / rank_tokens
    sums["num_loss_tokens"] = float(batch["loss_mask"][:, 1:].sum())
    return sums


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


# ---------------------------------------------------------------- weights and checkpoints


def publish_weights(model: torch.nn.Module, run_dir: Path, step: int, keep_last: int) -> Path:
    """`weights/step_<step>/` for inference (atomic), then drop all but the newest `keep_last`."""
    from rlrun.model import save_weights

    out = save_weights(model, step_dir(run_dir / "weights", step), metadata={"step": str(step)})
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


# ---------------------------------------------------------------- the loop


def run(cfg: Any, run_dir: Path, stop: StopFlag, ranks: Ranks) -> None:
    """Train steps `start..cfg.max_steps`; raises StopRequested on a stop signal."""
    from rlrun.log import get_logger
    from rlrun.model import load_model, resolve_model_path
    from rlrun.tracking import Tracker

    log = get_logger()
    tcfg = cfg.trainer
    rank, world, device = ranks.rank, ranks.world, ranks.device
    torch.manual_seed(cfg.seed)

    # Rank 0 first: with model=tiny it builds <run>/model when the parent has not.
    if rank == 0:
        model_path = resolve_model_path(cfg.model, run_dir, cfg.seed)
    barrier(ranks)
    if rank != 0:
        model_path = resolve_model_path(cfg.model, run_dir, cfg.seed)
    model, _ = load_model(model_path, cfg.model.dtype, str(device), cfg.model.trust_remote_code)
    model.train()
    ref_model = None
    if tcfg.kl_coef > 0:
        ref_model, _ = load_model(model_path, cfg.model.dtype, str(device), cfg.model.trust_remote_code)
        ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    state = load_checkpoint(run_dir, model, optimizer, device) or {}
    start = int(state.get("step", 0)) + 1
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    micro_batch_size = tcfg.micro_batch_size

    xcfg = tcfg.log_extras  # the trainer logs distributions only (samples are the orchestrator's)
    resume_ids = {k: state[k] for k in ("wandb_run_id", "mlflow_run_id") if state.get(k)}
    tracker = Tracker(cfg.logger, job="trainer", output_dir=run_dir, run_name=cfg.name, resume_ids=resume_ids,
                      max_table_rows=xcfg.max_rows)  # fmt: skip
    try:
        if start == 1:
            tracker.log_hyperparams(cfg)
        else:
            log.info(f"resumed from checkpoints/step_{start - 1}")
            if rank == 0:  # the parent removed newer weights; the orchestrator syncs to these
                publish_weights(model, run_dir, start - 1, tcfg.keep_last)
        log.info(
            f"trainer rank {rank}/{world} on {device}: {model_path}, steps {start}..{cfg.max_steps}, "
            f"lr {tcfg.lr}, clip [{1 - tcfg.clip_eps_low:.2f}, {1 + tcfg.clip_eps_high:.2f}], kl_coef {tcfg.kl_coef}"
        )

        for step in range(start, cfg.max_steps + 1):
            step_start = time.perf_counter()
            with tracker.timer("wait_for_batch"):
                wait_for(lambda: bool(stop) or batch_ready(run_dir, step), f"rollouts/step_{step}")
                if any_rank(bool(stop), ranks):  # every rank stops at the same point
                    raise StopRequested(f"stopped by signal {stop.signal} while waiting for step {step}")
            tensors, meta = read_batch(run_dir, step)
            rows = tensors["input_ids"].shape[0]
            if rows < world:
                raise ValueError(f"rollouts/step_{step} has {rows} rows, fewer than the {world} trainer ranks")
            batch = {k: v[rank::world].to(device) for k, v in tensors.items()}  # rows i % world == rank
            temperature = float(meta.get("temperature", cfg.orchestrator.temperature))
            temperature = temperature if temperature > 0 else 1.0  # greedy sampling records T=1 logprobs

            # Per-token values only on steps that log them: otherwise nothing extra is kept.
            token_values = {} if xcfg.distributions and step % xcfg.interval == 0 else None
            with tracker.timer("forward_backward") as fwd_bwd:
                tokens_per_rank = sum_ranks(float(batch["loss_mask"][:, 1:].sum()), ranks) / world
                stats = forward_backward(
                    model, batch, temperature, tcfg.clip_eps_low, tcfg.clip_eps_high,
                    tcfg.kl_coef, ref_model, micro_batch_size, loss_tokens=max(tokens_per_rank, 1.0),
                    token_values=token_values,
                )  # fmt: skip
            with tracker.timer("optimizer_step") as opt_step:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm))
                if math.isfinite(grad_norm):
                    optimizer.step()
                else:  # gradients are identical on every rank after DDP, so all skip together
                    log.warning(f"step {step}: gradient norm is {grad_norm}; skipping the update")
                optimizer.zero_grad(set_to_none=True)

            with tracker.timer("save_weights"):
                if rank == 0:
                    publish_weights(model, run_dir, step, tcfg.keep_last)
            if tcfg.checkpoint_interval > 0 and (step % tcfg.checkpoint_interval == 0 or step == cfg.max_steps):
                with tracker.timer("checkpoint"):
                    if rank == 0:
                        save_checkpoint(run_dir, step, model, optimizer, tracker.run_identity())

            compute_s = fwd_bwd.seconds + opt_step.seconds
            metrics = {
                **stats,
                "grad_norm": grad_norm,
                "lr": optimizer.param_groups[0]["lr"],
                "tokens/s": stats["num_loss_tokens"] / max(compute_s, 1e-9),
                "policy_lag": float(step - 1 - int(meta.get("policy_version", step - 1))),
                "time/step": time.perf_counter() - step_start,
            }
            m = tracker.log_metrics(metrics, step, REDUCTIONS)
            if token_values is not None:  # the whole batch's tokens, from every rank; rank 0 logs
                for name, values in gather_token_values(token_values, ranks).items():
                    tracker.log_distribution(f"distributions/{name}", values, step)
            kl = f" | kl {m['kl']:.4f}" if "kl" in m else ""
            log.info(
                f"step {step}/{cfg.max_steps} | loss {m['loss']:+.4f} | grad_norm {m['grad_norm']:.3f} | "
                f"entropy {m['entropy']:.3f} | clipped {m['clip_ratio/region_mean']:.3f}{kl} | "
                f"tokens {m['num_loss_tokens']:.0f} | policy_lag {m['policy_lag']:.0f} | "
                f"wait {m['time/wait_for_batch']:.2f}s | train {m['time/forward_backward']:.2f}s"
            )
        log.info(f"trainer done: {cfg.max_steps} steps")
    finally:
        tracker.finish()
