"""What the device check saw, as one small JSON: `python scripts/gpu_check_summary.py <run dir> [options]`.

Reads only the run directory's own record (`metrics/<job>.jsonl` through `rlrun.tracking.record`,
`status.json`, `config.yaml`) and, when given, pytest's JUnit XML; writes `gpu_check.json` into
`--out` (default: `$OUT` when set, else the run directory) and prints it. Every part is
optional: a run that crashed early, a job with no record, no monitor, no GPU metrics or no
pytest report leave their fields null (with `errors` saying why), never a traceback, so the
figures that exist always come back.

Fields: the device (torch's view, when torch imports), the run's status, model and devices, RL steps/s
(trainer steps over the wall time between its first and last record), tokens/s (generation:
the orchestrator's `tokens/s`; training: the trainer's `perf/tokens_per_s`, medians), reward
(mean of the first and last `--window` RL steps, the gain), the SFT stage's held-out reward
(first and last evaluation), the last held-out evaluation's rewards, `mismatch/kl` (median, max;
with `off_policy_steps` > 0 it includes the policy's change since sampling), the trainer's peak CUDA memory, the
monitor's GPU readings during RL (utilization mean and max, memory max, per-job memory max),
run-doctor findings, pytest's counts, and `checks`: the verdicts at a glance (run done, no
test failed, reward rises, GPU busy while training, mismatch under the doctor's strict threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rlrun from this tree, installed or not

from rlrun.tracking.record import read_alerts, read_metrics, record_path  # noqa: E402

OUT_FILE = "gpu_check.json"
MISMATCH_KL_MAX = 0.01  # the run doctor's strict `mismatch` threshold (rlrun/conf/doctor/strict.yaml)


def _series(records: list[dict[str, Any]], name: str) -> list[float]:
    return [float(r["metrics"][name]) for r in records if name in r["metrics"]]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rounded(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):  # NaN and infinities as strings: valid JSON, and still seen
        return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def device_info() -> dict[str, Any]:
    """torch's version and the first CUDA device, when torch imports (the check runs beside it)."""
    try:
        import torch
    except Exception as exc:  # the summary never needs torch
        return {"torch": None, "error": f"{type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": False}
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(cuda_available=True, name=props.name, memory_gb=props.total_memory / 1e9,
                        count=torch.cuda.device_count())  # fmt: skip
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def rl_summary(run_dir: Path, window: int) -> dict[str, Any]:
    """Steps/s, tokens/s, reward gain, mismatch and peak memory of the RL jobs."""
    trainer = read_metrics(record_path(run_dir, "trainer"))
    orchestrator = read_metrics(record_path(run_dir, "orchestrator"))
    out: dict[str, Any] = {"steps": len(trainer)}
    if len(trainer) >= 2:
        wall = trainer[-1]["time"] - trainer[0]["time"]
        out["wall_s"] = wall
        out["steps_per_s"] = (len(trainer) - 1) / wall if wall > 0 else None
    out["generated_tokens_per_s_median"] = _median(_series(orchestrator, "tokens/s"))
    out["trained_tokens_per_s_median"] = _median(_series(trainer, "perf/tokens_per_s"))
    out["step_s_median"] = _median(_series(trainer, "time/step"))
    rewards = _series(orchestrator, "reward")
    if rewards:
        k = min(window, len(rewards))
        first, last = statistics.fmean(rewards[:k]), statistics.fmean(rewards[-k:])
        out["reward"] = {"window": k, "first": first, "last": last, "gain": last - first}
    out["eval_last"] = _last_eval(orchestrator)
    out["off_policy_steps_median"] = _median(_series(orchestrator, "off_policy_steps"))  # > 0: kl includes drift
    kl = _series(trainer, "mismatch/kl")
    out["mismatch_kl"] = {"median": _median(kl), "max": max(kl)} if kl else None
    diff = _series(trainer, "mismatch/logprob_diff_max")
    out["mismatch_logprob_diff_max"] = max(diff) if diff else None
    peak = _series(trainer, "perf/peak_memory_gb")
    out["trainer_peak_memory_gb"] = max(peak) if peak else None
    mfu = _series(trainer, "perf/mfu")
    out["mfu_median"] = _median(mfu)
    return out


