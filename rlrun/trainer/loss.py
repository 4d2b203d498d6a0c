"""The policy-gradient loss: TRL's GRPO loss types, with the math visible.

For each completion token t of sequence i, with A_i the sequence's advantage:

    ratio_t  = pi_theta(t) / pi_old(t) = exp(logprob_t - old_logprob_t)
    loss_t   = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)
             + kl_coef * (exp(ref_t - logprob_t) - (ref_t - logprob_t) - 1)   # k3 estimator

`trainer.loss_type` (TRL's names and semantics) changes two things:

- the ratio: `gspo` uses one ratio per sequence, exp(mean_t log ratio_t) (TRL's
  `importance_sampling_level="sequence"`); `cispo` drops the min/clip and weighs the
  log-probability by the truncated ratio, loss_t = -sg(min(ratio_t, 1 + eps_high)) * A_i * logprob_t
  (CISPO's upper truncation; our eps is relative to 1, as for the other types);
- how token losses become one number (`reduce_loss` over a micro-batch, divided by `normalizer`):
  `dapo` and `cispo` sum / tokens of the whole batch (every rank), `bnpo` sum / this rank's
  tokens, `grpo` and `gspo` the mean over sequences of each sequence's token mean, `dr_grpo`
  sum / (sequences * max completion length).

`trainer.is_correction` corrects for the sampler/trainer mismatch with the importance ratio
rho_t = exp(logprob_t - old_logprob_t) as measured by this forward (detached; old_logprob is
the sampler's): `token_truncate` (TIS) multiplies each token's loss by min(rho_t, cap) / rho_t,
so that a token's importance weight never exceeds `trainer.is_cap`; `token_mask` drops tokens
with rho_t outside [1/cap, cap]; `sequence_mask` drops whole sequences whose geometric-mean
rho is outside it. Dropped tokens still count in the normalizer (the rest are not up-weighted).
Stats `is/truncated_frac` (tokens with rho_t > cap under token_truncate) and `is/masked_frac`.

The clip stats follow TRL: `low` counts tokens whose ratio fell below 1 - eps_low where A < 0
(the update would push them further down and is clipped), `high` tokens above 1 + eps_high
where A > 0, `region` either; each a fraction of the masked tokens.

`token_values`, when given (a dict of lists, only on steps that log distributions), gets
the masked tokens' `importance_ratio` and `per_token_loss` appended as detached 1-D
tensors; without it nothing more is kept than the scalars.
"""

from __future__ import annotations

import torch

from rlrun.metric_names import MISMATCH_STATS
from rlrun.trainer.config import IS_CORRECTIONS, LOSS_TYPES

PER_SEQUENCE = ("grpo", "gspo")  # token means per sequence, then a mean over sequences


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_type: str = "dapo",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    token_values: dict[str, list[torch.Tensor]] | None = None,
    is_correction: str = "none",
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each token's loss [B, T] (0 outside `loss_mask`) and detached stats; advantages [B].

    `ref_logprobs` adds `kl_coef` times the k3 KL to the reference and a `kl` stat.
    Positions outside `loss_mask` contribute nothing, not even NaN from padding logits.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: must be one of {LOSS_TYPES}")
    if is_correction not in IS_CORRECTIONS:
        raise ValueError(f"is_correction={is_correction!r}: must be one of {IS_CORRECTIONS}")
    mask = loss_mask > 0
    num_tokens = mask.sum().clamp(min=1)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0.0).sum() / num_tokens

    adv = advantages[:, None].to(logprobs.dtype)  # [B, 1]: every token of a sequence shares its advantage
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    weight, is_stats = is_weights(log_ratio.detach(), mask, is_correction, is_cap)
    if loss_type == "gspo":  # one ratio per sequence: the geometric mean of its tokens' ratios
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logprobs)
    ratio = torch.exp(log_ratio)  # [B, T]
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1.0 + clip_eps_high).detach() * adv * logprobs
    else:
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
        per_token = -torch.min(unclipped, clipped)  # pessimistic: no gain from moving past the clip

    if weight is not None:
        per_token = per_token * weight
    stats: dict[str, torch.Tensor] = dict(is_stats)
    if ref_logprobs is not None:
        log_ref_ratio = torch.where(mask, ref_logprobs - logprobs, 0.0)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl).detach()
    per_token = torch.where(mask, per_token, 0.0)

    with torch.no_grad():
        low = (ratio < 1.0 - clip_eps_low) & (adv < 0) if loss_type != "cispo" else torch.zeros_like(mask)
        high = (ratio > 1.0 + clip_eps_high) & ((adv > 0) if loss_type != "cispo" else True)
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
    return per_token, stats


