"""DVCLive backend: what it writes, read back with DVCLive's own readers (`dvclive.utils.parse_tsv`
/ `parse_json`, `dvclive.serialize.load_yaml`) in its documented layout, across a restart."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dvclive")

from dvclive.serialize import load_yaml  # noqa: E402
from dvclive.utils import parse_json, parse_tsv  # noqa: E402

from rlrun.tracking.backends.dvclive import DvcliveBackend, DvcliveLoggerConfig  # noqa: E402
from conftest import no_eos_alert  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402
from rlrun.tracking.names import DISTRIBUTION_STATS  # noqa: E402



@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """HOME in tmp_path, a Studio token around (DVCLive would post to Studio with it), and the
    working directory a git repository: DVCLive's own set-up would `dvc init` it."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    subprocess.run(["git", "init", "-q", str(cwd)], check=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("DVC_STUDIO_TOKEN", "isat_" + "x" * 40)
    monkeypatch.setenv("DVC_STUDIO_REPO_URL", "https://github.com/example/repo")
    for var in ("DVC_ROOT", "DVCLIVE_TEST", "DVCLIVE_RESUME", "DVC_STUDIO_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(cwd)
    yield cwd
    assert sorted(p.name for p in cwd.iterdir()) == [".git"], "no .dvc / .dvcignore in the working directory"
    assert not any(home.rglob("*")), "nothing written to HOME"


def _metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"loss": 1.0 / step + offset, "rewards/lcs/mean": step * 0.25, "eval/pass@4": 0.5, "time/step": 0.125,
            "kl": math.nan if step == 5 else 0.01 * step}  # fmt: skip


def _history(run_dir: Path, name: str) -> list[tuple[int, str]]:
    """(step, value as written) rows of one metric's .tsv, DVCLive's column named by the name's last part."""
    return [(int(row["step"]), row[name.rsplit("/", 1)[-1]]) for row in parse_tsv(run_dir / "plots" / "metrics" / f"{name}.tsv")]


def test_roundtrip_across_a_restart(tmp_path, no_network, sandbox):
    output_dir = tmp_path / "run"
    cfg = DvcliveLoggerConfig(enabled=True)
    first = DvcliveBackend(cfg, TrackerContext(job="trainer", output_dir=output_dir, max_table_rows=3))
    identity = first.run_identity()
    run_dir = output_dir / "dvclive" / "trainer"
    assert identity == {"dvclive_dir": str(run_dir.absolute())}, "known before open()"
    first.open()
    first.open()  # re-callable: the writer thread calls it again after a failure
    first.log_hyperparams({"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>", "tags": ["a"]})
    t0 = time.time()
    batches = [[MetricPoint(s, _metrics(s), t0 + s) for s in range(lo, min(lo + 7, 31))] for lo in range(1, 31, 7)]
    for batch in batches:
        first.log_metrics(batch)
    first.log_metrics(batches[1])  # a retried delivery adds nothing
    first.log_samples([{"prompt": "p10-0", "completion": "x\ty", "reward": 1.0}, {"prompt": "p10-1", "completion": "", "reward": 0.0}], 10)
    first.log_samples([{"prompt": "p20-0", "completion": "z", "reward": 0.5}, {"prompt": "p20-1", "completion": "", "reward": 0.25}], 20)
    first.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)
    first.log_distribution("distributions/reward", [0.0, 0.25, 0.5, 1.0], step=10)  # retried
    first.log_alert(no_eos_alert(12))
    first.finish()

    # The job restarts from its step-24 checkpoint: steps 25..30 come again, with other values.
    second = DvcliveBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path / "other", max_table_rows=3, resume_ids=identity))
    assert second.run_identity() == identity, "the saved folder, not the new output_dir"
    second.open()
    second.log_hyperparams({"trainer.resumed": True})
    second.log_metrics([MetricPoint(s, _metrics(s, offset=100.0), t0 + s) for s in range(25, 61)])
    second.log_samples([{"prompt": "again", "completion": "", "reward": 0.0}], step=20)  # the table has step 20
    second.log_samples([{"prompt": "p40", "completion": "w", "reward": 0.75}], step=40)
    second.log_distribution("distributions/reward", [1.0, 2.0, 3.0], step=40)
    second.log_alert(no_eos_alert(41, stop=True))
    second.finish()
    second.finish()  # idempotent
    assert not (tmp_path / "other").exists()

    loss = _history(run_dir, "loss")
    assert [s for s, _ in loss] == list(range(1, 61)), "each step exactly once"
    assert [float(v) for _, v in loss] == [1.0 / s + (0.0 if s <= 30 else 100.0) for s in range(1, 61)], "first values kept"
    assert _history(run_dir, "rewards/lcs/mean") == [(s, str(s * 0.25)) for s in range(1, 61)], "`/` kept: subfolders"
    assert _history(run_dir, "eval/pass@4") == [(s, "0.5") for s in range(1, 61)]
    assert _history(run_dir, "time/step_") == [(s, "0.125") for s in range(1, 61)], "a last part `step` gets a `_`"
    assert _history(run_dir, "kl")[4] == (5, "nan")

    stats = {stat: _history(run_dir, f"distributions/reward/{stat}") for stat in DISTRIBUTION_STATS}
    assert all([s for s, _ in rows] == [10, 40] for rows in stats.values()), "one row per step, none twice"
    assert [float(v) for _, v in stats["min"]] == [0.0, 1.0] and [float(v) for _, v in stats["max"]] == [1.0, 3.0]
    assert [float(v) for _, v in stats["p50"]] == [0.375, 2.0] and [float(v) for _, v in stats["mean"]] == [0.4375, 2.0]

    summary = parse_json(run_dir / "metrics.json")
    assert summary["step"] == 60 and summary["loss"] == 1.0 / 60 + 100.0
    assert summary["rewards"]["lcs"]["mean"] == 15.0 and summary["eval"]["pass@4"] == 0.5
    assert summary["time"] == {"step_": 0.125}
    assert summary["distributions"]["reward"]["max"] == 3.0
    assert summary["alerts"]["trainer"]["no_eos"] == no_eos_alert(41, stop=True).text(), "the newest finding per rule"

    params = load_yaml(run_dir / "params.yaml")
    assert params == {"trainer.lr": 0.003, "name": "exp", "logger.wandb.api_key": "<redacted>", "tags": "['a']",
                      "trainer.resumed": True}  # fmt: skip

    samples = parse_json(run_dir / "plots" / "custom" / "samples.json")
    assert samples == [
        {"step": 20, "prompt": "p20-0", "completion": "z", "reward": 0.5},
        {"step": 20, "prompt": "p20-1", "completion": "", "reward": 0.25},
        {"step": 40, "prompt": "p40", "completion": "w", "reward": 0.75},
    ], "the newest max_table_rows rows, none repeated after the resume"

    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {"metrics.json", "params.yaml", "plots/custom/samples.json", "plots/metrics/loss.tsv"} <= files
    assert all(f in ("metrics.json", "params.yaml") or f.startswith("plots/") for f in files), files
    assert not (run_dir / "dvc.yaml").exists()
    assert no_network == [], "no connection and no DNS lookup (no Studio post)"


