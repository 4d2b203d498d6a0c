"""Comet backend: what it writes, read back from Comet's offline archives across a restart of the
job: every zip of the experiment (`experiment.json`, and `messages.json` with the files it
names), as `comet upload` reads them; histograms with Comet's own `Histogram.from_json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("comet_ml")

from rlrun.tracking.backends.comet import (  # noqa: E402
    CometBackend,
    CometLoggerConfig,
    archives,
    read_archives,
    table_rows,
)
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME in tmp_path, TMPDIR watched, and a Comet API key configured: offline, nothing may use it."""
    real_tmp = tmp_path / "tmp"
    real_tmp.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COMET_API_KEY", "x" * 25)
    monkeypatch.setattr("tempfile.tempdir", str(real_tmp))
    for var in ("MPLCONFIGDIR", "COMET_ERROR_TRACKING_ENABLE", "COMET_DISABLE_AUTO_LOGGING"):
        monkeypatch.delenv(var, raising=False)  # set by open(): undone after the test
    yield home
    assert not any(home.rglob("*")), "nothing written to HOME"
    assert not any(real_tmp.rglob("*")), "nothing left in the temporary directory"


def _metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"loss": 1.0 / step + offset, "rewards/lcs/mean": step * 0.25, "eval/pass@4": 0.5, "time/step": 0.125}


