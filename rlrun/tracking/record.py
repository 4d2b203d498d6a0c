"""The one reader of the local record, `<run>/metrics/<job>.jsonl` (written by the jsonl backend).

Each line is one JSON object with a `type`: `metrics` (`step`, `time`, `metrics`),
`hyperparams`, `samples`, `distribution` or `alert` (a run-doctor finding: the fields of
`rlrun.tracking.base.Alert`). A torn last line (a crash mid-write, or a
line still being written) is skipped. Everything that reads a run's record (the resume
rules, the parent's progress bar and monitor, the sweep summary, reports, tests) reads it
through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def record_path(run_dir: str | Path, job: str) -> Path:
    """Where a job's record lives under the default `logger.jsonl.dir`."""
    return Path(run_dir) / "metrics" / f"{job}.jsonl"


def _parse(lines: Iterator[bytes] | list[bytes], kind: str | None) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and (kind is None or record.get("type") == kind):
            records.append(record)
    return records


def read_records(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every complete record of a jsonl file (only those of type `kind` when given)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        return _parse(f, kind)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The `metrics` records of a jsonl file, in the order they were written."""
    return read_records(path, "metrics")


def read_alerts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every job's run-doctor findings (`alert` records), oldest first."""
    alerts = [a for path in sorted((Path(run_dir) / "metrics").glob("*.jsonl")) for a in read_records(path, "alert")]
    return sorted(alerts, key=lambda a: a.get("time", 0.0))


def last_logged_step(path: str | Path) -> int | None:
    """The highest step with a metrics record (None: nothing logged yet)."""
    steps = [int(r["step"]) for r in read_metrics(path)]
    return max(steps) if steps else None


def last_metric(path: str | Path | None, name: str, tail_bytes: int = 1 << 16) -> float | None:
    """`name` in the newest metrics record that has it, read from the end of the file."""
    if path is None or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().splitlines()
    for record in reversed(_parse(lines, "metrics")):
        value = record.get("metrics", {}).get(name)
        if isinstance(value, (int, float)):
            return float(value)
    return None


class RecordTail:
    """The new complete records of a growing jsonl file, read incrementally (for watchers)."""

    def __init__(self, path: str | Path, kind: str | None = "metrics") -> None:
        self.path = Path(path)
        self.kind = kind
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        return _parse(data[:end].splitlines(), self.kind)
