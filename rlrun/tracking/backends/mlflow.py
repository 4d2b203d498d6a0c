"""MLflow backend: batched metrics, params, sample tables and distribution artifacts.

Trainer and orchestrator share ONE MLflow run (the parent creates it, see
`rlrun.tracking.runs`, and hands the id to the jobs); each job's metric keys carry a
`<job>/` prefix.

Everything goes through an explicit `MlflowClient` (never the fluent, process-global API),
so several backends in one process cannot step on each other.

Re-delivery (the writer thread retries a call that raised) is harmless:
- metrics keep the caller's timestamp, and MLflow drops rows identical in
  (key, step, timestamp, value), so a resent batch adds nothing;
- params already on the run with the same value are skipped (differing ones are
  skipped with a warning: MLflow forbids changing a param);
- a sample table is written whole (not appended as log_table would) and listed in the
  run's table tag only if absent; distribution statistics reuse the first attempt's
  timestamp and histogram artifacts are overwritten.

MLflow lists a run's tables in one tag of at most 8000 characters (~120 tables): a long run
lists the first ones; every table is a JSON file under `samples/` either way.

NaN and +/-inf metric values are sent as they are: MLflow stores NaN as NaN and clamps
+/-inf to +/-1.7976931348623157e308 (both the SQLite store and the REST server).
"""

from __future__ import annotations

import json
import logging
import time as _time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # an mlflow dependency; log_table takes its tables
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as MLFLOW_TAG_LIMIT

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.names import DISTRIBUTION_STATS, sanitize_key
from rlrun.tracking.runs import ensure_run, mlflow_client, resolve_tracking_uri

try:  # a private module; the fallbacks are MLflow's documented limits
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:
    MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 1000, 6000, 100

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 30


def _json_cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


