"""How the parent starts the inference servers: where each one listens, and what to run.

The parent settles every server's address before any job starts (`choose_port`):
`inference.urls`, one `http://<host>:<port>` per server (`inference.num_servers`), each on a
port free on `inference.host` (or `inference.port`, `+1`, ... when one is given), written into
the run's config, so the servers, the orchestrator and the parent agree without talking.
`inference.port` is then the first server's port. `plan(cfg, run_dir)` says what to run for
`inference.backend`: one local torch server per URL (`--server-index k` serves `urls[k]`), or
vLLM's one server (`rlrun.inference.vllm`), which also decides which GPUs the trainer may use.
"""

from __future__ import annotations

import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlrun.schema import ConfigError


@dataclass
class Launch:
    """The inference servers' command lines and environment, and what the trainer job must add."""

    commands: list[list[str]]  # commands[k] serves inference.urls[k], as job `server_jobs(n)[k]`
    env: dict[str, str] = field(default_factory=dict)
    trainer_env: dict[str, str] = field(default_factory=dict)  # e.g. its CUDA_VISIBLE_DEVICES


def server_jobs(count: int) -> list[str]:
    """The servers' job names: `inference` alone, else `inference_<k>` (their logs, RSS series, errors)."""
    return ["inference"] if count == 1 else [f"inference_{k}" for k in range(count)]


def free_ports(host: str, count: int) -> list[int]:
    """`count` different ports free on `host` now (each server binds its own a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with ExitStack() as held:  # all held open together, so the OS cannot hand out one twice
        socks = [held.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now."""
    return free_ports(host, 1)[0]


def server_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of a server's base URL `http://<host>:<port>`; ValueError otherwise."""
    parts = urlsplit(str(url))
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"{url!r} is not a server's base URL http://<host>:<port>")
    return parts.hostname, port


def check_servers(icfg: Any) -> None:
    """ConfigError naming the key: several vLLM servers, or `inference.urls` that do not fit."""
    if icfg.backend == "vllm" and icfg.num_servers > 1 and not icfg.urls:  # a deployment's nodes may each run one
        raise ConfigError(f"inference.num_servers={icfg.num_servers}: inference=vllm runs one server (give it "
                          "several GPUs with inference.tensor_parallel_size); several servers need inference=local")
    urls = list(icfg.urls)
    if urls and len(urls) != icfg.num_servers:
        raise ConfigError(f"inference.urls: {len(urls)} URLs for inference.num_servers={icfg.num_servers} "
                          "(the parent fills this key; leave it empty)")  # fmt: skip
    for url in urls:
        try:
            split_url(url)
        except ValueError as exc:
            raise ConfigError(f"inference.urls: {exc}") from None


def choose_port(cfg: Any) -> None:
    """Settle `cfg.inference.urls` (when empty) and `inference.port` before the run's config is written."""
    icfg = cfg.inference
    if not icfg.urls:
        n = int(icfg.num_servers)
        ports = [int(icfg.port) + k for k in range(n)] if icfg.port else free_ports(icfg.host, n)
        icfg.urls = [server_url(icfg.host, port) for port in ports]
    icfg.port = split_url(icfg.urls[0])[1]


def plan(cfg: Any, run_dir: Path) -> Launch:
    """The inference servers for `cfg.inference.backend`; raises ConfigError when they cannot run here."""
    if cfg.inference.backend == "vllm":
        from rlrun.inference.vllm import vllm_launch

        return vllm_launch(cfg, run_dir)
    server = [sys.executable, "-m", "rlrun.inference", "--config", str(run_dir / "config.yaml")]
    return Launch([[*server, "--server-index", str(k)] for k in range(len(cfg.inference.urls))])
