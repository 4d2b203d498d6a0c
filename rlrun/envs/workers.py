"""Env workers: reward functions run in subprocesses, a pool per environment.

`EnvWorkerPool.score` splits a step's completions into one chunk per worker, scores them
in parallel and returns the scores in input order. A worker that dies (OOM, a segfaulting
reward library, a stray SIGKILL) breaks the whole `ProcessPoolExecutor`; the pool logs the
incident, starts a fresh executor and re-scores every chunk that had not come back, so no
rollout is lost (up to `max_retries` restarts per call).

Worker logs: with `env_workers.file_logs=true` every worker of environment `<env>` appends
to `<log_dir>/env_workers/<env>.log`, each line naming the worker (`<env>/w<index>`, pid).
Otherwise the workers' records travel back with their results and are written through the
pool owner's (the orchestrator's) logger. Workers are spawned fresh and import neither
torch nor transformers, so they start in a fraction of a second.

Workers are *spawned*: like any spawn-based multiprocessing, the entry script of the pool's
owner must guard its top-level code with `if __name__ == "__main__":` (`python -m pkg` with a
`__main__.py` is never re-run in workers, so rlrun's job entrypoints are safe).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, is_dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rlrun.envs.base import Environment, Example
from rlrun.log import get_logger, reset_logger, setup_logger

WORKER_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[job]} pid={process} {name}:{line} {message}"

# ---------------------------------------------------------------- inside a worker process

_ENV: Environment | None = None
_STARTED = None  # a Barrier of all the pool's workers, so start-up waits for each of them
_RECORDS: list[tuple[str, str]] = []  # (level, line) to hand back when not logging to a file


def _init_worker(
    task: dict, factory: str | None, level: str, env_level: str, log_file: str | None, counter, started
) -> None:
    """Per worker: its own logger (file or hand-back buffer), then the environment."""
    global _ENV, _STARTED
    _STARTED = started
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    reset_logger()  # in case the start method inherited the parent's logger
    logger = setup_logger(level, None, job=f"{task['name']}/w{index}")
    logger.remove()  # no stdout sink: the lines go to the shared file or back to the parent
    if log_file is not None:
        # Append: every worker of this environment shares the file (the pool started it fresh).
        logger.add(log_file, level=level.upper(), format=WORKER_FORMAT, mode="a", colorize=False, encoding="utf-8")
    else:
        logger.add(
            lambda message: _RECORDS.append((message.record["level"].name, message.rstrip("\n"))),
            level=level.upper(),
            format="{extra[job]} pid={process}: {message}",
        )

    from omegaconf import OmegaConf

    cfg = OmegaConf.create(task)
    if factory:
        module_name, cls_name = factory.split(":")
        _ENV = getattr(importlib.import_module(module_name), cls_name)(cfg)
    else:
        from rlrun.envs import load_environment

        _ENV = load_environment(cfg)
    for name in _ENV.library_loggers:
        logging.getLogger(name).setLevel(env_level.upper())
    logger.info(f"env worker {index} ready: {_ENV.name} (pid {os.getpid()})")


def _take_records() -> list[tuple[str, str]]:
    records = list(_RECORDS)
    _RECORDS.clear()
    return records


def _hello() -> tuple[int, list[tuple[str, str]]]:
    _STARTED.wait()  # one hello per worker: none returns before every worker is up
    return os.getpid(), _take_records()


def _score_chunk(completions: list[str], examples: list[Example]) -> tuple[list[dict[str, float]], list]:
    start = time.perf_counter()
    scores = [_ENV.score(c, e) for c, e in zip(completions, examples)]
    get_logger().debug(f"scored {len(scores)} completions in {1e3 * (time.perf_counter() - start):.1f} ms")
    return scores, _take_records()


# ---------------------------------------------------------------- in the pool's owner


class EnvWorkerPool:
    def __init__(
        self,
        task_cfg: Any,
        workers_cfg: Any,
        log_dir: str | Path | None = None,
        *,
        env_factory: str | None = None,
        max_retries: int = 3,
    ):
        """Start `workers_cfg.num_workers` workers for the environment `task_cfg.name`.

        `log_dir` is the run's `logs/` directory; `env_factory` ("module:Class") builds an
        environment that is not in the registry (plugins, tests).
        """
        self._task = _plain(task_cfg)
        self.env_name: str = self._task["name"]
        self.num_workers = int(workers_cfg.num_workers)
        self.max_retries = max_retries
        self.restarts = 0
        self.log_file: Path | None = None
        if workers_cfg.file_logs and log_dir is not None:
            self.log_file = Path(log_dir) / "env_workers" / f"{self.env_name}.log"
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_file.write_text("")  # a fresh file per run, which the workers then append to
        self._ctx = get_context("spawn")  # a clean interpreter: no inherited threads, torch or logger
        self._counter = self._ctx.Value("i", 0)  # worker indices, continued across restarts
        self._initargs = (
            self._task, env_factory, str(workers_cfg.level), str(workers_cfg.env_level),
            None if self.log_file is None else str(self.log_file), self._counter,
        )
        self.pids: list[int] = []  # the live workers' process ids
        self._pool = self._start()

    def _start(self, timeout_s: float = 120.0) -> ProcessPoolExecutor:
        """A new executor with every worker started (start-up errors surface here, not mid-run)."""
        started = self._ctx.Barrier(self.num_workers, timeout=timeout_s)
        pool = ProcessPoolExecutor(
            self.num_workers, mp_context=self._ctx, initializer=_init_worker, initargs=(*self._initargs, started)
        )
        pids = []
        try:
            for future in [pool.submit(_hello) for _ in range(self.num_workers)]:
                pid, records = future.result()
                pids.append(pid)
                self._forward(records)
        except (BrokenProcessPool, threading.BrokenBarrierError) as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            where = f"{self.log_file} and stderr" if self.log_file else "stderr"
            raise RuntimeError(f"env workers for {self.env_name!r} failed to start; see {where}") from exc
        self.pids = pids  # each worker answered one hello (they wait for each other)
        return pool

    def score(self, completions: list[str], examples: list[Example]) -> list[dict[str, float]]:
        """Score each completion against its example; results in input order."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        if not completions:
            return []
        size = math.ceil(len(completions) / self.num_workers)
        chunks = {i: (completions[s : s + size], examples[s : s + size]) for i, s in enumerate(range(0, len(completions), size))}
        results: dict[int, list[dict[str, float]]] = {}
        for attempt in range(self.max_retries + 1):
            lost = self._score_chunks({i: c for i, c in chunks.items() if i not in results}, results)
            if lost is None:
                return [score for i in sorted(results) for score in results[i]]
            if attempt == self.max_retries:
                raise RuntimeError(
                    f"env workers of {self.env_name!r} kept dying; gave up after {self.max_retries} restarts"
                ) from lost
            self.restarts += 1
            _log(
                "WARNING",
                f"an env worker of {self.env_name!r} died ({lost}); restarting the pool and re-scoring "
                f"{len(chunks) - len(results)} of {len(chunks)} chunks (restart {attempt + 1}/{self.max_retries})"
            )
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()
        raise AssertionError("unreachable")

    def _score_chunks(self, todo: dict[int, tuple], results: dict[int, list]) -> BrokenProcessPool | None:
        """Score `todo` into `results`; return the error if the pool broke (some chunks lost)."""
        futures: dict[int, Future] = {}
        try:
            for i, (completions, examples) in todo.items():
                futures[i] = self._pool.submit(_score_chunk, completions, examples)
        except BrokenProcessPool as exc:  # a worker died between calls
            broken: BrokenProcessPool | None = exc
        else:
            broken = None
        wait(futures.values())
        for i, future in futures.items():
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                broken = error
            elif error is not None:
                raise error  # a bug in a reward function fails loudly
            else:
                results[i], records = future.result()
                self._forward(records)
        return broken

    def _forward(self, records: list[tuple[str, str]]) -> None:
        """Write worker records handed back (file_logs off) through this process's logger."""
        for level, line in records:
            _log(level, line)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "EnvWorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log(level: str, message: str) -> None:
    try:
        get_logger().log(level, message)
    except RuntimeError:  # this process set up no logger: stderr still reaches the job's log
        print(f"{level} {message}", file=sys.stderr)


def _plain(cfg: Any) -> dict:
    """The task config as a plain dict (picklable, cheap to send to spawned workers)."""
    if isinstance(cfg, dict):
        return dict(cfg)
    if is_dataclass(cfg):
        return asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
