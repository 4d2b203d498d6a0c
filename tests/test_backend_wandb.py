"""W&B backend in offline mode, read back from the run directory with wandb's own reader.

wandb 0.31 has no Python reader for `.wandb` transaction logs any more (the old
`wandb.sdk.internal.datastore` is gone); its reader is `wandb leet inspect --json`
(wandb-core), which prints one JSON object per record.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import wandb_records
from omegaconf import DictConfig, OmegaConf

from rlrun.config import WandbLoggerConfig
from rlrun.tracking.backends import backend_class
from rlrun.tracking.backends.wandb import WandbBackend
from rlrun.tracking.base import MetricPoint, TrackerContext

# Smaller and quieter runs; W&B's own system-metrics sampler is not under test.
FAST = {"wandb_settings": {"x_disable_stats": True, "x_save_requirements": False, "disable_git": True}}


@pytest.fixture(autouse=True)
def _wandb_data_dir(tmp_path, monkeypatch):
    """Offline table artifacts are staged under $WANDB_DATA_DIR (default ~/.local/share/wandb)."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def _cfg(tmp_path: Path, **kw) -> DictConfig:
    """The backend's node as the tracker hands it over: a typed OmegaConf node."""
    kw.setdefault("offline", True)
    return OmegaConf.structured(WandbLoggerConfig(enabled=True, project="rlrun-test", name="exp", dir=str(tmp_path), **kw))


def _run_dir(tmp_path: Path, run_id: str) -> Path:
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    return run_dir


def _records(run_dir: Path, run_id: str) -> list[dict]:
    return wandb_records(run_dir / f"run-{run_id}.wandb")


def _history(records: list[dict]) -> dict[int, dict]:
    return {int(r["history"]["step"].get("num", 0)): r["history"]["item"] for r in records if r["type"] == "history"}


def _config(records: list[dict]) -> dict:
    config: dict = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
    return config


def test_offline_roundtrip(tmp_path):
    ctx = TrackerContext(job="trainer", output_dir=tmp_path / "run", max_table_rows=5, **FAST)
    backend = backend_class("wandb")(_cfg(tmp_path, id="abc123", tags=["t1", "t2"]), ctx)
    assert backend.run_identity() == {"wandb_run_id": "abc123-trainer"}, "known before open()"
    backend.open()
    backend.open()  # re-callable: the second call keeps the run

    backend.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>"})
    t0 = time.time()
    for step in range(10):
        backend.log_metrics([MetricPoint(step, {"loss": 1.0 / (step + 1), "reward/mean": 0.1 * step}, t0 + step)])
        if step in (2, 5, 8):
            backend.log_samples([{"prompt": f"p{step}-{i}", "completion": "c", "reward": float(i)} for i in range(2)], step)
        if step == 5:
            backend.log_distribution("rewards/per_sample", [0.0, 0.25, 0.5, 1.0], step)
    backend.log_metrics([MetricPoint(3, {"loss": 99.0}, t0)])  # a stale re-delivery: ignored, no error
    backend.log_samples([{"prompt": "late", "completion": "c", "reward": 2.0}], step=7)  # late: kept at step 9
    backend.finish()
    backend.finish()  # idempotent

    run_dir = _run_dir(tmp_path, "abc123-trainer")
    records = _records(run_dir, "abc123-trainer")
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "exp-trainer"
    assert run["run_group"] == "exp" and run["job_type"] == "trainer"
    assert run["project"] == "rlrun-test" and run["run_id"] == "abc123-trainer"
    assert run["tags"] == ["t1", "t2"]

    config = _config(records)
    assert config["trainer.lr"] == 0.003 and config["name"] == "exp"
    assert config["logger.wandb.api_key"] == "<redacted>"

    history = _history(records)
    assert sorted(history) == list(range(10))
    for step in range(10):
        assert history[step]["loss"] == 1.0 / (step + 1), "the stale step-3 value did not overwrite"
        assert history[step]["reward/mean"] == 0.1 * step

    hist = history[5]
    assert hist["rewards/per_sample._type"] == "histogram"
    assert sum(hist["rewards/per_sample.values"]) == 4
    assert (hist["rewards/per_sample.bins"][0], hist["rewards/per_sample.bins"][-1]) == (0.0, 1.0)

    # One accumulating table under `samples`, bounded to the newest max_table_rows rows.
    assert {s for s, item in history.items() if item.get("samples._type") == "table-file"} == {2, 5, 8, 9}
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 4
    at_step = {s: json.loads((run_dir / "files" / history[s]["samples.path"]).read_text()) for s in (2, 5, 8, 9)}
    assert at_step[2]["columns"] == ["step", "prompt", "completion", "reward"]
    assert [row[1] for row in at_step[2]["data"]] == ["p2-0", "p2-1"]
    assert [row[0] for row in at_step[8]["data"]] == [2, 5, 5, 8, 8], "rows from several steps, oldest dropped"
    assert [row[1] for row in at_step[9]["data"]] == ["p5-0", "p5-1", "p8-0", "p8-1", "late"]
    assert at_step[9]["data"][-1][0] == 7, "a row keeps its own step"

    (loss,) = [r["metric"] for r in records if r["type"] == "metric" and r["metric"].get("name") == "loss"]
    assert loss["summary"] == {"min": True}, "the run table shows the lowest loss"


