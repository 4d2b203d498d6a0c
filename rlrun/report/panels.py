"""What a report plots: one `Panel` per figure, each drawing the lines a run has for it.

A panel's lines depend on whether runs are overlaid (a sweep, or runs compared): alone, a
run shows every detail (bands, per-GPU and per-job lines, stacked timings); overlaid, each
run contributes one line per panel so that its color identifies it. A panel no run has
lines for is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rlrun.report.data import Run, Series


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


def _per_env(run: Run, overlaid: bool) -> list[Line]:
    """`<env>/reward` of each environment of a task with several (a mixture)."""
    names = [n for n in run.names("orchestrator") if n.endswith("/reward") and n.count("/") == 1 and n != "eval/reward"]
    return [Line(n.removesuffix("/reward"), run.get("orchestrator", n)) for n in names]


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
    Panel("Reward per environment", "mean reward", _per_env),
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


# ---------------------------------------------------------------- series helpers


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
