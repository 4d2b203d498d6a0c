"""The Tracker under faults, with real backends read back with their own readers.

- An MLflow server SIGKILLed while the Tracker logs, then restarted on the same store and
  port: every point lands exactly once and no `log_metrics` call waits for the server.
- Secrets in the config reach no file and no backend (jsonl, TensorBoard, MLflow, W&B).
- W&B online without credentials fails when the Tracker is built, saying what to do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from conftest import metrics, records, wandb_records  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlrun.config import RunConfig  # noqa: E402
from rlrun.rundir import wait_for  # noqa: E402
from rlrun.tracking import Tracker  # noqa: E402

# W&B's system-metrics sampler and requirements capture are not under test.
WANDB_FAST = {"x_disable_stats": True, "x_save_requirements": False, "disable_git": True}


def _logger_cfg(**enabled: bool):
    """The `logger` node of a whole run config (its `${name}` interpolations resolve)."""
    cfg = OmegaConf.structured(RunConfig).logger
    for name, on in enabled.items():
        cfg[name].enabled = on
    return cfg


# ---------------------------------------------------------------- (a) server killed mid-run


@pytest.mark.timeout(420)  # two server starts (90 s each), flushes (30 s, 60 s), the outage (30 s at most)
def test_mlflow_server_killed_and_restarted_mid_run(tmp_path, caplog):
    server = MlflowServer(tmp_path / "server").start()
    try:
        _log_through_an_outage(server, tmp_path, caplog)
    finally:
        server.stop()


def _log_through_an_outage(server: MlflowServer, tmp_path: Path, caplog) -> None:
    cfg = _logger_cfg(mlflow=True)
    cfg.mlflow.tracking_uri = server.uri
    cfg.mlflow.experiment_name = "outage"
    cfg.delivery.retry_initial_s = 0.05
    cfg.delivery.retry_max_s = 0.5
    tracker = Tracker(cfg, job="trainer", output_dir=tmp_path / "run")
    worker = tracker.workers["mlflow"]

    logged: dict[int, dict[str, float]] = {}

    def log(step: int) -> None:
        values = {f"m{i}": step * 10.0 + i for i in range(5)}
        tracker.log_metrics(values, step)
        logged[step] = values
        time.sleep(0.01)

    step = 0
    while step < 100:
        log(step)
        step += 1
    assert tracker.flush(timeout=30), "delivered while the server is up"

    # The outage: SIGKILL, then a restart once the caller has logged on through it. A
    # log_metrics that waited for the server would never get there (the restart then comes
    # after 30 s, and the count below says so).
    server.kill()  # no graceful shutdown
    restarting, restarted = threading.Event(), threading.Event()
    logged_through = threading.Event()
    returned_while_down = 0  # log_metrics calls that returned before the restart began
    restart_error: list[BaseException] = []

    def restart() -> None:
        try:
            logged_through.wait(30)
            restarting.set()
            server.start()
        except BaseException as exc:  # noqa: BLE001
            restart_error.append(exc)
        restarted.set()

    restarter = threading.Thread(target=restart)
    restarter.start()
    while not restarted.is_set():  # keep logging through the outage and the restart
        log(step)
        step += 1
        if not restarting.is_set():
            returned_while_down += 1
            if returned_while_down >= 20 and worker.failures > 0:
                logged_through.set()
    outage_end = step
    while step < max(300, outage_end + 50):  # and on after it
        log(step)
        step += 1
    restarter.join()
    assert not restart_error, restart_error
    assert returned_while_down >= 20, f"only {returned_while_down} log_metrics calls returned while the server was down"
    assert worker.failures > 0, "the outage was noticed (deliveries failed and were retried)"
    assert tracker.flush(timeout=60), "delivery resumed after the restart, before finish()"
    tracker.finish()

    client = MlflowClient(server.uri)
    run_id = worker.backend.run_id
    for i in range(5):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"trainer/m{i}"))
        assert history == [(s, logged[s][f"m{i}"]) for s in range(step)], f"m{i}: each point exactly once"
    steps = [r["step"] for r in metrics(tmp_path / "run", "trainer")]
    assert steps == list(range(step)), "the jsonl record did not wait for MLflow"
    assert any("tracker backend mlflow failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- (b) secrets


WANDB_KEY = "wandb_v1_" + "Ab3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6kM9n"  # new-style W&B key, 40 chars
HF_TOKEN = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNm1234567890"  # looks like a Hugging Face token
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SECRETS = (WANDB_KEY, HF_TOKEN, GITHUB_PAT)


def test_secrets_reach_no_backend(tmp_path, monkeypatch):
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    cfg = OmegaConf.structured(RunConfig)
    cfg.name = "secrets"
    cfg.logger.wandb.api_key = WANDB_KEY  # secret by its key's name
    cfg.model.path = HF_TOKEN  # secret by its value only
    cfg.logger.console.metrics = ["loss", GITHUB_PAT]  # in a list
    log_cfg = cfg.logger
    log_cfg.tensorboard.enabled = True
    log_cfg.mlflow.enabled = True
    log_cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_cfg.mlflow.experiment_name = "secrets"
    log_cfg.wandb.enabled = True
    log_cfg.wandb.offline = True
    log_cfg.wandb.dir = str(tmp_path / "wandb_root")
    run_dir = tmp_path / "run"

    tracker = Tracker(log_cfg, job="trainer", output_dir=run_dir, wandb_settings=WANDB_FAST)
    assert sorted(tracker.workers) == ["jsonl", "mlflow", "tensorboard", "wandb"]
    tracker.log_hyperparams(cfg)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    tracker.log_samples([{"prompt": "abc", "completion": "cba", "reward": 1.0}], step=2)
    tracker.log_distribution("rewards", [0.0, 0.5, 1.0], step=2)
    assert tracker.flush(timeout=120), "every backend got everything"
    tracker.finish()

    # jsonl: redacted, but the params are all there.
    (hp,) = [r["params"] for r in records(run_dir, "trainer", "hyperparams")]
    assert hp["logger.wandb.api_key"] == hp["model.path"] == "<redacted>"
    assert hp["logger.console.metrics"] == '["loss", "<redacted>"]'
    assert hp["trainer.lr"] == 0.003, "only the secrets are redacted"

    # TensorBoard: the raw event files.
    tb_files = [p for p in (run_dir / "tensorboard").rglob("*") if p.is_file()]
    assert tb_files, "TensorBoard wrote event files"
    assert any(b"| logger.wandb.api_key | <redacted> |" in p.read_bytes() for p in tb_files), "hyperparams written"
    for path in tb_files:
        for secret in SECRETS:
            assert secret.encode() not in path.read_bytes(), (secret, path)

    # MLflow: the run's params as MLflow returns them.
    client = MlflowClient(log_cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    params = run.data.params
    assert params["logger.wandb.api_key"] == params["model.path"] == "<redacted>"
    assert params["trainer.lr"] == "0.003"
    for value in list(params.values()) + list(run.data.tags.values()):
        for secret in SECRETS:
            assert secret not in value, (secret, value)

    # W&B: the offline run's config, read back with wandb's reader, and every file's bytes.
    run_id = tracker.run_identity()["wandb_run_id"]
    (wandb_run_dir,) = (tmp_path / "wandb_root" / "wandb").glob(f"offline-run-*-{run_id}")
    items = wandb_records(wandb_run_dir / f"run-{run_id}.wandb")
    config: dict = {}
    for item in items:
        if item["type"] == "config":
            config.update(item["config"].get("update", {}))
    assert config["logger.wandb.api_key"] == config["model.path"] == "<redacted>"
    assert config["trainer.lr"] == 0.003
    assert any(r["type"] == "history" for r in items), "the metrics are in the run"
    for secret in SECRETS:
        assert secret not in json.dumps(items), secret

    # And no file anywhere under the test's directory holds a secret: jsonl, the MLflow
    # database and artifacts, TensorBoard, the W&B run and W&B's data, cache and config dirs.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "mlflow.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret, path)


# ---------------------------------------------------------------- (c) W&B online, no credentials


def test_wandb_online_without_credentials_fails_at_construction(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    # The W&B server: a port that listens and never answers. A connection attempt would be
    # left pending in its backlog.
    wandb_server = socket.create_server(("127.0.0.1", 0))
    wandb_server.setblocking(False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{wandb_server.getsockname()[1]}")
    cfg = _logger_cfg(wandb=True, tensorboard=True)
    threads_before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError) as err:
        Tracker(cfg, job="trainer", output_dir=tmp_path / "run")
    with wandb_server, pytest.raises(BlockingIOError):
        wandb_server.accept()  # "fails at once, not after trying to connect": nothing tried to
    message = str(err.value)
    assert "wandb login" in message and "logger.wandb.offline=true" in message
    assert "WANDB_API_KEY" in message
    assert not {t.name for t in threading.enumerate() if t.name.startswith("tracker-")} - threads_before, (
        "no writer thread was started"
    )
    assert not (tmp_path / "run").exists(), "nothing was written"
    # The same config offline builds (and finishes) fine.
    cfg.wandb.offline = True
    cfg.wandb.dir = str(tmp_path / "wandb_root")
    Tracker(cfg, job="trainer", output_dir=tmp_path / "run", wandb_settings=WANDB_FAST).finish()


# ---------------------------------------------------------------- (d) a writer thread importing torch

_IMPORT_RACE = """
import json, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from rlrun.config import RunConfig
from rlrun.tracking import Tracker

