"""trackio backend: what it writes, read back with trackio's own reader (`trackio.Api` and the
store it reads, `trackio.sqlite_storage.SQLiteStorage`), across a restart of the job."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("trackio")

from rlrun.tracking.backends.trackio import SAMPLES_KEY, TrackioBackend, TrackioLoggerConfig, trackio_dir  # noqa: E402
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402

PROJECT = "rlrun-test"


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME and the HF cache in tmp_path, and an HF token around: trackio.init would ask the
    Hub who it is with it (whoami); this backend must not."""
    real_store = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "trackio"
    before = sorted(real_store.rglob("*")) if real_store.exists() else []
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    for var in ("TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)
    yield home
    assert (sorted(real_store.rglob("*")) if real_store.exists() else []) == before, "nothing in trackio's default store"
    assert not home.exists() or not any(home.rglob("*")), "nothing written to HOME"


def _read(directory: Path, project: str = PROJECT) -> dict[str, dict]:
    """Per run name: id, logs, config and alerts, as trackio's Api and store read them
    from `directory` (trackio keeps its directory in module globals: `trackio_dir` sets it)."""
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    with trackio_dir(directory):
        return {
            run.name: {"id": run.id, "logs": SQLiteStorage.get_logs(project, run_id=run.id), "config": run.config,
                       "alerts": run.alerts()}  # fmt: skip
            for run in trackio.Api().runs(project)
        }


def _metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"loss": 1.0 / step + offset, "rewards/lcs/mean": step * 0.25, "eval/pass@4": 0.5, "time/step": 0.125, "time": 7.0}


def test_roundtrip_across_a_restart(tmp_path, no_network, isolated_home):
    run_dir = tmp_path / "run"
    cfg = TrackioLoggerConfig(enabled=True, project=PROJECT)
    first = TrackioBackend(cfg, TrackerContext(job="trainer", output_dir=run_dir, run_name="exp"))
    identity = first.run_identity()
    assert identity["trackio_run_name"] == "exp-trainer" and identity["trackio_run_id"], "known before open()"
    first.open()
    first.open()  # re-callable: the writer thread calls it again after a failure
    first.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>", "_x": 1})
    t0 = 1_700_000_000.0
    batches = [[MetricPoint(s, _metrics(s), t0 + s) for s in range(lo, min(lo + 7, 31))] for lo in range(1, 31, 7)]
    for batch in batches:
        first.log_metrics(batch)
    first.log_metrics(batches[1])  # a retried delivery adds nothing
    samples = [{"prompt": "a|b", "completion": "x\ny", "reward": 1.0}, {"prompt": "c", "completion": "", "reward": 0}]
    first.log_samples(samples, step=10)
    first.log_samples(samples, step=10)  # retried
    first.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)
    first.log_alert(no_eos_alert(12))
    first.log_alert(no_eos_alert(12))  # retried
    first.finish()

    # The job restarts from its step-24 checkpoint: steps 25..30 come again, with other values.
    second = TrackioBackend(cfg, TrackerContext(job="trainer", output_dir=run_dir, run_name="exp", resume_ids=identity))
    assert second.run_identity() == identity
    second.open()
    second.log_hyperparams({"trainer.lr": 0.003, "trainer.resumed": True})
    second.log_metrics([MetricPoint(s, _metrics(s, offset=100.0), t0 + s) for s in range(25, 61)])
    second.log_samples([{"prompt": "again", "completion": "", "reward": 0.0}], step=28)  # the run has step 28
    second.log_samples([{"prompt": "later", "completion": "z", "reward": 0.5}], step=40)
    second.log_distribution("distributions/reward", [1.0, 2.0, 3.0], step=40)
    second.log_alert(no_eos_alert(41, stop=True))
    second.finish()
    second.finish()  # idempotent

    runs = _read(run_dir / "trackio")
    assert list(runs) == ["exp-trainer"] and runs["exp-trainer"]["id"] == identity["trackio_run_id"], "one run, continued"
    run = runs["exp-trainer"]

    logs = run["logs"]
    scalars = sorted((row for row in logs if "loss" in row), key=lambda row: row["step"])
    assert [row["step"] for row in scalars] == list(range(1, 61)), "each step exactly once"
    for row in scalars:
        s = row["step"]
        assert row["loss"] == 1.0 / s + (0.0 if s <= 30 else 100.0), "steps the run had keep their first values"
        assert row["rewards/lcs/mean"] == s * 0.25 and row["eval/pass@4"] == 0.5 and row["time/step"] == 0.125
        assert row["__time"] == 7.0, "a name trackio reserves gets trackio's `__` prefix"
        assert row["timestamp"] == datetime.fromtimestamp(t0 + s, timezone.utc).isoformat(), "the caller's time"

    tables = {row["step"]: row[SAMPLES_KEY] for row in logs if SAMPLES_KEY in row}
    assert sorted(tables) == [10, 40]
    assert tables[10] == {"_type": "trackio.table", "_value": [{"step": 10, **row} for row in samples]}
    assert tables[40]["_value"] == [{"step": 40, "prompt": "later", "completion": "z", "reward": 0.5}]

    hists = {row["step"]: row["distributions/reward"] for row in logs if "distributions/reward" in row}
    assert sorted(hists) == [10, 40]
    assert hists[10]["_type"] == "trackio.histogram" and sum(hists[10]["values"]) == 4
    assert (hists[10]["bins"][0], hists[10]["bins"][-1]) == (0.0, 1.0)
    assert (hists[40]["bins"][0], hists[40]["bins"][-1], sum(hists[40]["values"])) == (1.0, 3.0, 3)

    config = run["config"]
    assert config["trainer.lr"] == 0.003 and config["name"] == "exp" and config["logger.wandb.api_key"] == "<redacted>"
    assert config["param_x"] == 1, "a `_` key is trackio's: the param is renamed"
    assert config["trainer.resumed"] is True, "the second attempt's params are merged in"
    assert config["_Group"] == "exp"

    alerts = sorted(run["alerts"], key=lambda a: a["step"])
    assert [(a["step"], a["level"], a["title"]) for a in alerts] == [(12, "warn", "trainer: no_eos"), (41, "error", "trainer: no_eos")]
    assert alerts[0]["text"] == no_eos_alert(12).text()

    assert no_network == [], "no connection and no DNS lookup"
    assert {p.name for p in (run_dir / "trackio").iterdir()} <= {f"{PROJECT}.db", f"{PROJECT}.lock", f"{PROJECT}.db-wal", f"{PROJECT}.db-shm"}