def test_monitor_metrics_are_plotted_over_elapsed_seconds(tmp_path):
    ctx = TrackerContext(job="monitor", output_dir=tmp_path / "run", **FAST)
    backend = backend_class("wandb")(_cfg(tmp_path, id="mon"), ctx)
    backend.open()
    backend.log_metrics([MetricPoint(1, {"system/elapsed_s": 2.0, "system/cpu_percent": 50.0, "gpu/0/power_w": 9.0},
                                     time.time())])  # fmt: skip
    backend.finish()
    records = _records(_run_dir(tmp_path, "mon-monitor"), "mon-monitor")
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    assert {m["glob_name"]: m["step_metric"] for m in metrics if "glob_name" in m} == {
        "system/*": "system/elapsed_s", "gpu/*": "system/elapsed_s"}


def test_two_jobs_in_one_process_from_writer_threads(tmp_path):
    """Trainer and orchestrator: two runs open at once, each opened and fed on its own thread."""
    backends = {
        job: WandbBackend(_cfg(tmp_path, group="grp"), TrackerContext(job=job, output_dir=tmp_path, **FAST))
        for job in ("trainer", "orchestrator")
    }
    ids = {job: b.run_identity()["wandb_run_id"] for job, b in backends.items()}
    assert ids["trainer"] != ids["orchestrator"]
    errors: list[BaseException] = []
    opened = threading.Barrier(2)

    def writer(job: str, offset: float) -> None:
        try:
            backend = backends[job]
            backend.open()
            opened.wait(60)  # both runs are open at the same time
            for step in range(5):
                backend.log_metrics([MetricPoint(step, {"x": offset + step}, time.time())])
            backend.finish()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(job, 100.0 * i)) for i, job in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors

    for i, job in enumerate(("trainer", "orchestrator")):
        records = _records(_run_dir(tmp_path, ids[job]), ids[job])
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["display_name"] == f"exp-{job}" and run["run_group"] == "grp" and run["job_type"] == job
        assert {s: item["x"] for s, item in _history(records).items()} == {s: 100.0 * i + s for s in range(5)}


def test_api_key_is_never_written(tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    backend = WandbBackend(_cfg(tmp_path, id="keyed", api_key=secret), TrackerContext(job="trainer", output_dir=tmp_path, **FAST))
    backend.open()
    backend.log_hyperparams({"logger.wandb.api_key": "<redacted>"})
    backend.log_metrics([MetricPoint(0, {"x": 1.0}, time.time())])
    backend.finish()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_preflight_online_without_credentials_says_what_to_do(no_credentials):
    ctx = TrackerContext(job="trainer", output_dir=no_credentials)
    with pytest.raises(RuntimeError) as err:
        WandbBackend.preflight(_cfg(no_credentials, offline=False), ctx)
    message = str(err.value)
    assert "wandb login" in message and "WANDB_API_KEY" in message and "logger.wandb.offline=true" in message


def test_preflight_passes_when_it_can_work(no_credentials, monkeypatch):
    tmp_path = no_credentials
    ctx = TrackerContext(job="trainer", output_dir=tmp_path)
    online = _cfg(tmp_path, offline=False)
    WandbBackend.preflight(_cfg(tmp_path, offline=True), ctx)
    WandbBackend.preflight(_cfg(tmp_path, offline=False, api_key="k" * 40), ctx)
    monkeypatch.setenv("WANDB_MODE", "offline")
    WandbBackend.preflight(online, ctx)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    WandbBackend.preflight(online, ctx)
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    WandbBackend.preflight(online, ctx)


def test_the_model_as_an_artifact(tmp_path, tiny_model):
    """log_model=checkpoints: every checkpoint's model directory an artifact of type `model`."""
    import base64
    import hashlib

    ctx = TrackerContext(job="trainer", output_dir=tmp_path / "run", **FAST)
    backend = backend_class("wandb")(_cfg(tmp_path, id="art", log_model="checkpoints"), ctx)
    assert backend.wants_model(final=False) and backend.wants_model(final=True)
    backend.open()
    backend.log_model(tiny_model, step=5, final=False)
    backend.log_model(tiny_model, step=9, final=True)
    backend.log_model(tmp_path / "pruned", step=10, final=True)  # gone before upload: skipped
    backend.finish()

    records = _records(_run_dir(tmp_path, "art-trainer"), "art-trainer")
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert [(a["type"], a["name"], sorted(a["aliases"])) for a in artifacts] == [
        ("model", "art-trainer-model", ["latest", "step-5"]), ("model", "art-trainer-model", ["final", "latest", "step-9"])]
    weights = (tiny_model / "model.safetensors").read_bytes()
    digest = base64.b64encode(hashlib.md5(weights).digest()).decode()
    for artifact in artifacts:
        files = {c["path"]: c["digest"] for c in artifact["manifest"]["contents"]}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert files["model.safetensors"] == digest, "the exported weights, byte for byte"