def _last_eval(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """The newest held-out evaluation: `eval/reward` and each `eval/rewards/<fn>/mean`."""
    for record in reversed(records):
        m = record["metrics"]
        if "eval/reward" in m:
            return {k.removeprefix("eval/"): v for k, v in m.items()
                    if k == "eval/reward" or (k.startswith("eval/rewards/") and k.endswith("/mean"))}  # fmt: skip
    return None


def sft_summary(run_dir: Path) -> dict[str, Any] | None:
    records = read_metrics(record_path(run_dir, "sft"))
    if not records:
        return None
    evals = _series(records, "eval/reward")
    out: dict[str, Any] = {"steps": len(records), "wall_s": records[-1]["time"] - records[0]["time"]}
    if evals:
        out["eval_reward"] = {"first": evals[0], "last": evals[-1], "gain": evals[-1] - evals[0]}
    out["eval_last"] = _last_eval(records)
    return out


def model_summary(run_dir: Path) -> dict[str, Any]:
    """The run's model and devices, from its resolved `config.yaml`."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model, inference, trainer = cfg.get("model", {}), cfg.get("inference", {}), cfg.get("trainer", {})
    keep = ("name", "path", "dtype", "hidden_size", "num_layers", "num_heads", "intermediate_size")
    return {**{k: model.get(k) for k in keep}, "inference_device": inference.get("device"),
            "gpu_memory_fraction": inference.get("gpu_memory_fraction"), "trainer_device": trainer.get("device"),
            "max_async_steps": cfg.get("orchestrator", {}).get("max_async_steps")}  # fmt: skip


def gpu_summary(run_dir: Path) -> dict[str, Any] | None:
    """The monitor's GPU readings while RL trained (`system/train_step` > 0), per GPU."""
    records = read_metrics(record_path(run_dir, "monitor"))
    training = [r for r in records if r["metrics"].get("system/train_step", 0) > 0] or records
    names = {n for r in training for n in r["metrics"] if n.startswith("gpu/")}
    if not names:
        return None
    gpus: dict[str, Any] = {}
    for index in sorted({n.split("/")[1] for n in names if n.split("/")[1].isdigit()}):
        p = f"gpu/{index}/"
        util = _series(training, p + "utilization")
        used = _series(training, p + "memory_used_gb")
        power = _series(training, p + "power_w")
        gpu: dict[str, Any] = {
            "samples": len(util),
            "utilization_mean": statistics.fmean(util) if util else None,
            "utilization_max": max(util) if util else None,
            "memory_used_gb_max": max(used) if used else None,
            "memory_total_gb": (_series(training, p + "memory_total_gb") or [None])[-1],
            "power_w_max": max(power) if power else None,
        }
        jobs = sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith(p + "job_memory_used_gb/"))
        gpu["job_memory_used_gb_max"] = {job: max(_series(training, f"{p}job_memory_used_gb/{job}")) for job in jobs}
        gpus[index] = gpu
    return {"samples_while_training": len(training), "gpus": gpus}


def pytest_summary(junit: Path | None) -> dict[str, Any] | None:
    """Counts from pytest's `--junitxml` report, and the ids of what failed."""
    if junit is None or not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    skipped: list[str] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failed.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = next((c.get("message", "") for c in case if c.tag == "skipped"), "")
            skipped.append(f"{name}: {reason}"[:200])
        else:
            counts["passed"] += 1
    return {**counts, "not_passed": failed, "skipped_tests": skipped}


def summarize(run_dir: Path, junit: Path | None = None, window: int = 10, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:  # fmt: skip
    """The whole summary; each part that fails is null, with its error under `errors`."""
    summary: dict[str, Any] = {"run_dir": str(run_dir), **(extra or {})}
    errors: dict[str, str] = {}
    parts = {
        "device": device_info,
        "status": lambda: json.loads((run_dir / "status.json").read_text()),
        "model": lambda: model_summary(run_dir),
        "rl": lambda: rl_summary(run_dir, window),
        "sft": lambda: sft_summary(run_dir),
        "gpu_monitor": lambda: gpu_summary(run_dir),
        "doctor_alerts": lambda: [f"{a.get('job')} step {a.get('step')}: {a.get('rule')}" for a in read_alerts(run_dir)],
        "pytest": lambda: pytest_summary(junit),
    }
    for name, part in parts.items():
        try:
            summary[name] = part()
        except Exception as exc:  # a missing or torn file: say so, keep the rest
            summary[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"
    if summary.get("status"):
        keep = ("status", "exit_code", "message", "steps", "reward", "eval_reward", "started_at", "ended_at")
        summary["status"] = {k: summary["status"].get(k) for k in keep}
    summary["checks"] = checks(summary)
    summary["errors"] = errors
    return _rounded(summary)


def checks(summary: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's verdicts at a glance; None where this run cannot say (no GPU, no record)."""
    rl, gpu, tests = summary.get("rl") or {}, summary.get("gpu_monitor") or {}, summary.get("pytest")
    utilization = [g["utilization_max"] for g in gpu.get("gpus", {}).values() if g.get("utilization_max") is not None]
    kl = rl.get("mismatch_kl")
    return {
        "run_done": (summary.get("status") or {}).get("status") == "done",
        "no_test_failed": None if tests is None else tests["failed"] + tests["errors"] == 0,
        "reward_rises": None if "reward" not in rl else rl["reward"]["gain"] > 0,
        "gpu_busy_while_training": max(utilization) > 0 if utilization else None,
        f"mismatch_kl_max_below_{MISMATCH_KL_MAX}": None if not kl else kl["max"] < MISMATCH_KL_MAX,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--junit", type=Path, help="pytest's --junitxml report")
    parser.add_argument("--out", type=Path, help="the folder for gpu_check.json (default: $OUT, else the run dir)")
    parser.add_argument("--window", type=int, default=10, help="RL steps averaged at each end for the reward gain")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra top-level fields (numbers parsed), e.g. --set pytest_s=41")  # fmt: skip
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    summary = summarize(args.run_dir, args.junit, args.window, extra)
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2)
    (out_dir / OUT_FILE).write_text(text + "\n")
    print(text)
    print(f"wrote {out_dir / OUT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
