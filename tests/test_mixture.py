"""A task of two environments through the real app: each env's workers, log file, metrics,
held-out set and sample rows; and the bad-task cases that must fail before any job starts."""

from __future__ import annotations

import pytest
from conftest import assert_names_planned, metrics, records, run_app

pytestmark = pytest.mark.slow

ENVS = ("short", "long")  # conf/task/mixture.yaml: two reverse_text variants


@pytest.mark.timeout(420)
def test_two_env_mixture_records_each_env(tmp_path):
    run_dir = tmp_path / "run"
    out = run_app(
        run_dir, "task=mixture", "task.envs.long.weight=3.0", "task.envs.short.num_eval_prompts=4",
        "task.envs.long.num_eval_prompts=6", "sft.max_steps=2", "max_steps=3", "orchestrator.batch_size=8",
        "orchestrator.group_size=4", "orchestrator.eval_interval=3", "log_extras=samples", "log_extras.interval=1",
        "log_extras.samples_per_step=16", "orchestrator.eval_samples_per_prompt=4", "orchestrator.eval_pass_k=[1,2,4]",
        "logger=[jsonl,tensorboard]", timeout=360,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    for env in ENVS:
        log = (run_dir / "logs" / "env_workers" / f"{env}.log").read_text()
        assert f"{env}/w0" in log and "ready" in log, env
    orchestrator = metrics(run_dir, "orchestrator")
    assert [r["step"] for r in orchestrator] == [1, 2, 3]
    for record in orchestrator:
        m = record["metrics"]
        for env in ENVS:
            for name in ("reward", "reward_std", "rewards/lcs/mean", "rewards/exact/mean", "frac_reward_zero_std",
                         "completions/mean_length", "completions/clipped_ratio", "errors/score", "errors/timeout",
                         "errors/worker_restarts"):  # fmt: skip
                assert f"{env}/{name}" in m, (record["step"], env, name)
            assert m[f"{env}/errors/score"] == 0.0
        # 8 prompts split 1:3 -> 2 short and 6 long prompts (of 4 completions each): the totals are their mix.
        assert m["reward"] == pytest.approx((2 * m["short/reward"] + 6 * m["long/reward"]) / 8)
    final = orchestrator[-1]["metrics"]
    assert final["eval/reward"] == pytest.approx((4 * final["short/eval/reward"] + 6 * final["long/eval/reward"]) / 10)
    assert "short/eval/completions/mean_length" in final and "long/eval/rewards/exact/mean" in final
    for prefix in ("eval/", "short/eval/", "long/eval/"):  # 4 sampled completions per held-out prompt
        p1, p2, p4 = (final[f"{prefix}pass@{k}"] for k in (1, 2, 4))
        assert 0.0 <= p1 <= p2 <= p4 <= 1.0 and 0.0 <= final[f"{prefix}avg@4"] <= 2.0, prefix
    assert final["eval/pass@1"] == pytest.approx((4 * final["short/eval/pass@1"] + 6 * final["long/eval/pass@1"]) / 10)

    rows = [row for record in records(run_dir, "orchestrator", "samples") for row in record["rows"]]
    assert {row["env"] for row in rows} == set(ENVS)
    assert all(len(row["prompt"]) - 1 <= 4 for row in rows if row["env"] == "short")
    assert all(len(row["prompt"]) - 1 >= 5 for row in rows if row["env"] == "long")

    sft = metrics(run_dir, "sft")
    assert "short/eval/reward" in sft[-1]["metrics"] and "long/eval/reward" in sft[-1]["metrics"], "SFT evaluates each env"
    assert_names_planned(run_dir)

    from rlrun.report import load_run
    from rlrun.report.panels import PANELS

    (per_env,) = [p for p in PANELS if p.title == "Reward per environment"]
    assert sorted(line.label for line in per_env.lines(load_run(run_dir), False)) == sorted(ENVS), "one curve per env"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*") if "orchestrator" in str(p)}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for env in ENVS:
        assert [e.step for e in acc.Scalars(f"{env}/reward")] == [1, 2, 3], env


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["task.name=mixture"], "task.envs"),  # a mixture of nothing
        (["task=mixture", "task.envs.short.name=nope"], "task.envs.short.name"),
        (["task=mixture", "task.envs.long.max_chars=2"], "task.envs.long.max_chars"),
    ],
)
def test_a_bad_task_fails_before_any_job(tmp_path, overrides, named):
    run_dir = tmp_path / "run"
    out = run_app(run_dir, *overrides, timeout=120)
    assert out.returncode != 0
    assert named in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert not (run_dir / "logs").exists(), "no job started"
