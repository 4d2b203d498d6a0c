"""The sweep directory's files, and the summary that reads them: one row per job.

The summary reads each job's `status.json`, never only what the launcher says: with
hydra-submitit a failed task used to look COMPLETED to Slurm, and a job that Slurm killed
(time limit, scancel, node failure) writes nothing, which is reported as failed.

The file names live here, the one module that reads them all; the writers import them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlrun.rundir import read_json, write_text_atomic
from rlrun.tracking.record import read_metrics, record_path

STATUS_FILE = "status.json"  # <run>/: how the job ended (sweep/job.py)
SWEEP_FILE = "sweep.json"  # <sweep>/: the sweep and its planned jobs (sweep/callback.py)
JOBS_FILE = "sweep_jobs.json"  # <sweep>/: the submitted jobs and Slurm's view (sweep/submitit.py)
SUMMARY_FILE = "sweep_summary.csv"  # <sweep>/: this module

COLUMNS = ["job", "overrides", "status", "final_reward", "eval_reward", "steps", "max_steps", "exit_code",
           "slurm_job_id", "slurm_state", "message", "run_dir", "all_overrides"]  # fmt: skip


def timestamp() -> str:
    """Local time, as the sweep's files record it."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def sweep_id(sweep_dir: str | Path) -> str:
    """`outputs/multirun/2026-11-23/14-05-09` -> `2026-11-23_14-05-09`; else the folder name."""
    parts = Path(sweep_dir).parts
    if len(parts) >= 3 and parts[-3] == "multirun":
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1] if parts else "sweep"


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last training reward, the newest evaluation reward and the last trained step."""
    out: dict[str, Any] = {"reward": None, "eval_reward": None, "steps": 0}
    for record in read_metrics(record_path(run_dir, "orchestrator")):
        metrics = record.get("metrics", {})
        for key, name in (("reward", "reward"), ("eval/reward", "eval_reward")):
            if key in metrics:
                out[name] = metrics[key]
    for record in read_metrics(record_path(run_dir, "trainer")):
        out["steps"] = max(out["steps"], int(record.get("step") or 0))
    return out


def job_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Job folders that Hydra created: `<sweep>/<subdir>/.hydra/` with the job's number."""
    found: dict[int, Path] = {}
    for hydra_yaml in sweep_dir.glob("**/.hydra/hydra.yaml"):
        job_dir = hydra_yaml.parent.parent
        if ".submitit" in job_dir.parts:
            continue
        try:
            num = OmegaConf.load(hydra_yaml).hydra.job.num
        except Exception:
            continue
        if isinstance(num, int):
            found[num] = job_dir
    return found


def _varying(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that differ between jobs (what the sweep is about)."""
    if len(jobs) < 2:
        return jobs
    common = set(jobs[0]).intersection(*map(set, jobs[1:]))
    return [[o for o in job if o not in common] for job in jobs]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: overrides, status, final reward, Slurm's view; missing -> failed."""
    sweep = read_json(sweep_dir / SWEEP_FILE, default=None) or {}
    jobs_file = read_json(sweep_dir / JOBS_FILE, default=None) or {}
    launched = {int(j["job"]): j for j in jobs_file.get("jobs", [])}
    planned = {int(j["job"]): j["overrides"] for j in sweep.get("jobs") or []}
    dirs = job_dirs(sweep_dir)
    rows = []
    for num in sorted(set(planned) | set(launched) | set(dirs)):
        job_dir = dirs.get(num, sweep_dir / str(num))
        rows.append(_row(num, job_dir, planned.get(num), launched.get(num, {})))
    for row, vary in zip(rows, _varying([r["all_overrides"] for r in rows])):
        row["overrides"] = " ".join(vary)
        row["all_overrides"] = " ".join(row["all_overrides"])
    return rows


def _row(num: int, job_dir: Path, planned: list[str] | None, record: dict[str, Any]) -> dict[str, Any]:
    """A job's row from its status.json, its sweep_jobs.json entry (`record`) and its record."""
    status = read_json(job_dir / STATUS_FILE, default=None) or {}
    overrides = planned or record.get("overrides") or status.get("overrides")
    if overrides is None and (job_dir / ".hydra" / "overrides.yaml").is_file():
        overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    row: dict[str, Any] = {
        "job": num,
        "all_overrides": list(overrides or []),
        "status": status.get("status"),
        "final_reward": status.get("reward"),
        "eval_reward": status.get("eval_reward"),
        "steps": status.get("steps"),
        "max_steps": status.get("max_steps"),
        "exit_code": status.get("exit_code"),
        "slurm_job_id": record.get("slurm_job_id") or status.get("slurm_job_id"),
        "slurm_state": record.get("state"),
        "message": status.get("message") or "",
        "run_dir": status.get("run_dir") or str(job_dir),
    }
    if row["final_reward"] is None:  # a job that died before writing its end status
        metrics = final_metrics(Path(row["run_dir"]))
        row.update(final_reward=metrics["reward"], eval_reward=metrics["eval_reward"], steps=metrics["steps"])
    if row["status"] != "done":
        row.update(status="failed", message=_failure_reason(row, status, record, job_dir))
    return row


def _failure_reason(row: dict[str, Any], status: dict[str, Any], record: dict[str, Any], job_dir: Path) -> str:
    """Why a job did not finish: its own message, else what Slurm and submitit saw."""
    reasons = [row["message"]]
    if row["status"] != "failed":  # the job did not say why
        if not status:
            reasons.insert(0, "never started" if not job_dir.is_dir() else "no status.json")
        elif row["status"] == "running":
            reasons.insert(0, "ended without writing its status (killed?)")
        if record.get("state") and record["state"] not in ("COMPLETED", "COMPLETING"):
            reasons.append(f"Slurm state {record['state']}")
        if record.get("error"):
            reasons.append(record["error"])
    return "; ".join(dict.fromkeys(r for r in reasons if r))


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def print_table(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for name in ("job", "overrides", "status", "reward", "eval reward", "steps", "slurm", "message"):
        table.add_column(name, overflow="fold")
    for row in rows:
        style = "green" if row["status"] == "done" else "red"
        slurm = " ".join(str(x) for x in (row["slurm_job_id"], row["slurm_state"]) if x) or "-"
        steps = f"{num(row['steps'])}/{num(row['max_steps'])}"
        table.add_row(str(row["job"]), row["overrides"] or "-", f"[{style}]{row['status']}[/{style}]",
                      num(row["final_reward"]), num(row["eval_reward"]), steps, slurm, row["message"])  # fmt: skip
    console = Console(stderr=False, width=max(120, shutil.get_terminal_size((160, 20)).columns))
    console.print(table)
    done = sum(r["status"] == "done" for r in rows)
    console.print(f"{done}/{len(rows)} jobs done; summary in {sweep_dir / SUMMARY_FILE}")


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write `sweep_summary.csv` and print the table (when there is any job); the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if rows:
        write_csv(rows, sweep_dir / SUMMARY_FILE)
        print_table(rows, sweep_dir)
    return rows
