"""Schemas of the `inference` group: the keys every backend has, and each backend's own.

`inference=local` merges `LocalInferenceConfig`, `inference=vllm` `VllmInferenceConfig`
(each option's YAML names its schema), so a vLLM-only key given to the local server fails
at composition, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlrun.schema import checked


@dataclass
class InferenceConfig:
    backend: str = checked("local", one_of=("local", "vllm"))
    host: str = "127.0.0.1"
    port: int = 0  # 0: the parent picks a free port and gives it to every job
    # Settled by the parent before any job starts: each inference server's base URL
    # (http://<addr>:<port>); empty: the one server on host:port.
    urls: list[str] = field(default_factory=list)
    max_batch_size: int = checked(512, gt=0)  # sequences generated together
    startup_timeout_s: float = 120.0


@dataclass
class LocalInferenceConfig(InferenceConfig):
    """The embedded torch server (`rlrun.inference.server`)."""

    device: str = "cpu"
    num_threads: int = 1  # torch intra-op threads of the server


@dataclass
class VllmInferenceConfig(InferenceConfig):
    """vLLM's OpenAI server (`rlrun.inference.vllm`), on GPUs."""

    backend: str = checked("vllm", one_of=("local", "vllm"))
    gpu_memory_utilization: float = checked(0.9, gt=0, le=1)  # share of each inference GPU's memory vLLM may take
    tensor_parallel_size: int = checked(1, gt=0)  # the first GPUs visible; the trainer gets the rest
    max_model_len: Optional[int] = None  # None: the model's own context length
    dtype: str = "${model.dtype}"  # weights and activations: auto, bfloat16, float16, float32
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` flags, e.g. [--enforce-eager]


SCHEMAS: dict[str, type[InferenceConfig]] = {"local": LocalInferenceConfig, "vllm": VllmInferenceConfig}
