"""SwanLab backend in offline mode, written across a restart, read back from its run folders.

SwanLab has no public reader for its record files: the test reads them with SwanLab's own
`DataStoreReader` (the reader `swanlab sync` uses) into its protobuf `Record`s, the config from
`files/config.yaml` and the media (tables, charts, texts) from the files the records name.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

swanlab = pytest.importorskip("swanlab")
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from swanlab.proto.swanlab.record.v1.record_pb2 import Record  # noqa: E402
from swanlab.proto.swanlab.run.v1.run_pb2 import ResumeMode, RunState  # noqa: E402
from swanlab.sdk.internal.core_python.store import DataStoreReader  # noqa: E402

from rlrun.tracking.backends.swanlab import SwanlabBackend, SwanlabLoggerConfig  # noqa: E402
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402
from rlrun.tracking.names import DISTRIBUTION_STATS  # noqa: E402

NAMES = ("loss", "rewards/lcs/mean", "eval/pass@4", "time/step")


def _value(name: str, step: int) -> float:
    return NAMES.index(name) * 1000.0 + step / 8


@pytest.fixture
def offline(tmp_path, monkeypatch, no_network):
    """HOME and the working directory in tmp_path, SwanLab's env pointing online and at a
    webhook, and any connection or DNS lookup off this machine failing (and recorded)."""
    for d in ("home", "cwd"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")  # SwanLab reads ./.env and ./swanlab.yaml, defaults to ./swanlog
    monkeypatch.setenv("SWANLAB_MODE", "online")
    monkeypatch.setenv("SWANLAB_WEBHOOK", "http://203.0.113.7/hook")
    return no_network


def _on_writer_thread(fn) -> None:
    """Backends run on their writer thread, never the main one."""
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]


def _read(path: Path) -> list[Record]:
    reader = DataStoreReader()
    reader.open(str(path))
    out = []
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        out.append(record)
    reader.close()
    return out


def _runs(log_dir: Path, run_id: str) -> list[tuple[Path, list[Record]]]:
    """(folder, records) of each folder of a run id, oldest first."""
    runs = [(path.parent, _read(path)) for path in sorted(log_dir.glob("run-*/run-*.swanlab"))]
    return [(d, records) for d, records in runs if records[0].start.id == run_id]


def _of(records: list[Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _media(run_dir: Path, records: list[Record], key: str) -> dict[int, tuple[str, str]]:
    """step -> (file content, caption) of a key's media records."""
    out = {}
    for m in _of(records, "media"):
        if m.key == key:
            (item,) = m.value.items
            (path,) = (run_dir / "media").rglob(item.filename)
            out[m.step] = (path.read_text(), item.caption)
    return out


