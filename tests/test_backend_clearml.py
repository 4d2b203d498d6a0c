"""ClearML backend: what it writes, read back from ClearML's offline session across a restart of the
job: the task with ClearML's own offline reader (`Task(task_id=...)` in offline mode loads
`task.json`), the events from `metrics.jsonl` as `Task.import_offline_session` reads them, and
the zip that command takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("clearml")

from rlrun.tracking.backends.clearml import (  # noqa: E402
    HISTOGRAM_BINS,
    ClearmlBackend,
    ClearmlLoggerConfig,
    _local_task_class,
    read_events,
)
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME in tmp_path, and a ClearML server configured: offline, nothing may reach it."""
    real = Path.home() / ".clearml"
    before = sorted(real.rglob("*")) if real.exists() else []
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_API_HOST", "https://api.clear.ml")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "x" * 20)
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "y" * 40)
    monkeypatch.delenv("CLEARML_CACHE_DIR", raising=False)
    yield home
    assert (sorted(real.rglob("*")) if real.exists() else []) == before, "nothing in ~/.clearml"
    assert not any(home.rglob("*")), "nothing written to HOME"


def _metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"loss": 1.0 / step + offset, "rewards/lcs/mean": step * 0.25, "eval/pass@4": 0.5, "time/step": 0.125}


def _reload(root: Path, task_id: str):
    from clearml import Task

    return _local_task_class(root, task_id)(private=Task._Task__create_protection, task_id=task_id)


