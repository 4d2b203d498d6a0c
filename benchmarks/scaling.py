"""Scaling: how the step time grows with group size, completion length and trainer ranks.

One end-to-end run (`python -m rlrun`) per point, each varying one knob from the default
experiment (16 prompts x group 8, 12 tokens, 1 rank), evaluation and checkpoints off,
--steps steps; steady-state step time (steps after --skip) and the phase times of both
jobs. `--plot-only` redraws benchmarks/results/scaling.png from scaling.json.

    python benchmarks/scaling.py [--steps 30] [--skip 5] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RL_STAGE, machine, run_rlrun, summarize, table, write_json  # noqa: E402

SWEEPS = {
    "group_size": ("orchestrator.group_size", [4, 8, 16, 32]),
    "max_tokens": ("orchestrator.max_tokens", [6, 12, 24, 48]),
    "num_ranks": ("trainer.num_ranks", [1, 2]),
}
BASE = [*RL_STAGE, "orchestrator.eval_interval=0", "trainer.checkpoint_interval=0"]


def plot(result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(4.5 * len(SWEEPS), 3.6))
    for ax, (name, points) in zip(axes, result["sweeps"].items()):
        xs = [p["value"] for p in points]
        ax.plot(xs, [p["step_s"] for p in points], "o-", label="step (wall)")
        ax.plot(xs, [p["orchestrator"]["generate_s"] for p in points], "s--", label="generate")
        ax.plot(xs, [p["trainer"]["forward_backward_s"] for p in points], "^--", label="trainer fwd+bwd")
        ax.set_xlabel(name)
        ax.set_ylabel("seconds per step")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("rlrun step time (tiny Llama, reverse_text, CPU); one knob varied from the default")
    fig.tight_layout()
    path = RESULTS / "scaling.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        print(f"wrote {plot(json.loads((RESULTS / 'scaling.json').read_text()))}")
        return 0

    settings = {"steps": args.steps, "skip": args.skip, "base_overrides": BASE,
                "sweeps": {k: {"key": key, "values": vals} for k, (key, vals) in SWEEPS.items()}}
    print(f"settings: {settings}")
    result: dict = {"sweeps": {}, "settings": settings}
    for name, (key, values) in SWEEPS.items():
        points, rows = [], []
        for value in values:
            with tempfile.TemporaryDirectory(prefix=f"rlrun-bench-scaling-{name}-") as tmp:
                run = run_rlrun(Path(tmp) / "run", [*BASE, f"max_steps={args.steps}", f"{key}={value}"])
            s = summarize(run, args.skip)
            group = value if name == "group_size" else 8
            s.update(value=value, samples_per_s=16 * group / s["step_s"], machine_before=run["machine_before"])
            points.append(s)
            rows.append([value, s["step_s"], s["samples_per_s"], s["orchestrator"]["generate_s"],
                         s["orchestrator"]["update_weights_s"], s["trainer"]["forward_backward_s"],
                         s["trainer"]["wait_for_batch_s"]])
        result["sweeps"][name] = points
        print(f"\n{name} ({key}):")
        print(table(rows, [name, "step s", "samples/s", "generate s", "update_weights s", "fwd+bwd s",
                           "trainer wait s"]))
    result["machine"] = machine()
    print(f"\nwrote {write_json('scaling', result)}")
    print(f"wrote {plot(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
