"""Plots and a summary of a run (or a sweep) from its own record: `python -m rlrun.report`.

    python -m rlrun.report outputs/2026-11-23/14-05-09            # -> <run>/report.png, report.html
    python -m rlrun.report outputs/multirun/2026-11-23/15-00-00   # a sweep: its jobs overlaid
    python -m rlrun.report runA runB -o compare/                  # any runs overlaid, written to compare/

Reads only `metrics/{orchestrator,trainer,monitor}.jsonl` (no tracker, no server), so it
works on a finished, crashed or still-running run. Training curves use the training step
as x-axis, a faint raw line and an EMA over it; usage curves (the monitor's) use wall-clock
seconds since the start. Panels whose metrics a run does not have are left out. A sweep's
jobs are labelled by the overrides that differ between them (`.hydra/overrides.yaml`).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

JOBS = ("orchestrator", "trainer", "monitor")
DASHES = ("-", "--", ":", "-.")
ELAPSED = "system/elapsed_s"


class NotARun(ValueError):
    pass


# ---------------------------------------------------------------- reading runs


@dataclass
class Series:
    x: list[float]
    y: list[float]


@dataclass
class Run:
    path: Path
    label: str
    overrides: list[str]
    metrics: dict[str, dict[str, Series]] = field(default_factory=dict)  # job -> metric -> series

    def get(self, job: str, name: str) -> Series | None:
        return self.metrics.get(job, {}).get(name)

    def names(self, job: str, prefix: str = "") -> list[str]:
        return sorted(k for k in self.metrics.get(job, {}) if k.startswith(prefix))

    @property
    def steps(self) -> int:
        training = [s for job in ("orchestrator", "trainer") for s in self.metrics.get(job, {}).values() if s.x]
        return max((int(max(s.x)) for s in training), default=0)


def is_run_dir(path: Path) -> bool:
    return (path / "metrics").is_dir() and any((path / "metrics").glob("*.jsonl"))


def sweep_jobs(path: Path) -> list[Path]:
    """A sweep directory's job directories, in job order: Hydra's numbered subdirs (any
    subdir name when Hydra's `multirun.yaml` says it is a sweep)."""
    if not path.is_dir():
        return []
    named = (path / "multirun.yaml").is_file()
    jobs = [p for p in path.iterdir() if p.is_dir() and (named or p.name.isdigit()) and is_run_dir(p)]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(o) for o in overrides if not str(o).startswith("hydra.")]


def load_run(path: Path, label: str = "") -> Run:
    from rlrun.tracking.backends.jsonl import read_records

    overrides = read_overrides(path)
    run = Run(path, label or path.name, overrides)
    for job in JOBS:
        by_step: dict[int, dict[str, float]] = {}
        for record in read_records(path / "metrics" / f"{job}.jsonl"):
            if record.get("type") == "metrics":
                by_step[int(record["step"])] = record.get("metrics", {})  # a step logged twice: the last wins
        if not by_step:
            continue
        series: dict[str, Series] = {}
        for step in sorted(by_step):
            metrics = by_step[step]
            x = float(metrics.get(ELAPSED, step)) if job == "monitor" else float(step)
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    s = series.setdefault(name, Series([], []))
                    s.x.append(x)
                    s.y.append(float(value))
        run.metrics[job] = series
    return run


def label_runs(runs: list[Run]) -> None:
    """Label each run by the overrides that tell it apart from the others."""
    if len(runs) < 2:
        return
    common = set.intersection(*(set(r.overrides) for r in runs))
    for run in runs:
        distinct = [o for o in run.overrides if o not in common]
        run.label = ",".join(distinct) or ",".join(run.overrides) or run.path.name


def resolve(paths: list[Path]) -> list[tuple[Path, list[Path]]]:
    """(where the report goes, the runs it shows) for each path given; NotARun otherwise."""
    targets = []
    for path in paths:
        if is_run_dir(path):
            targets.append((path, [path]))
        elif jobs := sweep_jobs(path):
            targets.append((path, jobs))
        elif not path.exists():
            raise NotARun(f"{path}: no such directory")
        else:
            raise NotARun(f"{path}: not a run directory (no metrics/*.jsonl) nor a sweep directory "
                          "(no numbered job subdirectories with metrics/*.jsonl)")  # fmt: skip
    return targets


