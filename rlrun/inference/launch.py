"""How the parent starts the inference job: one launch plan per backend, the port chosen up front.

The parent always picks the port (`inference.port=0`: a free one) and writes it into the
run's config before any job starts, so orchestrator and inference agree on it without
talking: the orchestrator waits for `/health` on that port. `plan(cfg, run_dir)` says what
to run for `inference.backend`: the local torch server, or vLLM's (`rlrun.inference.vllm`),
which also decides which GPUs the trainer may use.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Launch:
    """The inference job's command line and environment, and what the trainer job must add."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    trainer_env: dict[str, str] = field(default_factory=dict)  # e.g. its CUDA_VISIBLE_DEVICES


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def choose_port(cfg: Any) -> None:
    """Fix `cfg.inference.port` (0: a free one) before the run's config is written."""
    if not cfg.inference.port:
        cfg.inference.port = free_port(cfg.inference.host)


def plan(cfg: Any, run_dir: Path) -> Launch:
    """The inference job for `cfg.inference.backend`; raises ConfigError when it cannot run here."""
    if cfg.inference.backend == "vllm":
        from rlrun.inference.vllm import vllm_launch

        return vllm_launch(cfg, run_dir)
    return Launch([sys.executable, "-m", "rlrun.inference", "--config", str(run_dir / "config.yaml")])
