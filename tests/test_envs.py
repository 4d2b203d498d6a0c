"""Environments, rewards, and the env-worker pool with real worker processes.

This module must not import torch at top level: the worker processes import it to build
the test environments below.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest

from rlrun.config import EnvWorkersConfig, TaskConfig
from rlrun.envs import load_environment
from rlrun.envs.base import Environment, Example
from rlrun.envs.reverse_text import ReverseText, lcs_ratio
from rlrun.envs.workers import EnvWorkerPool
from rlrun.log import setup_logger
from rlrun.rundir import wait_for

HERE = __name__  # this module's import name, for env_factory ("module:Class")


class TwoRewards(Environment):
    name = "two_rewards"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reward_fns = {"length": self.length, "has_a": self.has_a}

    def sample(self, rng, n, split="train"):
        return [Example(prompt="p", answer="", info={}) for _ in range(n)]

    def length(self, completion, example):
        return float(len(completion))

    def has_a(self, completion, example):
        return float("a" in completion)


class ProbeEnv(ReverseText):
    """Reports facts about the worker process it runs in, as rewards."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reward_fns = {
            "torch_loaded": lambda c, e: float("torch" in sys.modules),
            "lib_level": lambda c, e: float(logging.getLogger(self.library_loggers[0]).getEffectiveLevel()),
            "pid": lambda c, e: float(os.getpid()),
        }


GATE = "RLRUN_TEST_GATE"  # a folder: where GatedReverse workers say they are scoring, and wait to go on


class GatedReverse(ReverseText):
    """ReverseText whose worker, once it has a chunk, says so (`$RLRUN_TEST_GATE/scoring_<pid>`)
    and scores nothing until the test creates `$RLRUN_TEST_GATE/go`: a batch in flight for
    as long as the test needs."""

    def lcs(self, completion, example):
        gate = Path(os.environ[GATE])
        (gate / f"scoring_{os.getpid()}").touch()
        wait_for((gate / "go").exists, "the test to let the worker go on", timeout_s=60)
        return super().lcs(completion, example)


class StuckReverse(ReverseText):
    """ReverseText whose `lcs` blocks SIGALRM and sleeps on "stuck": a scorer stuck where a signal cannot reach it."""

    def lcs(self, completion, example):
        if completion.startswith("stuck"):
            import time

            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(600)
        return super().lcs(completion, example)


class FaultyReverse(ReverseText):
    """ReverseText whose `lcs` raises on completions starting with "boom" and hangs on "hang"."""

    def lcs(self, completion, example):
        if completion.startswith("boom"):
            raise ZeroDivisionError("a bug in the reward function")
        if completion.startswith("hang"):
            import time

            time.sleep(600)
        return super().lcs(completion, example)


