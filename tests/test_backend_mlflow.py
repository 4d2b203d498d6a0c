"""MLflow backend, read back with MlflowClient: a SQLite store and a real `mlflow server`."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402

from rlrun.config import MlflowLoggerConfig  # noqa: E402
from rlrun.rundir import wait_for  # noqa: E402
from rlrun.tracking.backends import backend_class  # noqa: E402
from rlrun.tracking.backends.mlflow import MlflowBackend
from rlrun.tracking.names import sanitize_key  # noqa: E402
from rlrun.tracking.runs import ensure_run  # noqa: E402
from rlrun.tracking.base import MetricPoint, TrackerContext  # noqa: E402
from rlrun.tracking.config import DeliveryConfig  # noqa: E402
from rlrun.tracking.delivery import BackendWorker, Event  # noqa: E402

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("server").uri


def _cfg(uri: str, **kw) -> DictConfig:
    """The backend's node as the tracker hands it over: a typed OmegaConf node."""
    kw.setdefault("experiment_name", "rlrun-test")
    return OmegaConf.structured(MlflowLoggerConfig(enabled=True, tracking_uri=uri, run_name="exp", **kw))


def _backend(uri: str, tmp_path, job: str = "trainer", **kw) -> MlflowBackend:
    backend = backend_class("mlflow")(_cfg(uri, **kw), TrackerContext(job=job, output_dir=tmp_path))
    backend.open()
    return backend


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@contextmanager
def _connection_attempts(port: int) -> Iterator[list[tuple]]:
    """This process's TCP connection attempts to `port` meanwhile (urllib3 connects with
    `socket.connect`): how many tries a request made, whatever the machine's speed."""
    attempts: list[tuple] = []
    connect = socket.socket.connect

    def counted(sock, address):
        if isinstance(address, tuple) and address[1] == port:
            attempts.append(address)
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", counted)
        yield attempts


def _load_json_artifact(client: MlflowClient, run_id: str, path: str, tmp_path) -> dict:
    local = client.download_artifacts(run_id, path, str(tmp_path / "download"))
    with open(local) as f:
        return json.load(f)


