"""Aim backend: a local repo, written across a restart, read back with Aim's own SDK.

Aim's SDK reads runs through the repo's index, which the Aim UI builds in the background;
the test builds it with Aim's own `aim storage reindex` command (run in-process through
Aim's click CLI), then reads the run with `aim.Repo`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

aim = pytest.importorskip("aim")
from aim.cli.cli import cli_entry_point  # noqa: E402
from aim.storage.context import Context  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlrun.tracking.backends.aim import AimBackend, AimLoggerConfig  # noqa: E402
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402

NAMES = ("loss", "rewards/lcs/mean", "eval/pass@4", "time/step")


def _value(name: str, step: int) -> float:
    return NAMES.index(name) * 1000.0 + step / 8  # exact in binary floating point


@pytest.fixture
def offline(tmp_path, monkeypatch, no_network):
    """HOME in tmp_path; any connection or DNS lookup off this machine fails and is recorded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return no_network


def _read_run(repo_dir: Path, run_hash: str):
    result = CliRunner().invoke(cli_entry_point, ["storage", "--repo", str(repo_dir), "reindex", "--yes"])
    assert result.exit_code == 0, result.output
    repo = aim.Repo(str(repo_dir))
    assert [r.hash for r in repo.iter_runs()] == [run_hash], "one run, the resumed one"
    return repo.get_run(run_hash)


def test_aim_roundtrip_across_a_restart(tmp_path, offline):
    home_before = set((tmp_path / "home").rglob("*"))
    threads_before = set(threading.enumerate())
    cfg = OmegaConf.structured(AimLoggerConfig(enabled=True, experiment="exp"))  # as the tracker hands it over
    ctx = TrackerContext(job="trainer", output_dir=tmp_path / "run")

    first = AimBackend(cfg, ctx)
    identity = first.run_identity()
    assert set(identity) == {"aim_run_hash"} and len(identity["aim_run_hash"]) == 24, "known before open()"
    first.open()
    first.open()  # re-callable: keeps the run
    first.log_hyperparams({"trainer.lr": 0.003, "trainer.steps": 60, "name": "exp", "a": 1, "a.b": 2,
                           "logger.wandb.api_key": "<redacted>"})  # fmt: skip
    for start in range(1, 31, 10):
        first.log_metrics([MetricPoint(s, {n: _value(n, s) for n in NAMES}, time.time()) for s in range(start, start + 10)])
    first.log_metrics([MetricPoint(5, {"loss": 99.0}, time.time())])  # a retried batch: same step rewritten, not added
    first.log_metrics([MetricPoint(5, {"loss": _value("loss", 5)}, time.time())])
    first.log_samples([{"prompt": "p0", "completion": "c0", "reward": 1.0}], step=3)
    first.log_samples([{"prompt": "p1\n|x", "completion": "", "reward": 0}], step=3)  # same step: rows add up
    first.log_samples([{"prompt": "later", "reward": 0.5}], step=7)
    first.log_distribution("rewards/per_sample", [0.0, 0.5, 0.5, 1.0], step=3)
    first.log_distribution("rewards/per_sample", [1.0, 2.0, 3.0], step=7)
    checkins = first._run._checkins  # Aim's run-status files: written after the log record
    check_in = checkins.check_in

    def failing_once(*args, **kwargs):
        checkins.check_in = check_in
        raise OSError("test: disk full")

    checkins.check_in = failing_once
    with pytest.raises(OSError):
        first.log_alert(no_eos_alert(12))  # recorded, then failed
    first.log_alert(no_eos_alert(12))  # the delivery layer's retry: not recorded twice
    first.finish()
    first.finish()  # idempotent

    second = AimBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path / "run", resume_ids=identity))
    assert second.run_identity() == identity
    second.open()
    # The job restarts from a step-24 checkpoint: 25..30 come again, with other values.
    second.log_metrics([MetricPoint(s, {n: -_value(n, s) if s <= 30 else _value(n, s) for n in NAMES}, time.time())
                        for s in range(25, 61)])  # fmt: skip
    second.log_alert(no_eos_alert(12))  # already in the run: not logged twice
    second.log_alert(no_eos_alert(40, stop=True))
    second.finish()
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not left, f"threads left running after finish(): {left}"

    run = _read_run(tmp_path / "run" / "aim", identity["aim_run_hash"])
    assert run.name == "exp-trainer" and run.experiment == "exp"
    hparams = run["hparams"]
    assert hparams["trainer"] == {"lr": 0.003, "steps": 60}
    assert hparams["name"] == "exp" and hparams["logger"]["wandb"]["api_key"] == "<redacted>"
    assert hparams["a"] == 1 and hparams["a.b"] == 2, "a key that is also a prefix stays whole"

    for name in NAMES:
        metric = run.get_metric(name, Context({}))
        steps, (values,) = metric.data.view("val").items_list()
        assert steps == list(range(1, 61)), name
        assert values == [_value(name, s) for s in range(1, 61)], "each step once, the first attempt's values"

    texts = run.get_text_sequence("samples", Context({}))
    steps, (rows,) = texts.data.view("val").items_list()
    assert steps == [3, 7]
    assert [json.loads(t.data) for t in rows[0]] == [
        {"step": 3, "prompt": "p0", "completion": "c0", "reward": 1.0},
        {"step": 3, "prompt": "p1\n|x", "completion": "", "reward": 0},
    ]
    assert [json.loads(t.data) for t in rows[1]] == [{"step": 7, "prompt": "later", "reward": 0.5}]

    dists = run.get_distribution_sequence("rewards/per_sample", Context({}))
    steps, (hists,) = dists.data.view("val").items_list()
    assert steps == [3, 7]
    counts, edges = hists[0].to_np_histogram()
    assert counts.sum() == 4 and (edges[0], edges[-1]) == (0.0, 1.0) and len(counts) == 64
    counts, edges = hists[1].to_np_histogram()
    assert counts.sum() == 3 and (edges[0], edges[-1]) == (1.0, 3.0)

    _, (records,) = run.get_log_records().data.view("val").items_list()
    assert [(r.message, r.level) for r in records] == [
        (no_eos_alert(12).text(), logging.WARNING),
        (no_eos_alert(40, stop=True).text(), logging.ERROR),
    ]
    assert records[1].json()["args"] == {"job": "trainer", "rule": "no_eos", "metric": "completions/clipped_ratio",
                                         "step": 40, "value": 0.95}  # fmt: skip

    assert not offline, "no connection attempted"
    assert set((tmp_path / "home").rglob("*")) == home_before, "nothing written to HOME"
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {("run", "aim")}, "everything under <output_dir>/aim"


