"""Env workers: reward functions run in subprocesses, a pool per environment.

`EnvWorkerPool.score` splits a step's completions into one chunk per worker, scores them
in parallel and returns the scores in input order. A worker that dies (OOM, a segfaulting
reward library, a stray SIGKILL) breaks the whole `ProcessPoolExecutor`; the pool logs the
incident, starts a fresh executor and re-scores every chunk that had not come back, so no
rollout is lost (up to `max_retries` restarts per call).

Worker logs: with `env_workers.file_logs=true` every worker of environment `<env>` appends
to `<log_dir>/env_workers/<env>.log`, each line naming the worker (`<env>/w<index>`, pid);
with `env_workers.per_worker_logs=true` each worker writes its own
`<log_dir>/env_workers/<env>/worker_<n>.log`. Otherwise the workers' records travel back with
their results and are written through the pool owner's (the orchestrator's) logger.

Bad scorers do not stop training: a reward function that raises scores that completion 0
(every reward function, and the total), and one still running after
`env_workers.score_timeout_s` is interrupted (SIGALRM in the worker) and scores 0 too. Each
kind of error is logged once, at its first occurrence, in the env's log and the owner's log;
`take_error_counts()` hands the owner the counts since its last call (`<env>/errors/*`). Workers are spawned fresh and import neither
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
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rlrun.envs.base import Environment, Example, plain
from rlrun.log import get_logger, reset_logger, setup_logger

WORKER_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[job]} pid={process} {name}:{line} {message}"

# ---------------------------------------------------------------- inside a worker process

_ENV: Environment | None = None
_STARTED = None  # a Barrier of all the pool's workers, so start-up waits for each of them
_RECORDS: list[tuple[str, str]] = []  # (level, line) to hand back when not logging to a file
_TIMEOUT_S = 30.0
_SEEN_ERRORS: set[str] = set()  # kinds of scoring error this worker has logged


class ScoreTimeout(Exception):
    """A completion was still being scored after `env_workers.score_timeout_s`."""


def _init_worker(
    task: dict, factory: str | None, level: str, env_level: str, log_file: str | None, counter, started,
    key: str = "", timeout_s: float = 30.0,
) -> None:  # fmt: skip
    """Per worker: its own logger (file or hand-back buffer), then the environment.

    `log_file` may hold `{worker}`: one file per worker (`per_worker_logs`)."""
    global _ENV, _STARTED, _TIMEOUT_S
    _STARTED, _TIMEOUT_S = started, timeout_s
    signal.signal(signal.SIGALRM, _on_alarm)  # the per-completion timeout (`_score_one`)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    reset_logger()  # in case the start method inherited the parent's logger
    logger = setup_logger(level, None, job=f"{key or task['name']}/w{index}")
    logger.remove()  # no stdout sink: the lines go to the shared file or back to the parent
    if log_file is not None:
        log_file = log_file.replace("{worker}", str(index))
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
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


def _hello() -> tuple[int, list[str], list[tuple[str, str]]]:
    _STARTED.wait()  # one hello per worker: none returns before every worker is up
    return os.getpid(), list(_ENV.reward_fns), _take_records()


def _on_alarm(signum, frame) -> None:
    raise ScoreTimeout(f"scoring took longer than env_workers.score_timeout_s={_TIMEOUT_S:g}")


def _score_one(completion: str, example: Example) -> tuple[dict[str, float], str | None]:
    """The env's scores, or all zeros and the kind of error (`score: <type>` / `timeout`)."""
    signal.setitimer(signal.ITIMER_REAL, _TIMEOUT_S)  # _on_alarm, installed at start: tasks run on the main thread
    try:
        return _ENV.score(completion, example), None
    except ScoreTimeout as exc:
        kind, error = "timeout", exc
    except Exception as exc:  # a reward function's bug must not stop training: score 0, report it
        kind, error = f"score: {type(exc).__name__}", exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if kind not in _SEEN_ERRORS:
        _SEEN_ERRORS.add(kind)
        get_logger().warning(f"{kind}: {error} (scored 0; logged once per kind, counted in <env>/errors/*)")
    return {**dict.fromkeys(_ENV.reward_fns, 0.0), "reward": 0.0}, kind


