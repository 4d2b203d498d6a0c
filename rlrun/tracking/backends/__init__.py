"""Backend registry: names map to import paths, so a library is imported only when chosen."""

from __future__ import annotations

import importlib

from rlrun.tracking.base import Backend

BACKENDS: dict[str, str] = {
    "jsonl": "rlrun.tracking.backends.jsonl:JsonlBackend",
    "console": "rlrun.tracking.backends.console:ConsoleBackend",
    "tensorboard": "rlrun.tracking.backends.tensorboard:TensorboardBackend",
    "mlflow": "rlrun.tracking.backends.mlflow:MlflowBackend",
    "wandb": "rlrun.tracking.backends.wandb:WandbBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, cls_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown tracking backend {name!r}; known: {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module_name), cls_name)
