"""TensorBoard backend: what it writes, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import time

import pytest

from rlrun.config import TensorboardLoggerConfig
from rlrun.tracking.backends import backend_class
from rlrun.tracking.base import MetricPoint, TrackerContext

pytest.importorskip("torch.utils.tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_tensorboard_roundtrip(tmp_path):
    ctx = TrackerContext(job="trainer", output_dir=tmp_path)
    backend = backend_class("tensorboard")(TensorboardLoggerConfig(enabled=True), ctx)
    backend.open()
    backend.open()  # re-callable: the writer thread calls it again after a failure

    t0 = time.time()
    # Values exactly representable in float32 (TensorBoard's scalar type).
    points = [MetricPoint(s, {"loss": 1.0 / (s + 1), "reward/mean": s * 0.25}, t0 + s) for s in range(8)]
    backend.log_metrics(points[:5])
    backend.log_metrics([MetricPoint(points[5].step, points[5].metrics, points[5].time)])
    backend.log_metrics(points[6:])
    backend.log_hyperparams({"trainer.lr": 0.003, "name": "exp|1", "logger.wandb.api_key": "<redacted>"})
    backend.log_samples([{"prompt": "abc", "completion": "cba", "reward": 1.0}, {"prompt": "x\ny", "completion": "", "reward": 0}], step=3)
    backend.log_samples([{"prompt": "later", "reward": 0.5}], step=7)
    backend.log_distribution("rewards/per_sample", [0.0, 0.5, 0.5, 1.0], step=3)
    backend.log_distribution("rewards/per_sample", [1.0, 2.0, 3.0], step=7)
    backend.finish()

    run_dir = tmp_path / "tensorboard" / "trainer"
    assert run_dir.is_dir(), "one subdirectory per job"
    acc = _read(run_dir)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"loss", "reward/mean"}
    for tag, expected in (("loss", lambda s: 1.0 / (s + 1)), ("reward/mean", lambda s: s * 0.25)):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(8))
        assert [e.value for e in events] == pytest.approx([expected(s) for s in range(8)], rel=1e-6)
        assert [e.wall_time for e in events] == pytest.approx([t0 + s for s in range(8)]), "walltime = point.time"

    hist = acc.Histograms("rewards/per_sample")
    assert [h.step for h in hist] == [3, 7]
    assert hist[0].histogram_value.num == 4
    assert (hist[1].histogram_value.min, hist[1].histogram_value.max) == (1.0, 3.0)

    hparams = _text(acc, "hyperparams")
    assert "| trainer.lr | 0.003 |" in hparams[0]
    assert "exp\\|1" in hparams[0], "pipes in values are escaped"
    samples = _text(acc, "samples")
    assert sorted(samples) == [3, 7]
    assert "| prompt | completion | reward |" in samples[3]
    assert "| abc | cba | 1.0 |" in samples[3]
    assert "x<br>y" in samples[3], "a newline does not break the table row"
    assert "| later | 0.5 |" in samples[7]

    # The HParams plugin's session: its params and the job's metrics (HPARAMS_METRICS["trainer"]).
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["loss", "entropy", "grad_norm", "mismatch/kl"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    params = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert params == {"trainer.lr": pytest.approx(0.003), "name": "exp|1", "logger.wandb.api_key": "<redacted>"}


def test_two_jobs_write_separate_runs(tmp_path):
    cfg = TensorboardLoggerConfig(enabled=True, log_dir=str(tmp_path / "tb"), flush_secs=1)
    backends = [backend_class("tensorboard")(cfg, TrackerContext(job=j, output_dir=tmp_path)) for j in ("trainer", "orchestrator")]
    for i, b in enumerate(backends):
        b.open()
        b.log_metrics([MetricPoint(1, {"x": float(i)}, time.time())])
    # Durable after each batch, before finish(): a crash loses nothing already delivered.
    for i, job in enumerate(("trainer", "orchestrator")):
        assert [(e.step, e.value) for e in _read(tmp_path / "tb" / job).Scalars("x")] == [(1, float(i))]
    for b in backends:
        b.finish()
