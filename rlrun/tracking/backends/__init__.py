"""Backend registry: the one list of backend names, mapped to import paths so a library is
imported only when its backend is chosen."""

from __future__ import annotations

import importlib
from typing import Any

from rlrun.tracking.base import Backend

BACKENDS: dict[str, str] = {
    "jsonl": "rlrun.tracking.backends.jsonl:JsonlBackend",  # always on: the local record
    "console": "rlrun.tracking.backends.console:ConsoleBackend",
    "tensorboard": "rlrun.tracking.backends.tensorboard:TensorboardBackend",
    "mlflow": "rlrun.tracking.backends.mlflow:MlflowBackend",
    "wandb": "rlrun.tracking.backends.wandb:WandbBackend",
}


def enabled_backends(logger_cfg: Any) -> list[str]:
    """Backend names selected by a `logger` config node; jsonl always comes first."""
    return ["jsonl"] + [name for name in BACKENDS if name != "jsonl" and logger_cfg[name].enabled]


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, cls_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown tracking backend {name!r}; known: {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module_name), cls_name)
