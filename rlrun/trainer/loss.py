"""The GRPO loss: a clipped importance ratio per token (DAPO's asymmetric clip), plus KL.

For each completion token t of sequence i, with A_i the sequence's group-relative advantage:

    ratio_t  = pi_theta(t) / pi_old(t) = exp(logprob_t - old_logprob_t)
    loss_t   = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)
             + kl_coef * (exp(ref_t - logprob_t) - (ref_t - logprob_t) - 1)   # k3 estimator
    loss     = sum_t loss_t * mask_t / sum_t mask_t                          # token-level mean

The clip stats follow TRL's GRPO trainer: `low` counts tokens whose ratio fell below
1 - eps_low where A < 0 (the update would push them further down and is clipped), `high`
tokens above 1 + eps_high where A > 0, `region` either; each is a fraction of the masked
tokens.

`token_values`, when given (a dict of lists, only on steps that log distributions), gets
the masked tokens' `importance_ratio` and `per_token_loss` appended as detached 1-D
tensors; without it nothing more is kept than the scalars.
"""

from __future__ import annotations

import torch


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    token_values: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise (a scalar) and detached stats; logprobs/masks [B, T], advantages [B].

    `ref_logprobs` adds `kl_coef` times the k3 KL to the reference and a `kl` stat.
    Positions outside `loss_mask` contribute nothing, not even NaN from padding logits.
    """
    mask = loss_mask > 0
    num_tokens = mask.sum().clamp(min=1)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0.0).sum() / num_tokens

    adv = advantages[:, None].to(logprobs.dtype)  # [B, 1]: every token of a sequence shares its advantage
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    per_token = -torch.min(unclipped, clipped)  # pessimistic: no gain from moving past the clip

    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        log_ref_ratio = torch.where(mask, ref_logprobs - logprobs, 0.0)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl).detach()

    loss = masked_mean(per_token)

    with torch.no_grad():
        low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
        high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
        low_frac, high_frac = masked_mean(low.float()), masked_mean(high.float())
        # This rank's fractions; the tracker's cross-rank reduction makes them mean / min / max.
        stats["clip_ratio/low_mean"] = low_frac
        stats["clip_ratio/low_min"] = low_frac
        stats["clip_ratio/high_mean"] = high_frac
        stats["clip_ratio/high_max"] = high_frac
        stats["clip_ratio/region_mean"] = masked_mean((low | high).float())
        if token_values is not None:
            token_values.setdefault("importance_ratio", []).append(ratio[mask])
            token_values.setdefault("per_token_loss", []).append(per_token.detach()[mask])
    return loss, stats
