"""One run across several nodes (`deployment=slurm`) on a real three-node Slurm cluster.

The cluster (tests/slurm_cluster.py -> scripts/slurm_cluster.py, `nodes=3`) is three slurmd
daemons on this host (n1..n3, all NodeAddr 127.0.0.1), started once for this module and
stopped by PID; it needs root and the tests skip without it. Every node is the same machine,
so per-node usage numbers are not independent here: the tests check the names, the files and
the plumbing, not the values. Runs are tiny but real: inference on n1, orchestrator on n1, the
trainer as one torchrun (gloo, c10d rendezvous) across n2 and n3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from slurm_cluster import running_cluster, scontrol, squeue, wait_until

from conftest import ROOT, alive, app_env, assert_names_planned, metrics

from rlrun.rundir import latest_step

pytestmark = pytest.mark.slow

RUN = ("deployment=slurm", "deployment.num_train_nodes=2", "trainer.num_ranks=2", "+experiment=smoke")


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(nodes=3)


def _env(cluster, tmp_path: Path) -> dict[str, str]:
    env = app_env(tmp_path, **cluster.env)
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(key)  # the test itself may run inside an allocation: the runs decide where they are
    return env


def _salloc(cluster, run_dir: Path, *overrides: str) -> list[str]:
    return ["salloc", "-N3", "--time=10", sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", *overrides]


def _end(proc: subprocess.Popen, cluster) -> None:
    """A run the test gave up on: kill its salloc and parent, and cancel the allocation (its steps
    would outlive a SIGKILLed salloc); this is the test's own cluster."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["scancel", "--quiet", "--user", "root"], env={**os.environ, **cluster.env}, timeout=30)


def _node_records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "logs" / "nodes").glob("*.json"))]


def _pids(run_dir: Path) -> set[int]:
    """Every process of the run's jobs on every node: from the node records, and what is below them now."""
    pids = {r[k] for r in _node_records(run_dir) for k in ("pid", "agent_pid") if k in r}
    for pid in list(pids):
        try:
            pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return pids




def _scontrol_field(cluster, job_id: str, field: str) -> str | None:
    out = scontrol(cluster, "-o", "show", "job", job_id).stdout
    return next((item.split("=", 1)[1] for item in out.split() if item.startswith(f"{field}=")), None)


