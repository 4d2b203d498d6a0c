"""The run doctor: its rules on hand-made metric streams, its findings delivered through every
backend (each read back with its own reader), a failing tracker found, and its config checked."""

from __future__ import annotations

import math
import time

import pytest
from conftest import records, wandb_records
from omegaconf import OmegaConf

from rlrun.config import ConfigError, LoggerConfig
from rlrun.doctor.config import RULES, DoctorConfig, check_doctor
from rlrun.doctor.doctor import Doctor
from rlrun.rundir import wait_for
from rlrun.tracking import Tracker
from rlrun.tracking.base import Alert, MetricPoint
from rlrun.tracking.record import read_alerts


def _doctor_cfg(**overrides):
    cfg = OmegaConf.structured(DoctorConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _replay(stream: list[dict[str, float]], job: str = "trainer", **overrides) -> list[Alert]:
    """The findings of a doctor fed `stream` (step i + 1 is stream[i]) one point at a time."""
    alerts: list[Alert] = []
    doctor = Doctor(_doctor_cfg(**overrides), job, alerts.append)
    for step, metrics in enumerate(stream, start=1):
        doctor([MetricPoint(step, metrics, 0.0)])
    return alerts


def test_sustained_rule_fires_once_per_streak_at_its_step():
    clipped = [0.5] * 5 + [0.95] * 15 + [0.2] * 3 + [1.0] * 10
    alerts = _replay([{"completions/clipped_ratio": v} for v in clipped], "orchestrator")
    assert [(a.rule, a.step, a.metric) for a in alerts] == [
        ("no_eos", 15, "completions/clipped_ratio"),  # the 10th step in a row >= 0.9
        ("no_eos", 33, "completions/clipped_ratio"),  # cleared at 21..23, then 10 more steps
    ]
    assert alerts[0].value == 0.95 and "(>= 0.9 for 10 steps)" in alerts[0].text()
    assert "orchestrator.max_tokens" in alerts[0].hint and not alerts[0].stop


def test_each_default_rule_on_its_own_symptom():
    healthy = {"entropy": 0.4, "grad_norm": 2.0, "loss": 0.01, "mismatch/kl": 1e-3, "reward": 0.5,
               "frac_reward_zero_std": 0.2, "idle/trainer_wait_frac": 0.2, "idle/inference_wait_frac": 0.01}  # fmt: skip
    rng = [0.5 + 0.1 * math.sin(i) for i in range(200)]  # a reward that moves
    base = [{**healthy, "reward": r} for r in rng]
    assert _replay(base) == [], "a healthy stream: no finding"

    def symptom(at: int, **changed: float) -> list[tuple[str, int]]:
        stream = [dict(m) for m in base]
        for m in stream[at:]:
            m.update(changed)
        return [(a.rule, a.step) for a in _replay(stream)]

    assert symptom(100, entropy=0.01) == [("entropy_collapse", 120)]
    assert symptom(100, frac_reward_zero_std=0.95) == [("no_signal", 120)]
    assert symptom(100, **{"mismatch/kl": 0.2}) == [("mismatch", 110)]
    assert symptom(100, **{"idle/trainer_wait_frac": 0.95}) == [("trainer_starved", 120)]
    assert symptom(100, **{"idle/inference_wait_frac": 0.95}) == [("inference_starved", 120)]
    assert symptom(100, reward=0.7) == [("reward_flat", 150)]  # 50 steps within 1e-3
    assert symptom(100, loss=float("nan")) == [("nan", 101)]
    spike = [dict(m) for m in base]
    spike[150]["grad_norm"] = 25.0  # 12.5x the largest of the 50 before
    assert [(a.rule, a.step, a.value) for a in _replay(spike)] == [("grad_spike", 151, 25.0)]


def test_disabled_rules_and_stop_on():
    stream = [{"loss": float("inf"), "completions/clipped_ratio": 1.0}] * 12
    assert [a.rule for a in _replay(stream, **{"nan.enabled": False, "no_eos.enabled": False})] == []
    alerts = _replay(stream, stop_on=["nan"])
    assert [(a.rule, a.stop) for a in alerts] == [("nan", True), ("no_eos", False)]
    assert alerts[0].text().endswith("The run stops (doctor.stop_on).")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"doctor.stop_on: 'nans' is not a doctor rule.*nan"):
        check_doctor(_doctor_cfg(stop_on=["nans"]))
    with pytest.raises(ConfigError, match=r"doctor.no_eos: set exactly one of above"):
        check_doctor(_doctor_cfg(**{"no_eos.below": 0.1}))
    assert set(RULES) >= {"no_eos", "entropy_collapse", "no_signal", "mismatch", "grad_spike", "nan", "reward_flat",
                          "trainer_starved", "inference_starved", "tracker"}  # fmt: skip


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_a_finding_reaches_every_backend_and_asks_for_the_stop(tmp_path, wandb_dirs):
    """NaN loss at step 4 with stop_on=[nan]: the stop callback fires, and jsonl, TensorBoard,
    MLflow and W&B each hold the alert, read back through their own readers."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = OmegaConf.structured(LoggerConfig)
    for name in ("tensorboard", "mlflow", "wandb"):
        logger[name].enabled = True
    logger.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger.mlflow.run_name = logger.wandb.name = "doctor-test"  # the run config's `${name}` is not here
    logger.wandb.offline = True
    stops: list[str] = []
    tracker = Tracker(logger, job="trainer", output_dir=tmp_path, doctor=_doctor_cfg(stop_on=["nan"]),
                      on_stop=stops.append, mlflow_end_run=True,
                      wandb_settings={"x_disable_stats": True, "disable_git": True})  # fmt: skip
    for step in range(1, 7):
        tracker.log_metrics({"loss": float("nan") if step == 4 else 0.1, "grad_norm": 1.0}, step)
        time.sleep(0.01)
    assert wait_for(lambda: stops or None, "the doctor's stop", timeout_s=10)
    tracker.finish()

    assert len(stops) == 1 and "doctor [nan] trainer step 4: loss = nan" in stops[0]
    (alert,) = read_alerts(tmp_path)
    assert (alert["rule"], alert["metric"], alert["step"], alert["stop"]) == ("nan", "loss", 4, True)
    assert alert == records(tmp_path, "trainer", "alert")[0]

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "trainer"), size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors("alerts/trainer/nan/text_summary")
    assert event.step == 4 and "loss = nan" in event.tensor_proto.string_val[0].decode()

    client = MlflowClient(logger.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rlrun").experiment_id])
    assert run.data.tags["rlrun.alert.trainer.nan"] == alert["text"]

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    (wandb_alert,) = [r["alert"] for r in wandb_records(run_file) if r["type"] == "alert"]
    assert wandb_alert["title"] == "trainer: nan" and wandb_alert["level"] == "ERROR"
    assert wandb_alert["text"] == alert["text"]


def test_a_failing_tracker_backend_is_a_finding(tmp_path):
    """A backend failing for longer than doctor.tracker.after_s: one finding, in the others."""
    from test_tracker import FlakyBackend

    from rlrun.tracking.delivery import BackendWorker

    logger = OmegaConf.structured(LoggerConfig)
    logger.delivery.retry_initial_s = 0.05
    tracker = Tracker(logger, job="orchestrator", output_dir=tmp_path, doctor=_doctor_cfg(**{"tracker.after_s": 0.3}))
    flaky = FlakyBackend()
    flaky.down.set()
    tracker.workers["flaky"] = BackendWorker(flaky, logger.delivery, tmp_path / "spill")
    for step in range(1, 201):  # until the finding is in the record (about 0.3 s)
        tracker.log_metrics({"reward": 0.5 + 0.01 * (step % 7)}, step)
        time.sleep(0.02)
        if records(tmp_path, "orchestrator", "alert"):
            break
    flaky.down.clear()  # it recovers: the alert queued for it is delivered too
    tracker.finish()
    (alert,) = records(tmp_path, "orchestrator", "alert")
    assert alert["rule"] == "tracker" and alert["metric"] == "tracker/flaky" and alert["value"] >= 0.3
    assert ("alert", alert["step"]) in flaky.other
