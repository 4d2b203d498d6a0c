"""Metrics tracking: `Tracker` fans out to console, jsonl, TensorBoard, MLflow and W&B."""

from rlrun.tracking.tracker import Tracker, enabled_backends

__all__ = ["Tracker", "enabled_backends"]
