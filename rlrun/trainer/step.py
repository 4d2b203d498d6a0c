"""One GRPO step's math on one rank: token logprobs, the loss and its gradient, per micro-batch."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from rlrun.trainer.loss import mismatch_stats, normalizer, per_token_loss, reduce_loss


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    logit_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token t) under `log_softmax((logits[t-1] + logit_bias) / temperature)`, and the entropy there.

    `logit_bias` [V] is the sampler's (`rlrun.model.bias_tensor`): the distribution it sampled from.
    `compute_dtype` (`precision.compute_dtype`): the forward runs under autocast in it; the
    softmax is taken in fp32 either way.

    Both [B, T-1]: column j is about token j+1 (the logits at j predict it), so they line
    up with `loss_mask[:, 1:]` and `old_logprobs[:, 1:]`. The entropy carries no gradient.
    """
    with torch.autocast(input_ids.device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    if logit_bias is not None:
        logits = logits + logit_bias
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, T-1, V]
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
    loss_type: str = "dapo",
    max_tokens: int | None = None,
    logit_bias: torch.Tensor | None = None,
    is_correction: str = "none",
    is_cap: float = 2.0,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Accumulate the gradient of this rank's rows' loss; its stats (token means over the rows).

    The loss is `loss.reduce_loss` over each micro-batch divided by `loss.normalizer`, whose
    denominators are this rank's whole batch: micro-batches change nothing but memory, and
    DDP syncs gradients on the last one only. For `dapo` / `cispo` pass `loss_tokens`, the
    mean token count per rank (total / world; default: this rank's): DDP averages gradients
    over ranks, so the gradient is then the token mean over the whole batch, exactly as in
    one process. `max_tokens` (the longest completion allowed) is what `dr_grpo` divides by.

    `token_values` (pass `{}` on steps that log distributions, else None): gets the masked
    tokens' `entropy`, `importance_ratio` and `per_token_loss` appended per micro-batch as
    detached 1-D tensors on the model's device; None keeps nothing beyond the scalars.

    `compute_dtype`: the forwards' autocast dtype (None: the weights' own); the loss, its
    reduction and the mismatch stats are fp32 either way.

    The `mismatch/*` stats (`loss.mismatch_stats`) compare this forward's logprobs (the weights
    at the start of the step) with the sampler's, over all of this rank's rows.
    """
    rows = batch["input_ids"].shape[0]
    size = micro_batch_size or rows
    starts = list(range(0, rows, size))
    rank_tokens = float(batch["loss_mask"][:, 1:].sum().clamp(min=1))
    denominator = normalizer(loss_type, batch_tokens=loss_tokens or rank_tokens, rank_tokens=rank_tokens,
                             rank_rows=rows, max_tokens=max_tokens or batch["input_ids"].shape[1])  # fmt: skip
    sums: dict[str, float] = {}
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (logprobs, sampler's, mask) per micro-batch
    for i, start in enumerate(starts):
        mb = {k: v[start : start + size] for k, v in batch.items()}
        mask = mb["loss_mask"][:, 1:]
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if no_sync is not None and i < len(starts) - 1 else nullcontext():
            logprobs, entropy = token_logprobs(model, mb["input_ids"], mb["attention_mask"], temperature, logit_bias,
                                               compute_dtype)  # fmt: skip
            ref_logprobs = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logprobs, _ = token_logprobs(ref_model, mb["input_ids"], mb["attention_mask"], temperature,
                                                     logit_bias, compute_dtype)  # fmt: skip
            per_token, stats = per_token_loss(
                logprobs, mb["old_logprobs"][:, 1:], mb["advantages"], mask, loss_type,
                clip_eps_low, clip_eps_high, ref_logprobs, kl_coef, token_values, is_correction, is_cap,
            )  # fmt: skip
            seen.append((logprobs.detach(), mb["old_logprobs"][:, 1:], mask))
            loss = reduce_loss(per_token, mask, loss_type) / denominator
            loss.backward()
        mb_tokens = float(mask.sum())
        # This micro-batch's share of the rank's loss: the mean over ranks is the batch's loss.
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        if token_values is not None:
            token_values.setdefault("entropy", []).append(entropy[mask > 0])
        for name, value in stats.items():  # this rank's token means
            sums[name] = sums.get(name, 0.0) + float(value) * mb_tokens / rank_tokens
    sums["num_loss_tokens"] = float(batch["loss_mask"][:, 1:].sum())
    sums.update(mismatch_stats(*(torch.cat(parts) for parts in zip(*seen))))
    return sums



def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, log: Any,
                   step: int) -> float:  # fmt: skip
    """Clip the gradient, step (unless its norm is not finite), zero it; the norm before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    if math.isfinite(grad_norm):
        optimizer.step()
    else:  # gradients are identical on every rank after DDP, so all skip together
        log.warning(f"step {step}: gradient norm is {grad_norm}; skipping the update")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
