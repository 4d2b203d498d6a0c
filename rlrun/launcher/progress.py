"""The parent's console view of a run: a rich progress bar fed by the jobs' jsonl records.

The parent never talks to the jobs to learn their progress: it reads the new lines of
`metrics/orchestrator.jsonl` and `metrics/trainer.jsonl`, the same local record every run
keeps, so the view costs the jobs nothing. Run-doctor findings in them (`alert` records) are
repeated on the parent's console as they come, and listed in the closing summary.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlrun.tracking.record import RecordTail, last_metric, read_alerts, record_path


def doctor_summary(run_dir: Path) -> str:
    """The run doctor's findings, one per line after a header ("" when there were none)."""
    alerts = read_alerts(run_dir)
    if not alerts:
        return ""
    lines = [f"  {a['job']} step {a['step']}: {a['rule']} ({a['metric']} = {a['value']:.4g})" for a in alerts]
    return f"\nrun doctor: {len(alerts)} finding(s) (details in the job logs and `alert` records):\n" + "\n".join(lines)


class RunProgress:
    """Step (trained), reward, tokens/s and ETA on one line; a summary at the end."""

    def __init__(self, run_dir: Path, max_steps: int, console: Console | None = None,
                 warn: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.max_steps = max_steps
        self.run_dir = run_dir
        self.warn = warn
        self.sft_record = record_path(run_dir, "sft")  # an SFT stage's last evaluation: where RL started
        self.orchestrator = RecordTail(record_path(run_dir, "orchestrator"), kind=None)
        self.trainer = RecordTail(record_path(run_dir, "trainer"), kind=None)
        self.rewards: dict[int, float] = {}
        self.trained = 0
        self.reward = float("nan")
        self.tokens_per_s = float("nan")
        self.last_eval: tuple[int, dict[str, float]] | None = None  # the newest evaluation: step, eval/* metrics
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("reward {task.fields[reward]}"), TextColumn("tokens/s {task.fields[tps]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self.task = self.progress.add_task("rl", total=max_steps, reward="-", tps="-")
        self.progress.start()

    def update(self) -> None:
        for record in self._metrics(self.orchestrator):
            metrics = record["metrics"]
            self.rewards[record["step"]] = metrics.get("reward", float("nan"))
            self.reward = self.rewards[record["step"]]
            self.tokens_per_s = metrics.get("tokens/s", self.tokens_per_s)
            if "eval/reward" in metrics:
                self.last_eval = (record["step"], {k: v for k, v in metrics.items() if k.startswith("eval/")})
        for record in self._metrics(self.trainer):
            self.trained = max(self.trained, record["step"])
        self.progress.update(
            self.task, completed=self.trained, reward=f"{self.reward:.3f}", tps=f"{self.tokens_per_s:,.0f}"
        )

    def _metrics(self, tail: RecordTail) -> list[dict[str, Any]]:
        """The new metrics records; a new alert is shown on the console on the way."""
        records = tail.new_records()
        if self.warn is not None:
            for alert in (r for r in records if r.get("type") == "alert"):
                self.warn(f"{alert.get('text') or alert}")
        return [r for r in records if r.get("type") == "metrics"]

    def summary(self) -> str:
        """Mean reward of the first and last 10% of steps; the newest held-out evaluation (and the
        SFT stage's, where RL started from)."""
        steps = sorted(self.rewards)
        if not steps:
            return "no steps were recorded"
        k = max(1, len(steps) // 10)
        first = statistics.fmean(self.rewards[s] for s in steps[:k])
        last = statistics.fmean(self.rewards[s] for s in steps[-k:])
        text = f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({last - first:+.3f})"
        if self.last_eval is not None:
            step, ev = self.last_eval
            text += f"; held-out eval at step {step}: reward {ev['eval/reward']:.3f}"
            if "eval/rewards/exact/mean" in ev:  # tasks with an exact-match reward function
                text += f", exact-match {ev['eval/rewards/exact/mean']:.3f}"
                sft_exact = last_metric(self.sft_record, "eval/rewards/exact/mean")
                if sft_exact is not None:
                    text += f" (after SFT {sft_exact:.3f})"
            if "eval/completions/clipped_ratio" in ev:
                text += f", ended with EOS {1 - ev['eval/completions/clipped_ratio']:.0%}"
        return text + doctor_summary(self.run_dir)

    def close(self) -> None:
        self.progress.stop()
