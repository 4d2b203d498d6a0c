"""The inference job: serves the policy over an OpenAI/vLLM-compatible HTTP API.

- `engine.py`: batched sampling with a KV cache and exact per-token logprobs (torch).
- `server.py`: `/v1/completions`, `/v1/models`, `/health`, `/update_weights` on stdlib HTTP.
- `client.py`: what the orchestrator uses to talk to it (or to vLLM), one server or several
  (`InferenceServers`); imports no torch.
- `launch.py`: where each server listens (`inference.urls`) and what the parent runs.
- `auth.py`: the run's token on mutating requests, weights only from inside the run.
- `__main__.py`: `python -m rlrun.inference --config <run>/config.yaml`.

Importing this package imports nothing heavy; import the submodules you need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class Completion:
    """One sampled completion, as the engine produces it and the client parses it back."""

    token_ids: list[int]  # sampled tokens; EOS included when it stopped the sequence
    logprobs: list[float]  # log p(token) under softmax(logits / temperature)
    finish_reason: Literal["stop", "length"]
    # Per position, the most likely (token id, logprob) pairs, when asked for.
    top_logprobs: list[list[tuple[int, float]]] | None = None


def served_model_name(cfg: Any) -> str:
    """The name `/v1/models` shows for the run config `cfg` (the local server and vLLM alike)."""
    return "tiny" if cfg.model.name == "tiny" else str(cfg.model.path)