def _dead(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by the pool counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def examples():
    return ReverseText(TaskConfig()).sample(random.Random(1), 37)


# ---------------------------------------------------------------- rewards and sampling


def test_prompt_format_and_lcs_reward():
    env = load_environment(TaskConfig())
    ex = env.sample(random.Random(0), 1)[0]
    text = ex.info["text"]
    assert ex.prompt == text + "=" and ex.answer == text[::-1]
    assert env.score(ex.answer, ex) == {"lcs": 1.0, "exact": 1.0, "reward": 2.0}, "reward = lcs + exact"
    assert env.score(ex.answer + "</s>xyz", ex)["exact"] == 1.0 and env.score(ex.answer + "x", ex)["exact"] == 0.0
    assert env.score(ex.answer + "x", ex)["reward"] == env.score(ex.answer + "x", ex)["lcs"] < 1.0
    assert ReverseText(TaskConfig(reward_weights={"exact": 0.0})).score(ex.answer, ex)["reward"] == 1.0
    assert env.score(ex.answer + "</s>", ex)["lcs"] == 1.0  # EOS and trailing newline are not content
    assert env.score(ex.answer + "\n", ex)["lcs"] == 1.0
    assert env.score(ex.answer + "</s>garbage", ex)["lcs"] == 1.0  # nothing after EOS counts
    assert env.score("", ex)["lcs"] == 0.0
    partial = env.score(ex.answer[:-1] + "Z", ex)["lcs"]
    assert 0.0 < partial < 1.0
    assert lcs_ratio("abcd", "abxd") == pytest.approx(2 * 3 / 8)
    assert lcs_ratio("abc", "XYZ") == 0.0


def test_special_tokens_never_raise_the_reward(tiny_model):
    """What the policy emitted is what is scored: padding a completion with special tokens
    (decoded as themselves, as the orchestrator decodes) never scores higher than without them."""
    from rlrun.model import decode_completion, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    env = ReverseText(TaskConfig())
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    assert len(special) >= 2, tokenizer.all_special_tokens  # <pad>, <s>, <unk>
    rng = random.Random(0)
    raised = []
    for example in env.sample(rng, 200):
        plain = tokenizer.encode(rng.choice([example.answer, example.answer[:-1], example.answer[::-1]]),
                                 add_special_tokens=False)  # fmt: skip
        padded = list(plain)
        for _ in range(rng.randint(1, 6)):
            padded.insert(rng.randint(0, len(padded)), rng.choice(special))
        shown = decode_completion(tokenizer, padded)
        assert all(tokenizer.convert_ids_to_tokens(i) in shown for i in padded if i in special), shown
        if env.score(shown, example)["reward"] > env.score(decode_completion(tokenizer, plain), example)["reward"]:
            raised.append((example.prompt, shown))
    assert not raised, raised[:5]
    # EOS ends the completion: what follows it does not count.
    eos = tokenizer.eos_token_id
    ex = Example("abc=", "cba")
    tail = tokenizer.encode("cba", add_special_tokens=False) + [eos] + tokenizer.encode("xyz", add_special_tokens=False)
    assert env.score(decode_completion(tokenizer, tail), ex)["lcs"] == 1.0


def test_named_rewards_combine_with_weights():
    env = TwoRewards(TaskConfig(reward_weights={"length": 0.5}))
    ex = Example("p", "", {})
    assert env.score("abc", ex) == {"length": 3.0, "has_a": 1.0, "reward": 0.5 * 3.0 + 1.0}
    assert TwoRewards(TaskConfig()).score("xy", ex)["reward"] == 2.0  # missing names weigh 1
    with pytest.raises(ValueError, match="typo"):
        TwoRewards(TaskConfig(reward_weights={"typo": 1.0})).score("x", ex)


def test_eval_split_is_fixed_and_held_out():
    cfg = TaskConfig(num_eval_prompts=16)
    a, b = ReverseText(cfg), ReverseText(cfg)
    eval_a = a.sample(random.Random(1), 16, split="eval")
    assert eval_a == b.sample(random.Random(99), 16, split="eval")
    assert len(eval_a) == 16 and a.sample(random.Random(1), 4, split="eval") == eval_a[:4]
    train_1, train_2 = a.sample(random.Random(1), 64), a.sample(random.Random(2), 64)
    assert train_1 == a.sample(random.Random(1), 64) and train_1 != train_2
    held_out = {ex.info["text"] for ex in eval_a}
    assert not held_out & {ex.info["text"] for ex in a.sample(random.Random(3), 3000)}
    for ex in train_1:
        assert cfg.min_chars <= len(ex.info["text"]) <= cfg.max_chars and set(ex.info["text"]) <= set(cfg.alphabet)
    with pytest.raises(ValueError):
        a.sample(random.Random(0), 1, split="test")


# ---------------------------------------------------------------- the worker pool


def test_pool_scores_in_order_with_two_workers(examples):
    env = ReverseText(TaskConfig())
    completions = [ex.answer[: i % 5] + "x" * (i % 3) for i, ex in enumerate(examples)]
    with EnvWorkerPool(TaskConfig(), EnvWorkersConfig(num_workers=2), log_dir=None) as pool:
        assert len(set(pool.pids)) == 2
        assert pool.score(completions, examples) == [env.score(c, e) for c, e in zip(completions, examples)]
        assert pool.score([], []) == []


def test_workers_are_light_and_set_library_levels(examples):
    workers = EnvWorkersConfig(num_workers=2, env_level="ERROR")
    with EnvWorkerPool(TaskConfig(), workers, None, env_factory=f"{HERE}:ProbeEnv") as pool:
        scores = pool.score(["x"] * 8, examples[:8])
        assert {s["torch_loaded"] for s in scores} == {0.0}
        assert {s["lib_level"] for s in scores} == {float(logging.ERROR)}
        assert {s["pid"] for s in scores} <= {float(p) for p in pool.pids}  # scored in the workers
        assert float(os.getpid()) not in {s["pid"] for s in scores}


def test_worker_file_logs_shared_and_named(tmp_path, examples):
    log_file = tmp_path / "logs" / "env_workers" / "reverse_text.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("a previous run\n")
    workers = EnvWorkersConfig(num_workers=2, file_logs=True, level="DEBUG")
    with EnvWorkerPool(TaskConfig(), workers, tmp_path / "logs") as pool:
        pool.score([ex.answer for ex in examples], examples)
        pids = pool.pids
    lines = log_file.read_text().splitlines()
    assert "a previous run" not in lines  # each run starts the file fresh ...
    for index, pid in enumerate(sorted(pids)):  # ... and every worker appends to it
        assert any(f"pid={pid} " in line for line in lines)
    assert any("reverse_text/w0" in line and "ready" in line for line in lines)
    assert any("reverse_text/w1" in line and "ready" in line for line in lines)
    assert sum("scored" in line for line in lines) == 2


def test_worker_logs_go_through_the_owner_logger_without_file_logs(tmp_path, examples):
    setup_logger("DEBUG", tmp_path / "orchestrator.log", job="orchestrator")
    workers = EnvWorkersConfig(num_workers=2, file_logs=False, level="DEBUG")
    with EnvWorkerPool(TaskConfig(), workers, tmp_path / "logs") as pool:
        pool.score([ex.answer for ex in examples], examples)
    assert not (tmp_path / "logs" / "env_workers").exists()
    text = (tmp_path / "orchestrator.log").read_text()
    assert "reverse_text/w0 pid=" in text and "reverse_text/w1 pid=" in text and "scored" in text


def test_pool_recovers_from_worker_killed_between_batches(tmp_path, examples):
    setup_logger("INFO", tmp_path / "orchestrator.log", job="orchestrator")
    env = ReverseText(TaskConfig())
    with EnvWorkerPool(TaskConfig(), EnvWorkersConfig(num_workers=2), tmp_path / "logs") as pool:
        expected = [env.score(ex.answer[:3], ex) for ex in examples]
        assert pool.score([ex.answer[:3] for ex in examples], examples) == expected
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _dead(victim), "the killed worker to die", timeout_s=30)
        assert pool.score([ex.answer[:3] for ex in examples], examples) == expected
        assert pool.restarts == 1 and victim not in pool.pids and len(pool.pids) == 2
    assert "died" in (tmp_path / "orchestrator.log").read_text()


