"""The local sampling engine: batched autoregressive sampling with a KV cache.

One batch = every (prompt x n) sequence of one or more requests, left-padded to a common
length. Each step feeds only the newest token (the KV cache holds the rest), samples from
softmax((logits + logit_bias) / temperature), and records the sampled token's
log-probability under that same distribution, which is exactly what the trainer recomputes
as `log_softmax((logits + logit_bias) / temperature)` for the importance ratio.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import torch

from rlrun.inference import Completion
from rlrun.model import bias_tensor, eos_token_ids, load_weights

__all__ = ["Completion", "Engine", "GenerationRequest", "SamplingParams"]


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # <= 0: greedy, logprobs under softmax(logits)
    seed: int | None = None
    top_logprobs: int = 0
    # Added to the logits before the temperature (OpenAI's `logit_bias`): -100 bans a token.
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    prompts: list[list[int]]
    params: SamplingParams = field(default_factory=SamplingParams)


class Engine:
    """Samples completions from `model`; `load_weights` swaps weights between batches."""

    def __init__(self, model, tokenizer, device: str = "cpu", max_batch_size: int = 512):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_model_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self.eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)), dtype=torch.long, device=self.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        # Held for a whole batch and for a weight swap, so weights never change mid-batch.
        self.lock = threading.RLock()
        self.weights_version = 0
        self.weights_path: str | None = None

    # ------------------------------------------------------------ public API

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt: result[i][j] is prompt i's j-th completion."""
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                logit_bias=dict(logit_bias or {}))  # fmt: skip
        return self.generate_batch([GenerationRequest(prompts, params)])[0]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[list[list[Completion]]]:
        """Generate several requests together; result[r][i][j] as in `generate`, per request."""
        for request in requests:
            self.validate(request)
        # One row per sequence, prompt-major within each request.
        rows = [
            (request.params, prompt, _row_generator(request.params.seed, index))
            for request in requests
            for index, prompt in enumerate(p for p in request.prompts for _ in range(request.params.n))
        ]
        completions: list[Completion] = []
        with self.lock:
            for start in range(0, len(rows), self.max_batch_size):
                completions += self._generate_rows(rows[start : start + self.max_batch_size])

        results, it = [], iter(completions)
        for request in requests:
            n = request.params.n
            results.append([[next(it) for _ in range(n)] for _ in request.prompts])
        return results

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError (the server answers 400) for a request the engine cannot serve."""
        p = request.params
        if not request.prompts:
            raise ValueError("prompt must not be empty")
        if p.n < 1:
            raise ValueError(f"n must be >= 1, got {p.n}")
        if p.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {p.max_tokens}")
        if p.top_logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {p.top_logprobs}")
        for token, bias in p.logit_bias.items():
            if not 0 <= token < self.vocab_size or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: token {token} must be in [0, {self.vocab_size}), its bias in [-100, 100]")
        for prompt in request.prompts:
            if not prompt:
                raise ValueError("a prompt has no tokens")
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
            if self.max_model_len is not None and len(prompt) + p.max_tokens > self.max_model_len:
                raise ValueError(
                    f"This model's maximum context length is {self.max_model_len} tokens; the request needs "
                    f"{len(prompt) + p.max_tokens} ({len(prompt)} in the prompt, {p.max_tokens} in the completion)"
                )

    def load_weights(self, path: str) -> int:
        """Swap in weights written by `rlrun.model.save_weights`; waits for the running batch."""
        with self.lock:
            load_weights(self.model, path)
            self.weights_version += 1
            self.weights_path = str(path)
            return self.weights_version

    # ------------------------------------------------------------ the sampling loop

    @torch.inference_mode()
    def _generate_rows(self, rows: list[tuple[SamplingParams, list[int], torch.Generator]]) -> list[Completion]:
        B, dev = len(rows), self.device
        params = [p for p, _, _ in rows]
        generators = [g for _, _, g in rows]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        greedy = temperature <= 0
        temperature = torch.where(greedy, torch.ones_like(temperature), temperature)  # greedy: logprobs at T=1
        max_new = torch.tensor([p.max_tokens for p in params], device=dev)
        top_k = max(p.top_logprobs for p in params)
        biased = any(p.logit_bias for p in params)
        bias = None  # [B, V], built at the first step (V: the logits' width)

        # Left-pad the prompts; positions count real tokens only, so padding changes nothing.
        width = max(len(prompt) for _, prompt, _ in rows)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=dev)
        attention_mask = torch.zeros((B, width), dtype=torch.long, device=dev)
        for i, (_, prompt, _) in enumerate(rows):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=dev)
            attention_mask[i, width - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        # Inverse-CDF sampling with one uniform draw per row and step, all drawn up front from
        # the row's own generator (one call per row, not per row and token): a seeded sequence
        # samples the same tokens whatever it is batched with.
        steps = int(max_new.max())
        draws = torch.zeros((B, steps), dtype=torch.float64)
        for i, (p, g) in enumerate(zip(params, generators)):
            draws[i, : p.max_tokens] = torch.rand(p.max_tokens, generator=g, dtype=torch.float64)
        draws = draws.to(dev)

        past = None
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        sampled, sampled_logp, tops = [], [], []
        for t in range(steps):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if biased:
                if bias is None:
                    per_request = {id(p): bias_tensor(p.logit_bias, logits.shape[-1], dev) for p in params}  # rows share one
                    bias = torch.stack([per_request[id(p)] for p in params])
                logits = logits + bias
            logp = torch.log_softmax(logits / temperature[:, None], dim=-1)

            # (right=True: a token of probability 0 is never picked.)
            cdf = logp.double().exp().cumsum(-1)
            token = torch.searchsorted(cdf, (draws[:, t] * cdf[:, -1])[:, None], right=True).squeeze(-1)
            token = torch.where(greedy, logp.argmax(-1), token.clamp(max=cdf.shape[-1] - 1))
            sampled.append(token)
            sampled_logp.append(logp.gather(-1, token[:, None]).squeeze(-1))
            if top_k:
                tops.append(logp.topk(top_k, dim=-1))

            # A row ends at EOS (kept, "stop") or at its own max_tokens ("length").
            active = ~done
            lengths += active.long()
            hit_eos = active & torch.isin(token, self.eos_ids)
            stopped |= hit_eos
            done |= hit_eos | (lengths >= max_new)
            if done.all():
                break

            input_ids = token[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=torch.long, device=dev)], dim=1)
            position_ids = position_ids[:, -1:] + 1

        tokens = torch.stack(sampled, dim=1).tolist()
        logps = torch.stack(sampled_logp, dim=1).tolist()
        if top_k:
            top_vals = torch.stack([t.values for t in tops], dim=1).tolist()
            top_ids = torch.stack([t.indices for t in tops], dim=1).tolist()
        completions = []
        for i, p in enumerate(params):
            n = int(lengths[i])
            top = None
            if p.top_logprobs:
                top = [list(zip(top_ids[i][s][: p.top_logprobs], top_vals[i][s][: p.top_logprobs])) for s in range(n)]
            completions.append(
                Completion(
                    token_ids=tokens[i][:n],
                    logprobs=logps[i][:n],
                    finish_reason="stop" if bool(stopped[i]) else "length",
                    top_logprobs=top,
                )
            )
        return completions


def _row_generator(seed: int | None, index: int) -> torch.Generator:
    """The random stream of one sequence: from (request seed, row index), or fresh when unseeded."""
    g = torch.Generator()  # CPU: cheap, and the same stream on every device
    g.manual_seed(random.getrandbits(63) if seed is None else (seed * 0x9E3779B97F4A7C15 + index) % 2**63)
    return g
