"""Metrics tracking: `Tracker` fans out to console, jsonl, TensorBoard, MLflow and W&B."""

from rlrun.tracking.backends import enabled_backends
from rlrun.tracking.tracker import Tracker

__all__ = ["Tracker", "enabled_backends"]