def test_roundtrip_across_a_restart(tmp_path, no_network, isolated_home):
    run_dir = tmp_path / "run"
    cfg = ClearmlLoggerConfig(enabled=True, project="rlrun-test", tags=["grpo"])
    first = ClearmlBackend(cfg, TrackerContext(job="trainer", output_dir=run_dir, run_name="exp", max_table_rows=5))
    identity = first.run_identity()
    task_id = identity["clearml_task_id"]
    assert task_id.startswith("offline-") and identity["clearml_dir"] == str((run_dir / "clearml").absolute())
    first.open()
    first.open()  # re-callable: the writer thread calls it again after a failure
    first.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>", "n": 4})
    batches = [[MetricPoint(s, _metrics(s), 0.0) for s in range(lo, min(lo + 7, 31))] for lo in range(1, 31, 7)]
    for batch in batches:
        first.log_metrics(batch)
    first.log_metrics(batches[1])  # a retried delivery adds nothing
    samples = [{"prompt": "a|b", "completion": "x\ny", "reward": 1.0}, {"prompt": "c", "completion": "", "reward": 0}]
    first.log_samples(samples, step=10)
    first.log_samples(samples, step=10)  # retried
    first.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)
    first.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)  # retried
    first.log_alert(no_eos_alert(12))
    first.log_alert(no_eos_alert(12))  # retried
    first.finish()
    session = run_dir / "clearml" / task_id
    assert (run_dir / "clearml" / f"{task_id}.zip").exists()

    # The job restarts from its step-24 checkpoint: steps 25..30 come again, with other values.
    second = ClearmlBackend(cfg, TrackerContext(job="trainer", output_dir=run_dir, run_name="exp", resume_ids=identity))
    assert second.run_identity() == identity
    second.open()
    second.log_hyperparams({"trainer.resumed": True})
    second.log_metrics([MetricPoint(s, _metrics(s, offset=100.0), 0.0) for s in range(25, 61)])
    second.log_samples([{"prompt": "again", "completion": "", "reward": 0.0}], step=10)  # the session has it
    second.log_samples([{"prompt": "later", "completion": "z", "reward": 0.5}], step=40)
    second.log_distribution("distributions/reward", [1.0, 2.0, 3.0], step=40)
    second.log_alert(no_eos_alert(12))  # the log has it
    second.log_alert(no_eos_alert(41, stop=True))
    second.finish()
    second.finish()  # idempotent

    assert sorted(p.name for p in (run_dir / "clearml").iterdir()) == [task_id, f"{task_id}.zip"], "one task, continued"
    events = read_events(session)
    assert {e["task"] for e in events} == {task_id}

    scalars: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for e in events:
        if e["type"] == "training_stats_scalar":
            scalars.setdefault((e["metric"], e["variant"]), []).append((e["iter"], e["value"]))
    assert sorted(scalars) == [("eval", "pass@4"), ("loss", "loss"), ("rewards/lcs", "mean"), ("time", "step")]
    assert scalars[("loss", "loss")] == [(s, 1.0 / s + (0.0 if s <= 30 else 100.0)) for s in range(1, 61)], \
        "each step exactly once, unshifted; steps the task had keep their first values"
    assert scalars[("rewards/lcs", "mean")] == [(s, s * 0.25) for s in range(1, 61)]
    assert scalars[("eval", "pass@4")] == [(s, 0.5) for s in range(1, 61)]
    assert scalars[("time", "step")] == [(s, 0.125) for s in range(1, 61)]

    plots = {(e["metric"], e["variant"], e["iter"]): json.loads(e["plot_str"]) for e in events if e["type"] == "plot"}
    assert len([e for e in events if e["type"] == "plot"]) == len(plots) == 4, "no plot twice"
    table = plots[("samples", "samples", 10)]["data"][0]
    assert table["type"] == "table" and table["header"]["values"] == ["step", "prompt", "completion", "reward"]
    assert table["cells"]["values"] == [[10, 10], ["a|b", "c"], ["x\ny", ""], [1.0, 0]], "columns of cells"
    assert plots[("samples", "samples", 40)]["data"][0]["cells"]["values"] == [[40], ["later"], ["z"], [0.5]]
    hist = plots[("distributions", "reward", 10)]["data"][0]
    assert hist["type"] == "bar" and len(hist["y"]) == HISTOGRAM_BINS and sum(hist["y"]) == 4
    assert (hist["x"][0], hist["y"][0], hist["y"][-1]) == ("0.0", 1, 1)
    assert float(hist["x"][HISTOGRAM_BINS // 4]) == 0.25 and hist["y"][HISTOGRAM_BINS // 4] == 1
    hist = plots[("distributions", "reward", 40)]["data"][0]
    assert (hist["x"][0], sum(hist["y"])) == ("1.0", 3)

    logs = [(e["level"], e["msg"]) for e in events if e["type"] == "log"]
    assert logs == [("WARNING", no_eos_alert(12).text()), ("ERROR", no_eos_alert(41, stop=True).text())]

    task = _reload((run_dir / "clearml").absolute(), task_id)  # ClearML's offline reader of task.json
    assert task.name == "exp-trainer" and task.get_tags() == ["grpo"]
    assert task.get_parameters(cast=True) == {
        "rlrun/trainer.lr": 0.003, "rlrun/name": "exp", "rlrun/logger.wandb.api_key": "<redacted>", "rlrun/n": 4,
        "rlrun/trainer.resumed": True,
    }  # fmt: skip
    assert task.get_parameters()["rlrun/trainer.lr"] == "0.003", "ClearML keeps values as strings"
    stored = json.loads((session / "task.json").read_text())
    assert stored["project_name"] == "rlrun-test", "the project import_offline_session files it under"
    assert "script" not in stored and "environment" not in json.dumps(stored).lower(), "no argv, no environment"

    with zipfile.ZipFile(run_dir / "clearml" / f"{task_id}.zip") as zf:
        assert sorted(zf.namelist()) == ["metrics.jsonl", "task.json"]
        assert zf.read("metrics.jsonl") == (session / "metrics.jsonl").read_bytes(), "the zip has the whole session"

    assert no_network == [], "no connection and no DNS lookup"


def test_two_jobs_from_writer_threads(tmp_path, no_network, isolated_home):
    """Trainer and orchestrator in one process, each on its own thread: two tasks, not one."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(ClearmlLoggerConfig(enabled=True, name="exp"))
    backends = [ClearmlBackend(cfg, TrackerContext(job=job, output_dir=tmp_path)) for job in ("trainer", "orchestrator")]
    errors: list[BaseException] = []

    def writer(backend: ClearmlBackend, offset: float) -> None:
        try:
            backend.open()
            for step in range(20):
                backend.log_metrics([MetricPoint(step, {"x": offset + step}, 0.0)])
            backend.finish()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b, 100.0 * i)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, backend in enumerate(backends):
        events = read_events(backend.session_dir)
        assert [(e["iter"], e["value"]) for e in events if e["type"] == "training_stats_scalar"] == [
            (s, 100.0 * i + s) for s in range(20)
        ]
        assert _reload(backend.root.absolute(), backend.task_id).name == f"exp-{backend.task_name.split('-')[-1]}"
    assert no_network == []


def test_clashing_names_are_refused(tmp_path, isolated_home):
    backend = ClearmlBackend(ClearmlLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
    backend.open()
    backend.log_metrics([MetricPoint(1, {"x": 1.0}, 0.0)])
    with pytest.raises(ValueError, match="title/series"):
        backend.log_metrics([MetricPoint(2, {"x/x": 1.0, "y": 2.0}, 0.0)])
    backend.log_metrics([MetricPoint(2, {"y": 2.0}, 0.0)])
    backend.finish()
    assert [(e["metric"], e["iter"]) for e in read_events(backend.session_dir)] == [("x", 1), ("y", 2)]


def test_plugin_and_lazy_import(tmp_path):
    """The entry point's object names this backend, and importing the module imports no clearml."""
    code = ("import importlib, sys; from rlrun.tracking.backends.clearml import PLUGIN, ClearmlBackend, ClearmlLoggerConfig; "
            "module, cls = PLUGIN.backend.split(':'); assert getattr(importlib.import_module(module), cls) is ClearmlBackend; "
            "assert PLUGIN.config is ClearmlLoggerConfig; assert 'clearml' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})
    ClearmlBackend.preflight(ClearmlLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
