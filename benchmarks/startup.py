"""Start-up: `python -m rlrun --cfg job` and the time to the first training step.

- cfg_job_s: wall time of `python -m rlrun --cfg job` (median of --repeats runs), target <= 1.5 s;
- first_step_s: the default experiment, from process start to the wall-clock `time` of the
  trainer's step-1 record in metrics/trainer.jsonl (median of --first-step-repeats runs),
  target <= 5 s. The phases come from the launcher's log (run directory, jobs started,
  inference serving);
- which imports dominate: `python -X importtime` of `--cfg job`, and of what every job
  process imports (rlrun.model: torch + transformers' Llama).

The default run is shortened with `max_steps` (--max-steps, default 5) and measured without
its SFT stage (`sft.max_steps=0`): the time to RL's first step depends on neither.

    python benchmarks/startup.py [--repeats 5] [--first-step-repeats 3] [--max-steps 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RL_STAGE, ROOT, first_step_s, machine, run_rlrun, table, wait_quiet, write_json  # noqa: E402

CFG_JOB_TARGET_S, FIRST_STEP_TARGET_S = 1.5, 5.0


def time_cmd(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def import_times(code_args: list[str], top: int = 10) -> list[dict]:
    """The `top` imports by cumulative time (ms), outermost packages first among equals."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *code_args], cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append({"module": m.group(4), "self_ms": int(m.group(1)) / 1000, "cumulative_ms": int(m.group(2)) / 1000,
                         "depth": len(m.group(3)) // 2})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


def launcher_phases(log_text: str, start: float) -> dict[str, float]:
    """Seconds from process start to each line of logs/rl.log (`YYYY-MM-DD HH:MM:SS.mmm`, local time)."""
    marks = {"run_dir_s": "run directory:", "inference_started_s": "started inference",
             "inference_serving_s": "inference is serving", "trainer_started_s": "started trainer"}
    out = {}
    for key, text in marks.items():
        for line in log_text.splitlines():
            if text in line:
                t = dt.datetime.fromisoformat(" ".join(line.split()[:2])).timestamp()
                out[key] = t - start
                break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-step-repeats", type=int, default=3, help="whole runs timed to their first step")
    parser.add_argument("--max-steps", type=int, default=5)
    args = parser.parse_args()

    cfg_cmd = [sys.executable, "-m", "rlrun", "--cfg", "job"]
    time_cmd(cfg_cmd)  # warm the page cache / .pyc
    cfg_times = []
    for _ in range(args.repeats):
        wait_quiet(60)
        cfg_times.append(time_cmd(cfg_cmd))
    cfg_job_s = statistics.median(cfg_times)

    runs = []
    for _ in range(args.first_step_repeats):
        with tempfile.TemporaryDirectory(prefix="rlrun-bench-startup-") as tmp:
            run = run_rlrun(Path(tmp) / "run", [*RL_STAGE, f"max_steps={args.max_steps}"])
            log_text = (Path(tmp) / "run" / "logs" / "rl.log").read_text()
            runs.append({"first_step_s": first_step_s(run), "phases": launcher_phases(log_text, run["start"]),
                         "machine_before": run["machine_before"], "loadavg_1m_after": run["loadavg_1m_after"]})
    first = statistics.median(r["first_step_s"] for r in runs)

    wait_quiet(60)
    cfg_imports = import_times(["-m", "rlrun", "--cfg", "job"])
    job_imports = import_times(["-c", "import rlrun.model; from transformers import LlamaForCausalLM, AutoTokenizer"])
    torch_import_s = statistics.median(time_cmd([sys.executable, "-c", "import torch"]) for _ in range(3))
    job_import_s = statistics.median(
        time_cmd([sys.executable, "-c", "import rlrun.model; from transformers import LlamaForCausalLM"]) for _ in range(3)
    )

    result = {
        "cfg_job_s": cfg_job_s,
        "first_step_s": first,
        "targets": {"cfg_job_s": CFG_JOB_TARGET_S, "first_step_s": FIRST_STEP_TARGET_S},
        "met": {"cfg_job_s": cfg_job_s <= CFG_JOB_TARGET_S, "first_step_s": first <= FIRST_STEP_TARGET_S},
        "cfg_job_runs_s": cfg_times,
        "first_step_runs": runs,
        "python_import_torch_s": torch_import_s,
        "python_import_rlrun_model_llama_s": job_import_s,
        "top_imports_cfg_job": cfg_imports,
        "top_imports_job_process": job_imports,
        "settings": {"cmd_cfg_job": " ".join(cfg_cmd[1:]), "first_step_overrides": [*RL_STAGE, f"max_steps={args.max_steps}"],
                     "repeats": args.repeats, "first_step_repeats": args.first_step_repeats},
        "machine": machine(),
    }
    path = write_json("startup", result)

    print(f"settings: {result['settings']}")
    print(table([["--cfg job", cfg_job_s, CFG_JOB_TARGET_S, result["met"]["cfg_job_s"]],
                 ["time to first training step", first, FIRST_STEP_TARGET_S, result["met"]["first_step_s"]]],
                ["what", "seconds (median)", "target", "met"]))
    print("\nphases of the default run (s from process start, median run):")
    mid = sorted(runs, key=lambda r: r["first_step_s"])[len(runs) // 2]
    print(table([[k, v] for k, v in mid["phases"].items()] + [["trainer step 1 record", mid["first_step_s"]]],
                ["phase", "s"]))
    print(f"\nimport torch: {torch_import_s:.2f} s; import rlrun.model + transformers Llama: {job_import_s:.2f} s "
          "(paid once, by the zygote the local jobs are forked from)")
    print("\ntop imports of `--cfg job` (cumulative ms):")
    print(table([[r["module"], r["cumulative_ms"], r["self_ms"]] for r in cfg_imports], ["module", "cumulative ms", "self ms"]))
    print("\ntop imports of a job process (cumulative ms):")
    print(table([[r["module"], r["cumulative_ms"], r["self_ms"]] for r in job_imports], ["module", "cumulative ms", "self ms"]))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