cfg = OmegaConf.structured(RunConfig).logger
cfg.tensorboard.enabled = True  # its writer thread imports torch when it opens
tracker = Tracker(cfg, job="trainer", output_dir=sys.argv[1])
assert "torch" not in sys.modules

def importing() -> bool:
    # torch.distributed registered but torch not done importing: `import torch.distributed`
    # here would wait on the import lock until the writer thread's import finishes.
    torch = sys.modules.get("torch")
    return "torch.distributed" in sys.modules and bool(getattr(torch.__spec__, "_initializing", False))

in_window, returned_in_window, step = 0, 0, 0
events = Path(sys.argv[1]) / "tensorboard" / "trainer"
while step < 5 or not any(events.glob("events.*")):  # until the writer thread has imported torch
    started_in_window = importing()
    tracker.log_metrics({"x": float(step)}, step)
    in_window += started_in_window
    returned_in_window += started_in_window and importing()
    step += 1
    time.sleep(0.001)
tracker.finish()
print(json.dumps({"in_window": in_window, "returned_in_window": returned_in_window, "steps": step}))
"""


def test_writer_thread_importing_torch_does_not_block_the_caller(tmp_path):
    """log_metrics checks for a process group without waiting for a half-done torch import."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_RACE, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["in_window"] > 0, f"the loop never ran while torch was being imported: {result}"
    # A call that waited for the import would return only once torch is imported; at most
    # one call (the one the import finishes during) may do so by chance.
    assert result["returned_in_window"] > 0, f"log_metrics waited for the torch import: {result}"
    assert result["returned_in_window"] >= result["in_window"] - 1, f"log_metrics waited for the torch import: {result}"