@pytest.mark.timeout(240)
def test_sbatch_runs_inference_orchestrator_and_a_two_node_trainer(cluster, tmp_path):
    """Outside an allocation `deployment=slurm` submits rlrun.sbatch; inside it the jobs go to their nodes."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", *RUN, "max_steps=4", "monitor=system",
         "monitor.collection_interval=0.5", "logger=[jsonl,tensorboard]"],
        cwd=ROOT, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted Slurm job ")[1].split()[0]
    assert f"slurm-{job_id}.out" in out.stdout
    try:
        wait_until(lambda: _scontrol_field(cluster, job_id, "JobState") not in ("PENDING", "RUNNING", "COMPLETING"),
                   "the batch job to end", timeout_s=180)  # fmt: skip
    finally:
        subprocess.run(["scancel", "--quiet", job_id], env={**os.environ, **cluster.env}, timeout=30)  # if still there
    slurm_out = (run_dir / f"slurm-{job_id}.out").read_text()
    assert _scontrol_field(cluster, job_id, "JobState") == "COMPLETED", slurm_out[-3000:]
    assert _scontrol_field(cluster, job_id, "ExitCode") == "0:0"

    # Where each job ran: the node records, the parent's log, the trainer's ranks on two nodes.
    placed = {(r["job"], r["node"]) for r in _node_records(run_dir) if "rank" not in r}
    assert placed == {("inference", "n1"), ("orchestrator", "n1"), ("trainer", "n2"), ("trainer", "n3")}
    rl_log = (run_dir / "logs" / "rl.log").read_text()
    for line in ("started inference on node n1", "started orchestrator on node n1", "started trainer on nodes n2,n3",
                 "started monitor on nodes n1,n2,n3", "the run directory is shared by n1,n2,n3", "run finished: 4 steps"):
        assert line in rl_log, line
    rank_nodes = {}
    for rank in (0, 1):
        first = (run_dir / "logs" / "trainer" / f"rank_{rank}.log").read_text().splitlines()[0]
        rank_nodes[rank] = first.split("SLURMD_NODENAME=")[1].split(",")[0]
    assert sorted(rank_nodes.values()) == ["n2", "n3"]
    for node in ("n2", "n3"):  # each train node's own output file, written on that node
        assert "rlrun.launcher.node: trainer on node " + node in (run_dir / "logs" / "trainer" / f"node_{node}.stdout").read_text()
    # Each node proved it shares the run directory.
    assert sorted(p.name for p in (run_dir / ".shared_fs").iterdir()) == ["n1", "n2", "n3", "parent"]

    # Inference served on the node's address and loaded every step's weights.
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert len(cfg["inference"]["urls"]) == 1 and cfg["inference"]["urls"][0].startswith("http://127.0.0.1:")
    assert cfg["deployment"]["nodes"] == ["n1", "n2", "n3"]
    server_log = (run_dir / "logs" / "inference" / "node_0.stdout").read_text()
    for version in (1, 2):  # the versions steps 3 and 4 sample with (max_async_steps=1)
        assert f"loaded weights v{version} from {run_dir / 'weights' / f'step_{version}'}" in server_log
    assert [r["step"] for r in metrics(run_dir, "trainer")] == [1, 2, 3, 4]

    # Usage of every node, named by node, in the one monitor record; the parent read no machine of its own.
    names = {n for r in metrics(run_dir, "monitor") for n in r["metrics"]}
    for name in ("system/n1/cpu_percent", "system/n1/rss_mb/inference", "system/n1/rss_mb/orchestrator",
                 "system/n2/rss_mb/trainer", "system/n3/rss_mb/trainer", "system/n3/ram_used_gb", "system/run_dir_gb"):
        assert name in names, name
    assert not {"system/cpu_percent", "system/ram_used_gb"} & names and not any(n.startswith("system/rss_mb/") for n in names)
    assert sorted(p.name for p in (run_dir / "metrics" / "nodes").glob("*.jsonl")) == ["n1.jsonl", "n2.jsonl", "n3.jsonl"]
    assert_names_planned(run_dir)
    # One tracker run per job, though the trainer ran on two nodes.
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == ["monitor", "orchestrator", "trainer"]
    assert squeue(cluster).strip() == ""


@pytest.mark.timeout(180)
def test_a_trainer_rank_killed_on_the_second_node_stops_every_job_on_every_node(cluster, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_salloc(cluster, run_dir, *RUN, "max_steps=5000", "trainer.checkpoint_interval=0"),
                            cwd=ROOT, env=_env(cluster, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        rank_files = lambda: sorted((run_dir / "logs" / "nodes").glob("trainer.rank_*.json"))  # noqa: E731
        wait_until(lambda: len(rank_files()) == 2 and len(metrics(run_dir, "trainer")) >= 2, "two trainer steps",
                   timeout_s=120)  # fmt: skip
        victim = next(r for r in map(lambda p: json.loads(p.read_text()), rank_files()) if r["node"] == "n3")
        pids = _pids(run_dir)
        assert len(pids) >= 8 and victim["pid"] in pids  # agents, servers, torchrun agents and ranks
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not alive(pids), "every process of the run to end", timeout_s=10.0, poll_s=0.1)
        gone_after = time.monotonic() - killed_at
        output, _ = proc.communicate(timeout=30)
    finally:
        _end(proc, cluster)
    assert gone_after < 10.0
    assert proc.returncode == 1, output[-3000:]
    expected = (f"job 'trainer' failed on node n3 (exit code 1); see its log logs/trainer/rank_{victim['rank']}.log "
                "(stdout/stderr: logs/trainer/node_n3.stdout)")  # fmt: skip
    assert expected in output and expected in (run_dir / "logs" / "rl.log").read_text()
    assert not alive(_pids(run_dir) | pids)
    assert squeue(cluster).strip() == ""


@pytest.mark.timeout(200)
def test_sigterm_to_the_parent_stops_all_and_a_resumed_run_continues_from_its_checkpoint(cluster, tmp_path):
    run_dir = tmp_path / "run"
    common = (*RUN, "trainer.checkpoint_interval=2", "monitor=off")
    proc = subprocess.Popen(_salloc(cluster, run_dir, *common, "max_steps=5000"), cwd=ROOT, env=_env(cluster, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:  # older checkpoints are pruned: wait for any at or past step 4
        wait_until(lambda: (latest_step(run_dir / "checkpoints") or 0) >= 4, "checkpoint 4", timeout_s=120)
        parent = next(p for p in psutil.Process(proc.pid).children() if "rlrun" in p.cmdline())
        pids = _pids(run_dir)
        parent.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        _end(proc, cluster)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stop requested (signal 15); stopping every job gracefully" in output
    assert not alive(pids)
    stopped_at = max(r["step"] for r in metrics(run_dir, "trainer"))
    newest = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert 4 <= newest <= stopped_at

    total = stopped_at + 3
    out = subprocess.run(_salloc(cluster, run_dir, *common, f"max_steps={total}", f"resume_from={run_dir}"),
                         cwd=ROOT, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=150)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming {run_dir} after checkpoint step {newest}" in (run_dir / "logs" / "rl.log").read_text()
    assert f"steps {newest + 1}..{total}" in (run_dir / "logs" / "trainer" / "rank_0.log").read_text()
    assert [r["step"] for r in metrics(run_dir, "trainer")] == list(range(1, total + 1))
    assert (run_dir / "logs.1" / "rl.log").is_file()  # the first attempt's logs are kept
    assert squeue(cluster).strip() == ""


def test_dry_run_writes_the_sbatch_script_and_submits_nothing(cluster, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "rlrun", f"hydra.run.dir={run_dir}", "deployment=slurm", "deployment.dry_run=true",
         "deployment.num_train_nodes=2", "deployment.num_infer_nodes=2", "trainer.num_ranks=4",
         "deployment.partition=debug", "deployment.account=rl", "deployment.gpus_per_node=2",
         "deployment.cpus_per_task=8", "deployment.mem_gb=64", "deployment.timeout_min=30", "max_steps=7"],
        cwd=ROOT, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    script = (run_dir / "rlrun.sbatch").read_text().splitlines()
    assert script[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=30", "#SBATCH --partition=debug",
                 "#SBATCH --account=rl", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G",
                 f"#SBATCH --output={run_dir}/slurm-%j.out", "#SBATCH --requeue", "#SBATCH --exclusive", f"cd {ROOT}"):
        assert line in script, line
    command = script[-1]
    assert command.startswith(f"exec {sys.executable} -m rlrun deployment=slurm ")
    assert f"hydra.run.dir={run_dir}" in command and "max_steps=7" in command and "deployment.dry_run" not in command
    assert f"resume=resume_from={run_dir}" in "\n".join(script)  # a requeued allocation resumes
    assert "not submitted" in out.stdout and squeue(cluster).strip() == ""
    assert not (run_dir / "config.yaml").exists()  # nothing ran: the allocation's run writes it


def test_config_errors_name_the_key(cluster, tmp_path):
    env = _env(cluster, tmp_path)

    def rlrun(*overrides: str, salloc: bool = False) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rlrun", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
        return subprocess.run(["salloc", "-N2", *cmd] if salloc else cmd, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=90)  # fmt: skip

    out = rlrun("deployment=slurm", "deployment.dry_run=true", "deployment.num_train_nodes=2", "trainer.num_ranks=3")
    assert out.returncode == 2 and "trainer.num_ranks=3: must be a multiple of deployment.num_train_nodes=2" in out.stderr
    out = rlrun("deployment=slurm", "deployment.dry_run=true", "deployment.num_infer_nodes=0")
    assert out.returncode == 2 and "deployment.num_infer_nodes=0: must be > 0" in out.stderr
    out = rlrun("deployment=slurm", "deployment.nodes_count=2")
    assert out.returncode != 0 and "nodes_count" in out.stderr
    out = rlrun("deployment.num_train_nodes=2")  # deployment=local has no such key
    assert out.returncode != 0 and "num_train_nodes" in out.stderr
    out = rlrun("deployment=slurm", "logger.wandb.api_key=abcd1234efgh5678", "deployment.dry_run=true")
    assert out.returncode == 2 and "logger.wandb.api_key: a secret on the command line" in out.stderr
    assert "abcd1234efgh5678" not in out.stderr + out.stdout
    # Inside an allocation too small for the layout: exit 2 before any job starts, naming both keys.
    out = rlrun(*RUN, salloc=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "deployment.num_infer_nodes=1 + deployment.num_train_nodes=2 = 3 nodes, but this allocation" in out.stdout
    assert squeue(cluster).strip() == ""
