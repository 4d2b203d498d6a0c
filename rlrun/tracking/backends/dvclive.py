"""DVCLive backend: plain files in DVCLive's layout, one folder per job (`<dir>/<job>`).

What DVC, its VS Code extension and Studio read (`dvc plots show`, `dvc metrics show`):
- each metric's history in `plots/metrics/<name>.tsv` (`step` and value columns; `/` in a
  name is a subfolder, kept as is; NaN / inf are written as `nan` / `inf`);
- the latest values in `metrics.json` (nested by `/`), with the last `step`;
- hyperparams in `params.yaml` (flat dotted keys);
- samples as DVCLive's custom plot `plots/custom/samples.json`: the newest `max_table_rows`
  rows, each with its `step`, drawn as a scatter of the first numeric column by step.
  DVCLive has no table type; this file is the table.
- distributions as statistics: DVCLive has no histogram type, so (as for MLflow) each
  becomes `<name>/<stat>` metrics (p5, p50, p95, mean, std, min, max);
- alerts: DVCLive has no alert or event type; each doctor rule's newest finding is a text
  value in `metrics.json` under `alerts/<job>/<rule>`.

Names are kept, `/` included, but one: a name whose last part is `step` (rlrun's `time/step`)
gets a `_` (`time/step_`), because DVCLive names the value column of `<name>.tsv` by the
name's last part and a `step` value column overwrites the step column (DVCLive 3.49 then
writes the values without their steps). Metric names are paths here, so a name that is also
the start of another one (`a` and `a/b`: `metrics.json` cannot nest under a number), or that
has an empty, `.` or `..` part, or that two names map to, is refused (ValueError) before
anything of that batch is written.

DVCLive is used without DVC: `Live(save_dvc_exp=False, dvcyaml=None)`, and its repository
and Studio set-up are skipped (`_LocalLive`): DVCLive's own would `dvc init` the git
repository around the working directory (writing `.dvc/` outside the run directory) and
post to DVC Studio when a Studio token is configured. We never call `next_step()` or `end()`
either: they write signal files under the working directory's DVC repository (`.dvc/tmp`)
and post to Studio; we set `live.step` to each point's step and write `metrics.json`
ourselves (`make_summary`). Nothing here opens a connection. Tested with dvclive 3.49.1.

Re-delivery is harmless: each metric's file is appended only for steps above the last one
it holds (read back from the file on resume), and the other files are rewritten whole.
A resumed job (`resume_ids["dvclive_dir"]`) reopens the same folder with `resume=True`;
without it, `Live()` empties the folder first, as DVCLive does for a new run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rlrun.tracking.base import Alert, Backend, MetricPoint, TrackerContext
from rlrun.tracking.config import TrackerPlugin
from rlrun.tracking.names import DISTRIBUTION_STATS, dvclive_key

SAMPLES_KEY = "samples"
_SUMMARY_STEP = "step"  # make_summary writes the last step under this key of metrics.json


@dataclass
class DvcliveLoggerConfig:
    enabled: bool = False
    dir: Optional[str] = None  # default: <output_dir>/dvclive; each job writes <dir>/<job>


# What the `rlrun.trackers` entry point `dvclive` names (this module imports no dvclive).
PLUGIN = TrackerPlugin(DvcliveLoggerConfig, "rlrun.tracking.backends.dvclive:DvcliveBackend")


def _local_live_class() -> type:
    """dvclive.Live without DVC and Studio (see the module docstring)."""
    from dvclive import Live

    class _LocalLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # unused: dvcyaml=None

        _init_test = _init_dvc  # DVCLIVE_TEST would move the folder to a temporary directory

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

    return _LocalLive


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _prefixes(key: str) -> list[str]:
    parts = key.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += _leaves(value, name + "/") if isinstance(value, dict) else [name]
    return out


class DvcliveBackend(Backend):
    name = "dvclive"

    def __init__(self, cfg: Any, ctx: TrackerContext) -> None:
        base = Path(getattr(cfg, "dir", None) or Path(ctx.output_dir) / "dvclive")
        saved = ctx.resume_ids.get("dvclive_dir")
        self.dir = Path(saved) if saved else (base / ctx.job if ctx.job else base)
        self.resuming = saved is not None
        self.max_rows = int(ctx.max_table_rows)
        self._rows: deque[dict[str, Any]] = deque(maxlen=self.max_rows)
        self._samples_through = -1  # newest step in the samples table when this attempt opened it
        self._last: dict[str, int] = {}  # DVCLive name -> last step its .tsv holds
        self._keys: dict[str, str] = {}  # metric name -> DVCLive name (checked)
        # DVCLive name -> the metric it belongs to; None for a resumed run's names (whose
        # metric is not known yet) and for the summary's own `step`.
        self._owners: dict[str, str | None] = {_SUMMARY_STEP: None}
        self._prefixes: set[str] = set()  # every proper prefix of those names (`a` for `a/b`)
        self._top_step: int | None = None  # the newest step logged: metrics.json's `step`
        self._live: Any = None

    @classmethod
    def preflight(cls, cfg: Any, ctx: TrackerContext) -> None:
        import importlib.util

        if importlib.util.find_spec("dvclive") is None:
            raise RuntimeError("logger.dvclive is on but dvclive is not installed: `pip install dvclive`")

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        if self._live is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        live = _local_live_class()(
            dir=str(self.dir), resume=self.resuming, report=None, save_dvc_exp=False, dvcyaml=None, monitor_system=False
        )
        if isinstance(live.summary.get(_SUMMARY_STEP), int):
            self._top_step = live.summary[_SUMMARY_STEP]
        for key in _leaves(live.summary):  # a resumed run's names constrain the new ones
            self._owners.setdefault(key, None)
            self._prefixes.update(_prefixes(key))
        if self.resuming:
            samples = Path(live.plots_dir) / "custom" / f"{SAMPLES_KEY}.json"
            if samples.exists():
                from dvclive.utils import parse_json

                self._rows.extend(parse_json(samples))
                self._samples_through = max((int(row.get("step", -1)) for row in self._rows), default=-1)
        self._live = live

    def run_identity(self) -> dict[str, str]:
        return {"dvclive_dir": str(self.dir.absolute())}

    def finish(self) -> None:
        if self._live is not None:
            self._summarize()
            self._live = None

    def _summarize(self) -> None:
        """metrics.json, rewritten whole: the newest value of each metric, and the newest step
        (a late distribution or alert must not move it back)."""
        if self._top_step is not None:
            self._live.step = self._top_step
        self._live.make_summary()

    # ------------------------------------------------------------ names

    def _map(self, names: list[str]) -> dict[str, str]:
        """Metric name -> DVCLive name, for every name seen; the new ones are checked first and
        taken only if all of them can be kept (else ValueError, and nothing is written)."""
        new = [name for name in dict.fromkeys(names) if name not in self._keys]
        if not new:
            return self._keys
        owners, prefixes, keys = dict(self._owners), set(self._prefixes), {}
        for name in new:
            key = dvclive_key(name)
            if any(part in ("", ".", "..") for part in key.split("/")):
                raise ValueError(f"dvclive: metric {name!r} cannot be a DVCLive path (an empty, '.' or '..' part)")
            if key in owners and owners[key] is not None and owners[key] != name:
                raise ValueError(f"dvclive: metrics {owners[key]!r} and {name!r} both become {key!r}")
            clash = key if key in prefixes else next((p for p in _prefixes(key) if p in owners), None)
            if clash is not None:
                shown = "the last step" if clash == _SUMMARY_STEP else repr(clash)
                raise ValueError(f"dvclive: metric {name!r} clashes with {shown}: in metrics.json one is the "
                                 "start of the other (rename one of them)")  # fmt: skip
            owners[key] = name
            prefixes.update(_prefixes(key))
            keys[name] = key
        self._owners, self._prefixes = owners, prefixes
        self._keys.update(keys)
        return self._keys

    def _last_step(self, key: str) -> int:
        last = self._last.get(key)
        if last is None:
            last = -1
            path = Path(self._live.plots_dir) / "metrics" / f"{key}.tsv"
            if self.resuming and path.exists():  # a new run's folder was emptied by Live()
                from dvclive.utils import parse_tsv

                last = max((int(row["step"]) for row in parse_tsv(path)), default=-1)
            self._last[key] = last
        return last

    # ------------------------------------------------------------ data

    def _log_values(self, step: int, values: dict[str, float], keys: dict[str, str]) -> bool:
        """One step's values, each appended only if its file does not have the step yet."""
        live = self._live
        live.step = step  # DVCLive writes each row at live.step: exactly rlrun's step
        wrote = False
        for name, value in values.items():
            key = keys[name]
            if step <= self._last_step(key):
                continue  # delivered before (a retry, or the previous attempt of a resumed job)
            live.log_metric(key, value)
            self._last[key] = step
            wrote = True
        if wrote:
            self._top_step = step if self._top_step is None else max(self._top_step, step)
        return wrote

    def log_metrics(self, points: list[MetricPoint]) -> None:
        keys = self._map([name for point in points for name in point.metrics])
        wrote = False
        for point in points:
            wrote = self._log_values(point.step, {k: float(v) for k, v in point.metrics.items()}, keys) or wrote
        if wrote:
            self._summarize()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        # params.yaml is rewritten whole with every param logged so far (and a resumed run's).
        self._live.log_params({key: _cell(value) for key, value in params.items()})

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows or step <= self._samples_through:
            return  # a resumed job's repeat of a step the table already has
        kept = deque(self._rows, maxlen=self.max_rows)
        kept.extend({"step": step, **{k: _cell(v) for k, v in row.items()}} for row in rows)  # a row's own "step" wins
        data = list(kept)
        numeric = [c for c in dict.fromkeys(k for row in data for k in row) if c != "step"
                   and all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) for row in data)]  # fmt: skip
        # The file is rewritten whole: a retry is harmless. x/y only style DVC's plot; the first
        # call fixes them.
        self._live.log_plot(SAMPLES_KEY, data, x="step", y=numeric[0] if numeric else "step", template="scatter",
                            title="samples")  # fmt: skip
        self._rows = kept  # only once written, so a retried call does not add its rows twice

    def log_distribution(self, name: str, values: list[float], step: int) -> None:
        finite = np.asarray(values, dtype=np.float64)
        p5, p50, p95 = np.percentile(finite, [5, 50, 95])
        stats = (p5, p50, p95, finite.mean(), finite.std(), finite.min(), finite.max())
        named = {f"{name}/{s}": float(v) for s, v in zip(DISTRIBUTION_STATS, stats)}
        if self._log_values(step, named, self._map(list(named))):
            self._summarize()

    def log_alert(self, alert: Alert) -> None:
        name = f"alerts/{alert.job}/{alert.rule}"
        key = self._map([name])[name]
        # A text value in metrics.json only (plot=False): DVC plots numbers, and the newest
        # finding per rule is what `dvc metrics show` should say.
        self._live.log_metric(key, alert.text(), plot=False)
        self._summarize()