# ---------------------------------------------------------------- (e) no thread wake-up per call


def test_paced_calls_wake_no_writer_and_are_delivered_in_batches(tmp_path):
    """A call wakes no writer thread (a woken writer preempts the caller on a busy machine);
    the writer picks up what arrived on its own within a wake interval, in one batch."""
    from rlrun.tracking.delivery import WAKE_INTERVAL_S

    tracker = Tracker(_logger_cfg(), job="trainer", output_dir=tmp_path)
    backend = tracker.workers["jsonl"].backend
    calls: list[int] = []
    real = backend.log_metrics

    def spy(points):
        calls.append(len(points))
        return real(points)

    backend.log_metrics = spy
    start = time.monotonic()
    for step in range(100):
        tracker.log_metrics({"x": float(step)}, step)
        time.sleep(0.002)  # a paced caller: the writer would otherwise be woken 100 times
    elapsed = time.monotonic() - start  # a bound that grows with the machine's slowness, never flaky
    # No flush: it arrives by itself.
    wait_for(lambda: sum(calls) >= 100, "delivery without flush() or finish()", timeout_s=30)
    assert sum(calls) == 100, "delivered without flush() or finish()"
    assert len(calls) <= elapsed / WAKE_INTERVAL_S + 3, f"{len(calls)} backend calls for 100 paced steps: {calls}"
    tracker.finish()
    assert [r["step"] for r in metrics(tmp_path, "trainer")] == list(range(100))


# ---------------------------------------------------------------- (d) every file-backed store blocked, then freed


def _tensorboard_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "trainer"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars("x")}


def _mlflow_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    history = MlflowClient(identity["mlflow_tracking_uri"]).get_metric_history(identity["mlflow_run_id"], "trainer/x")
    assert len(history) == len({m.step for m in history}), "no step twice"
    return {m.step: m.value for m in history}


def _dvclive_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from dvclive.utils import parse_tsv

    rows = parse_tsv(run_dir / "dvclive" / "trainer" / "plots" / "metrics" / "x.tsv")
    assert len(rows) == len({row["step"] for row in rows}), "no step twice"
    return {int(row["step"]): float(row["x"]) for row in rows}


def _aim_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from aim.storage.context import Context
    from test_backend_aim import _read_run

    run = _read_run(run_dir / "aim", identity["aim_run_hash"])
    steps, (values,) = run.get_metric("x", Context({})).data.view("val").items_list()
    assert len(steps) == len(set(steps)), "no step twice"
    return dict(zip(steps, values))


