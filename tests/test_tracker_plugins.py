"""Tracker backends are plugins: the `rlrun.trackers` entry-point group.

rlrun's own five are registered there like any other. A third-party package,
`tests/tracker_plugins/rlrun_test_tracker` (backend `csvlog`: metrics as CSV files), is built and
pip-installed into a temporary directory that goes on the app's `PYTHONPATH` (nothing is
installed into the venv), then selected with `logger=[jsonl,csvlog]` with no change to rlrun.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROOT, app_env, metrics, pip_install_site, run_app

from rlrun.tracking.backends import ENTRY_POINT_GROUP, enabled_backends, plugins
from rlrun.tracking.config import BUILTIN

PACKAGE = ROOT / "tests" / "tracker_plugins" / "rlrun_test_tracker"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return pip_install_site(PACKAGE, tmp_path_factory.mktemp("tracker_plugin"))


def _cfg_job(*overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrun", "--cfg", "job", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


def test_rlruns_own_backends_come_from_the_entry_points():
    registered = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    expected = {name: f"rlrun.tracking.config:{name.upper()}" for name in BUILTIN}  # plugins defined in config.py
    expected |= {name: f"rlrun.tracking.backends.{name}:PLUGIN" for name in ("aim", "clearml", "comet", "dvclive", "swanlab", "trackio")}
    assert registered == expected, "pyproject.toml"
    assert list(plugins())[0] == "jsonl", "the record first"
    assert list(plugins()) == ["jsonl", *sorted(set(expected) - {"jsonl"})]


def test_a_plugin_is_composed_checked_and_selected(site, tmp_path):
    env = app_env(tmp_path, PYTHONPATH=str(site))
    out = _cfg_job("logger=[jsonl,csvlog]", "logger.csvlog.delimiter='|'", env=env)
    assert out.returncode == 0, out.stderr
    assert "  csvlog:\n    enabled: true\n    dir: null\n    delimiter: '|'" in out.stdout
    bad = _cfg_job("logger=csvlog", "logger.csvlog.delimitr=x", env=env)
    assert bad.returncode != 0 and "delimitr" in bad.stderr, "a wrong key fails at composition, named"
    wrong_type = _cfg_job("logger=csvlog", "logger.csvlog.enabled=maybe", env=env)
    assert wrong_type.returncode != 0 and "logger.csvlog.enabled" in wrong_type.stderr
    without = _cfg_job("logger=csvlog", env=app_env(tmp_path))
    assert without.returncode != 0 and "Could not find 'logger/csvlog'" in without.stderr, "not installed: not there"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_logs_through_the_plugin(site, tmp_path):
    run_dir = tmp_path / "run"
    out = run_app(run_dir, "sft.max_steps=0", "max_steps=3", "logger=[jsonl,csvlog]", "logger.csvlog.delimiter='|'",
                  timeout=240, env=app_env(tmp_path, PYTHONPATH=str(site)))  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for job in ("orchestrator", "trainer"):
        with open(run_dir / "csvlog" / job / "metrics.csv", newline="") as f:
            rows = [(int(step), name, float(value)) for step, name, value in csv.reader(f, delimiter="|")]
        record = {(r["step"], name): value for r in metrics(run_dir, job) for name, value in r["metrics"].items()}
        assert {(step, name): value for step, name, value in rows} == pytest.approx(record), job
        assert {step for step, _, _ in rows} == {1, 2, 3}, job
        assert (run_dir / "csvlog" / job / "params.csv").read_text().count("trainer.lr|") == 1


def test_enabled_backends_with_a_plugin_node():
    from omegaconf import OmegaConf

    from rlrun.config import LoggerConfig

    cfg = OmegaConf.structured(LoggerConfig)
    cfg.mlflow.enabled = True
    assert enabled_backends(cfg) == ["jsonl", "mlflow"]
