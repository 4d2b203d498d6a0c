"""The orchestrator's pure parts: advantages, batch tensors, metrics, sample selection, eval."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from rlrun.envs.base import Environment, Example
from rlrun.inference import Completion
from rlrun.orchestrator.eval import (
    EVAL_TEMPERATURE,
    Evaluator,
    eval_metrics,
    eval_table,
    is_eval_step,
    pass_at_k,
    sampled_metrics,
)
from rlrun.orchestrator.extras import (
    best_and_worst,
    is_logging_step,
    log_rollout_extras,
    sample_rows,
    select_samples,
)
from rlrun.log import render_table
from rlrun.orchestrator.rollout import (
    Rollout,
    build_batch,
    completion_metrics,
    group_advantages,
    per_env,
    reward_metrics,
)


def _completion(tokens: list[int], finish: str = "stop") -> Completion:
    return Completion(token_ids=tokens, logprobs=[-0.5 - 0.1 * i for i in range(len(tokens))], finish_reason=finish)


def _rollout(prompt_ids: list[int], completion: Completion, prompt: str = "p", text: str = "c",
             scores: dict[str, float] | None = None, advantage: float = 0.0, env: str = "e") -> Rollout:  # fmt: skip
    return Rollout(Example(prompt, "", env=env), prompt_ids, completion, text=text, scores=scores or {},
                   advantage=advantage)  # fmt: skip


# ---------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    # Group 1: mean 1, Bessel std sqrt(2/3) (TRL's) -> (r - 1) / (std + eps). Group 2: all equal -> 0.
    eps = 1e-4
    adv = group_advantages([0.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], group_size=4, eps=eps)
    std = math.sqrt(2 / 3)
    assert adv[:4] == pytest.approx([-1 / (std + eps), 1 / (std + eps), 0.0, 0.0])
    assert adv[4:] == [0.0, 0.0, 0.0, 0.0], "a zero-std group carries no signal"
    with_eps = group_advantages([0.0, 1.0], group_size=2)  # default eps 1e-4: mean 0.5, std sqrt(1/2)
    assert with_eps == pytest.approx([-0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)])
    assert sum(group_advantages([0.3, 0.9, 0.1], 3)) == pytest.approx(0.0, abs=1e-12)


def test_scale_rewards_batch_and_none_by_hand():
    rewards = [0.0, 2.0, 1.0, 1.0]  # groups of 2: means 1 and 1
    # batch: every group divided by the std of all four, Bessel: var = (1 + 1 + 0 + 0) / 3
    batch_std = math.sqrt(2 / 3)
    assert group_advantages(rewards, 2, "batch", eps=0.0) == pytest.approx([-1 / batch_std, 1 / batch_std, 0.0, 0.0])
    assert group_advantages(rewards, 2, "none") == [-1.0, 1.0, 0.0, 0.0], "Dr. GRPO: centred, not scaled"
    # group: each group's own std (sqrt(2) for the first, 0 for the second)
    assert group_advantages(rewards, 2, "group", eps=1e-12) == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0, 0])
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 2, "rank")


def test_group_advantages_reject_a_ragged_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0] * 6, group_size=4)


# ---------------------------------------------------------------- batch tensors


def test_build_batch_masks_and_positions():
    rollouts = [_rollout([1, 2], _completion([5, 6, 7]), advantage=1.5),
                _rollout([3], _completion([8], "length"), advantage=-0.5)]  # fmt: skip
    t = build_batch(rollouts, pad_id=0)
    assert t["input_ids"].tolist() == [[1, 2, 5, 6, 7], [3, 8, 0, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Only completion tokens are trained on; padding and prompts are masked out.
    assert t["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    torch.testing.assert_close(t["old_logprobs"][0], torch.tensor([0.0, 0.0, -0.5, -0.6, -0.7]))
    torch.testing.assert_close(t["old_logprobs"][1], torch.tensor([0.0, -0.5, 0.0, 0.0, 0.0]))
    assert t["advantages"].tolist() == [1.5, -0.5]
    assert t["truncated"].tolist() == [0.0, 1.0], "cut off at max_tokens"
    assert t["input_ids"].dtype == torch.long and t["loss_mask"].dtype == torch.float32


# ---------------------------------------------------------------- metrics


SCORES = [
    {"lcs": 1.0, "short": 0.0, "reward": 1.0},
    {"lcs": 0.0, "short": 1.0, "reward": 1.0},
    {"lcs": 0.5, "short": 0.0, "reward": 0.5},
    {"lcs": 0.5, "short": 0.0, "reward": 0.5},
]


def test_reward_metrics_by_hand():
    m = reward_metrics(SCORES, group_size=2)
    assert m["reward"] == 0.75
    assert m["reward_std"] == 0.0 and m["frac_reward_zero_std"] == 1.0  # both groups tie
    # Bessel-corrected, as TRL's: lcs (1, 0, .5, .5) has squared deviations summing to 0.5, over 3.
    assert m["rewards/lcs/mean"] == 0.5 and m["rewards/lcs/std"] == pytest.approx(math.sqrt(0.5 / 3))
    assert m["rewards/short/mean"] == 0.25 and m["rewards/short/std"] == pytest.approx(math.sqrt(0.75 / 3))
    m = reward_metrics([{"reward": r} for r in (0.0, 1.0, 0.5, 0.5)], group_size=2)
    assert m["reward_std"] == pytest.approx(math.sqrt(0.5) / 2) and m["frac_reward_zero_std"] == 0.5
    assert not [k for k in m if k.startswith("rewards/")]


def test_completion_metrics_by_hand():
    m = completion_metrics([_completion([1, 2]), _completion([1, 2, 3, 4], "length"), _completion([1, 2, 3, 4, 5, 6])])
    assert m["completions/mean_length"] == 4.0
    assert (m["completions/min_length"], m["completions/max_length"]) == (2.0, 6.0)
    assert m["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert m["completions/mean_terminated_length"] == 4.0
    assert (m["completions/min_terminated_length"], m["completions/max_terminated_length"]) == (2.0, 6.0)
    none_stopped = completion_metrics([_completion([1], "length")])
    assert none_stopped["completions/mean_terminated_length"] == 0.0


# ---------------------------------------------------------------- sample selection


REWARDS = [0.2, 0.9, 0.0, 0.5, 0.5, 0.1, 0.3, 0.7]
LENGTHS = [5, 6, 7, 1, 9, 4, 3, 2]


def test_select_samples_picks_the_informative_ones_first():
    picks = select_samples(REWARDS, LENGTHS, 4, random.Random(0))
    assert picks == [(1, "best reward"), (2, "worst reward"), (3, "shortest"), (4, "longest")]
    picks = select_samples(REWARDS, LENGTHS, 6, random.Random(0))
    assert picks[:4] == [(1, "best reward"), (2, "worst reward"), (3, "shortest"), (4, "longest")]
    assert [why for _, why in picks[4:]] == ["random", "random"]
    assert len({i for i, _ in picks}) == 6, "no rollout twice"


def test_select_samples_is_bounded_and_never_repeats():
    assert select_samples(REWARDS, LENGTHS, 2, random.Random(0)) == [(1, "best reward"), (2, "worst reward")]
    assert select_samples(REWARDS, LENGTHS, 0, random.Random(0)) == []
    everything = select_samples(REWARDS, LENGTHS, 100, random.Random(0))
    assert sorted(i for i, _ in everything) == list(range(8))
    # One rollout both best and longest: it is listed once, and the next criterion fills in.
    picks = select_samples([1.0, 0.0, 0.5], [9, 5, 1], 3, random.Random(0))
    assert picks == [(0, "best reward"), (1, "worst reward"), (2, "shortest")]
    assert select_samples([], [], 4, random.Random(0)) == []
    with pytest.raises(ValueError):
        select_samples([1.0], [1, 2], 1, random.Random(0))


def test_select_samples_is_deterministic_with_a_seed():
    rewards = [random.Random(1).random() for _ in range(64)]
    lengths = list(range(64))
    first = select_samples(rewards, lengths, 8, random.Random("0/samples/3"))
    assert first == select_samples(rewards, lengths, 8, random.Random("0/samples/3"))
    others = {tuple(select_samples(rewards, lengths, 8, random.Random(seed))) for seed in range(5)}
    assert len(others) > 1, "the random picks do depend on the seed"


def test_sample_rows_have_every_column():
    rollouts = [
        _rollout([1, 2, 3], _completion([4, 5]), prompt="ab=", text="ba", scores={"lcs": 0.5, "reward": 0.5}),
        _rollout([1, 2, 3], _completion([4, 5, 6]), prompt="cd=", text="dc", scores={"lcs": 1.0, "reward": 1.0},
                 advantage=1.0),
    ]  # fmt: skip
    rows = sample_rows(7, [(1, "best reward")], rollouts)
    assert rows == [{
        "step": 7, "selected_as": "best reward", "env": "e", "prompt": "cd=", "completion": "dc", "lcs": 1.0,
        "reward": 1.0, "advantage": 1.0, "prompt_tokens": 3, "completion_tokens": 3,
    }]  # fmt: skip


def test_sample_rows_of_a_mixture_share_their_columns():
    """Rows of envs with different reward functions: one set of columns, NaN where an env has no such function."""
    rollouts = [
        _rollout([1], _completion([4]), scores={"lcs": 0.5, "reward": 0.5}, env="rev"),
        _rollout([1], _completion([4]), scores={"score": 1.0, "reward": 1.0}, env="rg"),
    ]
    rows = sample_rows(1, [(0, "best reward"), (1, "random")], rollouts)
    assert [list(r) for r in rows] == [list(rows[0])] * 2 and [r["env"] for r in rows] == ["rev", "rg"]
    assert rows[0]["lcs"] == 0.5 and math.isnan(rows[0]["score"]) and math.isnan(rows[1]["lcs"]) and rows[1]["score"] == 1.0


def test_per_env_metrics_only_for_a_task_of_several_envs():
    rollouts = [_rollout([1], _completion([4] * n), scores={"reward": r}, env=env)
                for env, r, n in [("a", 1.0, 2), ("a", 0.0, 4), ("b", 0.5, 3), ("b", 0.5, 3)]]  # fmt: skip
    def mean_reward(rs):
        return {"reward": sum(r.reward for r in rs) / len(rs), "n": float(len(rs))}

    assert per_env(mean_reward, rollouts) == {"a/reward": 0.5, "a/n": 2.0, "b/reward": 0.5, "b/n": 2.0}
    assert per_env(mean_reward, rollouts[:2]) == {}, "one env: the totals are its metrics"


class _Recorder:
    def __init__(self) -> None:
        self.samples: list = []
        self.distributions: dict = {}

    def log_samples(self, rows, step):
        self.samples.append((step, rows))

    def log_distribution(self, name, values, step):
        self.distributions[name] = (step, list(values))


def test_log_rollout_extras_follows_the_job_config():
    rollouts = [_rollout([1] * 4, _completion([7] * n), scores={"lcs": r, "reward": r}, advantage=0.1)
                for r, n in zip(REWARDS, LENGTHS)]  # fmt: skip
    both = _Recorder()
    cfg = SimpleNamespace(samples=True, distributions=True, samples_per_step=3)
    log_rollout_extras(both, cfg, 4, random.Random(0), rollouts)
    ((step, rows),) = both.samples
    assert step == 4 and [r["selected_as"] for r in rows] == ["best reward", "worst reward", "shortest"]
    assert both.distributions == {
        "distributions/reward": (4, REWARDS),
        "distributions/advantage": (4, [0.1] * 8),
        "distributions/completion_length": (4, LENGTHS),
    }
    only_dists = _Recorder()
    log_rollout_extras(only_dists, SimpleNamespace(samples=False, distributions=True, samples_per_step=3), 4,
                       random.Random(0), rollouts)  # fmt: skip
    assert only_dists.samples == [] and len(only_dists.distributions) == 3
    assert [is_logging_step(s, 5) for s in (1, 4, 5, 10, 11)] == [False, False, True, True, False]


# ---------------------------------------------------------------- evaluation


def test_eval_steps_and_metrics():
    assert [s for s in range(1, 11) if is_eval_step(s, 3, 10)] == [3, 6, 9, 10], "and at the last step"
    assert [s for s in range(1, 11) if is_eval_step(s, 0, 10)] == [], "0: off"
    m = eval_metrics([{"lcs": 1.0, "reward": 1.0}, {"lcs": 0.0, "reward": 0.0}],
                     [_completion([1, 2]), _completion([1, 2, 3, 4], "length")])  # fmt: skip
    assert m["eval/reward"] == 0.5 and m["eval/reward_std"] == pytest.approx(math.sqrt(0.5)), "std across prompts"
    assert m["eval/rewards/lcs/mean"] == 0.5 and m["eval/completions/mean_length"] == 3.0
    assert m["eval/completions/clipped_ratio"] == 0.5
    assert all(k.startswith("eval/") for k in m) and "eval/frac_reward_zero_std" not in m


def test_best_and_worst_and_the_table():
    assert best_and_worst([0.5, 1.0, 0.0, 0.7, 0.2], 4) == [1, 3, 4, 2], "two best, two worst, by reward"
    assert best_and_worst([0.5, 1.0, 0.0], 3) == [1, 0, 2]
    assert best_and_worst([0.5, 1.0], 10) == [1, 0] and best_and_worst([0.5], 0) == []
    text = eval_table(6, ["ab=", "cd=", "[/]x="], ["ba", "[bold]no", "??"], [1.0, 0.0, 0.25], 2)
    assert "eval samples at step 6" in text
    assert "ab=" in text and "ba" in text and "[bold]no" in text, "completions shown literally, never as markup"
    assert "[/]x=" not in text, "only the best and the worst"
    assert eval_table(6, ["a"], ["b"], [1.0], 0) == ""
    assert "0.1235" in render_table("t", ["x"], [(0.123456,)])


class _CharTokenizer:
    bos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True, **_options):
        return "".join(chr(i) for i in ids)


class _Env(Environment):
    name = "toy"

    def __init__(self):
        super().__init__(SimpleNamespace(reward_weights={}))
        self.reward_fns = {"exact": lambda completion, ex: float(completion == ex.answer)}

    def sample(self, rng, n, split="train"):
        assert split == "eval"
        return [Example(prompt=f"{c}{c}=", answer=c) for c in "abcdefgh"[:n]]


def test_evaluator_runs_one_greedy_completion_per_held_out_prompt():
    env = _Env()
    calls = []

    class Client:
        def complete(self, prompt_ids, n, max_tokens, temperature, seed=None, logit_bias=None):
            calls.append((len(prompt_ids), n, max_tokens, temperature))
            # Prompt "xx=" -> completion "x" for the first half, "?" for the rest.
            return [[_completion([p[1] if i < 3 else ord("?")])] for i, p in enumerate(prompt_ids)]

    class Pool:
        def score(self, texts, examples):
            return [env.score(t, ex) for t, ex in zip(texts, examples)]

    lines = []
    log = SimpleNamespace(info=lines.append)
    evaluator = Evaluator(env, _CharTokenizer(), num_prompts=6, max_tokens=5, num_to_print=2)
    metrics = evaluator.evaluate(9, Client(), Pool(), log)
    assert calls == [(6, 1, 5, EVAL_TEMPERATURE)] and EVAL_TEMPERATURE == 0.0
    assert metrics["eval/reward"] == 0.5 and metrics["eval/rewards/exact/mean"] == 0.5
    assert metrics["eval/completions/mean_length"] == 1.0
    assert "eval at step 9: reward 0.500 over 6 held-out prompts" in lines[0]
    assert "eval samples at step 9" in lines[1] and "aa=" in lines[1] and "ff=" in lines[1]
    quiet = Evaluator(env, _CharTokenizer(), num_prompts=6, max_tokens=5, num_to_print=0)
    lines.clear()
    quiet.evaluate(9, Client(), Pool(), log)
    assert len(lines) == 1, "num_val_samples_to_print=0: no table"
    assert Evaluator(env, _CharTokenizer(), 0, 5, 2).evaluate(1, Client(), Pool(), log) == {}


def test_pass_at_k_unbiased_estimator_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 2, 3) == 1.0  # n - c < k: every draw of k holds a correct one
    assert pass_at_k(8, 3, 2) == pytest.approx(1 - math.comb(5, 2) / math.comb(8, 2))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    m = sampled_metrics([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 2.0]],
                        [[True, False, False, False], [False, False, False, True]], ks=[1, 2, 8])  # fmt: skip
    assert m == {"avg@4": pytest.approx(0.5), "pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}, "k > n is left out"


def test_a_stop_after_the_batch_is_written_still_logs_the_step(hydra_compose, tmp_path, monkeypatch):
    """A stop (a requeue's SIGTERM) between writing a step's batch and logging the step lost its
    record for good: the trainer may train and checkpoint that batch, and a resume starts after
    the checkpoint. The written step is logged; the stop then ends the run before the next."""
    from omegaconf import open_dict

    import rlrun.batch
    from rlrun.inference.auth import create_token, read_token
    from rlrun.inference.engine import Engine
    from rlrun.inference.server import InferenceServer
    from rlrun.job import StopFlag, StopRequested
    from rlrun.log import setup_logger
    from rlrun.model import build_tiny_model, load_model
    from rlrun.orchestrator.loop import Orchestrator
    from rlrun.tracking.record import read_metrics

    cfg = hydra_compose("sft.max_steps=0", "max_steps=3", "orchestrator.eval_interval=1")
    setup_logger("INFO", tmp_path / "logs" / "orchestrator.log", job="orchestrator")
    model, tokenizer = load_model(build_tiny_model(tmp_path / "model", cfg.model, cfg.seed))
    create_token(tmp_path)
    server = InferenceServer(Engine(model, tokenizer), "127.0.0.1", 0, model_name="tiny", token=read_token(tmp_path),
                             weights_root=tmp_path).start()  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir, cfg.inference.urls, cfg.inference.port = str(tmp_path), [server.url], server.port
    stop = StopFlag()
    written = rlrun.batch.write_batch

    def write_then_stop(*args, **kwargs):
        out = written(*args, **kwargs)
        stop.set()  # as if SIGTERM came right after the batch reached the trainer
        return out

    monkeypatch.setattr(rlrun.batch, "write_batch", write_then_stop)
    try:
        with pytest.raises(StopRequested):
            Orchestrator(cfg, tmp_path, stop).run()
    finally:
        server.shutdown()
    records = [r for r in read_metrics(tmp_path / "metrics" / "orchestrator.jsonl") if r.get("type", "metrics") == "metrics"]
    assert [r["step"] for r in records] == [1], "the written step is logged, and nothing after it"
    assert "reward" in records[0]["metrics"] and not any(k.startswith("eval/") for k in records[0]["metrics"])
    assert (tmp_path / "rollouts" / "step_1").is_dir() and not (tmp_path / "rollouts" / "step_2").exists()
