"""Log extras and evaluation end to end: one real 6-step run with every tracker, read back
with each backend's own reader (wandb's `leet inspect`, TensorBoard's EventAccumulator,
MlflowClient, the jsonl record) and the orchestrator's log.

The run: `log_extras=all log_extras.interval=2` (orchestrator samples and distributions at
steps 2, 4, 6) with a per-job override `trainer.log_extras.interval=3` (trainer
distributions at 3 and 6), and `orchestrator.eval_interval=3` (eval at 3 and 6).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import app_env, records, run_app, wandb_records

ORCHESTRATOR_DISTRIBUTIONS = {"distributions/reward", "distributions/advantage", "distributions/completion_length"}
TRAINER_DISTRIBUTIONS = {"distributions/entropy", "distributions/importance_ratio", "distributions/per_token_loss"}
SAMPLE_COLUMNS = ["step", "selected_as", "env", "prompt", "completion", "exact", "lcs", "reward", "advantage",
                  "prompt_tokens", "completion_tokens"]  # fmt: skip
ROWS_PER_STEP = 8  # log_extras.samples_per_step
ROLLOUTS = 16 * 8  # orchestrator.batch_size x group_size


# The tests that read the run are `slow`: its fixture runs the whole app, within the timeout of
# whichever test comes first (300 s for the run, then up to 60 s for each W&B run read back).
RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("log_extras")
    run_dir = tmp / "run"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = run_app(
        run_dir, "max_steps=6", "sft.max_steps=0", "log_extras=all", "log_extras.interval=2", "trainer.log_extras.interval=3",
        "orchestrator.eval_interval=3", "logger=all", "logger.wandb.offline=true", f"logger.mlflow.tracking_uri={uri}",
        env=app_env(tmp, MLFLOW_DISABLE_TELEMETRY="true"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, uri


# ---------------------------------------------------------------- the jsonl record and the log


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_jsonl_samples_and_distributions(run):
    run_dir, _ = run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["orchestrator"]["log_extras"]["interval"] == 2, "follows the top-level group"
    assert config["trainer"]["log_extras"]["interval"] == 3, "the per-job override"

    samples = records(run_dir, "orchestrator", "samples")
    assert [r["step"] for r in samples] == [2, 4, 6]
    for record in samples:
        rows = record["rows"]
        assert len(rows) == ROWS_PER_STEP
        for row in rows:
            assert list(row) == SAMPLE_COLUMNS
            assert not any(t in row["completion"] for t in ("<pad>", "<s>", "<unk>")), "no special token but EOS"
            assert row["step"] == record["step"]
            assert row["reward"] == pytest.approx(row["lcs"] + row["exact"]), "reverse_text: reward = lcs + exact"
            assert row["prompt"].endswith("=") and row["prompt_tokens"] >= 2 and row["completion_tokens"] >= 1
        kinds = [row["selected_as"] for row in rows]
        assert kinds[:2] == ["best reward", "worst reward"] and "random" in kinds
        assert rows[0]["reward"] == max(r["reward"] for r in rows)
        assert rows[1]["reward"] == min(r["reward"] for r in rows)
    assert not records(run_dir, "trainer", "samples"), "the trainer logs distributions only"

    dists = records(run_dir, "orchestrator", "distribution")
    assert {(r["step"], r["name"]) for r in dists} == {(s, n) for s in (2, 4, 6) for n in ORCHESTRATOR_DISTRIBUTIONS}
    for r in dists:
        assert len(r["values"]) == ROLLOUTS, r["name"]
    metrics = {r["step"]: r["metrics"] for r in records(run_dir, "orchestrator", "metrics")}
    for r in dists:
        if r["name"] == "distributions/reward":
            assert sum(r["values"]) / ROLLOUTS == pytest.approx(metrics[r["step"]]["reward"])
        if r["name"] == "distributions/advantage":
            assert sum(r["values"]) == pytest.approx(0.0, abs=1e-6), "group-relative"

    dists = records(run_dir, "trainer", "distribution")
    assert {(r["step"], r["name"]) for r in dists} == {(s, n) for s in (3, 6) for n in TRAINER_DISTRIBUTIONS}
    trainer = {r["step"]: r["metrics"] for r in records(run_dir, "trainer", "metrics")}
    for r in dists:
        assert len(r["values"]) == trainer[r["step"]]["num_loss_tokens"], "one value per masked token"
        if r["name"] == "distributions/importance_ratio":
            assert all(v > 0 for v in r["values"])
        if r["name"] == "distributions/per_token_loss":
            assert sum(r["values"]) / len(r["values"]) == pytest.approx(trainer[r["step"]]["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_eval_metrics_and_printed_samples(run):
    run_dir, _ = run
    metrics = {r["step"]: r["metrics"] for r in records(run_dir, "orchestrator", "metrics")}
    assert sorted(metrics) == list(range(1, 7)), "one record per step, eval merged into it"
    assert [s for s, m in metrics.items() if "eval/reward" in m] == [3, 6]
    for step in (3, 6):
        m = metrics[step]
        for name in ("eval/reward", "eval/reward_std", "eval/rewards/lcs/mean", "eval/rewards/lcs/std",
                     "eval/completions/mean_length", "eval/completions/clipped_ratio", "time/eval"):  # fmt: skip
            assert name in m, (step, name)
        assert 0.0 <= m["eval/reward"] <= 2.0
        assert m["eval/reward"] == pytest.approx(m["eval/rewards/lcs/mean"] + m["eval/rewards/exact/mean"])
        assert 0.0 < m["time/eval"] <= m["time/step"], "the eval pass is timed, as a part of its step"
    assert "time/eval" not in metrics[2]

    log = (run_dir / "logs" / "orchestrator.log").read_text()
    for step in (3, 6):
        after = re.escape(f": reward {metrics[step]['eval/reward']:.3f} over 64 held-out prompts")
        assert re.search(rf"eval at step {step} \(weights v\d+\){after}", log), "it names the weights it scored"
        table = log.split(f"eval samples at step {step} (best and worst)", 1)[1].split("\n\n", 1)[0]
        assert "prompt" in table and "completion" in table and "reward" in table
        assert sum(line.startswith("│") for line in table.splitlines()) >= 4, "num_val_samples_to_print=4 rows"


# ---------------------------------------------------------------- W&B


def _wandb_history(run_dir: Path, job: str) -> tuple[Path, dict[int, dict]]:
    (wandb_run,) = (run_dir / "wandb").glob(f"offline-run-*-{job}")
    (wandb_file,) = wandb_run.glob("run-*.wandb")
    items = wandb_records(wandb_file)
    history = {int(r["history"]["step"].get("num", 0)): r["history"]["item"] for r in items if r["type"] == "history"}
    return wandb_run, history


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_wandb_table_and_histograms(run):
    run_dir, _ = run
    wandb_run, history = _wandb_history(run_dir, "orchestrator")
    assert [s for s, item in history.items() if item.get("samples._type") == "table-file"] == [2, 4, 6]
    tables = {s: json.loads((wandb_run / "files" / history[s]["samples.path"]).read_text()) for s in (2, 4, 6)}
    assert tables[2]["columns"] == SAMPLE_COLUMNS
    # One accumulating table: at step 6 it holds the rows of steps 2, 4 and 6.
    assert [row[0] for row in tables[6]["data"]] == [2] * 8 + [4] * 8 + [6] * 8
    assert len(list((wandb_run / "files" / "media" / "table").glob("samples_*.table.json"))) == 3
    for step in (2, 4, 6):
        for name in ORCHESTRATOR_DISTRIBUTIONS:
            assert history[step][f"{name}._type"] == "histogram"
            assert sum(history[step][f"{name}.values"]) == ROLLOUTS
    assert sorted(s for s, item in history.items() if "eval/reward" in item) == [3, 6]

    _, history = _wandb_history(run_dir, "trainer")
    assert sorted(s for s, item in history.items() if "distributions/entropy._type" in item) == [3, 6]
    for name in TRAINER_DISTRIBUTIONS:
        assert history[6][f"{name}._type"] == "histogram"
        assert sum(history[6][f"{name}.values"]) == history[6]["num_loss_tokens"]


# ---------------------------------------------------------------- TensorBoard


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_tensorboard_histograms_and_text(run):
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run

    def read(job: str) -> EventAccumulator:
        acc = EventAccumulator(str(run_dir / "tensorboard" / job), size_guidance={"histograms": 0, "tensors": 0})
        acc.Reload()
        return acc

    acc = read("orchestrator")
    for name in ORCHESTRATOR_DISTRIBUTIONS:
        assert [(h.step, h.histogram_value.num) for h in acc.Histograms(name)] == [(s, ROLLOUTS) for s in (2, 4, 6)]
    text = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert sorted(text) == [2, 4, 6]
    assert "| " + " | ".join(SAMPLE_COLUMNS) + " |" in text[4] and "best reward" in text[4]
    assert [e.step for e in acc.Scalars("eval/reward")] == [3, 6]

    acc = read("trainer")
    for name in TRAINER_DISTRIBUTIONS:
        assert [h.step for h in acc.Histograms(name)] == [3, 6]


# ---------------------------------------------------------------- MLflow


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_mlflow_table_and_histogram_artifacts(run, tmp_path):
    from mlflow import MlflowClient

    run_dir, uri = run
    client = MlflowClient(uri)
    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["mlflow"]["run_id"]
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == [
        f"samples/orchestrator_step_{s:06d}.json" for s in (2, 4, 6)
    ]
    local = client.download_artifacts(run_id, "samples/orchestrator_step_000004.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert table["columns"] == SAMPLE_COLUMNS and len(table["data"]) == ROWS_PER_STEP
    assert {row[0] for row in table["data"]} == {4}

    paths = [f.path for f in client.list_artifacts(run_id, "distributions/orchestrator/distributions")]
    assert len(paths) == 9
    hist = json.loads(Path(client.download_artifacts(
        run_id, "distributions/orchestrator/distributions/reward_step_000002.json", str(tmp_path))).read_text())
    assert sum(hist["counts"]) == ROLLOUTS
    paths = [f.path for f in client.list_artifacts(run_id, "distributions/trainer/distributions")]
    assert sorted(paths) == sorted(f"distributions/trainer/distributions/{n.split('/')[1]}_step_{s:06d}.json"
                                   for n in TRAINER_DISTRIBUTIONS for s in (3, 6))  # fmt: skip
    assert [m.step for m in client.get_metric_history(run_id, "trainer/distributions/entropy/mean")] == [3, 6]
    assert sorted(m.step for m in client.get_metric_history(run_id, "orchestrator/eval/reward")) == [3, 6]


# ---------------------------------------------------------------- per-job overrides


def test_a_job_override_reaches_that_job_only(tmp_path, hydra_compose):
    """`orchestrator.log_extras.interval=5` as `python -m rlrun` composes, resolves and hands it to the jobs."""
    from omegaconf import OmegaConf

    from rlrun.config import load_run_config

    cfg = hydra_compose("log_extras=distributions", "orchestrator.log_extras.interval=5")
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), tmp_path / "config.yaml")  # as the parent writes it
    job = load_run_config(tmp_path / "config.yaml")
    assert job.orchestrator.log_extras.interval == 5
    assert job.trainer.log_extras.interval == job.log_extras.interval == 10
    for x in (job.orchestrator.log_extras, job.trainer.log_extras):
        assert x.distributions is True and x.samples is False  # the group reaches both jobs
    # A job started on its own takes the override on its command line too.
    job = load_run_config(tmp_path / "config.yaml", ["orchestrator.log_extras.interval=7"])
    assert job.orchestrator.log_extras.interval == 7 and job.trainer.log_extras.interval == 10
