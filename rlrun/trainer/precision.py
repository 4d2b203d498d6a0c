"""Mixed precision for the jobs that train (trainer, sft): fp32 master weights, half-precision compute.

With `model.dtype=bfloat16` the inference server holds the weights in bf16, but the jobs that
train load them in float32 and run each forward under `torch.autocast` in bf16: the matmuls
run in bf16 (the speed, and the same rounding of the weights the server sees), while the
weights, their gradients and AdamW's moments stay fp32. Kept in bf16, a weight would lose
every update smaller than half its spacing (2^-8 of its size): at lr 1e-5 almost all of them.
The weights handed to inference are cast to its dtype on the way (`inference_dtype`).

float16 is treated the same way, without loss scaling (a gradient can underflow): prefer
bfloat16. float32 and `auto` (the checkpoint's own dtype) load and compute as given.
"""

from __future__ import annotations

from typing import Any

import torch

HALF = ("bfloat16", "float16")
WEIGHT_DTYPES = ("float32", *HALF)


def master_dtype(dtype: str) -> str:
    """The dtype the training jobs load the weights in: float32 for a half precision."""
    return "float32" if dtype in HALF else dtype


def compute_dtype(dtype: str) -> torch.dtype | None:
    """The autocast dtype of the forward passes; None: no autocast (compute in the weights' dtype)."""
    return getattr(torch, dtype) if dtype in HALF else None


def inference_dtype(cfg: Any) -> str | None:
    """The dtype inference holds its weights in (vLLM's `inference.dtype`, else `model.dtype`);
    None where it is not one of ours (`auto`, vLLM's own names: the server casts when it loads)."""
    dtype = str(getattr(cfg.inference, "dtype", None) or cfg.model.dtype)
    return dtype if dtype in WEIGHT_DTYPES else None


def describe(dtype: str) -> str:
    """How a training job holds and computes, for its start line."""
    return f"fp32 weights, {dtype} autocast" if dtype in HALF else f"{dtype} weights"
