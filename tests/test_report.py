"""`python -m rlrun.report`: plots and an html summary from runs recorded by the real Tracker."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from omegaconf import OmegaConf

from rlrun.config import LoggerConfig
from rlrun.tracking import Tracker

STEPS = 40
FIRST_REWARD, LAST_REWARD = 0.1234, 0.8765


def _tracker(run_dir: Path, job: str, doctor=None) -> Tracker:
    return Tracker(OmegaConf.structured(LoggerConfig), job=job, output_dir=run_dir, rank=0, doctor=doctor)


def _reward(step: int, scale: float = 1.0) -> float:
    """Rising from FIRST_REWARD to LAST_REWARD (times `scale`), noisy in between."""
    t = (step - 1) / (STEPS - 1)
    noise = 0.0 if step in (1, STEPS) else 0.05 * math.sin(7 * step)
    return scale * (FIRST_REWARD + (LAST_REWARD - FIRST_REWARD) * t) + noise


def write_run(run_dir: Path, overrides: list[str] | None = None, scale: float = 1.0, monitor: bool = True,
              doctor=None) -> Path:  # fmt: skip
    orchestrator, trainer = _tracker(run_dir, "orchestrator", doctor), _tracker(run_dir, "trainer", doctor)
    for step in range(1, STEPS + 1):
        reward = _reward(step, scale)
        orchestrator.log_metrics({
            "reward": reward, "reward_std": 0.1, "rewards/lcs/mean": reward, "rewards/format/mean": 0.5,
            "completions/mean_length": 10 + step % 3, "completions/min_length": 4, "completions/max_length": 12,
            "completions/clipped_ratio": 0.5, "frac_reward_zero_std": 0.1, "tokens/s": 1000 + step,
            "time/generate": 0.05, "time/score": 0.01, "time/step": 0.07,
        }, step)  # fmt: skip
        trainer.log_metrics({
            "loss": 0.1, "grad_norm": 1.0 / step, "entropy": 3.0 - step / STEPS, "kl": 0.001 * step,
            "clip_ratio/low_mean": 0.01, "clip_ratio/high_mean": 0.02, "clip_ratio/region_mean": 0.03,
            "tokens/s": 2000, "time/forward_backward": 0.1, "time/wait_for_batch": 0.05, "time/step": 0.16,
        }, step)  # fmt: skip
    orchestrator.finish()
    trainer.finish()
    if monitor:
        tracker = _tracker(run_dir, "monitor")
        for i in range(1, 21):
            gpus = {f"gpu/{g}/{k}": v for g in (0, 1) for k, v in
                    {"utilization": 50.0 + g * 10 + i, "memory_used_gb": 20.0 + g, "memory_total_gb": 80.0,
                     "power_w": 300.0, "temperature_c": 60.0}.items()}  # fmt: skip
            tracker.log_metrics({"system/elapsed_s": 2.0 * i, "system/train_step": 2 * i, "system/cpu_percent": 50.0,
                                 "system/ram_percent": 20.0, "system/rss_mb/trainer": 400.0 + i,
                                 "system/rss_mb/inference": 300.0, **gpus, "gpu/node/utilization": 55.0 + i,
                                 "gpu/node/memory_used_gb": 41.0, "gpu/node/power_w": 600.0}, i)  # fmt: skip
        tracker.finish()
    if overrides is not None:
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run_dir


def _report(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrun.report", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _check_png(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width > 600 and height > 400, image.shape
    assert image[..., :3].std() > 0.05, "not a blank canvas"


def _row(page: str, metric: str) -> str:
    (row,) = re.findall(rf"<tr><td class='l'>\w+</td><td class='l'>{re.escape(metric)}</td>.*?</tr>", page)
    return row


def test_report_of_a_run(tmp_path):
    from rlrun.doctor import DoctorConfig

    # A doctor that finds completions/clipped_ratio 0.5 too high: its finding goes into the report.
    doctor = OmegaConf.merge(OmegaConf.structured(DoctorConfig), {"no_eos": {"above": 0.4}})
    run_dir = write_run(tmp_path / "run", doctor=doctor)
    out = _report(run_dir)
    assert out.returncode == 0, out.stderr
    png, page = run_dir / "report.png", run_dir / "report.html"
    assert out.stdout.split() == [str(png), str(page)], "the output paths are printed"
    _check_png(png)
    assert png.stat().st_size > 50_000
    html = page.read_text()
    assert re.search(r"<img [^>]*src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", html)
    reward = _row(html, "reward")
    assert f"<td>{FIRST_REWARD:.4g}</td><td>{LAST_REWARD:.4g}</td>" in reward, reward
    for metric in ("kl", "entropy", "clip_ratio/region_mean", "rewards/format/mean", "system/rss_mb/trainer",
                   "gpu/node/utilization"):
        _row(html, metric)
    doctor_rows = re.findall(r"<tr><td class='l'>run</td><td class='l'>(\w+)</td><td>(\d+)</td><td class='l'>(\w+)</td>"
                             r"<td class='l'>([\w/]+)</td><td>([\d.]+)</td><td>(\w+)</td>", html)  # fmt: skip
    assert doctor_rows == [("orchestrator", "10", "no_eos", "completions/clipped_ratio", "0.5", "no")], doctor_rows


def test_panels_without_metrics_are_left_out(tmp_path):
    from rlrun.report import load_run, plot

    run_dir = tmp_path / "run"
    tracker = _tracker(run_dir, "orchestrator")
    for step in range(1, 4):  # a run that crashed early: three steps, reward only
        tracker.log_metrics({"reward": 0.1 * step}, step)
    tracker.finish()
    assert plot([load_run(run_dir)], tmp_path / "r.png", "t") == 1
    _check_png(tmp_path / "r.png")
    full = write_run(tmp_path / "full")
    assert plot([load_run(full)], tmp_path / "f.png", "t") == 17, "every panel, GPU ones included"


def test_report_of_a_sweep_overlays_its_jobs(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-23" / "15-00-00"
    write_run(sweep / "0", ["trainer.lr=1e-4", "seed=1", "max_steps=40"])
    write_run(sweep / "1", ["trainer.lr=3e-4", "seed=1", "max_steps=40"], scale=0.5, monitor=False)
    out = _report(sweep)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(sweep / "report.png"), str(sweep / "report.html")]
    assert not (sweep / "0" / "report.png").exists(), "one report for the sweep"
    _check_png(sweep / "report.png")
    html = (sweep / "report.html").read_text()
    for label in ("trainer.lr=1e-4", "trainer.lr=3e-4"):  # the overrides that differ name the jobs
        assert f"<td class='l'>{label}</td>" in html and f"<h3>{label}</h3>" in html
    assert html.count("<tr><td class='l'>orchestrator</td><td class='l'>reward</td>") == 2

    out = _report(sweep / "0", sweep / "1", "-o", tmp_path / "compare")  # any runs, overlaid
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "compare" / "report.png").is_file()


@pytest.mark.parametrize("kind", ["missing", "empty", "not_a_run"])
def test_a_path_that_is_not_a_run_fails_clearly(tmp_path, kind):
    path = tmp_path / "x"
    if kind != "missing":
        path.mkdir()
    if kind == "not_a_run":
        write_run(path / "run")  # a directory of runs that is not a Hydra sweep
    out = _report(path)
    assert out.returncode != 0
    assert str(path) in out.stderr
    assert ("no such directory" if kind == "missing" else "not a run directory") in out.stderr
    assert not (path / "report.png").exists()