class MlflowBackend(Backend):
    name = "mlflow"
    max_batch_metrics = MAX_METRICS_PER_BATCH  # 1000: one log_batch request per delivery

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.tracking_uri = resolve_tracking_uri(cfg)
        self.run_id: str | None = ctx.resume_ids.get("mlflow_run_id") or getattr(cfg, "run_id", None)
        self.job = sanitize_key(ctx.job) if ctx.job else ""
        self.prefix = f"{self.job}/" if self.job else ""
        self._client: Any = None
        self._keys: dict[str, str] = {}  # metric name -> MLflow key (prefixed, sanitized)
        self._skipped: set[str] = set()  # keys already warned about (non-numeric values)
        self._table_list_full = False  # the run's table-list tag has no room left (see _mark_table)
        self._stat_times: dict[tuple[str, int], int] = {}  # (name, step) -> first attempt's ms

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        if self.run_id is None:
            self.run_id = ensure_run(self.cfg, self.ctx.run_name, tracking_uri=self.tracking_uri)
        else:
            self._client.get_run(self.run_id)  # a wrong id fails here, not on the first batch

    def run_identity(self) -> dict[str, str]:
        identity = {"mlflow_tracking_uri": self.tracking_uri}
        if self.run_id:
            identity["mlflow_run_id"] = self.run_id
        return identity

    def finish(self) -> None:
        # The parent owns the run's lifecycle (several jobs log to it); standalone users
        # set ctx.mlflow_end_run so the run is marked FINISHED here.
        if self.ctx.mlflow_end_run and self._client is not None and self.run_id:
            self._client.set_terminated(self.run_id, status="FINISHED")

    # ------------------------------------------------------------ metrics

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = sanitize_key(self.prefix + name)
        return key

    def _metric(self, name: str, value: Any, timestamp_ms: int, step: int) -> Metric | None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            if name not in self._skipped:
                self._skipped.add(name)
                log.warning("mlflow: metric %r has a non-numeric value %r; skipping it", name, value)
            return None
        return Metric(self._key(name), number, timestamp_ms, int(step))

    def _send_metrics(self, metrics: list[Metric]) -> None:
        # synchronous=True: errors must reach our retry layer even if async logging is enabled.
        # The delivery layer never hands over more than max_batch_metrics values at once.
        self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def log_metrics(self, points: list[MetricPoint]) -> None:
        out = []
        for point in points:
            ms = int(point.time * 1000)
            for name, value in point.metrics.items():
                metric = self._metric(name, value, ms, point.step)
                if metric is not None:
                    out.append(metric)
        self._send_metrics(out)

    # ------------------------------------------------------------ params

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        wanted: dict[str, str] = {}
        for key, value in params.items():
            wanted[sanitize_key(key)] = str(value)[:MAX_PARAM_VAL_LENGTH]
        # Params are write-once in MLflow: on resume (or a retry after a partial batch) they
        # are already there. Log only what is missing; never try to change a value.
        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        if changed:
            log.warning(
                "mlflow: run %s already has other values for %d params (%s); keeping the logged ones",
                self.run_id,
                len(changed),
                ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""),
            )
        new = [Param(k, v) for k, v in wanted.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):  # MLflow's own limit per request
            self._client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    # ------------------------------------------------------------ samples

    def _mark_table(self, artifact_file: str) -> None:
        """List the file in the run's `mlflow.loggedArtifacts` tag, as log_table does, so the UI
        shows it as a table; while the list fits the tag (MLFLOW_TAG_LIMIT characters, ~120 tables).

        MLflow's own log_table reads that tag on every call: once the list outgrew the limit
        the stored value was cut and every later call failed on the cut JSON, so a long run with
        sample tables stalled this backend for good. Later tables are still files under samples/."""
        if self._table_list_full:  # no need to read the run again
            return
        tags = self._client.get_run(self.run_id).data.tags
        try:
            logged = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        except ValueError:  # cut by an earlier writer: leave it as it is
            logged = None
        entry = {"path": artifact_file, "type": "table"}
        if logged is None or entry in logged:
            return
        value = json.dumps([*logged, entry])
        if len(value) > MLFLOW_TAG_LIMIT:
            log.warning("mlflow: the run's table list (tag %s) is full at %d tables; later sample tables are "
                        "logged as JSON files under samples/ without it", MLFLOW_LOGGED_ARTIFACTS, len(logged))  # fmt: skip
            self._table_list_full = True
            return
        self._client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, value)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        rows = [{"step": step, **row} for row in rows]  # a row's own "step" wins
        columns = dict.fromkeys(key for row in rows for key in row)
        table = {c: [_json_cell(row.get(c)) for row in rows] for c in columns}
        stem = f"{self.job}_step_{step:06d}" if self.job else f"step_{step:06d}"
        artifact_file = f"samples/{stem}.json"
        # The file log_table would write (pandas, orient="split"), written whole: a retried call
        # rewrites it rather than appending the rows again (log_table appends to an existing file).
        self._client.log_text(self.run_id, pd.DataFrame(table).to_json(orient="split", index=False, date_format="iso"),
                              artifact_file)  # fmt: skip
        self._mark_table(artifact_file)

    # ------------------------------------------------------------ the model

    def wants_model(self, final: bool) -> bool:
        mode = getattr(self.cfg, "log_model", "off")
        return mode == "checkpoints" or (mode == "final" and final)

    def log_model(self, path: Path, step: int, final: bool) -> None:
        """A logged model (transformers flavour) linked to the run at `step`; the final one also a
        version of `registered_model_name`, if set.

        The model is loaded from the directory on this (writer) thread: MLflow 3.17's flavour
        cannot log a checkpoint directory under transformers 5 (its task lookup fails), only
        loaded components. Its pip requirements are given, not inferred (inference wants
        torchvision, which a CPU install does not have).
        """
        import mlflow
        import mlflow.transformers

        from rlrun.model import load_model

        if not path.is_dir():
            log.warning("mlflow: model export %s was pruned before it could be logged; skipping it", path)
            return
        name = f"{self.job}-model" if self.job else "model"
        # A retry after a failure midway must not log a second model for the same step.
        experiment = self._client.get_run(self.run_id).info.experiment_id
        logged = self._client.search_logged_models(experiment_ids=[experiment], filter_string=f"name = '{name}'")
        if any(m.source_run_id == self.run_id and m.tags.get("rlrun.step") == str(step) for m in logged):
            return
        # log_model has no client form: it reads the process's tracking URI and active
        # experiment (one MLflow backend per job process, so setting them changes nothing else).
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(experiment_id=experiment)
        registered = getattr(self.cfg, "registered_model_name", None) if final else None
        model, tokenizer = load_model(path)
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name=name, task="text-generation", run_id=self.run_id,
            step=step, tags={"rlrun.step": str(step), "rlrun.final": str(final).lower()},
            registered_model_name=registered, await_registration_for=0, pip_requirements=["torch", "transformers"],
        )  # fmt: skip

    # ------------------------------------------------------------ alerts

    def log_alert(self, alert: Alert) -> None:
        # A tag per job and rule (the newest finding wins): the runs table can filter on it.
        self._client.set_tag(self.run_id, sanitize_key(f"rlrun.alert.{alert.job}.{alert.rule}"), alert.text())

    # ------------------------------------------------------------ distributions

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        finite = np.asarray(values, dtype=np.float64)
        p5, p50, p95 = np.percentile(finite, [5, 50, 95])
        values = (p5, p50, p95, finite.mean(), finite.std(), finite.min(), finite.max())
        # Same timestamp on a retry, so MLflow's dedup of identical rows applies.
        ms = self._stat_times.setdefault((name, step), int(_time.time() * 1000))
        self._send_metrics(
            [Metric(self._key(f"{name}/{s}"), float(v), ms, int(step)) for s, v in zip(DISTRIBUTION_STATS, values)]
        )

        counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
        histogram = {
            "name": name,
            "step": int(step),
            "bin_edges": edges.tolist(),
            "counts": counts.tolist(),
            "num_values": int(finite.size),
        }
        path = f"distributions/{self.prefix}{sanitize_key(name)}_step_{step:06d}.json"
        self._client.log_dict(self.run_id, histogram, path)  # overwrites: a retry is harmless
        self._stat_times.pop((name, step), None)

