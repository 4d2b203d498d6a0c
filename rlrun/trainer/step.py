"""One GRPO step's math on one rank: token logprobs, the loss and its gradient, per micro-batch."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rlrun.trainer.loss import grpo_loss


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