def test_swanlab_roundtrip_across_a_restart(tmp_path, offline):
    home_before = set((tmp_path / "home").rglob("*"))
    threads_before = set(threading.enumerate())
    hook = sys.excepthook
    # A typed node, as the tracker hands it over.
    cfg = OmegaConf.structured(SwanlabLoggerConfig(enabled=True, project="rlrun-test", name="exp", id="abc123", tags=["t1"]))
    ctx = TrackerContext(job="trainer", output_dir=tmp_path / "run")
    first = SwanlabBackend(cfg, ctx)
    identity = first.run_identity()
    assert identity == {"swanlab_run_id": "abc123-trainer"}, "known before open()"
    rows3 = [{"prompt": "p0", "completion": "c0", "reward": 1.0}, {"prompt": "p1\n|x", "completion": "", "reward": 0}]

    def first_attempt():
        first.open()
        first.open()  # re-callable: keeps the run
        first.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>"})
        for start in range(1, 31, 10):
            first.log_metrics([MetricPoint(s, {n: _value(n, s) for n in NAMES}, time.time()) for s in range(start, start + 10)])
        first.log_metrics([MetricPoint(5, {"loss": 99.0}, time.time())])  # a retried batch: SwanLab keeps the first
        first.log_samples(rows3, step=3)
        first.log_samples([{"prompt": "again", "reward": 2.0}], step=3)  # same step: the next free one
        first.log_samples([{"prompt": "later", "reward": 0.5}], step=7)
        first.log_distribution("rewards/per_sample", [0.0, 0.5, 0.5, 1.0], step=3)
        first.log_distribution("rewards/per_sample", [1.0, 2.0, 3.0], step=7)
        first.log_alert(no_eos_alert(12))
        first.finish()
        first.finish()  # idempotent

    _on_writer_thread(first_attempt)
    assert not swanlab.has_run() and sys.excepthook is hook

    second = SwanlabBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path / "run", resume_ids=identity))
    assert second.run_identity() == identity

    def second_attempt():
        second.open()
        # The job restarts from a step-24 checkpoint: 25..30 come again, with other values.
        second.log_metrics([MetricPoint(s, {n: -_value(n, s) if s <= 30 else _value(n, s) for n in NAMES}, time.time())
                            for s in range(25, 61)])  # fmt: skip
        second.log_distribution("rewards/per_sample", [9.0], step=7)  # a replay: already there
        second.log_alert(no_eos_alert(12))  # a replay: already there
        second.log_alert(no_eos_alert(40, stop=True))
        second.finish()

    _on_writer_thread(second_attempt)
    left = {t for t in set(threading.enumerate()) - threads_before if t.is_alive()}
    assert all(type(t).__name__ == "InotifyFD" for t in left), f"threads left after finish(): {left}"

    log_dir = tmp_path / "run" / "swanlog"
    found = _runs(log_dir, "abc123-trainer")
    assert len(found) == 2 and len(list(log_dir.glob("run-*"))) == 2, "a resume writes a second folder, same run id"
    run_dirs = [d for d, _ in found]
    runs = [records for _, records in found]

    for records in runs:
        (start,) = _of(records, "start")
        assert (start.id, start.name, start.project, start.group, start.job_type) == (
            "abc123-trainer", "exp-trainer", "rlrun-test", "exp", "trainer")  # fmt: skip
        assert list(start.tags) == ["t1"] and start.resume == ResumeMode.RESUME_MODE_ALLOW
        (finish,) = _of(records, "finish")
        assert finish.state == RunState.RUN_STATE_FINISHED

    scalars: dict[str, list[tuple[int, float]]] = {}
    for records in runs:
        for s in _of(records, "scalar"):
            scalars.setdefault(s.key, []).append((s.step, s.value.number))
    for name in NAMES:
        assert scalars[name] == [(s, _value(name, s)) for s in range(1, 61)], "each step once, the first attempt's values"

    config = yaml.safe_load((run_dirs[0] / "files" / "config.yaml").read_text())
    assert {k: v["value"] for k, v in config.items()} == {
        "trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>"}  # fmt: skip

    first_run = runs[0]
    tables = _media(run_dirs[0], first_run, "samples")
    assert sorted(tables) == [3, 4, 7]
    table = json.loads(tables[3][0])
    assert [c["field"] for c in table["colDefs"]] == ["step", "prompt", "completion", "reward"]
    assert table["rowData"] == [{"step": 3, **r} for r in rows3]
    assert json.loads(tables[4][0])["rowData"] == [{"step": 3, "prompt": "again", "reward": 2.0}]
    assert json.loads(tables[7][0])["rowData"] == [{"step": 7, "prompt": "later", "reward": 0.5}]

    for step, values in ((3, [0.0, 0.5, 0.5, 1.0]), (7, [1.0, 2.0, 3.0])):
        v = np.asarray(values)
        expected = (*np.percentile(v, [5, 50, 95]), v.mean(), v.std(), v.min(), v.max())
        for stat, want in zip(DISTRIBUTION_STATS, expected):
            assert scalars[f"rewards/per_sample/{stat}"].count((step, float(want))) == 1
    charts = _media(run_dirs[0], first_run, "rewards/per_sample")
    assert sorted(charts) == [3, 7]
    bars = json.loads(charts[3][0])["series"][0]["data"]
    assert len(bars) == 30 and sum(bars) == 4 and (bars[0], bars[-1]) == (1, 1)
    assert "rewards/per_sample" not in {m.key for m in _of(runs[1], "media")}, "the replayed step-7 chart was skipped"

    alerts = {**_media(run_dirs[0], first_run, "alerts/no_eos"), **_media(run_dirs[1], runs[1], "alerts/no_eos")}
    assert alerts == {12: (no_eos_alert(12).text(), "trainer: no_eos"), 40: (no_eos_alert(40, stop=True).text(), "trainer: no_eos")}
    assert len(_media(run_dirs[1], runs[1], "alerts/no_eos")) == 1, "the replayed alert was not logged again"

    assert not offline, "no connection attempted"
    assert set((tmp_path / "home").rglob("*")) == home_before, "nothing written to HOME"
    assert not any((tmp_path / "cwd").iterdir()), "nothing written to the working directory"
    assert {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()} == {("run", "swanlog")}
    for d in run_dirs:
        metadata = json.loads((d / "files" / "swanlab-metadata.json").read_text())
        assert all(metadata[k] is None for k in ("hardware", "runtime", "git", "swanlab")), "no probe ran"


def test_swanlab_keeps_one_run_per_process(tmp_path, offline):
    cfg = SwanlabLoggerConfig(enabled=True, name="exp", id="x1")
    trainer = SwanlabBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path))
    orchestrator = SwanlabBackend(cfg, TrackerContext(job="orchestrator", output_dir=tmp_path))
    assert trainer.run_identity() != orchestrator.run_identity()
    trainer.open()
    try:
        with pytest.raises(RuntimeError, match="one run per process"):
            orchestrator.open()
    finally:
        trainer.finish()
    orchestrator.open()  # once the other run is finished (as the writer thread retries)
    orchestrator.log_metrics([MetricPoint(1, {"x": 1.0}, time.time())])
    orchestrator.finish()
    ((_, records),) = _runs(tmp_path / "swanlog", "x1-orchestrator")
    assert [(s.key, s.step, s.value.number) for s in _of(records, "scalar")] == [("x", 1, 1.0)]


def test_swanlab_preflight_says_what_to_install(tmp_path, monkeypatch):
    ctx = TrackerContext(job="trainer", output_dir=tmp_path)
    SwanlabBackend.preflight(SwanlabLoggerConfig(enabled=True), ctx)  # installed: nothing to say
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "swanlab" else object())
    with pytest.raises(RuntimeError, match="pip install swanlab"):
        SwanlabBackend.preflight(SwanlabLoggerConfig(enabled=True), ctx)