def test_aim_two_jobs_share_a_repo(tmp_path, offline):
    cfg = AimLoggerConfig(enabled=True, repo=str(tmp_path / "aimrepo"), experiment="exp")
    backends = [AimBackend(cfg, TrackerContext(job=job, output_dir=tmp_path)) for job in ("trainer", "orchestrator")]
    for i, backend in enumerate(backends):
        backend.open()
        backend.log_metrics([MetricPoint(1, {"x": float(i)}, time.time())])
    for backend in backends:
        backend.finish()
    CliRunner().invoke(cli_entry_point, ["storage", "--repo", str(tmp_path / "aimrepo"), "reindex", "--yes"])
    runs = {r.name: r for r in aim.Repo(str(tmp_path / "aimrepo")).iter_runs()}
    assert set(runs) == {"exp-trainer", "exp-orchestrator"}
    for i, name in enumerate(("exp-trainer", "exp-orchestrator")):
        assert runs[name].experiment == "exp"
        assert runs[name].get_metric("x", Context({})).data.view("val").items_list() == ([1], [[float(i)]])


def test_aim_preflight_says_what_to_install(tmp_path, monkeypatch):
    ctx = TrackerContext(job="trainer", output_dir=tmp_path)
    AimBackend.preflight(AimLoggerConfig(enabled=True), ctx)  # installed: nothing to say
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "aim" else object())
    with pytest.raises(RuntimeError, match="pip install aim"):
        AimBackend.preflight(AimLoggerConfig(enabled=True), ctx)
