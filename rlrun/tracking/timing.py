"""`timer("name")`: time a phase of the step; the tracker logs it as `time/<name>`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Phase:
    """What `with timer("name") as phase:` gives: `phase.seconds` once the block is done."""

    seconds: float = 0.0


class StepTimer:
    """Accumulates phase durations until the step's metrics are logged."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[Phase]:
        phase = Phase()
        start = time.perf_counter()
        try:
            yield phase
        finally:
            phase.seconds = time.perf_counter() - start
            key = f"time/{name}"
            self._pending[key] = self._pending.get(key, 0.0) + phase.seconds

    def seconds(self, name: str) -> float:
        """`name`'s time so far in this step (every block of it since the last `take`)."""
        return self._pending.get(f"time/{name}", 0.0)

    def take(self) -> dict[str, float]:
        """The durations recorded since the last call, then forget them."""
        pending, self._pending = self._pending, {}
        return pending
