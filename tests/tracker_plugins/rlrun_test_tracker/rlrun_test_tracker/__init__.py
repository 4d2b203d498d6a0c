"""The plugin: `logger.csvlog` settings and where the backend is (imported only when chosen)."""

from dataclasses import dataclass
from typing import Optional

from rlrun.tracking.config import TrackerPlugin


@dataclass
class CsvLogConfig:
    enabled: bool = False
    dir: Optional[str] = None  # default: <run>/csvlog
    delimiter: str = ","


PLUGIN = TrackerPlugin(config=CsvLogConfig, backend="rlrun_test_tracker.backend:CsvLogBackend")