def test_pool_rescores_a_batch_in_flight_when_a_worker_dies(tmp_path, examples, monkeypatch):
    setup_logger("INFO", tmp_path / "orchestrator.log", job="orchestrator")
    examples = examples[:24]  # 12 per worker
    env = ReverseText(TaskConfig())
    completions = [ex.answer[::2] for ex in examples]
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(GATE, str(gate))  # the spawned workers inherit it
    with EnvWorkerPool(TaskConfig(), EnvWorkersConfig(num_workers=2), None, env_factory=f"{HERE}:GatedReverse") as pool:
        result: list = []
        thread = threading.Thread(target=lambda: result.append(pool.score(completions, examples)))
        thread.start()
        try:
            victim = wait_for(lambda: next((pid for pid in pool.pids if (gate / f"scoring_{pid}").exists()), None),
                              "a worker to start scoring its chunk", timeout_s=60)  # fmt: skip
            os.kill(victim, signal.SIGKILL)  # in the middle of its chunk
        finally:
            (gate / "go").touch()
        thread.join(timeout=60)
        assert result and result[0] == [env.score(c, e) for c, e in zip(completions, examples)]
        assert pool.restarts == 1
    log = (tmp_path / "orchestrator.log").read_text()
    assert "re-scoring 2 of 2 chunks" in log or "re-scoring 1 of 2 chunks" in log


def test_pool_gives_up_when_workers_keep_dying(examples):
    with EnvWorkerPool(TaskConfig(), EnvWorkersConfig(num_workers=1), None, max_retries=0) as pool:
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _dead(victim), "the killed worker to die", timeout_s=30)
        with pytest.raises(RuntimeError, match="kept dying"):
            pool.score(["x"], examples[:1])


def test_pool_start_failure_is_clear():
    with pytest.raises(RuntimeError, match="failed to start"):
        EnvWorkerPool(TaskConfig(), EnvWorkersConfig(num_workers=1), None, env_factory=f"{HERE}:NoSuchEnv")


def test_a_raising_or_hanging_scorer_scores_zero_and_is_counted_and_logged_once(tmp_path, examples):
    setup_logger("INFO", tmp_path / "orchestrator.log", job="orchestrator")
    env = ReverseText(TaskConfig())
    examples = examples[:6]
    completions = ["boom", examples[1].answer, "boom!", "hang", examples[4].answer, "hang2"]
    workers = EnvWorkersConfig(num_workers=1, score_timeout_s=0.5)
    with EnvWorkerPool(TaskConfig(), workers, tmp_path / "logs", env_factory=f"{HERE}:FaultyReverse") as pool:
        scores = pool.score(completions, examples)
        assert pool.take_error_counts() == {"score": 2, "timeout": 2, "worker_restarts": 0}
        assert pool.take_error_counts() == {"score": 0, "timeout": 0, "worker_restarts": 0}, "counts since the last call"
        pool.score(["boom"], examples[:1])
        assert pool.take_error_counts()["score"] == 1
    zero = {"lcs": 0.0, "exact": 0.0, "reward": 0.0}
    assert [scores[i] for i in (0, 2, 3, 5)] == [zero] * 4, "a failed completion scores 0 for every function"
    assert scores[1] == env.score(completions[1], examples[1]) and scores[1]["reward"] == 2.0, "the others are untouched"
    env_log = (tmp_path / "logs" / "env_workers" / "reverse_text.log").read_text()
    assert env_log.count("ZeroDivisionError: a bug in the reward function") == 1, "once per kind of error"
    assert env_log.count("score_timeout_s=0.5") == 1
    owner_log = (tmp_path / "orchestrator.log").read_text()
    assert owner_log.count("'reverse_text': score: ZeroDivisionError") == 1 and owner_log.count("timeout while scoring") == 1
    assert "scoring errors over the run: score: ZeroDivisionError x3, timeout x2" in owner_log, "the total at close"