# ---------------------------------------------------------------- what to plot


@dataclass
class Line:
    label: str
    series: Series
    style: str = "line"  # line | band (needs `lower`/`upper`) | stack | dashed
    lower: Series | None = None
    upper: Series | None = None
    smooth: bool = True


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: Callable[[Run, bool], list[Line]]  # (run, overlaid) -> lines; overlaid: one line per run
    x: str = "step"  # step | time


def _lines(run: Run, job: str, names: list[str], strip: str = "", style: str = "line") -> list[Line]:
    return [Line(n.removeprefix(strip), s, style) for n in names if (s := run.get(job, n)) is not None]


def _reward(run: Run, overlaid: bool) -> list[Line]:
    mean, std = run.get("orchestrator", "reward"), run.get("orchestrator", "reward_std")
    if mean is None:
        return []
    if overlaid or std is None:
        return [Line("reward", mean)]
    lo = Series(mean.x, [m - s for m, s in zip(mean.y, _align(mean, std))])
    hi = Series(mean.x, [m + s for m, s in zip(mean.y, _align(mean, std))])
    return [Line("reward (mean ± std)", mean, "band", lo, hi)]


def _per_function(run: Run, overlaid: bool) -> list[Line]:
    names = [n for n in run.names("orchestrator", "rewards/") if n.endswith("/mean")]
    reward = run.get("orchestrator", "reward")
    if len(names) == 1 and reward is not None and run.get("orchestrator", names[0]).y == reward.y:
        return []  # one reward function: the reward panel already shows it
    return [Line(n.removeprefix("rewards/").removesuffix("/mean"), run.get("orchestrator", n)) for n in names]


def _kl(run: Run, overlaid: bool) -> list[Line]:
    names = [n for n in run.names("trainer") if n == "kl" or n.startswith("kl/") or n.endswith("/kl")]
    return _lines(run, "trainer", names[:1] if overlaid else names)


def _clip(run: Run, overlaid: bool) -> list[Line]:
    names = run.names("trainer", "clip_ratio/")
    if overlaid:
        names = [n for n in names if n == "clip_ratio/region_mean"] or names[:1]
    else:  # the per-rank extremes repeat the means on one rank: means only, when there are means
        names = [n for n in names if n.endswith("_mean")] or names
    return _lines(run, "trainer", names, strip="clip_ratio/")


def _lengths(run: Run, overlaid: bool) -> list[Line]:
    mean = run.get("orchestrator", "completions/mean_length")
    if mean is None:
        return []
    lo, hi = run.get("orchestrator", "completions/min_length"), run.get("orchestrator", "completions/max_length")
    if overlaid or lo is None or hi is None:
        return [Line("mean length", mean)]
    lines = [Line("mean length (min–max)", mean, "band", lo, hi)]
    if (term := run.get("orchestrator", "completions/mean_terminated_length")) and any(term.y):
        lines.append(Line("mean terminated length", term))
    return lines


def _fractions(run: Run, overlaid: bool) -> list[Line]:
    names = ["completions/clipped_ratio", "frac_reward_zero_std"]
    return _lines(run, "orchestrator", names[:1] if overlaid else names)


def _timing(job: str) -> Callable[[Run, bool], list[Line]]:
    def lines(run: Run, overlaid: bool) -> list[Line]:
        total = run.get(job, "time/step")
        if overlaid:
            return [Line("time/step", total)] if total else []
        parts = _lines(run, job, [n for n in run.names(job, "time/") if n != "time/step"], strip="time/", style="stack")
        if total is not None:
            parts.append(Line("step (total)", total, "dashed", smooth=len(total.y) >= 10))
        return parts

    return lines


def _throughput(run: Run, overlaid: bool) -> list[Line]:
    lines = [Line(f"{job} tokens/s", s) for job in ("orchestrator", "trainer") if (s := run.get(job, "tokens/s"))]
    return lines[:1] if overlaid else lines


def _grad_norm(run: Run, overlaid: bool) -> list[Line]:
    return _lines(run, "trainer", ["grad_norm"])


def _cpu_ram(run: Run, overlaid: bool) -> list[Line]:
    names = ["system/cpu_percent", "system/ram_percent", "system/disk_percent"]
    return _lines(run, "monitor", names[:1] if overlaid else names, strip="system/")