def test_roundtrip(tracking_uri, tmp_path):
    backend = _backend(tracking_uri, tmp_path, tags={"team": "rl"})
    backend.open()  # re-callable
    run_id = backend.run_identity()["mlflow_run_id"]
    assert backend.run_identity()["mlflow_tracking_uri"] == tracking_uri

    t0 = time.time()
    points = [MetricPoint(s, {"loss": 1.0 / (s + 1), "reward/mean": 0.1 * s, "bad key!": s}, t0 + s) for s in range(20)]
    backend.log_metrics(points[:10])
    for p in points[10:]:
        backend.log_metrics([p])
    backend.log_metrics([MetricPoint(20, {"nan_metric": float("nan"), "inf_metric": float("inf")}, t0)])
    params = {"trainer.lr": 0.003, "name": "exp", "long": "x" * 7000, "weird/key?": [1, 2]}
    backend.log_hyperparams(params)
    backend.log_hyperparams(params)  # again (resume / retry): harmless
    backend.log_hyperparams({"trainer.lr": 0.1})  # a changed value: warned about and skipped
    rows = [{"prompt": "abc", "completion": "cba", "reward": 1.0}, {"prompt": "de", "completion": "ed", "reward": 0.0}]
    backend.log_samples(rows, step=5)
    backend.log_distribution("rewards/per_sample", [float(v) for v in range(101)], step=5)
    backend.finish()

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "exp" and run.data.tags["team"] == "rl"
    assert run.info.status == "RUNNING", "the parent owns the run lifecycle unless mlflow_end_run"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "rlrun-test"
    if tracking_uri.startswith("sqlite"):
        assert experiment.artifact_location == str(tmp_path / "mlartifacts" / "rlrun-test")

    # Every (step, value) pair, under the job prefix; sanitized key for the bad name.
    assert _history(client, run_id, "trainer/loss") == [(s, 1.0 / (s + 1)) for s in range(20)]
    assert _history(client, run_id, "trainer/reward/mean") == [(s, 0.1 * s) for s in range(20)]
    assert _history(client, run_id, "trainer/bad key_") == [(s, float(s)) for s in range(20)]
    assert [m.timestamp for m in sorted(client.get_metric_history(run_id, "trainer/loss"), key=lambda m: m.step)] == [
        int((t0 + s) * 1000) for s in range(20)
    ], "timestamps come from MetricPoint.time"
    assert "loss" not in run.data.metrics
    assert math.isnan(_history(client, run_id, "trainer/nan_metric")[0][1])
    assert _history(client, run_id, "trainer/inf_metric") == [(20, 1.7976931348623157e308)]

    logged = run.data.params
    assert logged["trainer.lr"] == "0.003" and logged["name"] == "exp"
    assert logged["long"] == "x" * 6000, "truncated to MLflow's param value limit"
    assert logged[sanitize_key("weird/key?")] == "[1, 2]"

    # Sample table: a table artifact MLflow knows about, in pandas "split" layout.
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == ["samples/trainer_step_000005.json"]
    table = _load_json_artifact(client, run_id, "samples/trainer_step_000005.json", tmp_path)
    assert table["columns"] == ["step", "prompt", "completion", "reward"]
    assert table["data"] == [[5, "abc", "cba", 1.0], [5, "de", "ed", 0.0]]
    assert {"path": "samples/trainer_step_000005.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])

    # Distribution: summary statistics at that step plus a histogram artifact.
    expected = {"p5": 5.0, "p50": 50.0, "p95": 95.0, "mean": 50.0, "min": 0.0, "max": 100.0}
    for stat, value in expected.items():
        assert _history(client, run_id, f"trainer/rewards/per_sample/{stat}") == [(5, pytest.approx(value))]
    assert _history(client, run_id, "trainer/rewards/per_sample/std")[0][1] == pytest.approx(29.1547594742265)
    hist = _load_json_artifact(client, run_id, "distributions/trainer/rewards/per_sample_step_000005.json", tmp_path)
    assert len(hist["counts"]) == 30 and len(hist["bin_edges"]) == 31
    assert sum(hist["counts"]) == hist["num_values"] == 101
    assert (hist["bin_edges"][0], hist["bin_edges"][-1]) == (0.0, 100.0)


def test_redelivery_is_harmless(tracking_uri, tmp_path):
    backend = _backend(tracking_uri, tmp_path, experiment_name="redelivery")
    run_id = backend.run_id
    t0 = time.time()
    batch = [MetricPoint(s, {"a": float(s), "b": -float(s)}, t0 + s * 0.001) for s in range(50)]
    backend.log_metrics(batch)
    backend.log_metrics(batch)  # the delivery layer resends a batch it was not sure about
    backend.log_metrics(batch[10:20])
    # Calls that fail after part of their work reached MLflow, then are retried whole.
    _fail_once(backend._client, "set_tag")  # log_table's last step, after the upload
    with pytest.raises(RuntimeError, match="injected"):
        backend.log_samples([{"prompt": "p", "reward": 1.0}], step=3)
    backend.log_samples([{"prompt": "p", "reward": 1.0}], step=3)
    _fail_once(backend._client, "log_dict")  # after the statistics were logged
    with pytest.raises(RuntimeError, match="injected"):
        backend.log_distribution("d", [1.0, 2.0, 3.0], step=3)
    backend.log_distribution("d", [1.0, 2.0, 3.0], step=3)
    _fail_once(backend._client, "log_batch", after_call=True)  # a response lost on the way back
    with pytest.raises(RuntimeError, match="injected"):
        backend.log_hyperparams({"p": 1})
    backend.log_hyperparams({"p": 1})

    client = MlflowClient(tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "trainer/a")] == [(s, float(s)) for s in range(50)]
    assert len(client.get_metric_history(run_id, "trainer/b")) == 50
    table = _load_json_artifact(client, run_id, "samples/trainer_step_000003.json", tmp_path)
    assert table["data"] == [[3, "p", 1.0]], "the retried rows are in the table once"
    tags = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert tags == [{"path": "samples/trainer_step_000003.json", "type": "table"}]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "trainer/d/mean")] == [(3, 2.0)]
    assert client.get_run(run_id).data.params == {"p": "1"}
    assert [f.path for f in client.list_artifacts(run_id, "distributions/trainer")] == ["distributions/trainer/d_step_000003.json"]


