"""Schema of the `monitor` group: usage sampled by the parent."""

from __future__ import annotations

from dataclasses import dataclass

from rlrun.schema import checked


@dataclass
class MonitorConfig:
    """GPU and system usage sampled in the background (NeMo-RL's names)."""

    system: bool = False  # CPU %, RAM, each job's RSS, disk of the run directory
    gpu: bool = False  # every visible GPU through NVML
    collection_interval: float = checked(2.0, gt=0)  # seconds between samples
    flush_interval: float = checked(10.0, gt=0)  # seconds between hand-overs to the tracker
