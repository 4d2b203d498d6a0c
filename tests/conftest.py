"""Shared test fixtures and helpers.

Test modules import the helpers by name (pytest puts tests/ on sys.path):

    from conftest import ROOT, metrics, run_app, spawn_app

- `ROOT`: the repository root (the cwd of every `python -m ...` a test starts).
- `run_app` / `spawn_app` / `app_env`: `python -m rlrun hydra.run.dir=<dir> <overrides>`, the
  whole app as `make run` starts it, to the end or in the background.
- `records` / `metrics`: a job's local record (`<run>/metrics/<job>.jsonl`), read through the
  project's one reader, `rlrun.tracking.record`.
- `wandb_records`: an offline W&B run's transaction log, read with wandb's own reader.

Fixtures: `tiny_model` (the default tiny model, built once per session: read it, never write
into it) and `hydra_compose` (the real config tree composed as `python -m rlrun` composes it).

House rules:
- Waiting for something is `rlrun.rundir.wait_for(ready, what, timeout_s)`; it returns the
  first value that is not None or False (so `[]` and `0` count as ready: return None instead).
- A test that starts `python -m rlrun` is marked `slow` (`make test` runs them all).
- A test's own timeout (pytest-timeout's global 300 s, or `@pytest.mark.timeout(N)`) is longer
  than the subprocess and wait timeouts it goes through, so those fire first, with their message.
- No wall-clock windows in tests (the CI machine is a loaded 2-core one): prove "does not wait"
  by order of events, counts, or a backend the test holds blocked. Speed goals are in benchmarks/.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rlrun.tracking.record import read_records, record_path

_LOCAL = ("127.0.0.1", "::1", "localhost")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Tests never talk to the W&B cloud; runs that need W&B use offline mode.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


# ---------------------------------------------------------------- the app as a subprocess


def app_cmd(run_dir: str | Path, *overrides: str) -> list[str]:
    """`python -m rlrun hydra.run.dir=<run_dir> <overrides>`."""
    return [sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", *overrides]


def app_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment for an app run that may log to W&B offline: W&B's data and cache
    under `tmp` (not the home directory), no API key from the caller's shell."""
    env = {**os.environ, "WANDB_DATA_DIR": str(tmp / "wandb_data"), "WANDB_CACHE_DIR": str(tmp / "wandb_cache")}
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def no_eos_alert(step: int, stop: bool = False) -> Any:
    """The run-doctor finding the tracker backends' tests log and read back (a fixed time per step)."""
    from rlrun.tracking.base import Alert

    return Alert(job="trainer", rule="no_eos", metric="completions/clipped_ratio", step=step, value=0.95,
                 detail="(>= 0.9 for 10 steps)", hint="raise max_tokens", stop=stop, time=1_700_000_000.0 + step)  # fmt: skip


def alive(procs):
    """The processes (psutil.Process objects or pids) still running and not zombies, in order."""
    import psutil

    out = []
    for item in procs:
        try:
            proc = item if isinstance(item, psutil.Process) else psutil.Process(item)
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(item)
        except psutil.NoSuchProcess:
            pass
    return out


def run_app(
    run_dir: str | Path, *overrides: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the whole app to its end; stdout and stderr captured as text."""
    return subprocess.run(
        app_cmd(run_dir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def spawn_app(run_dir: str | Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the whole app in the background; its stdout and stderr, together, on `proc.stdout`."""
    return subprocess.Popen(
        app_cmd(run_dir, *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


# ---------------------------------------------------------------- what a run recorded


def records(run_dir: str | Path, job: str, kind: str | None = None) -> list[dict[str, Any]]:
    """A job's records of type `kind` (all of them when None), in the order they were written."""
    return read_records(record_path(run_dir, job), kind)


def metrics(run_dir: str | Path, job: str) -> list[dict[str, Any]]:
    """A job's `metrics` records (`step`, `time`, `metrics`), in the order they were written."""
    return records(run_dir, job, "metrics")


def assert_names_planned(run_dir: str | Path) -> None:
    """Every metric and distribution name the run logged is one `rlrun.metric_names` planned
    for its config: the names checked against the trackers before any job started."""
    from omegaconf import OmegaConf

    from rlrun.config import schema
    from rlrun.metric_names import planned_metrics

    saved = OmegaConf.load(Path(run_dir) / "config.yaml")
    cfg = OmegaConf.merge(schema(deployment=OmegaConf.select(saved, "deployment.name", default="local")), saved)
    plan = planned_metrics(cfg)
    for path in sorted((Path(run_dir) / "metrics").glob("*.jsonl")):
        logged = read_records(path)
        scalars = {name for r in logged if r["type"] == "metrics" for name in r["metrics"]}
        distributions = {r["name"] for r in logged if r["type"] == "distribution"}
        assert path.stem in plan, f"{path.stem} logs metrics but no names were planned for it"
        assert not scalars - set(plan[path.stem].scalars), (path.stem, sorted(scalars - set(plan[path.stem].scalars)))
        assert not distributions - set(plan[path.stem].distributions), (path.stem, sorted(distributions))


def wandb_records(run_file: str | Path) -> list[dict[str, Any]]:
    """The records of an offline W&B run's `run-<id>.wandb`, read with `wandb leet inspect --json`
    (wandb-core's reader: wandb has no Python reader for these files any more)."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "WANDB_MODE": "offline"},  # the reader sends no telemetry
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def no_network(monkeypatch):
    """Every connection or DNS lookup off this machine fails and is recorded."""
    attempts: list[object] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL and host is not None:
            attempts.append(host)
            raise socket.gaierror(f"test: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def pip_install_site(package: Path, tmp: Path) -> Path:
    """`package` (a source tree) built and pip-installed into `<tmp>/site` (for sys.path or an
    app's PYTHONPATH): a plugin or environment package the tests install without the venv."""
    import shutil

    src = tmp / "src"
    shutil.copytree(package, src)  # pip builds in the source tree: keep build/ and egg-info out of the repo
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-input", "--disable-pip-version-check", "--target", str(tmp / "site"), str(src)],
        check=True, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return tmp / "site"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default tiny model (`ModelConfig()`, seed 0), built once for the session, at
    `<dir>/model` (so `<dir>` passes for a run directory). Shared: copy it to change it."""
    from rlrun.config import ModelConfig
    from rlrun.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", ModelConfig(), seed=0)


@pytest.fixture(scope="module")
def hydra_compose() -> Callable[..., Any]:
    """`hydra_compose(*overrides)`: the real config tree composed as `python -m rlrun` composes it.

    Module-scoped: Hydra's global state is initialized for one module at a time.
    """
    from hydra import compose, initialize_config_dir

    from rlrun.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _fresh_logger():
    """Each test starts and ends without a process logger."""
    from rlrun.log import reset_logger

    reset_logger()
    yield
    reset_logger()


def _has_gpu() -> bool:
    """An NVIDIA GPU this process can see: through NVML (cheap), else through torch."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                return True
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests are skipped on machines without a GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in gpu_items:
            item.add_marker(skip)