def test_new_run_empties_the_folder_and_jobs_are_apart(tmp_path, no_network, sandbox):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(DvcliveLoggerConfig(enabled=True, dir=str(tmp_path / "live")))  # as the tracker hands it over
    for job in ("trainer", "orchestrator"):
        b = DvcliveBackend(cfg, TrackerContext(job=job, output_dir=tmp_path))
        b.open()
        b.log_metrics([MetricPoint(s, {"x": float(s)}, time.time()) for s in (1, 2, 3)])
        b.finish()
    fresh = DvcliveBackend(cfg, TrackerContext(job="trainer", output_dir=tmp_path))  # no resume_ids: a new run
    fresh.open()
    fresh.log_metrics([MetricPoint(1, {"y": 5.0}, time.time())])
    fresh.finish()
    assert not (tmp_path / "live" / "trainer" / "plots" / "metrics" / "x.tsv").exists()
    assert _history(tmp_path / "live" / "trainer", "y") == [(1, "5.0")]
    assert _history(tmp_path / "live" / "orchestrator", "x") == [(1, "1.0"), (2, "2.0"), (3, "3.0")]
    assert no_network == []


def test_names_it_cannot_keep_are_refused_before_writing(tmp_path, sandbox):
    b = DvcliveBackend(DvcliveLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
    b.open()
    b.log_metrics([MetricPoint(1, {"a": 1.0}, time.time())])
    for bad in ({"a/b": 1.0}, {"step/x": 1.0}, {"../x": 1.0}, {"c//d": 1.0}, {"t/step": 1.0, "t/step_": 2.0}):
        with pytest.raises(ValueError):
            b.log_metrics([MetricPoint(2, {"ok": 2.0, **bad}, time.time())])
    b.log_metrics([MetricPoint(2, {"ok": 2.0}, time.time())])  # the refused batches wrote nothing
    b.finish()
    run_dir = tmp_path / "dvclive" / "trainer"
    assert _history(run_dir, "ok") == [(2, "2.0")]
    assert sorted(p.relative_to(run_dir / "plots" / "metrics").as_posix() for p in (run_dir / "plots" / "metrics").rglob("*")) == ["a.tsv", "ok.tsv"]
    assert not (tmp_path.parent / "x.tsv").exists()


def test_plugin_and_lazy_import(tmp_path):
    """The entry point's object names this backend, and importing the module imports no dvclive / dvc."""
    code = ("import importlib, sys; from rlrun.tracking.backends.dvclive import PLUGIN, DvcliveBackend, DvcliveLoggerConfig; "
            "module, cls = PLUGIN.backend.split(':'); assert getattr(importlib.import_module(module), cls) is DvcliveBackend; "
            "assert PLUGIN.config is DvcliveLoggerConfig; assert not {'dvclive', 'dvc'} & set(sys.modules)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    DvcliveBackend.preflight(DvcliveLoggerConfig(enabled=True), TrackerContext(job="trainer", output_dir=tmp_path))
