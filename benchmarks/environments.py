"""Does a reasoning-gym task learn? `+experiment=spell_backward` scored on words it never saw.

Per seed, one whole run (`python -m rlrun +experiment=spell_backward seed=<s> <overrides>`,
after waiting for an idle CPU), then:
- from the run's own record: the SFT stage's last held-out evaluation (what RL started from,
  `metrics/sft.jsonl`) and the orchestrator's last one (the final weights): reasoning-gym's
  score (`eval/reward`, the mean of `score_answer`) and the share that ended with EOS;
- `unseen`: the SFT policy and the final weights loaded into plain transformers decode,
  greedily and with no logit bias, prompts of words the run never saw (its SFT and RL prompts are
  replayed from their seeds and left out, as are the held-out ones); each completion is scored
  by the environment's `score` reward, i.e. reasoning-gym's own `score_answer` on the completion
  cut at EOS and stripped: mean score, exact share (score 1) and EOS share;
- the wall time of the whole run.

Target (the issue): score >= 0.95 on unseen words, the run within 5 minutes on 2 cores (on the
median run). Every figure is reported, misses included.
Results: benchmarks/results/environments.json (one entry per `--name`).

    python benchmarks/environments.py [--seeds 0,1,2] [--name spell_backward] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    greedy_ids,
    load_final_weights,
    load_policy,
    machine,
    mean,
    read_metrics,
    run_fields,
    run_rlrun,
    table,
    unseen_prompts,
    write_json,
)
from default_quality import last_eval  # noqa: E402

EXPERIMENT = "+experiment=spell_backward"
TARGETS = {"unseen_score": 0.95, "wall_s": 300.0}


def held_out(record: dict | None) -> dict | None:
    """An `eval/*` summary of `last_eval` with the reasoning-gym score under its own name."""
    if record is None:
        return None
    return {"step": record["step"], "score": record["reward"], "eos": record["eos"]}


def unseen_scores(run_dir: Path, num_prompts: int = 500) -> dict:
    """Greedy reasoning-gym scores, in plain transformers, of the SFT policy and the final
    weights on `num_prompts` prompts the run never saw."""
    from rlrun.config import load_run_config
    from rlrun.envs import load_task
    from rlrun.model import decode_completion

    cfg = load_run_config(run_dir / "config.yaml")  # on the schema: a config from an older rlrun still loads
    task = load_task(cfg.task)
    fresh, num_seen = unseen_prompts(cfg, task, num_prompts)
    model, tokenizer = load_policy(run_dir, cfg)

    def score() -> dict:
        scores, ended = [], 0
        for ex in fresh:
            new = greedy_ids(model, tokenizer, ex, cfg.orchestrator.max_tokens)
            ended += tokenizer.eos_token_id in new
            scores.append(task.score(decode_completion(tokenizer, new), ex)["score"])
        return {"score": mean(scores), "exact": mean([float(s == 1.0) for s in scores]), "eos": ended / len(fresh)}

    before = score() if cfg.sft.max_steps > 0 else None
    load_final_weights(model, run_dir)
    after = score()
    lengths = [len(ex.answer) for ex in fresh]
    return {"prompts": len(fresh), "prompts_seen": num_seen, "mean_answer_chars": mean(lengths),
            "sft": before, "final": after}  # fmt: skip


def measure(seed: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rlrun-bench-env-{seed}-") as tmp:
        run_dir = Path(tmp) / "run"
        run = run_rlrun(run_dir, [EXPERIMENT, f"seed={seed}", *overrides])  # waits for an idle CPU
        sft_path = run_dir / "metrics" / "sft.jsonl"
        sft_records = read_metrics(sft_path) if sft_path.is_file() else []
        unseen = unseen_scores(run_dir)
    sft = held_out(last_eval(sft_records))
    final = held_out(last_eval(run["orchestrator"]))
    return {
        "seed": seed,
        **run_fields(run),
        "sft_stage_s": sft_records[-1]["time"] - run["start"] if sft_records else None,  # run start -> SFT's last record
        "sft": sft,
        "final": final,
        "rl_gain_score": final["score"] - sft["score"] if final and sft else None,
        "unseen": unseen,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="spell_backward", help="the key of this configuration in the results file")
    parser.add_argument("overrides", nargs="*", help="extra `python -m rlrun` overrides")
    args = parser.parse_args()

    runs = [measure(int(s), args.overrides) for s in args.seeds.split(",")]
    rows = []
    for r in runs:
        s, f, u = r["sft"] or {}, r["final"] or {}, r["unseen"]
        us = u["sft"] or {}
        rows.append([r["seed"], s.get("score"), f.get("score"), f.get("eos"), us.get("score"), u["final"]["score"],
                     u["final"]["exact"], u["final"]["eos"], r["reward_first10pct"], r["reward_last10pct"],
                     r["sft_stage_s"], r["wall_s"]])  # fmt: skip
    print(table(rows, ["seed", "sft score", "final score", "final eos", "unseen sft", "unseen final", "unseen exact",
                       "unseen eos", "reward first", "reward last", "sft s", "wall s"]))  # fmt: skip
    summary = {
        "sft_score": mean([r["sft"]["score"] for r in runs if r["sft"]]),
        "final_score": mean([r["final"]["score"] for r in runs if r["final"]]),
        "rl_gain_score": mean([r["rl_gain_score"] for r in runs if r["rl_gain_score"] is not None]),
        "unseen_sft_score": mean([r["unseen"]["sft"]["score"] for r in runs if r["unseen"]["sft"]]),
        "unseen_score": mean([r["unseen"]["final"]["score"] for r in runs]),
        "unseen_exact": mean([r["unseen"]["final"]["exact"] for r in runs]),
        "unseen_eos": mean([r["unseen"]["final"]["eos"] for r in runs]),
        "wall_s": statistics.median(r["wall_s"] for r in runs),  # the target is on the median run
        "wall_s_max": max(r["wall_s"] for r in runs),
        "loadavg_1m_after_max": max(r["loadavg_1m_after"] for r in runs),
    }
    met = {key: summary[key] == summary[key] and (summary[key] <= target if key == "wall_s" else summary[key] >= target)
           for key, target in TARGETS.items()}  # fmt: skip
    print(f"{args.name}: held-out score SFT {summary['sft_score']:.3f} -> final {summary['final_score']:.3f}; "
          f"unseen words: SFT {summary['unseen_sft_score']:.3f} -> final {summary['unseen_score']:.3f} "
          f"(exact {summary['unseen_exact']:.3f}, EOS {summary['unseen_eos']:.1%}); median run "
          f"{summary['wall_s']:.0f} s (slowest {summary['wall_s_max']:.0f} s); targets met: {met}")
    path = RESULTS / "environments.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.name] = {
        "configuration": {"experiment": EXPERIMENT, "overrides": args.overrides, "seeds": args.seeds},
        "targets": TARGETS, "summary": summary, "met": met, "runs": runs, "machine": machine(),
    }  # fmt: skip
    print(f"wrote {write_json('environments', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