def _rss(run: Run, overlaid: bool) -> list[Line]:
    names = run.names("monitor", "system/rss_mb/")
    if overlaid:
        total = _sum([run.get("monitor", n) for n in names])
        return [Line("all jobs", total, smooth=False)] if total else []
    return [Line(n.removeprefix("system/rss_mb/"), run.get("monitor", n), smooth=False) for n in names]


def _gpu(metric: str) -> Callable[[Run, bool], list[Line]]:
    def lines(run: Run, overlaid: bool) -> list[Line]:
        node = run.get("monitor", f"gpu/node/{metric}")
        if overlaid:
            return [Line("node", node, smooth=metric != "memory_used_gb")] if node else []
        per_gpu = [n for n in run.names("monitor", "gpu/") if not n.startswith("gpu/node/")]
        out = _lines(run, "monitor", [n for n in per_gpu if n.endswith(f"/{metric}")])
        for line in out:
            line.smooth = metric not in ("memory_used_gb",)  # a memory peak must not be smoothed away
        if metric == "memory_used_gb":  # capacity, as a dashed ceiling per GPU
            totals = [n for n in per_gpu if n.endswith("/memory_total_gb")]
            out += [Line(n.removesuffix("_gb"), run.get("monitor", n), "dashed", smooth=False) for n in totals]
        return out

    return lines


PANELS = [
    Panel("Reward", "reward", _reward),
    Panel("Reward per function", "mean reward", _per_function),
    Panel("KL to the reference", "KL", _kl),
    Panel("Entropy", "nats / token", lambda run, o: _lines(run, "trainer", ["entropy"])),
    Panel("Clipped importance ratios", "fraction of tokens", _clip),
    Panel("Completion lengths", "tokens", _lengths),
    Panel("Truncated completions, zero-signal groups", "fraction", _fractions),
    Panel("Gradient norm", "grad norm", _grad_norm),
    Panel("Throughput", "tokens / s", _throughput),
    Panel("Orchestrator time per step", "seconds", _timing("orchestrator")),
    Panel("Trainer time per step", "seconds", _timing("trainer")),
    Panel("CPU, RAM, disk", "percent", _cpu_ram, x="time"),
    Panel("Memory per job (RSS of its processes)", "MB", _rss, x="time"),
    Panel("GPU utilization", "percent", _gpu("utilization"), x="time"),
    Panel("GPU memory", "GB", _gpu("memory_used_gb"), x="time"),
    Panel("GPU power", "W", _gpu("power_w"), x="time"),
    Panel("GPU temperature", "°C", _gpu("temperature_c"), x="time"),
]

# The summary table: (job, metric, how to summarize) -- first/last for training, mean/max for usage.
TABLE = [
    ("orchestrator", "reward"), ("orchestrator", "reward_std"), ("orchestrator", "rewards/*/mean"),
    ("trainer", "kl"), ("trainer", "entropy"), ("trainer", "clip_ratio/region_mean"), ("trainer", "grad_norm"),
    ("orchestrator", "completions/mean_length"), ("orchestrator", "completions/clipped_ratio"),
    ("orchestrator", "frac_reward_zero_std"), ("orchestrator", "tokens/s"), ("trainer", "tokens/s"),
    ("orchestrator", "time/step"), ("trainer", "time/step"),
    ("monitor", "system/cpu_percent"), ("monitor", "system/ram_used_gb"), ("monitor", "system/rss_mb/*"),
    ("monitor", "system/run_dir_gb"), ("monitor", "gpu/node/utilization"), ("monitor", "gpu/node/memory_used_gb"),
    ("monitor", "gpu/node/power_w"),
]  # fmt: skip


# ---------------------------------------------------------------- numbers


def _align(ref: Series, other: Series) -> list[float]:
    """`other`'s values at `ref`'s x (NaN where it has none)."""
    at = dict(zip(other.x, other.y))
    return [at.get(x, math.nan) for x in ref.x]


