"""Drawing a report: the panels as one PNG (matplotlib), and an html page around it.

`report()` writes both into a run's (or a sweep's) directory. Training curves use the
training step as x-axis, a faint raw line and an EMA over it; usage curves (the monitor's)
use wall-clock seconds since the start. matplotlib is imported only when plotting, so
reading runs and the CLI's argument errors stay quick.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rlrun.report.data import NotARun, Run, label_runs, load_run
from rlrun.report.panels import PANELS, Line, Panel, _align, _finite, ema

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DASHES = ("-", "--", ":", "-.")  # overlaid runs with several lines each: one dash style per line

# The html summary's metrics, (job, metric; `*`: any middle part), each as first/last/min/max/mean.
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


def fmt(value: float) -> str:
    """A table cell: 4 significant digits, scientific notation only for the very small or large."""
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
        _draw_panel(ax, panel, drawn, palette, run_color if overlaid else None)
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


def _draw_panel(ax: Axes, panel: Panel, drawn: list[tuple[Run, list[Line]]], palette: list[str],
                run_color: dict[int, str] | None) -> None:  # fmt: skip
    """One panel's lines, axes and legend; `run_color` (each run's color) when runs are overlaid."""
    from matplotlib.lines import Line2D

    overlaid = run_color is not None
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
        ax.legend([Line2D([], [], color="0.3", ls=dash) for dash in styles.values()], list(styles),
                  fontsize=8, loc="best", framealpha=0.7)  # fmt: skip
    if not overlaid and len(ax.get_legend_handles_labels()[0]) > 1:
        if any(line.style == "stack" for _, lines in drawn for line in lines):  # room above the stack
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, top + 0.45 * (top - bottom))
            ax.legend(fontsize=8, loc="upper center", ncols=3, framealpha=0.8)
        else:
            ax.legend(fontsize=8, loc="best", framealpha=0.7)


def _draw(ax: Axes, line: Line, color: str, label: str, dash: str = "-") -> None:
    """One line: a faint raw line under its EMA when it is long and noisy, its band (if any) behind."""
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


def _stack(ax: Axes, lines: list[Line], palette: list[str]) -> None:
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
    """One self-contained page: the runs, the PNG inlined, and the summary table of each run."""
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
    parts += _doctor_section(runs)
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


def _doctor_section(runs: list[Run]) -> list[str]:
    """The run doctor's findings of each run: rule, job, step, metric, value, what to try."""
    e = html.escape
    parts = ["<h2>Run doctor</h2>"]
    if not any(run.alerts for run in runs):
        return parts + ["<p>No findings: no rule of the run's <code>doctor</code> config fired.</p>"]
    parts.append("<table><tr><th>run</th><th>job</th><th>step</th><th>rule</th><th>metric</th><th>value</th>"
                 "<th>stopped the run</th><th>what it means, what to try</th></tr>")  # fmt: skip
    for run in runs:
        for a in run.alerts:
            parts.append(f"<tr><td class='l'>{e(run.label)}</td><td class='l'>{e(a['job'])}</td><td>{a['step']}</td>"
                         f"<td class='l'>{e(a['rule'])}</td><td class='l'>{e(a['metric'])}</td><td>{fmt(a['value'])}</td>"
                         f"<td>{'yes' if a.get('stop') else 'no'}</td><td class='l'>{e(a['hint'])}</td></tr>")  # fmt: skip
    return parts + ["</table>"]


def _reward_change(run: Run) -> str:
    """Mean reward of the first tenth of the steps -> of the last tenth: did it learn, at a glance."""
    reward = run.get("orchestrator", "reward")
    values = _finite(reward.y) if reward else []
    if not values:
        return "–"
    k = max(1, len(values) // 10)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return f"{fmt(first)} → {fmt(last)} ({last - first:+.3f})"


# ---------------------------------------------------------------- both


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