def is_weights(log_rho: torch.Tensor, mask: torch.Tensor, correction: str, cap: float
               ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-token loss weights [B, T] of `trainer.is_correction` (None for `none`) and their stats,
    from the detached log importance ratios (0 outside `mask`)."""
    if correction == "none":
        return None, {}
    n = mask.sum().clamp(min=1)
    rho = torch.exp(log_rho)
    if correction == "token_truncate":
        weight = torch.clamp(rho, max=cap) / rho
        return weight, {"is/truncated_frac": ((rho > cap) & mask).sum() / n}
    if correction == "token_mask":
        keep = (rho >= 1.0 / cap) & (rho <= cap)
    else:  # sequence_mask: the sequence's geometric-mean ratio
        seq = torch.exp(log_rho.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
        keep = ((seq >= 1.0 / cap) & (seq <= cap)).expand_as(mask)
    return keep.to(log_rho.dtype), {"is/masked_frac": (~keep & mask).sum() / n}


def mismatch_stats(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's token logprobs are from the sampler's, over the masked tokens.

    d_t = logprob_t - sampler_logprob_t. `mismatch/kl`: k3 estimate of KL(sampler || trainer),
    mean of exp(d) - 1 - d (tokens were drawn from the sampler); `logprob_diff_mean` / `_max`:
    |d|; `ppl_ratio`: the trainer's perplexity over the sampler's, exp(-mean d); the importance
    ratio exp(d) per token (`token_ratio_*`) and per sequence, exp(sum of its d) (`seq_ratio_*`).
    """
    mask = mask > 0
    if not bool(mask.any()):
        return {}
    d = torch.where(mask, logprobs.detach().float() - sampler_logprobs.float(), 0.0)
    dm = d[mask]
    rows = mask.any(-1)
    seq = torch.exp(d.sum(-1)[rows])
    tok = torch.exp(dm)
    values = torch.stack([
        (tok - 1.0 - dm).mean(), dm.abs().mean(), dm.abs().max(), torch.exp(-dm.mean()),
        tok.min(), tok.mean(), tok.max(), seq.min(), seq.mean(), seq.max(),
    ]).tolist()  # one device-to-host copy  # fmt: skip
    return dict(zip(MISMATCH_STATS, values, strict=True))


def reduce_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The micro-batch's share of the loss before `normalizer`: a sum of token losses, or for
    `grpo`/`gspo` a sum over sequences of each sequence's token mean."""
    if loss_type in PER_SEQUENCE:
        return (per_token.sum(-1) / (loss_mask > 0).sum(-1).clamp(min=1)).sum()
    return per_token.sum()


def normalizer(loss_type: str, *, batch_tokens: float, rank_tokens: float, rank_rows: int, max_tokens: int) -> float:
    """What `reduce_loss` is divided by so that one rank's micro-batches add up to its loss.

    `batch_tokens`: the whole batch's tokens divided by the number of ranks (DDP then averages
    the ranks' gradients, so `dapo` is the token mean of the whole batch, as in one process).
    """
    if loss_type in ("dapo", "cispo"):
        return max(batch_tokens, 1.0)
    if loss_type == "bnpo":
        return max(rank_tokens, 1.0)
    if loss_type in PER_SEQUENCE:
        return max(rank_rows, 1)
    if loss_type == "dr_grpo":
        return max(rank_rows, 1) * max_tokens
    raise ValueError(f"loss_type={loss_type!r}: must be one of {LOSS_TYPES}")