def _trackio_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from test_backend_trackio import _read

    (run,) = _read(run_dir / "trackio", "rlrun").values()
    logs = [log for log in run["logs"] if "x" in log]
    assert len(logs) == len({log["step"] for log in logs}), "no step twice"
    return {log["step"]: log["x"] for log in logs}


def _swanlab_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from test_backend_swanlab import _of, _runs

    (found,) = _runs(run_dir / "swanlog", identity["swanlab_run_id"])
    scalars = [(s.step, s.value.number) for s in _of(found[1], "scalar") if s.key == "x"]
    assert len(scalars) == len({step for step, _ in scalars}), "no step twice"
    return dict(scalars)


def _clearml_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from rlrun.tracking.backends.clearml import read_events

    events = [e for e in read_events(run_dir / "clearml" / identity["clearml_task_id"])
              if e["type"] == "training_stats_scalar" and (e["metric"], e["variant"]) == ("x", "x")]  # fmt: skip
    assert len(events) == len({e["iter"] for e in events}), "no step twice"
    return {e["iter"]: e["value"] for e in events}


def _comet_steps(run_dir: Path, identity: dict[str, str]) -> dict[int, float]:
    from rlrun.tracking.backends.comet import read_archives

    metrics = [m["payload"]["metric"] for m in read_archives(run_dir / "comet", identity["comet_experiment_key"])[1]
               if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"] == "x"]  # fmt: skip
    assert len(metrics) == len({m["step"] for m in metrics}), "no step twice"
    return {m["step"]: float(m["metricValue"]) for m in metrics}


# backend -> (where its store goes under the run directory, how to read x's steps back)
FILE_STORES = {
    "tensorboard": ("tensorboard", _tensorboard_steps),
    "clearml": ("clearml", _clearml_steps),
    "comet": ("comet", _comet_steps),
    "mlflow": ("mlstore", _mlflow_steps),
    "dvclive": ("dvclive", _dvclive_steps),
    "aim": ("aim", _aim_steps),
    "trackio": ("trackio", _trackio_steps),
    "swanlab": ("swanlog", _swanlab_steps),
}


@pytest.mark.parametrize("backend", sorted(FILE_STORES))
def test_a_blocked_store_is_retried_spilled_and_replayed(backend, tmp_path, monkeypatch, no_network):
    """The backend's store path is taken by a plain file (a fault root cannot write through,
    unlike a read-only directory): every call fails, the Tracker keeps the points (spilled to
    disk past `max_in_memory`), the caller never waits; once the path is free, every step is
    delivered exactly once, read back with the tracker's own reader."""
    pytest.importorskip({"mlflow": "mlflow", "dvclive": "dvclive", "aim": "aim", "trackio": "trackio",
                         "swanlab": "swanlab", "clearml": "clearml", "comet": "comet_ml"}.get(backend, "tensorboard"))  # fmt: skip
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    store, read_steps = FILE_STORES[backend]
    cfg = _logger_cfg(**{backend: True})
    cfg.delivery.retry_initial_s, cfg.delivery.retry_max_s, cfg.delivery.max_in_memory = 0.05, 0.2, 5
    cfg.delivery.warn_interval_s = 0.0
    if backend == "mlflow":
        cfg.mlflow.tracking_uri = f"sqlite:///{run_dir / store / 'mlflow.db'}"
    blocked = run_dir / store
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the store's folder should be")

    tracker = Tracker(cfg, job="trainer", output_dir=run_dir, mlflow_end_run=True)
    worker = tracker.workers[backend]
    slowest = 0.0
    for step in range(1, 41):
        start = time.perf_counter()
        tracker.log_metrics({"x": step * 0.5}, step)
        slowest = max(slowest, time.perf_counter() - start)
    wait_for(lambda: worker.failures >= 2 or None, f"{backend} to fail twice", timeout_s=60)
    wait_for(lambda: worker.backlog.on_disk or None, f"{backend}'s backlog to spill", timeout_s=60)
    spill = run_dir / "metrics" / ".spill" / "trainer" / f"{backend}.spill"
    assert spill.is_file() and slowest < 0.2, (spill, slowest)

    blocked.unlink()  # the fault ends: the next retry goes through
    tracker.finish()
    assert not spill.exists(), "the spill was read back and removed"
    assert read_steps(run_dir, worker.backend.run_identity()) == {step: step * 0.5 for step in range(1, 41)}
    assert [r["step"] for r in metrics(run_dir, "trainer")] == list(range(1, 41))
    assert no_network == []