def _fail_once(client: MlflowClient, method: str, after_call: bool = False) -> None:
    """Make `client.<method>` raise once (before or after really calling it), then behave."""
    real = getattr(client, method)

    def failing(*args, **kwargs):
        delattr(client, method)  # back to the real method for the retry
        if after_call:
            real(*args, **kwargs)
        raise RuntimeError(f"injected failure in {method}")

    setattr(client, method, failing)


def test_ensure_run_shares_one_run(tracking_uri, tmp_path):
    cfg = _cfg(tracking_uri, experiment_name="shared")
    run_id = ensure_run(cfg)
    cfg.run_id = run_id
    assert ensure_run(cfg) == run_id
    # Both jobs log into the run the parent created; their keys stay apart by prefix.
    for job, value in (("trainer", 1.0), ("orchestrator", 2.0)):
        backend = backend_class("mlflow")(cfg, TrackerContext(job=job, output_dir=tmp_path))
        backend.open()
        assert backend.run_identity()["mlflow_run_id"] == run_id
        backend.log_metrics([MetricPoint(1, {"x": value}, time.time())])
        backend.log_hyperparams({"seed": 0})
    client = MlflowClient(tracking_uri)
    assert _history(client, run_id, "trainer/x") == [(1, 1.0)]
    assert _history(client, run_id, "orchestrator/x") == [(1, 2.0)]
    experiment_id = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment_id])) == 1
    # The experiment exists now: a second ensure_run without run_id gets it, makes a new run.
    cfg.run_id = None
    assert ensure_run(cfg) != run_id


def test_default_store_under_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = OmegaConf.structured(MlflowLoggerConfig(enabled=True, experiment_name="my exp/1", run_name="r"))
    backend = backend_class("mlflow")(cfg, TrackerContext(job="trainer", output_dir=tmp_path))
    assert not (tmp_path / "outputs").exists(), "the constructor touches nothing"
    backend.open()
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert backend.run_identity() == {"mlflow_tracking_uri": uri, "mlflow_run_id": backend.run_id}
    backend.log_samples([{"prompt": "p"}], step=1)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("my exp/1")
    assert experiment.artifact_location == str(tmp_path / "outputs" / "mlartifacts" / "my_exp_1")
    assert (tmp_path / "outputs" / "mlartifacts" / "my_exp_1" / backend.run_id / "artifacts" / "samples" / "trainer_step_000001.json").is_file()


def test_end_run_only_when_asked(tracking_uri, tmp_path):
    cfg = _cfg(tracking_uri, experiment_name="standalone")
    backend = backend_class("mlflow")(cfg, TrackerContext(job="trainer", output_dir=tmp_path, mlflow_end_run=True))
    backend.open()
    backend.finish()
    assert MlflowClient(tracking_uri).get_run(backend.run_id).info.status == "FINISHED"


def test_wrong_run_id_fails_at_open(tracking_uri, tmp_path):
    cfg = _cfg(tracking_uri, run_id="0" * 32)
    backend = backend_class("mlflow")(cfg, TrackerContext(job="trainer", output_dir=tmp_path))
    with pytest.raises(Exception, match="(?i)run"):
        backend.open()


def _deliver(backend: MlflowBackend, points: list[MetricPoint], tmp_path) -> None:
    """Through the real delivery layer, which splits what it hands a backend into its batch size."""
    worker = BackendWorker(backend, OmegaConf.structured(DeliveryConfig), tmp_path / "spill")
    for point in points:
        worker.submit(Event("metrics", point))
    assert worker.flush(timeout=60)
    worker.request_stop().wait(60)
    worker.join(60)