def test_per_worker_log_files(tmp_path, examples):
    workers = EnvWorkersConfig(num_workers=2, per_worker_logs=True)
    with EnvWorkerPool(TaskConfig(), workers, tmp_path / "logs", name="rev") as pool:
        pool.score([ex.answer for ex in examples], examples)
        pids = pool.pids
    files = sorted((tmp_path / "logs" / "env_workers" / "rev").glob("*.log"))
    assert [f.name for f in files] == ["worker_0.log", "worker_1.log"]
    texts = [f.read_text() for f in files]
    assert all("ready" in t for t in texts) and "rev/w0" in texts[0] and "rev/w1" in texts[1]
    assert {pid for pid in pids if any(f"pid={pid} " in t for t in texts)} == set(pids)
    assert not (tmp_path / "logs" / "env_workers" / "rev.log").exists()


# ---------------------------------------------------------------- mixtures


def test_split_by_weight_sums_and_follows_weights():
    from rlrun.envs.mixture import split_by_weight

    assert split_by_weight(16, {"a": 1.0, "b": 1.0}) == {"a": 8, "b": 8}
    assert split_by_weight(16, {"a": 3.0, "b": 1.0}) == {"a": 12, "b": 4}
    assert split_by_weight(10, {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 4, "b": 3, "c": 3}  # largest remainder, then order
    assert split_by_weight(1, {"a": 0.2, "b": 0.8}) == {"a": 0, "b": 1}


def test_mixture_tags_examples_with_their_env_and_keeps_each_eval_set():
    from omegaconf import OmegaConf

    from rlrun.envs import env_configs, load_task

    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), {"name": "mixture", "envs": {  # as a YAML would
        "short": {"name": "reverse_text", "weight": 3.0, "min_chars": 3, "max_chars": 3, "num_eval_prompts": 4},
        "long": {"name": "reverse_text", "weight": 1.0, "min_chars": 6, "max_chars": 6, "num_eval_prompts": 2},
    }})  # fmt: skip
    assert list(env_configs(cfg)) == ["short", "long"]
    task = load_task(cfg)
    train = task.sample(random.Random(0), 16)
    assert [ex.env for ex in train] == ["short"] * 12 + ["long"] * 4
    assert all(len(ex.answer) == (3 if ex.env == "short" else 6) for ex in train)
    held_out = task.sample(random.Random(0), task.num_eval_prompts, split="eval")
    assert [ex.env for ex in held_out] == ["short"] * 4 + ["long"] * 2
    assert task.score(train[-1].answer, train[-1])["exact"] == 1.0
    single = load_task(OmegaConf.structured(TaskConfig()))
    assert {ex.env for ex in single.sample(random.Random(0), 4)} == {"reverse_text"} and single.name == "reverse_text"


def test_a_worker_stuck_beyond_the_alarm_is_killed_and_its_chunk_scores_zero(tmp_path, examples):
    setup_logger("INFO", tmp_path / "orchestrator.log", job="orchestrator")
    examples = examples[:4]
    completions = ["stuck", examples[1].answer, examples[2].answer, examples[3].answer]  # 2 chunks of 2
    workers = EnvWorkersConfig(num_workers=2, score_timeout_s=0.2)
    with EnvWorkerPool(TaskConfig(), workers, None, env_factory=f"{HERE}:StuckReverse") as pool:
        scores = pool.score(completions, examples)  # returns after 2 x 0.2 + 10 s, not 600
        zero = {"lcs": 0.0, "exact": 0.0, "reward": 0.0}
        assert scores[:2] == [zero, zero], "the stuck worker's whole chunk scores 0"
        assert [s["reward"] for s in scores[2:]] == [2.0, 2.0], "the other worker's chunk is kept"
        assert pool.take_error_counts() == {"score": 0, "timeout": 2, "worker_restarts": 1}
        assert pool.score([examples[1].answer], examples[1:2])[0]["reward"] == 2.0, "a fresh pool scores on"
