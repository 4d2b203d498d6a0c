"""Metric names checked before any job starts: each enabled backend's rules over every name
the jobs will log (`rlrun.metric_names`), a bad one failing at launch with the metric and the
backend named. That the planned names cover what runs really log is checked on the records
of the end-to-end tests (`conftest.assert_names_planned`)."""

from __future__ import annotations

import pytest
from conftest import run_app
from omegaconf import OmegaConf, open_dict

from rlrun.config import ConfigError, TaskConfig
from rlrun.metric_names import check_metric_names, planned_metrics
from rlrun.tracking.names import sanitize_key


def _mixture(hydra_compose, keys: list[str], logger: str = "all"):
    """A mixture whose environment keys are `keys` (as an experiment file would set them:
    OmegaConf cannot add a key to a typed dict from the command line)."""
    cfg = hydra_compose("task=mixture", f"logger={logger}")
    with open_dict(cfg):
        cfg.task.envs = OmegaConf.merge(OmegaConf.structured(TaskConfig), {"envs": {k: {"name": "reverse_text"}
                                                                                   for k in keys}}).envs  # fmt: skip
    return cfg


def test_every_default_name_passes_every_backend(hydra_compose):
    cfg = hydra_compose("logger=all", "monitor=gpu", "orchestrator.eval_samples_per_prompt=8", "log_extras=all")
    check_metric_names(cfg)
    plan = planned_metrics(cfg)
    assert {"eval/pass@8", "eval/avg@8", "rewards/exact/mean", "reverse_text/errors/score"} <= set(
        plan["orchestrator"].scalars)
    assert "mismatch/kl" in plan["trainer"].scalars and "gpu/0/utilization" in plan["monitor"].scalars
    # Jobs sharing one GPU: each one's memory there, beside (never under) the device's `gpu/0/memory_used_gb`.
    assert {"gpu/0/job_memory_used_gb/inference", "gpu/0/job_memory_used_gb/trainer"} <= set(plan["monitor"].scalars)
    assert sanitize_key("orchestrator/eval/pass@8") == "orchestrator/eval/pass_8", "MLflow shows @ as _"


@pytest.mark.parametrize(
    ("keys", "logger", "named"),
    [
        # `reward` (the total) is also the folder of `reward/...` (that env's): MLflow's file store.
        (["reward", "b"], "mlflow", ["metric 'reward' of the orchestrator job is also the start of metric 'reward/",
                                      "MLflow's file store", "logger.mlflow"]),
        # `eval/reward` is both that env's training reward and the held-out total: every backend.
        (["eval", "b"], "console", ["metric 'eval/reward' of the orchestrator job: two different metrics"]),
        # Two keys MLflow maps to one.
        (["a@1", "a_1"], "mlflow", ["'a@1/errors/score' and 'a_1/errors/score'", "MLflow key 'orchestrator/a_1/errors/score'"]),
        (["_x", "b"], "wandb", ["metric '_x/errors/score'", "W&B reserves", "logger.wandb"]),
        (["k" * 240, "b"], "mlflow", ["longer than 250 characters"]),
        (["reward", "b"], "dvclive", ["metric 'reward' of the orchestrator job is also the start", "DVCLive's metrics.json"]),
        ([".x", "b"], "swanlab", ["metric '.x/", "SwanLab trims leading and trailing"]),
        (["k" * 90, "b"], "comet", ["Comet cuts metric names at 100 characters"]),
        (["reward", "b"], "clearml", ["metrics 'reward' and 'reward/reward' of the orchestrator job: both are ClearML's"]),
    ],
)
def test_a_bad_name_names_the_metric_and_the_backend(hydra_compose, keys, logger, named):
    cfg = _mixture(hydra_compose, keys, logger)
    with pytest.raises(ConfigError) as raised:
        check_metric_names(cfg)
    for text in named:
        assert text in str(raised.value)


def test_the_same_keys_pass_where_no_backend_minds(hydra_compose):
    check_metric_names(_mixture(hydra_compose, ["reward", "b"], "tensorboard"))  # only MLflow minds a/a-b
    check_metric_names(_mixture(hydra_compose, ["_x", "b"], "mlflow"))  # only W&B minds a leading _


@pytest.mark.slow
def test_the_app_refuses_a_bad_name_before_any_job(tmp_path):
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "bad_names.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /task: mixture\n"
        "task:\n  envs:\n    reward: {name: reverse_text}\n"
    )
    run_dir = tmp_path / "run"
    out = run_app(run_dir, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+experiment=bad_names",
                  "logger=mlflow", timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "metric 'reward' of the orchestrator job is also the start of metric 'reward/" in out.stderr
    assert not (run_dir / "logs").exists(), "no job started"
