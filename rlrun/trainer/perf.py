"""Training efficiency: FLOPs per token from the model's config, and the device's peak FLOP/s.

MFU (model FLOPs utilization) = achieved model FLOP/s / the device's peak. Achieved FLOPs
count a forward and a backward pass over every token of the step's rows (prompt tokens
included: the forward runs over them): 6 x N per token for the N parameters outside the
input embedding, plus attention's 12 x layers x hidden x sequence length (the PaLM paper's
accounting). Recomputation (a reference model's forward, activation checkpointing) is not
counted: MFU measures the useful work.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak FLOP/s by device name (without sparsity), for `perf/mfu` on CUDA; a device
# not listed needs `perf.peak_flops`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12: set perf.peak_flops
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def peak_flops(device: Any, configured: float | None) -> float | None:
    """`perf.peak_flops` when set; else the table's figure for a known CUDA device; else None (CPU)."""
    if configured:
        return float(configured)
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class FlopsPerToken:
    """Training FLOPs (forward + backward) per token at a sequence length, for one model (its
    parameter count taken once)."""

    def __init__(self, model: Any) -> None:
        model = getattr(model, "module", model)  # DDP
        embedding = model.get_input_embeddings().weight.numel()
        self.params = sum(p.numel() for p in model.parameters()) - embedding
        self.layers, self.hidden = model.config.num_hidden_layers, model.config.hidden_size

    def __call__(self, seq_len: int) -> float:
        return 6.0 * self.params + 12.0 * self.layers * self.hidden * seq_len


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return FlopsPerToken(model)(seq_len)
