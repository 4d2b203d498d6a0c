"""`timer("name")`: time a phase of the step; the tracker logs it as `time/<name>`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Accumulates phase durations until the step's metrics are logged."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{name}"
            self._pending[key] = self._pending.get(key, 0.0) + time.perf_counter() - start

    def peek(self) -> dict[str, float]:
        """The durations recorded so far this step, without forgetting them."""
        return dict(self._pending)

    def take(self) -> dict[str, float]:
        """The durations recorded since the last call, then forget them."""
        pending, self._pending = self._pending, {}
        return pending
