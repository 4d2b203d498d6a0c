"""The reasoning_gym environment: sampling, the held-out set, what is scored, config errors;
and one run of the whole app on it (slow)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

pytest.importorskip("reasoning_gym")

from omegaconf import OmegaConf  # noqa: E402

from rlrun.envs.config import EnvConfig  # noqa: E402
from rlrun.envs.reasoning_gym_env import SEPARATOR, ReasoningGym, extract, get_dataset  # noqa: E402

SHORT_WORDS = {"min_word_len": 3, "max_word_len": 6}


def make_cfg(datasets=None, **settings):
    """An EnvConfig node for reasoning_gym, as `task=reasoning_gym` and a YAML would give."""
    datasets = {"spell_backward": dict(SHORT_WORDS)} if datasets is None else datasets
    return OmegaConf.merge(OmegaConf.structured(EnvConfig),
                           {"name": "reasoning_gym", "datasets": datasets, **settings})  # fmt: skip


@pytest.fixture(scope="module")
def env():
    return ReasoningGym(make_cfg(num_eval_prompts=16))


def one(env, word: str):
    """`env`'s example of spell_backward's item for `word`, as the dataset would make it."""
    entry = get_dataset("spell_backward", 1, 100_000, SHORT_WORDS)[0]
    entry = {**entry, "question": entry["question"].replace(entry["metadata"]["word"], word), "answer": word[::-1],
             "metadata": {**entry["metadata"], "word": word, "word_len": len(word)}}  # fmt: skip
    return env.make_example("spell_backward", 0, entry, "train")


# ---------------------------------------------------------------- prompts


def test_examples_carry_the_entry_prompt_messages_and_reference(env):
    (ex,) = env.sample(random.Random(3), 1)
    entry = ex.info["entry"]
    assert ex.info["dataset"] == "spell_backward" and ex.info["split"] == "train"
    assert entry["metadata"]["source_dataset"] == "spell_backward"
    assert entry == get_dataset("spell_backward", 1, 100_000, SHORT_WORDS)[ex.info["index"]], "train pool: seed 1"
    assert ex.prompt == entry["question"] + SEPARATOR == entry["question"] + "\n"
    assert ex.messages == [{"role": "user", "content": entry["question"]}], "no system prompt with raw answers"
    assert ex.answer == entry["answer"] == entry["metadata"]["word"][::-1]


def test_sampling_is_deterministic_by_rng_and_follows_the_dataset_fields(env):
    a = [ex.prompt for ex in env.sample(random.Random(7), 50)]
    assert a == [ex.prompt for ex in env.sample(random.Random(7), 50)]
    assert a == [ex.prompt for ex in ReasoningGym(make_cfg(num_eval_prompts=16)).sample(random.Random(7), 50)]
    assert a != [ex.prompt for ex in env.sample(random.Random(8), 50)]
    lengths = {len(ex.answer) for ex in env.sample(random.Random(0), 500)}
    assert lengths == {3, 4, 5, 6}


def test_eval_set_is_fixed_and_a_prefix():
    env = ReasoningGym(make_cfg(num_eval_prompts=20))
    held_out = env.sample(random.Random(0), 20, split="eval")
    assert [ex.prompt for ex in held_out] == [ex.prompt for ex in env.sample(random.Random(99), 20, split="eval")]
    assert [ex.prompt for ex in env.sample(random.Random(0), 5, split="eval")] == [ex.prompt for ex in held_out[:5]]
    assert len({ex.prompt for ex in held_out}) == 20, "no repeated question"
    assert {ex.info["split"] for ex in held_out} == {"eval"}
    other = ReasoningGym(make_cfg(num_eval_prompts=20))
    assert [ex.prompt for ex in other.sample(random.Random(1), 20, split="eval")] == [ex.prompt for ex in held_out]
    with pytest.raises(ValueError, match="unknown split"):
        env.sample(random.Random(0), 1, split="test")


def test_eval_items_are_kept_out_of_training():
    # 3-letter words only (1,370 of them) and 300 held out: a plain draw would hit one in ~5.
    cfg = make_cfg({"spell_backward": {"min_word_len": 3, "max_word_len": 3}}, num_eval_prompts=300)
    env = ReasoningGym(cfg)
    held_out = {ex.prompt for ex in env.sample(random.Random(0), 300, split="eval")}
    assert len(held_out) == 300
    pool = get_dataset("spell_backward", 1, 100_000, {"min_word_len": 3, "max_word_len": 3})
    rng = random.Random(0)
    unfiltered = [pool[rng.randrange(len(pool))]["question"] + SEPARATOR for _ in range(2000)]
    assert sum(q in held_out for q in unfiltered) > 200, "the test would otherwise prove nothing"
    train = [ex.prompt for ex in env.sample(random.Random(0), 2000)]
    assert not held_out & set(train)


def test_dataset_weights_are_respected():
    datasets = {"spell_backward": {"weight": 3.0, **SHORT_WORDS},
                "letter_counting": {"weight": 1.0, "min_words": 3, "max_words": 5}}  # fmt: skip
    cfg = make_cfg(datasets, num_eval_prompts=40)
    env = ReasoningGym(cfg)
    counts = Counter(ex.info["dataset"] for ex in env.sample(random.Random(0), 4000))
    assert counts["spell_backward"] + counts["letter_counting"] == 4000
    assert counts["spell_backward"] / 4000 == pytest.approx(0.75, abs=0.03)
    held_out = Counter(ex.info["dataset"] for ex in env.sample(random.Random(0), 40, split="eval"))
    assert set(held_out) == {"spell_backward", "letter_counting"}
    assert held_out["spell_backward"] > held_out["letter_counting"]
    ex = next(ex for ex in env.sample(random.Random(1), 50) if ex.info["dataset"] == "letter_counting")
    assert 3 <= len(ex.info["entry"]["metadata"]["span"]) <= 5, "the dataset's own fields reach it"
    assert env.score(ex.answer + "</s>", ex)["score"] == 1.0


# ---------------------------------------------------------------- what is scored


def test_extract_cuts_at_eos_and_strips():
    assert extract("erots", "raw") == "erots"
    assert extract("  erots \n</s>", "raw") == "erots"
    assert extract("ero</s>ts", "raw") == "ero", "nothing after the first EOS counts"
    assert extract("erots<|im_end|>x</s>y", "raw") == "erots"
    assert extract("erots<eos>", "raw") == extract("erots<|endoftext|>", "raw") == "erots"
    assert extract("\t\n", "raw") == ""
    assert extract("<answer> erots </answer>", "answer_tag") == "erots"
    assert extract("<answer>a</answer> then <answer>erots</answer></s><answer>b</answer>", "answer_tag") == "erots"
    assert extract("erots", "answer_tag") is None
    assert extract("<answer>erots</s></answer>", "answer_tag") is None, "a tag closed after EOS is not one"


def test_score_is_the_datasets_own_score_of_the_stripped_answer(env):
    ex = one(env, "store")  # answer "erots"
    dataset = get_dataset("spell_backward", 1, 100_000, SHORT_WORDS)
    score = lambda completion: env.score(completion, ex)  # noqa: E731
    assert dataset.score_answer(" erots ", ex.info["entry"]) == 0.0, "the scorer itself is whitespace-sensitive"
    assert score(" erots ") == {"score": 1.0, "reward": 1.0}, "surrounding whitespace is stripped first"
    assert score("erots</s>") == score("erots") == score("EROTS</s>") == {"score": 1.0, "reward": 1.0}
    assert score("erots</s>garbage")["score"] == 1.0
    assert score("eroxs</s>")["score"] == pytest.approx(4 / 5), "spell_backward: 1/len per matching position"
    assert score("ero</s>ts")["score"] == pytest.approx(3 / 5)
    assert score("erotsx</s>")["score"] == pytest.approx(0.8), "every position right, but longer: 1 - 0.2"
    assert score(" x erots")["score"] == 0.0
    assert score("</s>")["score"] == score("")["score"] == 0.0


def test_answer_tag_scores_the_last_tag_and_nothing_else():
    env = ReasoningGym(make_cfg(answer_format="answer_tag", num_eval_prompts=4))
    ex = one(env, "store")
    assert ex.answer == "<answer>erots</answer>", "the reference completion SFT trains on"
    assert ex.messages[0]["role"] == "system" and "<answer>" in ex.messages[0]["content"]
    assert ex.messages[1] == {"role": "user", "content": ex.info["entry"]["question"]}
    assert ex.prompt == ex.info["entry"]["question"] + SEPARATOR
    score = lambda completion: env.score(completion, ex)["score"]  # noqa: E731
    assert score(ex.answer + "</s>") == score("think <answer> erots </answer>") == 1.0
    assert score("<answer>xxxxx</answer><answer>erots</answer>") == 1.0
    assert score("<answer>erots</answer><answer>xxxxx</answer>") == 0.0
    assert score("erots</s>") == 0.0, "no tag, no answer"
    assert score("<answer>erots") == 0.0


# ---------------------------------------------------------------- settings


def test_unknown_dataset_lists_every_name():
    import reasoning_gym.factory

    with pytest.raises(ValueError) as err:
        ReasoningGym.check_config(make_cfg({"spel_backward": {}}))
    message = str(err.value)
    assert message.startswith("datasets.spel_backward: no such reasoning-gym dataset")
    assert all(name in message for name in reasoning_gym.factory.DATASETS)


@pytest.mark.parametrize(
    ("datasets", "named"),
    [
        ({}, "datasets: name at least one"),
        ({"spell_backward": {"max_len": 5}}, "datasets.spell_backward: "),
        ({"spell_backward": {"min_word_len": 5, "max_word_len": 3}}, "max_word_len must be >= min_word_len"),
        ({"spell_backward": {"weight": 0}}, "datasets.spell_backward.weight=0.0: must be > 0"),
        ({"spell_backward": {"weight": "much"}}, "datasets.spell_backward.weight='much'"),
        ({"spell_backward": 3}, "datasets.spell_backward=3: must be a mapping"),
        ({"spell_backward": {"size": "big"}}, "datasets.spell_backward: seed=None, size='big': must be integers"),
        ({"composite": {}}, "datasets.composite: name each dataset under `datasets` instead"),
    ],
)
def test_bad_settings_name_the_key(datasets, named):
    with pytest.raises(ValueError) as err:
        ReasoningGym.check_config(make_cfg(datasets))
    assert named in str(err.value)
    if "max_len" in str(datasets):
        assert "'max_len'" in str(err.value) and "max_word_len" in str(err.value), "the bad field and the good ones"


def test_launch_validation_names_the_task_key(hydra_compose):
    from rlrun.config import ConfigError, validate

    cfg = hydra_compose("task=reasoning_gym", "+task.datasets.nope={}")
    named = r"task\.datasets\.nope: no such reasoning-gym dataset; there are: .*spell_backward"
    with pytest.raises(ConfigError, match=named):
        validate(cfg)
    validate(hydra_compose("+experiment=spell_backward"))


def test_module_import_is_cheap_and_datasets_are_built_once_per_process(env):
    code = "import sys, rlrun.envs.reasoning_gym_env; print('reasoning_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    other = ReasoningGym(make_cfg(num_eval_prompts=16))
    assert other.train_dataset("spell_backward") is env.train_dataset("spell_backward")
    assert env.library_loggers == ["reasoning_gym"]


def test_scored_in_worker_processes_as_in_process(tmp_path, env):
    from rlrun.config import EnvWorkersConfig
    from rlrun.envs.workers import EnvWorkerPool

    examples = env.sample(random.Random(5), 6)
    completions = [ex.answer + "</s>" for ex in examples[:3]] + [" " + ex.answer[::-1] for ex in examples[3:]]
    cfg = make_cfg(num_eval_prompts=16)
    with EnvWorkerPool(cfg, EnvWorkersConfig(num_workers=1), tmp_path / "logs") as pool:
        scores = pool.score(completions, examples)
        assert pool.take_error_counts()["score"] == 0
    assert scores == [env.score(c, ex) for c, ex in zip(completions, examples)]
    assert [s["score"] for s in scores[:3]] == [1.0] * 3
    assert "ready: reasoning_gym" in (tmp_path / "logs" / "env_workers" / "reasoning_gym.log").read_text()


# ---------------------------------------------------------------- the whole app


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_app_run_reports_rewards_to_every_tracker(tmp_path):
    from conftest import app_env, metrics, run_app

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_app(
        run_dir, "task=reasoning_gym", "sft.max_steps=0", "max_steps=3", "orchestrator.batch_size=4",
        "orchestrator.group_size=4", "model.max_position_embeddings=128", "logger=[jsonl,mlflow,tensorboard]",
        f"logger.mlflow.tracking_uri={uri}", env=app_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="true"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [1, 2, 3]
    keys = ("reward", "rewards/score/mean")

    records = metrics(run_dir, "orchestrator")
    assert [r["step"] for r in records] == steps
    for record in records:
        for key in (*keys, "reasoning_gym/errors/score"):
            assert key in record["metrics"], (record["step"], key)
        assert 0.0 <= record["metrics"]["rewards/score/mean"] <= 1.0
        assert record["metrics"]["reasoning_gym/errors/score"] == 0.0, "no scoring error"

    import yaml
    from mlflow import MlflowClient

    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["mlflow"]["run_id"]
    client = MlflowClient(uri)
    for key in keys:
        assert sorted(m.step for m in client.get_metric_history(run_id, f"orchestrator/{key}")) == steps, key

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*") if "orchestrator" in str(p)}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for key in keys:
        assert [e.step for e in acc.Scalars(key)] == steps, key

    log = (run_dir / "logs" / "env_workers" / "reasoning_gym.log").read_text()
    assert "ready: reasoning_gym" in log
