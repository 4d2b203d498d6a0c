"""Sweeps (`python -m rlrun -m ...`): the pieces of rlrun/sweep/, experiments, bad input,
and a real two-job sweep through Hydra's basic launcher. Slurm: tests/test_slurm.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict, read_write

from conftest import ROOT, app_env

from rlrun.sweep import callback, summary
from rlrun.sweep import job as sweep_job
from rlrun.sweep import submitit as sweep_submitit

EXPERIMENTS = sorted(p.stem for p in (ROOT / "rlrun" / "conf" / "experiment").glob("*.yaml"))


def _rlrun(*args: str, timeout: float = 300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = app_env(tmp_path, **extra)
    env.pop("MLFLOW_TRACKING_URI", None)  # each test names its own store
    return env


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from rlrun.config import CONF_DIR, register

    register()

    from hydra_plugins.rlrun_launcher import quiet_schema_notice

    with warnings.catch_warnings(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        quiet_schema_notice()
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / summary.SUMMARY_FILE, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- experiments and launcher configs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    from rlrun.config import validate

    cfg = _compose([f"+experiment={name}"])
    assert cfg.name == name
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)


def test_experiment_lr_sweep_plans_six_jobs():
    cfg = _compose(["+experiment=lr_sweep"])
    jobs = callback.plan_jobs(cfg)
    assert len(jobs) == 6
    assert {tuple(sorted(j)) for j in jobs} == {
        ("+experiment=lr_sweep", f"seed={s}", f"trainer.lr={lr}") for lr in ("3e-05", "0.0001", "0.0003") for s in (0, 1)
    }


@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_slurm_gpu", "submitit_local"])
def test_launcher_presets_are_typed_and_target_rlruns_launchers(launcher):
    cfg = _compose([f"hydra/launcher={launcher}"])
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.startswith("hydra_plugins.rlrun_launcher.")
    assert launcher_cfg.nodes == 1 and launcher_cfg.tasks_per_node == 1
    if launcher != "submitit_local":
        assert {"partition", "timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb"} <= set(launcher_cfg)
        assert launcher_cfg.additional_parameters.requeue is True
    with pytest.raises(Exception, match="partiton"):
        _compose([f"hydra/launcher={launcher}", "hydra.launcher.partiton=x"])


def test_plan_jobs_matches_hydras_basic_sweeper():
    cfg = _compose([])
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["seed=1,2", "trainer.lr=1e-3,3e-3", "max_steps=2"]
    jobs = callback.plan_jobs(cfg)
    assert jobs == [
        ["seed=1", "trainer.lr=0.001", "max_steps=2"], ["seed=1", "trainer.lr=0.003", "max_steps=2"],
        ["seed=2", "trainer.lr=0.001", "max_steps=2"], ["seed=2", "trainer.lr=0.003", "max_steps=2"],
    ]  # fmt: skip
    assert summary._varying(jobs)[1] == ["seed=1", "trainer.lr=0.003"]


# ---------------------------------------------------------------- pieces


def test_sweep_id():
    assert summary.sweep_id("/x/outputs/multirun/2026-11-23/14-05-09") == "2026-11-23_14-05-09"
    assert summary.sweep_id("/tmp/my_sweep") == "my_sweep"


def test_prepare_job_groups_names_and_tags_the_tracker_runs(tmp_path):
    cfg = _compose(["logger=wandb+mlflow", "name=exp"])
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    info = {
        "job": 3,
        "overrides": ["trainer.lr=1e-3", "seed=2"],
        "override_dirname": "seed=2,trainer.lr=1e-3",
        "sweep": {"id": "2026-11-23_14-05-09", "dir": str(tmp_path),
                  "mlflow": {"tracking_uri": "sqlite:///elsewhere.db", "parent_run_id": "p1"}},
    }  # fmt: skip
    out = sweep_job.prepare_job(cfg, tmp_path / "3", info)
    assert out.logger.wandb.group == "2026-11-23_14-05-09"
    assert out.logger.wandb.name == "exp-3" and out.logger.mlflow.run_name == "exp-3"
    assert {"sweep:2026-11-23_14-05-09", "trainer.lr=1e-3", "seed=2"} <= set(out.logger.wandb.tags)
    tags = out.logger.mlflow.tags
    assert tags["sweep"] == "2026-11-23_14-05-09" and tags["sweep_job"] == "3"
    assert tags["overrides"] == "seed=2,trainer.lr=1e-3"
    assert "mlflow.parentRunId" not in tags, "the parent run lives in another store"
    assert out.resume_from is None

    with read_write(cfg), open_dict(cfg):
        cfg.logger.wandb.group = "mine"
        cfg.logger.mlflow.tracking_uri = "sqlite:///elsewhere.db"
    out = sweep_job.prepare_job(cfg, tmp_path / "3", info)
    assert out.logger.wandb.group == "mine", "a group the user set wins"
    assert out.logger.mlflow.tags["mlflow.parentRunId"] == "p1"

    with read_write(cfg), open_dict(cfg):
        cfg.output_dir = "/shared/by/every/job"
    with pytest.raises(ValueError, match="output_dir"):
        sweep_job.prepare_job(cfg, tmp_path / "3", info)


def test_a_requeued_slurm_job_resumes_its_own_run_dir(tmp_path, monkeypatch):
    cfg = _compose([])
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    run_dir = tmp_path / "0"
    info = {"job": 0, "overrides": [], "override_dirname": "", "sweep": {"id": "s", "dir": str(tmp_path)}}
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert sweep_job.prepare_job(cfg, run_dir, info).resume_from is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    resumed = sweep_job.prepare_job(cfg, run_dir, info).resume_from
    assert resumed is None, "requeued before it wrote anything: fresh start"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}")
    assert sweep_job.prepare_job(cfg, run_dir, info).resume_from == str(run_dir)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert sweep_job.prepare_job(cfg, run_dir, info).resume_from is None


def test_gpus_of_the_allocation_must_fit_the_run(monkeypatch):
    cfg = _compose(["trainer.device=cuda", "trainer.num_ranks=2"])
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert sweep_job.check_allocation(cfg) is None, "outside Slurm nothing to check"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "hydra.launcher.gpus_per_node=2" in sweep_job.check_allocation(cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert sweep_job.check_allocation(cfg) is None
    # One GPU shared: the local server on CUDA beside a one-rank CUDA trainer needs just that GPU.
    one = _compose(["trainer.device=cuda", "inference.device=cuda", "inference.gpu_memory_fraction=0.3"])
    with read_write(one), open_dict(one):
        del one["hydra"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert sweep_job.gpus_needed(one) == 1 and sweep_job.check_allocation(one) is None


def test_scontrol_states_without_accounting():
    text = (
        "JobId=12 ArrayJobId=11 ArrayTaskId=1 JobName=rl UserId=root(0) JobState=RUNNING Reason=None\n"
        "JobId=11 ArrayJobId=11 ArrayTaskId=0 JobName=rl JobState=TIMEOUT Reason=TimeLimit\n"
        "JobId=11 ArrayJobId=11 ArrayTaskId=2-3%2 JobName=rl JobState=PENDING Reason=JobArrayTaskLimit\n"
        "JobId=20 JobName=rl JobState=CANCELLED Reason=None\n"
    )
    states = sweep_submitit.parse_scontrol(text)
    assert {k: v["State"] for k, v in states.items()} == {
        "11_1": "RUNNING", "11_0": "TIMEOUT", "11_2": "PENDING", "11_3": "PENDING", "20": "CANCELLED",
    }  # fmt: skip


def _fake_job(sweep_dir: Path, num: int, overrides: list[str], status: dict | None) -> Path:
    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status is not None:
        (job / "status.json").write_text(json.dumps({"run_dir": str(job), **status}))
    return job


def test_summary_tells_done_from_failed_and_killed(tmp_path, capsys):
    """A job reads `failed` unless its own status.json says done, whatever Slurm says."""
    sweep_dir = tmp_path / "sweep"
    jobs = [[f"seed={i}", "max_steps=5"] for i in range(5)]
    (sweep_dir).mkdir()
    (sweep_dir / summary.SWEEP_FILE).write_text(json.dumps({"id": "s", "dir": str(sweep_dir),
                                                          "jobs": [{"job": i, "overrides": o} for i, o in enumerate(jobs)]}))  # fmt: skip
    _fake_job(sweep_dir, 0, jobs[0], {"status": "done", "exit_code": 0, "reward": 0.5, "steps": 5, "max_steps": 5})
    _fake_job(sweep_dir, 1, jobs[1], {"status": "failed", "exit_code": 1, "message": "exit code 1: boom"})
    _fake_job(sweep_dir, 2, jobs[2], {"status": "running"})  # killed by its time limit: no end status
    _fake_job(sweep_dir, 3, jobs[3], {"status": "stopped", "exit_code": 143, "message": "stopped by SIGTERM"})
    (sweep_dir / summary.JOBS_FILE).write_text(json.dumps({"jobs": [
        {"job": 0, "overrides": jobs[0], "slurm_job_id": "9_0", "state": "COMPLETED", "error": None},
        {"job": 1, "overrides": jobs[1], "slurm_job_id": "9_1", "state": "FAILED", "error": "RunFailed: x"},
        {"job": 2, "overrides": jobs[2], "slurm_job_id": "9_2", "state": "TIMEOUT", "error": "UncompletedJobError"},
        {"job": 3, "overrides": jobs[3], "slurm_job_id": "9_3", "state": "CANCELLED", "error": None},
        {"job": 4, "overrides": jobs[4], "slurm_job_id": "9_4", "state": "NODE_FAIL", "error": None},
    ]}))  # fmt: skip

    rows = summary.summarize(sweep_dir)
    assert [r["status"] for r in rows] == ["done", "failed", "failed", "failed", "failed"]
    assert [r["overrides"] for r in rows] == [f"seed={i}" for i in range(5)], "only what varies"
    assert rows[1]["message"] == "exit code 1: boom"
    assert "killed" in rows[2]["message"] and "TIMEOUT" in rows[2]["message"]
    assert "SIGTERM" in rows[3]["message"] and "CANCELLED" in rows[3]["message"]
    assert "never started" in rows[4]["message"] or "no status" in rows[4]["message"]
    csv_rows = _summary(sweep_dir)
    assert [r["status"] for r in csv_rows] == ["done", "failed", "failed", "failed", "failed"]
    assert csv_rows[0]["final_reward"] == "0.5" and csv_rows[2]["slurm_state"] == "TIMEOUT"
    assert "1/5 jobs done" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input


def test_unknown_launcher_says_which_exist(tmp_path):
    out = _rlrun("-m", "hydra/launcher=nope", f"hydra.sweep.dir={tmp_path / 's'}", "seed=1,2", timeout=120)
    assert out.returncode != 0
    assert "unknown launcher 'nope'" in out.stderr
    for name in ("basic", "submitit_local", "submitit_slurm"):
        assert f"hydra/launcher={name}" in out.stderr
    assert not (tmp_path / "s").exists()


_BLOCK_SUBMITIT = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("hydra_plugins.hydra_submitit_launcher") or name == "submitit":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def test_submitit_launchers_without_the_extra_say_what_to_install(tmp_path):
    """As if hydra-submitit-launcher were not installed: a clear error, no traceback, no job."""
    main = _BLOCK_SUBMITIT + "sys.argv = ['rlrun', *sys.argv[1:]]\nrunpy.run_module('rlrun', run_name='__main__')\n"
    out = subprocess.run([sys.executable, "-c", main, "-m", "hydra/launcher=submitit_slurm",
                          f"hydra.sweep.dir={tmp_path / 's'}", "seed=1,2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'rlrun[slurm]'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()

    # Chosen by a config rather than the command line: the launcher itself says it.
    stub = _BLOCK_SUBMITIT + (
        "from hydra_plugins.rlrun_launcher import SlurmLauncher, HAVE_SUBMITIT\n"
        "assert not HAVE_SUBMITIT\n"
        "try:\n    SlurmLauncher(partition='x')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", stub], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "SweepError" in out.stdout and "pip install 'rlrun[slurm]'" in out.stdout, out.stdout + out.stderr


def test_submitit_slurm_where_there_is_no_slurm(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _rlrun("-m", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 's'}", "seed=1,2",
                 env={**os.environ, "PATH": str(empty)}, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "`sbatch` not found" in out.stderr and "hydra/launcher=submitit_local" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s" / ".submitit").exists()


# ---------------------------------------------------------------- a real sweep


@pytest.mark.slow
@pytest.mark.timeout(480)  # after the sweep's own 400 s
def test_basic_sweep_two_real_jobs_one_fails(tmp_path):
    """Two jobs one after another in this process: grouped tracker runs, a right summary,
    and a non-zero exit because the second job fails (its inference server never comes up)."""
    sweep_dir = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _rlrun(
        "-m", f"hydra.sweep.dir={sweep_dir}", "+experiment=smoke", "max_steps=2", "name=sw",
        "logger=wandb+mlflow", "logger.wandb.offline=true", f"logger.mlflow.tracking_uri={uri}",
        "inference.startup_timeout_s=120,0.001",
        env=_env(tmp_path), timeout=400,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]

    rows = _summary(sweep_dir)
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "inference.startup_timeout_s=120", "done"),
        ("1", "inference.startup_timeout_s=0.001", "failed"),
    ]
    assert float(rows[0]["final_reward"]) >= 0 and rows[0]["steps"] == "2"
    assert "timed out" in rows[1]["message"] and "inference" in rows[1]["message"]
    assert "1/2 jobs done" in out.stdout

    info = json.loads((sweep_dir / summary.SWEEP_FILE).read_text())
    for num in (0, 1):
        run_dir = sweep_dir / str(num)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["logger"]["wandb"]["group"] == info["id"] == "sweep"
        assert config["logger"]["wandb"]["name"] == f"sw-{num}"
        assert json.loads((run_dir / "status.json").read_text())["status"] == ("done", "failed")[num]
    assert (sweep_dir / "0" / "logs" / "trainer" / "rank_0.log").is_file()
    assert len(list((sweep_dir / "0" / "wandb").glob("offline-run-*"))) == 2  # trainer, orchestrator

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("rlrun").experiment_id])}
    assert set(runs) == {"sw-0", "sw-1", "sw-sweep"}
    parent = runs["sw-sweep"]
    assert parent.info.run_id == info["mlflow"]["parent_run_id"] and parent.info.status == "FAILED"
    for num, status in ((0, "FINISHED"), (1, "FAILED")):
        run = runs[f"sw-{num}"]
        assert run.info.status == status
        assert run.data.tags["sweep"] == "sweep" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert ("inference.startup_timeout_s=120", "inference.startup_timeout_s=0.001")[num] in run.data.tags["overrides"]
    steps = sorted(m.step for m in client.get_metric_history(runs["sw-0"].info.run_id, "trainer/loss"))
    assert steps == [1, 2]