def _score_chunk(completions: list[str], examples: list[Example]) -> tuple[list[dict[str, float]], list, list]:
    start = time.perf_counter()
    results = [_score_one(c, e) for c, e in zip(completions, examples)]
    get_logger().debug(f"scored {len(results)} completions in {1e3 * (time.perf_counter() - start):.1f} ms")
    return [s for s, _ in results], [kind for _, kind in results if kind], _take_records()


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
        name: str | None = None,
    ):
        """Start `workers_cfg.num_workers` workers for the environment `task_cfg`.

        `name` is the env's key in the task (default: its `name`), which names its log file;
        `log_dir` is the run's `logs/` directory; `env_factory` ("module:Class") builds an
        environment that is not in the registry (plugins, tests).
        """
        self._task = dict(plain(task_cfg))
        self.env_name: str = name or self._task["name"]
        self.num_workers = int(workers_cfg.num_workers)
        self.max_retries = max_retries
        self.restarts = 0
        self.errors: Counter[str] = Counter()  # kinds of scoring error since take_error_counts()
        self.errors_total: Counter[str] = Counter()  # ... and over the pool's life, reported at close
        self._errors_seen: set[str] = set()
        self.log_file: Path | None = None
        log_spec: str | None = None
        if workers_cfg.file_logs and log_dir is not None:
            root = Path(log_dir) / "env_workers"
            if getattr(workers_cfg, "per_worker_logs", False):
                self.log_file = root / self.env_name
                self.log_file.mkdir(parents=True, exist_ok=True)
                for old in self.log_file.glob("worker_*.log"):
                    old.unlink()  # a fresh set per run, which the workers then append to
                log_spec = str(self.log_file / "worker_{worker}.log")
            else:
                self.log_file = root / f"{self.env_name}.log"
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                self.log_file.write_text("")  # a fresh file per run, which the workers then append to
                log_spec = str(self.log_file)
        self._ctx = get_context("spawn")  # a clean interpreter: no inherited threads, torch or logger
        self._counter = self._ctx.Value("i", 0)  # worker indices, continued across restarts
        self._initargs = (
            self._task, env_factory, str(workers_cfg.level), str(workers_cfg.env_level), log_spec, self._counter,
        )
        self.score_timeout_s = float(getattr(workers_cfg, "score_timeout_s", 30.0))
        self._init_extra = (self.env_name, self.score_timeout_s)
        self.pids: list[int] = []  # the live workers' process ids
        self.reward_fns: list[str] = []  # the environment's reward function names (from a worker)
        self._pool = self._start()

    def _start(self, timeout_s: float = 120.0) -> ProcessPoolExecutor:
        """A new executor with every worker started (start-up errors surface here, not mid-run)."""
        started = self._ctx.Barrier(self.num_workers, timeout=timeout_s)
        pool = ProcessPoolExecutor(
            self.num_workers, mp_context=self._ctx, initializer=_init_worker,
            initargs=(*self._initargs, started, *self._init_extra),
        )  # fmt: skip
        pids = []
        try:
            for future in [pool.submit(_hello) for _ in range(self.num_workers)]:
                pid, self.reward_fns, records = future.result()
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
            self.errors["worker_restarts"] += 1
            self.errors_total["worker_restarts"] += 1
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
        # SIGALRM cuts off each slow completion in its worker; a worker that still does not
        # answer (stuck in C code) is killed, and its chunk's completions score 0 as timeouts.
        longest = max((len(c) for c, _ in todo.values()), default=0)
        _, stuck = wait(futures.values(), timeout=self.score_timeout_s * longest + 10.0)
        if stuck:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.kill()
            for i in [i for i, f in futures.items() if f in stuck]:
                results[i] = [{**dict.fromkeys(self.reward_fns, 0.0), "reward": 0.0} for _ in todo[i][0]]
                self._count(["timeout"] * len(todo[i][0]))
                del futures[i]
            wait(futures.values())
            broken = BrokenProcessPool(f"a worker stopped answering for {self.score_timeout_s * longest + 10.0:g} s")
        for i, future in futures.items():
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                broken = error
            elif error is not None:
                raise error  # a bug in a reward function fails loudly
            else:
                results[i], kinds, records = future.result()
                self._forward(records)
                self._count(kinds)
        return broken

    def _count(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.errors[kind] += 1
            self.errors_total[kind] += 1
            if kind not in self._errors_seen:  # the owner's log names each kind once; the env log has the message
                self._errors_seen.add(kind)
                where = f" (see {self.log_file})" if self.log_file else ""
                _log("WARNING", f"env {self.env_name!r}: {kind} while scoring; that completion scored 0{where}")

    def take_error_counts(self) -> dict[str, int]:
        """Counts since the last call: `score` (a reward function raised), `timeout`, `worker_restarts`."""
        counts = {"score": 0, "timeout": 0, "worker_restarts": 0}
        for kind, n in self.errors.items():
            counts["score" if kind.startswith("score") else kind] += n
        self.errors.clear()
        return counts

    def _forward(self, records: list[tuple[str, str]]) -> None:
        """Write worker records handed back (file_logs off) through this process's logger."""
        for level, line in records:
            _log(level, line)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.errors_total:
            counts = ", ".join(f"{kind} x{n}" for kind, n in self.errors_total.most_common())
            _log("WARNING", f"env {self.env_name!r}: scoring errors over the run: {counts}")

    def __enter__(self) -> "EnvWorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log(level: str, message: str) -> None:
    try:
        get_logger().log(level, message)
    except RuntimeError:  # this process set up no logger: stderr still reaches the job's log
        print(f"{level} {message}", file=sys.stderr)