def test_roundtrip_across_a_restart(tmp_path, no_network, isolated_home):
    run_dir = tmp_path / "run"
    cfg = CometLoggerConfig(enabled=True, project="rlrun-test", tags=["grpo"])
    from comet_ml.error_tracking.api import setup_sentry_error_tracker

    setup_sentry_error_tracker()  # as half of the comet_ml imports do, before open() could say no
    first = CometBackend(cfg, TrackerContext(job="trainer", output_dir=run_dir, run_name="exp", max_table_rows=5))
    identity = first.run_identity()
    key = identity["comet_experiment_key"]
    assert len(key) == 32 and key.isalnum() and identity["comet_dir"] == str((run_dir / "comet").absolute())
    first.open()
    first.open()  # re-callable: the writer thread calls it again after a failure
    first.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>", "n": 4})
    first.log_hyperparams({"trainer.lr": 0.003, "n": 4})  # retried
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
    session = [p for p in (run_dir / "comet").iterdir() if p.name.startswith(f".{key}-")]
    assert len(session) == 1 and (session[0] / "messages.json").exists(), "the live session is under the run dir"
    first.finish()
    assert [p.name for p in archives(run_dir / "comet", key)] == [f"{key}.zip"]
    assert not session[0].exists(), "the zip replaces the session folder"

    # The job restarts from its step-24 checkpoint: steps 25..30 come again, with other values.
    second = CometBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path / "elsewhere", run_name="exp",
                                              resume_ids=identity, max_table_rows=5))  # fmt: skip
    assert second.run_identity() == identity
    second.open()
    second.log_hyperparams({"trainer.lr": 0.003, "trainer.resumed": True})
    for lo in range(25, 61, 9):
        second.log_metrics([MetricPoint(s, _metrics(s, offset=100.0), 0.0) for s in range(lo, min(lo + 9, 61))])
    second.log_samples(samples, step=10)  # the checkpoint is older than the first table: not again
    second.log_samples([{"prompt": "later", "completion": "z", "reward": 0.5}], step=40)
    second.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)  # had it
    second.log_distribution("distributions/reward", [1.0, 2.0, 3.0], step=40)
    second.log_alert(no_eos_alert(12))  # had it
    second.log_alert(no_eos_alert(41, stop=True))
    second.finish()
    assert not (tmp_path / "elsewhere").exists(), "a resumed job writes where the run is"

    root = run_dir / "comet"
    zips = archives(root, key)
    assert len(zips) == 2 and zips[1].name.startswith(f"{key}-"), "a resume is a second zip of the same key"
    metas, messages = read_archives(root, key)
    assert [m["offline_id"] for m in metas] == [key, key]
    assert [m["resume_strategy"] for m in metas] == ["create", "get"], "comet upload appends the second one"
    assert metas[0]["project_name"] == "rlrun-test" and metas[0]["tags"] == ["grpo"]
    assert not any(m.get("customer_error_reported") for m in metas), "Comet reported no error of its own"

    scalars: dict[str, list[tuple[int, float]]] = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            scalars.setdefault(metric["metricName"], []).append((metric["step"], metric["metricValue"]))
    scalars.pop("process duration", None)  # Comet's own, on some ends
    assert sorted(scalars) == ["eval/pass@4", "loss", "rewards/lcs/mean", "time/step"], "names kept, '/' and '@' too"
    assert scalars["loss"] == [(s, 1.0 / s + (0.0 if s <= 30 else 100.0)) for s in range(1, 61)], \
        "each step exactly once, unshifted; steps the experiment had keep their first values"
    assert scalars["rewards/lcs/mean"] == [(s, s * 0.25) for s in range(1, 61)]
    assert scalars["eval/pass@4"] == [(s, 0.5) for s in range(1, 61)]
    assert scalars["time/step"] == [(s, 0.125) for s in range(1, 61)]

    params = [m["payload"]["param"] for m in messages if m["type"] == "parameter_msg"]
    manual = {(p["paramName"], json.dumps(p["paramValue"])) for p in params if p["source"] == "manual"
              and p["paramName"] != "curr_step"}  # fmt: skip
    assert sorted(manual) == sorted({("trainer.lr", "0.003"), ("name", '"exp"'), ("n", "4"), ("trainer.resumed", "true"),
                                     ("logger.wandb.api_key", '"<redacted>"')}), "each param once, typed"  # fmt: skip
    assert len([p for p in params if p["source"] == "manual" and p["paramName"] != "curr_step"]) == 5
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    assert others["Name"] == "exp-trainer" and others["offline_experiment"] is True

    uploads = [m for m in messages if m["type"] == "file_upload"]
    tables = {m["payload"]["additional_params"]["step"]: m for m in uploads
              if m["payload"]["additional_params"]["fileName"].startswith("samples-step-")}  # fmt: skip
    assert sorted(tables) == [10, 40]
    assert tables[10]["payload"]["additional_params"]["fileName"] == "samples-step-10.csv"
    assert table_rows(tables[10]["data"]) == [
        ["step", "prompt", "completion", "reward"], ["10", "a|b", "x\ny", "1.0"], ["10", "c", "", "0"]]
    assert table_rows(tables[40]["data"]) == [["step", "prompt", "completion", "reward"], ["40", "later", "z", "0.5"]]

    from comet_ml import Histogram

    hists = {m["payload"]["additional_params"]["step"]: m for m in uploads if m["payload"]["upload_type"] == "histogram3d"}
    assert sorted(hists) == [10, 40], "no histogram twice"
    for step, values in ((10, [0.0, 0.25, 0.5, 1.0]), (40, [1.0, 2.0, 3.0])):
        assert hists[step]["payload"]["additional_params"]["fileName"] == "distributions/reward"
        stored = Histogram.from_json(json.loads(hists[step]["data"]))
        expected = Histogram()
        expected.add(values)
        assert stored.counts_compressed() == expected.counts_compressed()
        assert stored.get_count(-10.0, 10.0) == len(values)
    assert Histogram.from_json(json.loads(hists[40]["data"])).get_count(1.5, 2.5) == 1

    texts = [m for m in uploads if m["payload"]["upload_type"] == "text-sample"]
    assert [(m["payload"]["additional_params"]["step"], m["data"].decode(), m["payload"]["metadata"]["level"])
            for m in texts] == [(12, no_eos_alert(12).text(), "warning"), (41, no_eos_alert(41, stop=True).text(), "error")]  # fmt: skip
    assert texts[1]["payload"]["metadata"]["rule"] == "no_eos" and texts[1]["payload"]["metadata"]["stop"] is True

    everything = b"".join(z.read_bytes() for z in zips).decode("latin-1")
    assert "x" * 25 not in everything and str(isolated_home) not in everything, "no API key, no environment"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".matplotlib")) == sorted(z.name for z in zips)
    assert no_network == [], "no connection and no DNS lookup"


def test_long_names_are_refused(tmp_path, isolated_home):
    backend = CometBackend(CometLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
    backend.open()
    backend.log_metrics([MetricPoint(1, {"x": 1.0}, 0.0)])
    with pytest.raises(ValueError, match="100 characters"):
        backend.log_metrics([MetricPoint(2, {"a" * 101: 1.0, "y": 2.0}, 0.0)])
    backend.log_metrics([MetricPoint(2, {"y": 2.0}, 0.0)])
    backend.finish()
    metrics = [m["payload"]["metric"] for m in read_archives(backend.root, backend.key)[1] if m["type"] == "metric_msg"]
    assert [(m["metricName"], m["step"]) for m in metrics if m["metricName"] != "process duration"] == [("x", 1), ("y", 2)]


def test_plugin_and_lazy_import(tmp_path):
    """The entry point's object names this backend, and importing the module imports no comet_ml."""
    code = ("import importlib, sys; from rlrun.tracking.backends.comet import PLUGIN, CometBackend, CometLoggerConfig; "
            "module, cls = PLUGIN.backend.split(':'); assert getattr(importlib.import_module(module), cls) is CometBackend; "
            "assert PLUGIN.config is CometLoggerConfig; assert 'comet_ml' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})
    CometBackend.preflight(CometLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