def test_2500_metrics_three_requests_sqlite(tmp_path):
    """Counted with a spy that calls through to the real client."""
    backend = _backend(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    assert type(backend).max_batch_metrics == 1000
    calls: list[int] = []
    real = backend._client.log_batch

    def spy(run_id, metrics=(), **kw):
        calls.append(len(metrics))
        return real(run_id, metrics=metrics, **kw)

    backend._client.log_batch = spy
    t = time.time()
    points = [MetricPoint(s, {f"m{i}": float(i) for i in range(25)}, t) for s in range(100)]  # 2500 values
    _deliver(backend, points, tmp_path)
    assert sum(calls) == 2500 and max(calls) <= 1000, calls
    assert len(calls) <= 6, f"batched, not one request per step: {calls}"  # 3 when all 100 arrive at once
    assert len(backend._client.get_metric_history(backend.run_id, "trainer/m7")) == 100

    calls.clear()  # one step of 2500 metrics: split into requests of at most 1000
    _deliver(backend, [MetricPoint(100, {f"big{i}": float(i) for i in range(2500)}, t)], tmp_path)
    assert calls == [1000, 1000, 500]


def test_2500_metrics_three_requests_server(server, tmp_path):
    """Counted as POSTs to log-batch in the real server's access log."""
    backend = _backend(server.uri, tmp_path, experiment_name="requests")
    t = time.time()
    before = server.count_requests(LOG_BATCH)
    _deliver(backend, [MetricPoint(100, {f"big{i}": float(i) for i in range(2500)}, t)], tmp_path)
    # The access log line is written after the response.
    wait_for(lambda: server.count_requests(LOG_BATCH) - before >= 3, "3 log-batch requests in the access log", 30)
    time.sleep(0.2)  # time for a 4th line, had there been a 4th request
    assert server.count_requests(LOG_BATCH) - before == 3
    points = [MetricPoint(s, {f"m{i}": float(i) for i in range(25)}, t) for s in range(100)]
    _deliver(backend, points, tmp_path)
    assert len(MlflowClient(server.uri).get_metric_history(backend.run_id, "trainer/m24")) == 100


def test_from_a_writer_thread(tmp_path):
    """As the tracker uses it: run created on the main thread, logging on another."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(uri)
    cfg.run_id = ensure_run(cfg)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            backend = backend_class("mlflow")(cfg, TrackerContext(job="trainer", output_dir=tmp_path))
            backend.open()
            backend.log_metrics([MetricPoint(s, {"x": float(s)}, time.time()) for s in range(5)])
            backend.finish()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(60)
    assert not errors
    assert _history(MlflowClient(uri), cfg.run_id, "trainer/x") == [(s, float(s)) for s in range(5)]


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    """No minutes of hidden HTTP retries: our delivery layer owns retrying."""
    from mlflow_server import free_port

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # open() sets our defaults again
    port = free_port()
    backend = backend_class("mlflow")(_cfg(f"http://127.0.0.1:{port}"), TrackerContext(job="trainer", output_dir=tmp_path))
    with _connection_attempts(port) as attempts, pytest.raises(Exception):
        backend.open()
    assert len(attempts) == 1, f"one try, not retried: {attempts}"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_server_killed_and_restarted(server, tmp_path):
    """While the server is down calls raise quickly; after a restart on the same store the
    same backend (no reopen) delivers, and the retried batch lands exactly once."""
    backend = _backend(server.uri, tmp_path, experiment_name="outage")
    t = time.time()
    first = [MetricPoint(s, {"x": float(s)}, t + s) for s in range(5)]
    second = [MetricPoint(s, {"x": float(s)}, t + s) for s in range(5, 10)]
    backend.log_metrics(first)
    server.kill()
    with _connection_attempts(server.port) as attempts, pytest.raises(Exception):
        backend.log_metrics(second)
    assert len(attempts) == 1, f"one try, no internal HTTP retries: {attempts}"
    server.start()
    backend.log_metrics(second)  # the delivery layer's retry
    backend.log_metrics(first[3:])  # and a resend of points already stored
    assert _history(MlflowClient(server.uri), backend.run_id, "trainer/x") == [(s, float(s)) for s in range(10)]


def test_the_model_as_a_logged_model_and_a_registered_version(tmp_path, tiny_model):
    """log_model=final: the exported directory becomes a transformers-flavour logged model of the
    run, and a version of the registered model; loaded back, its weights are the ones exported."""
    import mlflow.transformers
    import torch

    from rlrun.model import load_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    backend = _backend(uri, tmp_path, log_model="final", registered_model_name="rlrun-policy")
    assert backend.wants_model(final=True) and not backend.wants_model(final=False)
    backend.log_model(tiny_model, step=7, final=True)
    backend.log_model(tiny_model, step=7, final=True)  # a retry: no second model
    backend.finish()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rlrun-test").experiment_id
    (model,) = client.search_logged_models(experiment_ids=[experiment])
    assert (model.name, model.source_run_id, model.tags["rlrun.step"]) == ("trainer-model", backend.run_id, "7")
    (version,) = client.search_model_versions("name = 'rlrun-policy'")
    assert version.run_id == backend.run_id
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.transformers.load_model(f"models:/{model.model_id}", return_type="components")
    original, _ = load_model(tiny_model)
    for (name, a), b in zip(original.state_dict().items(), loaded["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded["tokenizer"]("abc=")["input_ids"] == load_model(tiny_model)[1]("abc=")["input_ids"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_logs_its_final_model(tmp_path):
    """The app with logger.mlflow.log_model=final: the trainer exports its last step and the
    MLflow run gets it as a logged model whose weights are that step's published weights."""
    import mlflow.transformers
    import torch
    import yaml
    from conftest import run_app
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_app(run_dir, "sft.max_steps=0", "max_steps=3", "logger=[jsonl,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                  "logger.mlflow.log_model=final", timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_3"], "only the final step exported"
    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["mlflow"]["run_id"]
    client = MlflowClient(uri)
    (model,) = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id])
    assert (model.source_run_id, model.tags["rlrun.step"], model.tags["rlrun.final"]) == (run_id, "3", "true")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.transformers.load_model(f"models:/{model.model_id}", return_type="components")["model"]
    published = load_file(str(run_dir / "weights" / "step_3" / "model.safetensors"))
    state = loaded.state_dict()
    for name, tensor in published.items():
        assert torch.equal(state[name], tensor), name


def test_a_long_run_of_sample_tables_never_stalls_the_backend(tracking_uri, tmp_path, caplog):
    """MLflow keeps a run's table list in one 8000-character tag: log_table failed on every call
    once the list outgrew it. Tables go on as files; the list stops growing, with a warning."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    backend = _backend(tracking_uri, tmp_path, experiment_name="many-tables")
    steps = range(1, 161)
    for step in steps:
        backend.log_samples([{"prompt": "p", "reward": float(step)}], step=step)
    client = MlflowClient(tracking_uri)
    files = {f.path for f in client.list_artifacts(backend.run_id, "samples")}
    assert files == {f"samples/trainer_step_{s:06d}.json" for s in steps}
    tag = client.get_run(backend.run_id).data.tags["mlflow.loggedArtifacts"]
    listed = json.loads(tag)
    assert len(tag) <= MAX_TAG_VAL_LENGTH and 100 < len(listed) < 160
    assert listed[0] == {"path": "samples/trainer_step_000001.json", "type": "table"}
    assert _load_json_artifact(client, backend.run_id, "samples/trainer_step_000160.json", tmp_path)["data"] == [[160, "p", 160.0]]
    assert sum("table list" in r.getMessage() for r in caplog.records) == 1