def _sum(series: list[Series | None]) -> Series | None:
    """Pointwise sum over the x values any series has (a job that ended counts as 0)."""
    present = [s for s in series if s is not None]
    if not present:
        return None
    xs = sorted({x for s in present for x in s.x})
    total = dict.fromkeys(xs, 0.0)
    for s in present:
        for x, y in zip(s.x, s.y):
            total[x] += y
    return Series(xs, [total[x] for x in xs])


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average (NaN-tolerant); span ~ n/25 so long runs are smoothed more."""
    span = span or max(2, len(values) // 25)
    alpha = 2.0 / (span + 1.0)
    out, acc = [], math.nan
    for v in values:
        if math.isfinite(v):
            acc = v if not math.isfinite(acc) else acc + alpha * (v - acc)
        out.append(acc)
    return out


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


# ---------------------------------------------------------------- drawing


def plot(runs: list[Run], out_png: Path, title: str) -> int:
    """Draw every panel some run has into `out_png`; the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlaid = len(runs) > 1
    panels = [(p, [(run, p.lines(run, overlaid)) for run in runs]) for p in PANELS]
    panels = [(p, drawn) for p, drawn in panels if any(lines for _, lines in drawn)]
    if not panels:
        return 0
    cols = 3 if len(panels) > 4 else max(1, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.9 * rows + (0.6 if overlaid else 0.3)), squeeze=False,
                             layout="constrained")  # fmt: skip
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    run_color = {id(run): palette[i % len(palette)] for i, run in enumerate(runs)}
    for ax, (panel, drawn) in zip(axes.flat, panels):
        series_index = 0
        styles: dict[str, str] = {}  # overlaid runs with several lines each: a dash style per line
        for run, lines in drawn:
            stack = [line for line in lines if line.style == "stack"]
            if stack:
                _stack(ax, stack, palette)
                series_index += len(stack)
            for line in lines:
                if line.style == "stack":
                    continue
                color = run_color[id(run)] if overlaid else palette[series_index % len(palette)]
                series_index += 1
                dash = styles.setdefault(line.label, DASHES[len(styles) % len(DASHES)]) if overlaid else "-"
                _draw(ax, line, color, run.label if overlaid else line.label, dash)
        ax.set_title(panel.title, fontsize=11, fontweight="bold")
        ax.set_xlabel("step" if panel.x == "step" else "wall-clock seconds since start")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        if overlaid and len(styles) > 1:  # which line is which: the runs' colors are in the figure legend
            ax.legend([plt.Line2D([], [], color="0.3", ls=dash) for dash in styles.values()], list(styles),
                      fontsize=8, loc="best", framealpha=0.7)  # fmt: skip
        if not overlaid and len(ax.get_legend_handles_labels()[0]) > 1:
            if any(line.style == "stack" for _, lines in drawn for line in lines):  # room above the stack
                bottom, top = ax.get_ylim()
                ax.set_ylim(bottom, top + 0.45 * (top - bottom))
                ax.legend(fontsize=8, loc="upper center", ncols=3, framealpha=0.8)
            else:
                ax.legend(fontsize=8, loc="best", framealpha=0.7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if overlaid:  # one legend for every panel (a run has one color throughout), titled like the figure
        handles = [plt.Line2D([], [], color=run_color[id(run)], lw=2) for run in runs]
        fig.legend(handles, [run.label for run in runs], loc="outside upper center", ncols=min(len(runs), 4),
                   fontsize=10, title=title, title_fontsize=13, frameon=False)  # fmt: skip
    else:  # (constrained layout would put a suptitle and an outside legend on top of each other)
        fig.suptitle(title, fontsize=13)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return len(panels)


def _draw(ax, line: Line, color: str, label: str, dash: str = "-") -> None:
    s = line.series
    if line.style == "dashed":
        ax.plot(s.x, ema(s.y) if line.smooth else s.y, "--", color=color, lw=1.2, label=label)
        return
    noisy = line.smooth and len(s.y) >= 10
    if line.style == "band" and line.lower is not None and line.upper is not None:
        lo, hi = _align(s, line.lower), _align(s, line.upper)
        if noisy:
            lo, hi = ema(lo), ema(hi)
        ax.fill_between(s.x, lo, hi, color=color, alpha=0.15, lw=0)
    if noisy:
        ax.plot(s.x, s.y, color=color, lw=0.8, alpha=0.3, ls=dash)
        ax.plot(s.x, ema(s.y), color=color, lw=1.8, label=label, ls=dash)
    else:
        ax.plot(s.x, s.y, color=color, lw=1.5, label=label, ls=dash, marker="o" if len(s.y) < 3 else None)


def _stack(ax, lines: list[Line], palette: list[str]) -> None:
    """Components of a step's time, smoothed and stacked (raw values are too noisy to stack)."""
    xs = sorted({x for line in lines for x in line.series.x})
    layers = []
    for line in lines:
        at = dict(zip(line.series.x, line.series.y))
        layer = [at.get(x, 0.0) for x in xs]
        layers.append(ema([v if math.isfinite(v) else 0.0 for v in layer]) if len(xs) >= 10 else layer)
    colors = [palette[i % len(palette)] for i in range(len(lines))]
    ax.stackplot(xs, layers, labels=[line.label for line in lines], colors=colors, alpha=0.75)


# ---------------------------------------------------------------- the html summary


def _summaries(run: Run) -> list[tuple[str, str, dict[str, float]]]:
    """(job, metric, {first, last, min, max, mean}) for the table's metrics that `run` has."""
    rows = []
    for job, pattern in TABLE:
        if "*" in pattern:
            head, tail = pattern.split("*")
            names = [n for n in run.names(job, head) if n.endswith(tail)]
        else:
            names = [pattern] if run.get(job, pattern) else []
        for name in names:
            values = _finite(run.get(job, name).y)
            if values:
                rows.append((job, name, {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                                         "mean": sum(values) / len(values)}))  # fmt: skip
    return rows


def write_html(runs: list[Run], out_html: Path, png: Path, title: str) -> None:
    e = html.escape
    data = base64.b64encode(png.read_bytes()).decode("ascii") if png.is_file() else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child,"
        "td.l{text-align:left}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Runs</h2><table><tr><th>label</th><th>directory</th><th>overrides</th><th>steps</th>"
        "<th>reward: first 10% → last 10%</th></tr>",
    ]
    for run in runs:
        parts.append(f"<tr><td class='l'>{e(run.label)}</td><td class='l'>{e(str(run.path))}</td>"
                     f"<td class='l'>{e(' '.join(run.overrides)) or '–'}</td><td>{run.steps}</td>"
                     f"<td>{e(_reward_change(run))}</td></tr>")  # fmt: skip
    parts.append("</table>")
    if data:
        parts.append(f"<img alt='report' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Values</h2><p>Training metrics over steps; usage metrics (monitor) over its samples.</p>")
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{e(run.label)}</h3>")
        parts.append("<table><tr><th>job</th><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
                     "<th>mean</th></tr>")  # fmt: skip
        for job, name, v in _summaries(run):
            cells = "".join(f"<td>{fmt(v[k])}</td>" for k in ("first", "last", "min", "max", "mean"))
            parts.append(f"<tr><td class='l'>{job}</td><td class='l'>{e(name)}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out_html.write_text("\n".join(parts), encoding="utf-8")


def _reward_change(run: Run) -> str:
    reward = run.get("orchestrator", "reward")
    values = _finite(reward.y) if reward else []
    if not values:
        return "–"
    k = max(1, len(values) // 10)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return f"{fmt(first)} → {fmt(last)} ({last - first:+.3f})"


# ---------------------------------------------------------------- entry point


def report(target: Path, run_dirs: list[Path]) -> tuple[Path, Path]:
    """Write `target/report.png` and `target/report.html` for `run_dirs` (overlaid if several)."""
    runs = [load_run(p) for p in run_dirs]
    label_runs(runs)
    runs = [run for run in runs if run.metrics]
    if not runs:
        raise NotARun(f"{target}: no metrics recorded yet")
    target.mkdir(parents=True, exist_ok=True)
    title = f"rlrun report: {Path(*target.resolve().parts[-2:])}" + (f" ({len(runs)} runs)" if len(runs) > 1 else "")
    png, page = target / "report.png", target / "report.html"
    plot(runs, png, title)
    write_html(runs, page, png, title)
    return png, page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlrun.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("-o", "--out", type=Path, help="overlay every run given into one report written here")
    args = parser.parse_args(argv)
    try:
        targets = resolve(args.paths)
        if args.out is not None:
            targets = [(args.out, [run for _, runs in targets for run in runs])]
        for target, run_dirs in targets:
            for path in report(target, run_dirs):
                print(path)
    except NotARun as exc:
        print(f"rlrun.report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
