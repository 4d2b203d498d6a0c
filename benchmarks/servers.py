"""RL step time with two inference servers (`inference.num_servers=2`) against one.

Each setting is run end to end (`python -m rlrun`, the default experiment's RL stage)
--repeats times, the two settings alternating and each pair starting with the other one; each
run waits for an idle CPU and records the load. Reported per setting: the median steady-state
step time (wall time between the trainer's step records after --skip steps), the orchestrator's
`time/generate` and `time/update_weights`, and how many completion requests each server served
(from its log's closing line). Results: benchmarks/results/servers.json.

    python benchmarks/servers.py [--steps 20] [--skip 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RL_STAGE, machine, run_rlrun, summarize, table, write_json  # noqa: E402

SETTINGS = (1, 2)  # inference.num_servers


def served(run_dir: Path) -> list[int]:
    """Completion requests each server served, from the closing line of its log."""
    counts = []
    for log in sorted((run_dir / "logs").glob("inference*.stdout")):
        found = re.findall(r"stopped: served (\d+) completion requests", log.read_text())
        counts.append(int(found[-1]) if found else -1)
    return counts


def measure(num_servers: int, steps: int, skip: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rlrun-bench-servers-{num_servers}-") as tmp:
        run_dir = Path(tmp) / "run"
        run = run_rlrun(run_dir, [*RL_STAGE, f"max_steps={steps}", f"inference.num_servers={num_servers}"])
        requests = served(run_dir)
    s = summarize(run, skip)
    return {"num_servers": num_servers, "step_s": s["step_s"], "generate_s": s["orchestrator"]["generate_s"],
            "update_weights_s": s["orchestrator"]["update_weights_s"], "requests_per_server": requests,
            "wall_s": run["wall_s"], "loadavg_1m_before": run["machine_before"]["loadavg_1m"],
            "loadavg_1m_after": run["loadavg_1m_after"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the figures are medians")
    args = parser.parse_args()
    settings = {"steps": args.steps, "skip": args.skip, "repeats": args.repeats, "overrides": RL_STAGE,
                "compared": "inference.num_servers=1 vs 2"}  # fmt: skip
    print(f"settings: {settings}")
    runs: dict[int, list[dict]] = {n: [] for n in SETTINGS}
    for i in range(args.repeats):
        for n in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:  # each pair starts with the other setting
            runs[n].append(measure(n, args.steps, args.skip))
            print(f"  num_servers={n}: step {runs[n][-1]['step_s']:.4f} s, requests per server "
                  f"{runs[n][-1]['requests_per_server']}")  # fmt: skip
    result: dict = {"settings": settings, "machine": machine()}
    rows = []
    for n in SETTINGS:
        med = {key: statistics.median(r[key] for r in runs[n]) for key in ("step_s", "generate_s", "update_weights_s")}
        result[f"servers_{n}"] = {**{f"{k}_median": v for k, v in med.items()}, "runs": runs[n]}
        rows.append([n, med["step_s"], min(r["step_s"] for r in runs[n]), max(r["step_s"] for r in runs[n]),
                     med["generate_s"], med["update_weights_s"], runs[n][-1]["requests_per_server"]])  # fmt: skip
    result["ratio_two_over_one"] = result["servers_2"]["step_s_median"] / result["servers_1"]["step_s_median"]
    print(table(rows, ["servers", "step s (median)", "min", "max", "generate s", "update_weights s",
                       "requests per server (last run)"]))  # fmt: skip
    print(f"two servers / one: step time x{result['ratio_two_over_one']:.3f}")
    print(f"wrote {write_json('servers', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
