"""The run directory as the jobs' shared medium: paths, atomic step folders, waiting, pruning.

Orchestrator and trainer talk only through files here (as on a shared filesystem across
Slurm nodes): the orchestrator writes `rollouts/step_<n>/`, the trainer reads it and writes
`weights/step_<n>/` (the policy after n updates) and `checkpoints/step_<n>/`. Every step
folder is written under a temporary name and renamed, so a reader never sees half of one.

This module imports no torch: the parent and `--cfg job` use it too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUBDIRS = ("logs", "logs/trainer", "metrics", "rollouts", "weights", "checkpoints")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING = re.compile(r"^\.step_\d+\.(?:tmp|old)-(\d+)$")


def model_dir(cfg: Any, run_dir: str | Path) -> Path:
    """Where the policy lives, built or not: `<run_dir>/model` for `tiny`, `model.path` for `hf`."""
    if cfg.name == "tiny":
        return Path(run_dir) / "model"
    if not cfg.path:
        raise ValueError("model.path is required with model=hf")
    return Path(str(cfg.path)).expanduser()


def job_log(run_dir: str | Path, job: str, rank: int = 0) -> Path:
    """The text log of a job: logs/<job>.log, logs/{trainer,sft}/rank_<N>.log, and the inference
    servers' stdout: logs/inference.stdout (one server), logs/inference_<k>.stdout (several)."""
    logs = Path(run_dir) / "logs"
    if job in ("trainer", "sft"):  # jobs with ranks: a file each
        return logs / job / f"rank_{rank}.log"
    if is_inference_job(job):
        return logs / f"{job}.stdout"
    return logs / f"{job}.log"


def is_inference_job(job: str) -> bool:
    """`inference` or `inference_<k>`: a server, which logs to its stdout (vLLM's own output too)."""
    return re.fullmatch(r"inference(_\d+)?", job) is not None


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def list_steps(root: str | Path) -> list[int]:
    """Steps of the complete `step_<n>` folders under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(root: str | Path) -> int | None:
    steps = list_steps(root)
    return steps[-1] if steps else None


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder to its final name, replacing an older one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def staging_dir(final: Path) -> Path:
    """A fresh hidden folder next to `final` to write into before `publish_dir`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def prune(root: str | Path, keep_last: int, keep: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Delete all but the newest `keep_last` step folders (and any step in `keep`).

    Also removes staging folders a killed writer left behind (each root has one writer).
    """
    root = Path(root)
    for entry in root.iterdir() if root.is_dir() else []:
        match = _STAGING.match(entry.name)
        if match and int(match.group(1)) != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
    steps = list_steps(root)
    for step in steps[: max(0, len(steps) - keep_last)]:
        if step not in keep:
            shutil.rmtree(step_dir(root, step), ignore_errors=True)


def remove_after(root: str | Path, step: int) -> list[int]:
    """Delete step folders newer than `step` (a resume discards what the crashed run left)."""
    removed = [s for s in list_steps(root) if s > step]
    for s in removed:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    return removed


def wait_for(
    ready: Callable[[], Any],
    what: str,
    timeout_s: float | None = None,
    poll_s: float = 0.005,
    max_poll_s: float = 0.02,
) -> Any:
    """Poll `ready()` until it returns anything but None or False (0 is a ready value: the
    initial policy's version); return that. TimeoutError naming `what`.

    The trainer and the orchestrator hand batches and weights over through this every step:
    a late wake-up is dead time on the critical path (with the former 0.2 s cap it was ~35 ms
    per hand-over on the tiny default), while a check is one stat/listdir, ~50 per second at most.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = poll_s
    while True:
        value = ready()
        if value is not None and value is not False:
            return value
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(max_poll_s, delay * 1.5)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


_MISSING: Any = object()


def read_json(path: Path, default: Any = _MISSING) -> Any:
    """The JSON in `path`; `default` (when given) if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        if default is _MISSING:
            raise
        return default


def resume_step(run_dir: str | Path) -> int:
    """The step of the newest checkpoint (0 when none): a resumed run continues after it."""
    return latest_step(Path(run_dir) / "checkpoints") or 0
