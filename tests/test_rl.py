"""`python -m rlrun` end to end, with real processes: it trains, it fails cleanly, it resumes.

Every test here starts the whole app (`slow`). Each test's own timeout (pytest-timeout's
global 300 s, or the `timeout` mark) is longer than the subprocess timeouts it waits through,
so a hung run fails on the inner timeout, with the run's output.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import alive, app_env, assert_names_planned, metrics, records, run_app, spawn_app, wandb_records

from rlrun.rundir import wait_for
from rlrun.tracking.record import read_alerts

pytestmark = pytest.mark.slow
SECRET = "wandb_v1_" + "S3cr3t" * 8


def _wait_for_step(run_dir: Path, job: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    def reached() -> bool:
        records = metrics(run_dir, job)
        if records and records[-1]["step"] >= step:
            return True
        assert proc.poll() is None, f"rlrun exited early: {proc.stdout.read() if proc.stdout else ''}"
        return False

    wait_for(reached, f"{job} to reach step {step}", timeout_s=timeout, poll_s=0.1, max_poll_s=0.2)


def _tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]




# ---------------------------------------------------------------- it trains


@pytest.mark.timeout(600)
def test_default_run_learns_the_task_and_leaves_the_whole_record(tmp_path):
    """The default experiment as `make run` starts it (seed 0): SFT, then RL from its weights.
    Held-out exact matches rise over the SFT checkpoint and completions stop at EOS."""
    run_dir = tmp_path / "run"
    out = run_app(run_dir, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    for path in (".hydra/config.yaml", "config.yaml", "logs/rl.log", "logs/inference.stdout", "logs/orchestrator.log",
                 "logs/trainer/rank_0.log", "logs/sft/rank_0.log", "logs/env_workers/reverse_text.log",
                 "metrics/orchestrator.jsonl", "metrics/trainer.jsonl", "metrics/sft.jsonl", "model/config.json",
                 "sft/model/config.json"):  # fmt: skip
        assert (run_dir / path).is_file(), path
    for sub in ("rollouts", "weights", "checkpoints"):
        assert any((run_dir / sub).iterdir()), sub
    assert len(list((run_dir / "rollouts").glob("step_*"))) <= 3, "old rollouts pruned"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    max_steps, sft_steps = config["max_steps"], config["sft"]["max_steps"]
    assert sft_steps > 0, "the default run has an SFT stage"
    orchestrator, trainer, sft = metrics(run_dir, "orchestrator"), metrics(run_dir, "trainer"), metrics(run_dir, "sft")
    assert [r["step"] for r in orchestrator] == list(range(1, max_steps + 1))
    assert [r["step"] for r in trainer] == list(range(1, max_steps + 1))
    assert [r["step"] for r in sft] == list(range(1, sft_steps + 1))
    for name in ("reward", "reward_std", "rewards/lcs/mean", "rewards/lcs/std", "rewards/exact/mean", "frac_reward_zero_std",
                 "completions/mean_length", "completions/min_length", "completions/max_length",
                 "completions/clipped_ratio", "completions/mean_terminated_length", "num_tokens", "tokens/s",
                 "time/generate", "time/score", "time/update_weights", "time/wait_for_weights",
                 "idle/inference_wait_frac", "reverse_text/errors/score"):  # fmt: skip
        assert name in orchestrator[-1]["metrics"], name
    for name in ("loss", "grad_norm", "lr", "entropy", "clip_ratio/low_mean", "clip_ratio/low_min",
                 "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean", "tokens/s",
                 "time/wait_for_batch", "time/forward_backward", "time/save_weights", "mismatch/kl",
                 "mismatch/seq_ratio_max", "perf/tokens_per_s", "idle/trainer_wait_frac"):  # fmt: skip
        assert name in trainer[-1]["metrics"], name
    assert "perf/mfu" not in trainer[-1]["metrics"], "no MFU on the CPU without perf.peak_flops"
    # Step 1 is on-policy (both sides hold the initial weights) and the local engine computes
    # logprobs with the trainer's code: no mismatch beyond float noise.
    assert trainer[0]["metrics"]["mismatch/kl"] < 1e-5 and trainer[0]["metrics"]["mismatch/logprob_diff_max"] < 1e-2
    assert all(0.0 <= r["metrics"]["idle/inference_wait_frac"] <= 1.0 for r in orchestrator)

    # RL starts where SFT stopped and adds exact matches; greedy completions stop at EOS.
    sft_exact = sft[-1]["metrics"]["eval/rewards/exact/mean"]
    final_eval = orchestrator[-1]["metrics"]
    final_exact, eos_share = final_eval["eval/rewards/exact/mean"], 1 - final_eval["eval/completions/clipped_ratio"]
    assert final_exact >= 0.8 and final_exact - sft_exact >= 0.1, f"exact-match {sft_exact:.3f} -> {final_exact:.3f}"
    assert eos_share >= 0.95, eos_share
    rewards = [r["metrics"]["reward"] for r in orchestrator]
    k = max(1, len(rewards) // 10)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last - first >= 0.2, f"reward {first:.3f} -> {last:.3f}"
    summary = (f"held-out eval at step {max_steps}: reward {final_eval['eval/reward']:.3f}, "
               f"exact-match {final_exact:.3f} (after SFT {sft_exact:.3f}), ended with EOS {eos_share:.0%}")
    assert "mean reward" in (rl_log := (run_dir / "logs" / "rl.log").read_text()) and summary in rl_log, rl_log[-2000:]
    log = (run_dir / "logs" / "orchestrator.log").read_text()
    assert f"eval at step {max_steps} (weights v{max_steps})" in log, "the final evaluation scores the final weights"
    assert f"optimizer state from {run_dir / 'sft' / 'model' / 'optimizer.pt'}" in (
        run_dir / "logs" / "trainer" / "rank_0.log").read_text()  # fmt: skip

    usage = metrics(run_dir, "monitor")  # monitor=system (the default), sampled by the parent
    assert [r["step"] for r in usage] == list(range(1, len(usage) + 1)) and len(usage) >= 5
    assert {"system/cpu_percent", "system/ram_used_gb", "system/elapsed_s", "system/train_step"} <= set(usage[-1]["metrics"])
    assert all(any(f"system/rss_mb/{job}" in r["metrics"] for r in usage) for job in ("inference", "orchestrator", "trainer"))
    assert usage[-1]["metrics"]["system/train_step"] == max_steps, "the last sample is taken at the end"

    assert read_alerts(run_dir) == [], "a healthy run: the doctor stays silent"
    assert "run doctor" not in rl_log
    assert_names_planned(run_dir)


@pytest.mark.timeout(420)
def test_rl_only_experiment_raises_its_reward_and_emits_no_special_token(tmp_path):
    """`+experiment=reverse_text_rl_only`: GRPO from the untrained model on the LCS ratio. Its
    reward rises; no completion it sampled holds a special token other than EOS."""
    run_dir = tmp_path / "run"
    out = run_app(run_dir, "+experiment=reverse_text_rl_only", "log_extras=samples", "log_extras.interval=10",
                  timeout=360)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (run_dir / "metrics" / "sft.jsonl").exists() and not (run_dir / "sft").exists(), "no SFT stage"
    orchestrator = metrics(run_dir, "orchestrator")
    rewards = [r["metrics"]["reward"] for r in orchestrator]
    k = max(1, len(rewards) // 10)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last - first >= 0.2, f"reward {first:.3f} -> {last:.3f}"
    rows = [row for record in records(run_dir, "orchestrator", "samples") for row in record["rows"]]
    assert len(rows) >= 100
    assert not any(t in row["completion"] for row in rows for t in ("<pad>", "<s>", "<unk>")), "no special token but EOS"

    # Its completions never end (the first round's default): the doctor says so within 30 steps.
    (no_eos,) = [a for a in read_alerts(run_dir) if a["rule"] == "no_eos"]
    assert no_eos["job"] == "orchestrator" and no_eos["metric"] == "completions/clipped_ratio"
    assert no_eos["step"] <= 30 and no_eos["value"] >= 0.9 and not no_eos["stop"]
    assert f"doctor [no_eos] orchestrator step {no_eos['step']}" in (run_dir / "logs" / "orchestrator.log").read_text()
    rl_log = (run_dir / "logs" / "rl.log").read_text()
    assert no_eos["text"] in rl_log, "shown by the parent as it came"
    assert f"orchestrator step {no_eos['step']}: no_eos (completions/clipped_ratio" in rl_log, "and in the summary"
    assert_names_planned(run_dir)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("logger=nope", "nope"),
        ("trainer.lrr=0.1", "lrr"),
        ("trainer.lr=fast", "trainer.lr"),
        ("orchestrator.group_size=0", "orchestrator.group_size"),
        ("inference.num_servers=0", "inference.num_servers"),
        ("model=hf", "model.path"),
    ],
)
def test_bad_input_fails_before_any_job(tmp_path, override, named):
    run_dir = tmp_path / "run"
    extra = ["model.path=/no/such/model"] if override == "model=hf" else []
    out = run_app(run_dir, override, *extra, timeout=120)
    assert out.returncode != 0
    assert named in out.stdout + out.stderr
    assert not (run_dir / "logs").exists(), "no job started, nothing but the run directory written"


# ---------------------------------------------------------------- faults


def test_killed_orchestrator_stops_the_whole_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn_app(run_dir, "max_steps=100000", "sft.max_steps=0")
    try:
        _wait_for_step(run_dir, "orchestrator", 3, proc)
        tree = _tree(proc.pid)
        (orchestrator,) = [p for p in tree if "rlrun.orchestrator" in " ".join(p.cmdline())]
        orchestrator.send_signal(signal.SIGKILL)
        # The run ends on its own (TimeoutExpired otherwise): left alone it would train on to step 100000.
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "orchestrator" in output and "logs/orchestrator.log" in output and "SIGKILL" in output
    assert alive(tree) == [], "no process left behind"


@pytest.mark.timeout(600)  # 120 s to step 10, 120 s to stop, 300 s to resume
def test_sigterm_flushes_then_resume_logs_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["max_steps=30", "sft.max_steps=0", "trainer.checkpoint_interval=4", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"]
    proc = spawn_app(run_dir, *common)
    try:
        _wait_for_step(run_dir, "trainer", 10, proc)
        tree = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert alive(tree) == []
    stopped_at = metrics(run_dir, "trainer")[-1]["step"]
    assert stopped_at >= 10, "the trainer's tracker was flushed on SIGTERM"
    assert stopped_at < 30

    out = run_app(run_dir, f"resume_from={run_dir}", *common, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "logs.1" / "rl.log").is_file(), "the first attempt's logs are kept"
    for job in ("trainer", "orchestrator"):
        assert [r["step"] for r in metrics(run_dir, job)] == list(range(1, 31)), job

    from mlflow.tracking import MlflowClient

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    client = MlflowClient(uri)
    run_id = config["logger"]["mlflow"]["run_id"]
    for key in ("trainer/loss", "orchestrator/reward"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, 31)), key
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1, "one MLflow run, resumed"


@pytest.mark.timeout(600)  # 300 s for the run, 60 s to read each of its 3 W&B runs
def test_two_ranks_and_two_trackers_offline(tmp_path):
    """`trainer.num_ranks=2` with `logger=wandb+mlflow`: rank logs, named W&B runs, one MLflow run, no secret."""
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_app(
        run_dir, "max_steps=3", "sft.max_steps=0", "trainer.num_ranks=2", "name=exp", "logger=wandb+mlflow", "logger.wandb.offline=true",
        f"logger.mlflow.tracking_uri={uri}", f"logger.wandb.api_key={SECRET}",
        env=app_env(tmp_path, HF_TOKEN="hf_" + "T0k3n" * 8), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "logs/trainer/rank_0.log").is_file() and (run_dir / "logs/trainer/rank_1.log").is_file()
    assert "step 3/3" in (run_dir / "logs/trainer/rank_1.log").read_text()

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    names = set()
    for wandb_run in runs:
        (wandb_file,) = wandb_run.glob("run-*.wandb")
        records = wandb_records(wandb_file)
        names |= {record["run"]["display_name"] for record in records if record["type"] == "run"}
        assert SECRET not in json.dumps(records)
    assert names == {"exp-trainer", "exp-orchestrator", "exp-monitor"}  # monitor=system: the parent's usage run
    assert_names_planned(run_dir)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rlrun").experiment_id])
    assert {"trainer/loss", "trainer/grad_norm", "orchestrator/reward", "orchestrator/tokens/s"} <= set(run.data.metrics)
    assert all(SECRET not in str(v) for v in run.data.params.values())

    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".log", ".jsonl", ".stdout", ".json"):
            assert SECRET not in path.read_text(errors="replace"), path
            assert "T0k3nT0k3n" not in path.read_text(errors="replace"), path
