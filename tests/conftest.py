"""Shared test fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Tests never talk to the W&B cloud; runs that need W&B use offline mode.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True)
def _fresh_logger():
    """Each test starts and ends without a process logger."""
    from rlrun.log import reset_logger

    reset_logger()
    yield
    reset_logger()
