"""What metric names each tracker backend can take, checked before any job starts
(`rlrun.metric_names.check_metric_names`), and MLflow's key mapping, which both the check and
the MLflow backend use. Importing this imports no tracker library.

MLflow keys are `<job>/<name>`, with characters outside MLflow's set (`@` in `eval/pass@4`)
replaced by `_`; a distribution becomes `<name>/<stat>` keys. DVCLive keeps each job's names
as paths (a last part `step` becomes `step_`). Both keep a metric in a file at its key's
path, so a key that is also the start of another (`a` and `a/b`) cannot be kept. W&B
reserves names that start with `_`; ClearML splits a name into a title and a series; Comet
cuts names at 100 characters. TensorBoard and the jsonl record take any name; a
plugin backend's names are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

MLFLOW_MAX_KEY_LENGTH = 250  # MLflow's documented limit for metric and param keys
DISTRIBUTION_STATS = ("p5", "p50", "p95", "mean", "std", "min", "max")  # MLflow has no histogram type
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def sanitize_key(key: str) -> str:
    """A metric/param name MLflow accepts: alphanumerics and `_ - . space / :`, no empty,
    `.` or `..` path segments (MLflow treats names as paths), at most 250 characters."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p for p in key.split("/") if p]
    parts = ["_" * len(p) if p in (".", "..") else p for p in parts]
    key = "/".join(parts)[:MLFLOW_MAX_KEY_LENGTH].rstrip("/")
    return key or "_"


def dvclive_key(name: str) -> str:
    """DVCLive names a metric's value column by its last part, beside its `step` column: a
    last part `step` would overwrite the step, so `time/step` is kept as `time/step_`."""
    return name + "_" if name.rsplit("/", 1)[-1] == "step" else name


def _all_names(metrics: Any) -> list[str]:
    """A job's scalar names and its distributions as the statistics a store without histograms keeps."""
    return [*metrics.scalars, *(f"{d}/{s}" for d in metrics.distributions for s in DISTRIBUTION_STATS)]


def _path_problem(keys: dict[str, tuple[str, str]], store: str) -> str | None:
    """A key that is also the start of another: the store keeps each metric in a file at its key's path."""
    for key, (job, name) in keys.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            if (prefix := "/".join(parts[:i])) in keys:
                return (f"metric {keys[prefix][1]!r} of the {job} job is also the start of metric {name!r}: {store} "
                        f"cannot keep both (key {prefix!r} would be a file and a folder)")  # fmt: skip
    return None


def _mlflow_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    keys: dict[str, tuple[str, str]] = {}  # MLflow key -> (job, metric name)
    for job, metrics in plan.items():
        for name in _all_names(metrics):
            full = f"{job}/{name}"
            if len(full) > MLFLOW_MAX_KEY_LENGTH:
                return f"metric {name!r} of the {job} job: MLflow key {full!r} is longer than {MLFLOW_MAX_KEY_LENGTH} characters"
            key = sanitize_key(full)
            if key in keys and keys[key] != (job, name):
                return (f"metrics {keys[key][1]!r} and {name!r} of the {job} job: both become MLflow key {key!r} "
                        "(MLflow allows only letters, digits and _ - . space / :)")  # fmt: skip
            keys[key] = (job, name)
    return _path_problem(keys, "MLflow's file store")


def _dvclive_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    for job, metrics in plan.items():  # each job its own folder
        keys: dict[str, tuple[str, str]] = {"step": (job, "(the last step, in metrics.json)")}
        for name in _all_names(metrics):
            key = dvclive_key(name)
            if any(part in ("", ".", "..") for part in key.split("/")):
                return f"metric {name!r} of the {job} job: DVCLive keeps it as a path, with an empty, '.' or '..' part"
            if key in keys and keys[key] != (job, name):
                return f"metrics {keys[key][1]!r} and {name!r} of the {job} job: both are DVCLive's {key!r}"
            keys[key] = (job, name)
        if problem := _path_problem(keys, "DVCLive's metrics.json"):
            return problem
    return None


def _wandb_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    for job, metrics in plan.items():
        for name in [*metrics.scalars, *metrics.distributions]:
            if name.startswith("_"):
                return f"metric {name!r} of the {job} job: W&B reserves names that start with '_' (_step, _runtime)"
    return None


def clearml_pair(name: str) -> tuple[str, str]:
    """ClearML's (title, series) of a metric: the name up to its last `/`, and its last part
    (a name without `/` is both: ClearML's way for a single line)."""
    title, _, series = name.rpartition("/")
    return (title, series) if title else (name, name)


def _clearml_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    for job, metrics in plan.items():
        pairs: dict[tuple[str, str], str] = {}
        for name in [*metrics.scalars, *metrics.distributions]:
            pair = clearml_pair(name)
            if pair in pairs and pairs[pair] != name:
                return f"metrics {pairs[pair]!r} and {name!r} of the {job} job: both are ClearML's title/series {pair}"
            pairs[pair] = name
    return None


COMET_MAX_NAME_LENGTH = 100  # comet_ml's MAXIMAL_KEY_LENGTH: it cuts longer metric names


def _comet_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    for job, metrics in plan.items():
        for name in metrics.scalars:
            if len(name) > COMET_MAX_NAME_LENGTH:
                return f"metric {name!r} of the {job} job: Comet cuts metric names at {COMET_MAX_NAME_LENGTH} characters"
    return None


def _swanlab_problem(plan: dict[str, Any], cfg: Any) -> str | None:
    for job, metrics in plan.items():
        for name in [*_all_names(metrics), *metrics.distributions]:
            if name != name.strip(" \t\n\r./") or len(name) > 512:
                return (f"metric {name!r} of the {job} job: SwanLab trims leading and trailing '/', '.' and "
                        "blanks from a key and cuts it at 512 characters")  # fmt: skip
    return None


# backend name -> what is wrong with the planned names for it (None: nothing)
NAME_RULES: dict[str, Callable[[dict[str, Any], Any], str | None]] = {
    "mlflow": _mlflow_problem,
    "wandb": _wandb_problem,
    "dvclive": _dvclive_problem,
    "swanlab": _swanlab_problem,
    "clearml": _clearml_problem,
    "comet": _comet_problem,
}