def test_two_jobs_two_stores_from_writer_threads(tmp_path, no_network, isolated_home):
    """Trainer and orchestrator on their own threads, and a third backend with its own store:
    trackio's process-wide directory must not mix them up. Configs as the tracker hands them
    over: typed OmegaConf nodes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(TrackioLoggerConfig(enabled=True, project=PROJECT, name="exp", group="grp"))
    other_cfg = OmegaConf.structured(TrackioLoggerConfig(enabled=True, project=PROJECT, dir=str(tmp_path / "elsewhere")))
    backends = [TrackioBackend(cfg, TrackerContext(job=job, output_dir=tmp_path)) for job in ("trainer", "orchestrator")]
    backends.append(TrackioBackend(other_cfg, TrackerContext(job="sft", output_dir=tmp_path, run_name="solo")))
    errors: list[BaseException] = []
    opened = threading.Barrier(len(backends))

    def writer(backend: TrackioBackend, offset: float) -> None:
        try:
            backend.open()
            opened.wait(30)
            for step in range(20):
                backend.log_metrics([MetricPoint(step, {"x": offset + step}, time.time())])
            backend.finish()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b, 100.0 * i)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors

    runs = _read(tmp_path / "trackio")
    assert set(runs) == {"exp-trainer", "exp-orchestrator"}
    for i, job in enumerate(("trainer", "orchestrator")):
        run = runs[f"exp-{job}"]
        assert {r["step"]: r["x"] for r in run["logs"] if "x" in r} == {s: 100.0 * i + s for s in range(20)}
        assert run["config"]["_Group"] == "grp"
    assert {name: [r["x"] for r in run["logs"] if "x" in r] for name, run in _read(tmp_path / "elsewhere").items()} == {
        "solo-sft": [200.0 + s for s in range(20)]
    }
    assert no_network == []


def test_trackio_keeps_its_own_directory_outside_our_writes(tmp_path, isolated_home):
    import trackio.sqlite_storage
    import trackio.utils

    before = (trackio.utils.TRACKIO_DIR, trackio.sqlite_storage.TRACKIO_DIR, trackio.utils.MEDIA_DIR)
    backend = TrackioBackend(TrackioLoggerConfig(enabled=True, project=PROJECT), TrackerContext(job="trainer", output_dir=tmp_path))
    backend.open()
    backend.log_metrics([MetricPoint(1, {"x": 1.0}, time.time())])
    backend.finish()
    assert (trackio.utils.TRACKIO_DIR, trackio.sqlite_storage.TRACKIO_DIR, trackio.utils.MEDIA_DIR) == before


def test_refuses_hub_sync_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_BUCKET_ID", "someone/bucket")
    ctx = TrackerContext(job="trainer", output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="TRACKIO_BUCKET_ID"):
        TrackioBackend.preflight(TrackioLoggerConfig(enabled=True), ctx)
    with pytest.raises(RuntimeError, match="locally only"):
        TrackioBackend(TrackioLoggerConfig(enabled=True), ctx).open()
    assert not (tmp_path / "trackio").exists()


def test_plugin_and_lazy_import(tmp_path):
    """The entry point's object names this backend, and importing the module imports no trackio."""
    code = ("import importlib, sys; from rlrun.tracking.backends.trackio import PLUGIN, TrackioBackend, TrackioLoggerConfig; "
            "module, cls = PLUGIN.backend.split(':'); assert getattr(importlib.import_module(module), cls) is TrackioBackend; "
            "assert PLUGIN.config is TrackioLoggerConfig; assert 'trackio' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    TrackioBackend.preflight(TrackioLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
