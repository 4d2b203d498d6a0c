"""Sweeps as Slurm jobs (`hydra/launcher=submitit_slurm`) on a real single-node Slurm cluster.

The cluster (tests/slurm_cluster.py -> scripts/slurm_cluster.py) is installed with apt-get
when missing and started once for this module; it needs root, and the tests skip without
it. It has no accounting (sacct fails), as many small clusters: job states must still be
right. Each sweep job is a tiny but real rlrun run (inference, orchestrator, trainer).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm_cluster import scontrol, slurm_cluster, squeue, wait_until  # noqa: F401  (the fixture)

from conftest import ROOT, metrics

pytestmark = pytest.mark.slow


def _cmd(sweep_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "rlrun", "-m", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep_dir}",
        "hydra.launcher.cpus_per_task=1",  # two jobs at once on the 2-CPU node
        "hydra.launcher.timeout_min=15", "+experiment=smoke", *overrides,
    ]  # fmt: skip


def _env(cluster, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, **cluster.env, "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _spawn(cluster, tmp_path: Path, sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    log = open(tmp_path / "sweep.out", "w")
    return subprocess.Popen(_cmd(sweep_dir, *overrides), cwd=ROOT, env=_env(cluster, tmp_path), stdout=log,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, tmp_path: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return (tmp_path / "sweep.out").read_text()


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _slurm_id(sweep_dir: Path, job: int) -> str | None:
    try:
        jobs = json.loads((sweep_dir / "sweep_jobs.json").read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        return None
    return next((j["slurm_job_id"] for j in jobs if j["job"] == job), None)


def _steps(run_dir: Path, job: str) -> list[int]:
    return [r["step"] for r in metrics(run_dir, job)]


@pytest.mark.timeout(900)  # after its waits: 240 s, 90 s, then 400 s for the sweep to end
def test_two_job_sweep_on_slurm_one_requeued_mid_run(slurm_cluster, tmp_path):
    """Both jobs run at once as Slurm jobs sharing one MLflow SQLite store; job 0 is requeued
    (as on preemption) after its second checkpoint and resumes from it, same tracker runs."""
    sweep_dir, max_steps = tmp_path / "sweep", 16
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _spawn(slurm_cluster, tmp_path, sweep_dir, f"max_steps={max_steps}", "trainer.checkpoint_interval=2",
                  "name=sw", "logger=wandb+mlflow", "logger.wandb.offline=true", f"logger.mlflow.tracking_uri={uri}",
                  "seed=1,2")  # fmt: skip
    try:
        job0 = sweep_dir / "0"
        wait_until(lambda: (job0 / "checkpoints" / "step_2").is_dir() or proc.poll() is not None,
                   "job 0's checkpoint step_2", timeout_s=240, poll_s=0.1)  # fmt: skip
        assert proc.poll() is None, (tmp_path / "sweep.out").read_text()[-3000:]
        slurm_id = _slurm_id(sweep_dir, 0)
        first_config = yaml.safe_load((job0 / "config.yaml").read_text())
        assert _steps(job0, "trainer")[-1] < max_steps, "requeued while still training"
        assert scontrol(slurm_cluster, "requeue", slurm_id).returncode == 0

        def started_again() -> bool:  # a requeued job waits ~2 min (BeginTime): let it go now
            info = scontrol(slurm_cluster, "-o", "show", "job", slurm_id).stdout
            if "Restarts=1" in info and "JobState=RUNNING" in info:
                return True
            if "JobState=PENDING" in info:
                scontrol(slurm_cluster, "update", f"jobid={slurm_id}", "StartTime=now")
            return False

        wait_until(started_again, "the requeued job to run again", timeout_s=90, poll_s=1)
        out = _finish(proc, tmp_path, timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]

    rows = _summary(sweep_dir)
    assert [(r["job"], r["overrides"], r["status"], r["steps"]) for r in rows] == [
        ("0", "seed=1", "done", str(max_steps)), ("1", "seed=2", "done", str(max_steps)),
    ]  # fmt: skip
    assert all(r["final_reward"] and r["slurm_state"] == "COMPLETED" for r in rows), rows
    assert "2/2 jobs done" in out

    sweep_info = json.loads((sweep_dir / "sweep.json").read_text())
    for num in (0, 1):
        run_dir = sweep_dir / str(num)
        for path in ("config.yaml", ".hydra/overrides.yaml", "logs/rl.log", "logs/inference.stdout",
                     "logs/orchestrator.log", "logs/trainer/rank_0.log", "metrics/orchestrator.jsonl",
                     "metrics/trainer.jsonl", "status.json"):  # fmt: skip
            assert (run_dir / path).is_file(), f"job {num}: {path}"
        assert (run_dir / "checkpoints" / f"step_{max_steps}").is_dir()
        for job in ("trainer", "orchestrator"):
            assert _steps(run_dir, job) == list(range(1, max_steps + 1)), f"job {num} {job}: each step once"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["logger"]["wandb"]["group"] == sweep_info["id"] == "sweep"
        assert config["seed"] == num + 1

    status0 = json.loads((job0 / "status.json").read_text())
    assert status0["status"] == "done" and status0["attempt"] == 2 and status0["resumed"] is True
    assert (job0 / "logs.1" / "rl.log").is_file(), "the first attempt's logs are kept"
    assert "resuming" in (job0 / "logs" / "rl.log").read_text()
    config0 = yaml.safe_load((job0 / "config.yaml").read_text())
    for key in ("run_id", "tracking_uri"):
        assert config0["logger"]["mlflow"][key] == first_config["logger"]["mlflow"][key]
    assert config0["logger"]["wandb"]["id"] == first_config["logger"]["wandb"]["id"]
    wandb_ids = {p.name.rsplit("-", 2)[-2] for p in (job0 / "wandb").glob("offline-run-*")}
    assert wandb_ids == {first_config["logger"]["wandb"]["id"]}, "both attempts wrote the same W&B runs"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("rlrun").experiment_id])}
    assert set(runs) == {"sw-0", "sw-1", "sw-sweep"}, "one MLflow run per job (the requeued one resumed it)"
    parent = runs["sw-sweep"]
    assert parent.info.status == "FINISHED"
    for num in (0, 1):
        run = runs[f"sw-{num}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep"] == "sweep" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert f"seed={num + 1}" in run.data.tags["overrides"] and run.data.params["seed"] == str(num + 1)
        for key in ("trainer/loss", "orchestrator/reward"):  # two jobs on one SQLite store lost nothing
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, max_steps + 1)), (num, key)
    assert squeue(slurm_cluster).strip() == "", "no job left on the cluster"


@pytest.mark.timeout(600)  # after its waits: 240 s, then 300 s for the sweep to end
def test_failed_and_cancelled_slurm_jobs_are_reported_as_failed(slurm_cluster, tmp_path):
    """Job 1's run fails (its inference server never comes up): Slurm says FAILED, not
    COMPLETED. Job 0 is cancelled mid-run (scancel, as a time limit would): it never writes
    an end status, and the summary says failed; the sweep exits non-zero."""
    sweep_dir = tmp_path / "sweep"
    proc = _spawn(slurm_cluster, tmp_path, sweep_dir, "max_steps=500", "inference.startup_timeout_s=120,0.001")
    try:
        wait_until(lambda: _steps(sweep_dir / "0", "trainer") or proc.poll() is not None, "job 0 to train",
                   timeout_s=240)  # fmt: skip
        assert proc.poll() is None, (tmp_path / "sweep.out").read_text()[-3000:]
        env = {**os.environ, **slurm_cluster.env}
        subprocess.run(["scancel", _slurm_id(sweep_dir, 0)], env=env, check=True, timeout=30)
        out = _finish(proc, tmp_path, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-4000:]

    rows = _summary(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "failed")]
    assert rows[0]["slurm_state"] == "CANCELLED" and "CANCELLED" in rows[0]["message"]
    assert rows[1]["slurm_state"] == "FAILED", "a failed run is FAILED for Slurm too"
    assert "timed out" in rows[1]["message"] and "inference" in rows[1]["message"]
    assert "0/2 jobs done" in out
    assert json.loads((sweep_dir / "1" / "status.json").read_text())["exit_code"] == 1
    assert squeue(slurm_cluster).strip() == ""


def test_a_partition_or_resources_the_cluster_lacks_are_refused_clearly(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run(_cmd(sweep_dir, "hydra.launcher.partition=nope", "seed=1,2"), cwd=ROOT,
                         env=_env(slurm_cluster, tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "Slurm partition 'nope' does not exist" in out.stderr and "Partitions here: debug" in out.stderr
    assert "hydra.launcher.partition=" in out.stderr and "Traceback" not in out.stderr
    assert not (sweep_dir / ".submitit").exists() and squeue(slurm_cluster).strip() == ""

    out = subprocess.run(_cmd(sweep_dir, "hydra.launcher.cpus_per_task=64", "seed=1,2"), cwd=ROOT,
                         env=_env(slurm_cluster, tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "Slurm would not run the sweep's jobs" in out.stderr, out.stderr[-2000:]
    assert "Requested node configuration" in out.stderr
    assert "cpus_per_task" in out.stderr and not (sweep_dir / ".submitit").exists()
    assert "Traceback" not in out.stderr and squeue(slurm_cluster).strip() == ""
