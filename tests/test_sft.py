"""The SFT job: its data, and the stage before RL as `python -m rlrun` runs it (`sft.max_steps > 0`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import metrics, run_app

from rlrun.config import ConfigError, TaskConfig, validate
from rlrun.envs.reverse_text import ReverseText
from rlrun.model import load_tokenizer
from rlrun.batch import pad_sequences
from rlrun.sft.data import batches, read_jsonl_pairs, tokenize_pair


def test_jsonl_pairs_cycle_through_every_pair_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{c}=", "completion": c}) for c in "abcde") + "\n")
    stream = batches(None, str(path), batch_size=5, seed=0)
    first, second = next(stream), next(stream)
    assert sorted(first) == sorted(second) == [(f"{c}=", c) for c in "abcde"], "each epoch is every pair once"
    path.write_text('{"prompt": "a=", "completion": "a"}\n{"prompt": "b="}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        read_jsonl_pairs(path)


def test_task_pairs_tokenize_with_eos_and_only_completions_are_trained(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    env = ReverseText(TaskConfig())
    (example, answer), *_ = next(batches(env, None, batch_size=4, seed=0))
    assert answer == example.prompt[:-1][::-1], "the task's reference answer"
    prompt_ids, completion_ids = tokenize_pair(tokenizer, example, answer)
    assert prompt_ids == tokenize_pair(tokenizer, example.prompt, answer)[0], "no chat template: the prompt's text"
    assert completion_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(completion_ids[:-1]) == answer
    batch = pad_sequences([(prompt_ids, completion_ids), ([1, 2], [3])], pad_id=0)
    width = len(prompt_ids) + len(completion_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["loss_mask"][0].tolist() == [0.0] * len(prompt_ids) + [1.0] * len(completion_ids)
    assert batch["loss_mask"][1].tolist() == [0.0, 0.0, 1.0] + [0.0] * (width - 3)
    assert torch.equal(batch["attention_mask"][1, :3], torch.ones(3, dtype=torch.long))


def test_sft_data_file_must_exist(hydra_compose, tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.data"):
        validate(hydra_compose(f"sft.data={tmp_path / 'missing.jsonl'}"))
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a=", "completion": "a"}\n')
    validate(hydra_compose(f"sft.data={tmp_path / 'pairs.jsonl'}"))


@pytest.mark.slow
def test_sft_stage_runs_first_and_rl_starts_from_its_weights(tmp_path):
    run_dir = tmp_path / "run"
    out = run_app(run_dir, "sft.max_steps=40", "sft.eval_interval=20", "max_steps=2", "trainer.lr=2e-4", timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    sft = metrics(run_dir, "sft")
    assert [r["step"] for r in sft] == list(range(1, 41))
    losses = [r["metrics"]["loss"] for r in sft]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, f"the cross-entropy falls: {losses[:5]} ... {losses[-5:]}"
    for r in sft:
        assert {"loss", "grad_norm", "lr", "tokens/s", "num_loss_tokens", "num_tokens", "time/step"} <= set(r["metrics"])
    assert sft[-1]["metrics"]["num_tokens"] == sum(r["metrics"]["num_loss_tokens"] for r in sft), "cumulative"
    evaluated = [r["step"] for r in sft if "eval/reward" in r["metrics"]]
    assert evaluated == [20, 40] and "eval/rewards/exact/mean" in sft[-1]["metrics"]
    assert (run_dir / "logs" / "sft" / "rank_0.log").is_file() and (run_dir / "sft" / "model" / "config.json").is_file()

    rl_log = (run_dir / "logs" / "rl.log").read_text()
    assert rl_log.index("sft stage finished") < rl_log.index("started inference"), "SFT first, then RL"
    trainer_log = (run_dir / "logs" / "trainer" / "rank_0.log").read_text()
    assert f"{run_dir / 'sft' / 'model'}, steps 1..2" in trainer_log, "RL trains the SFT stage's policy"
    assert f"optimizer state from {run_dir / 'sft' / 'model' / 'optimizer.pt'} (lr 0.0002)" in trainer_log, "SFT's AdamW state, at RL's lr"
    assert [r["step"] for r in metrics(run_dir, "trainer")] == [1, 2]

    again = run_app(run_dir, f"resume_from={run_dir}", "sft.max_steps=40", "max_steps=3", timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sft stage finished" not in (run_dir / "logs" / "rl.log").read_text(), "a finished SFT stage is not redone"
    assert [r["step"] for r in metrics(run_dir, "sft")] == list(range(1, 41))


def test_task_data_without_reference_answers_is_refused():
    """An environment with no reference answers (some verifiers tasks) cannot feed SFT on its own."""
    from rlrun.envs.base import Environment, Example

    class NoAnswers(Environment):
        name = "no_answers"

        def sample(self, rng, n, split="train"):
            return [Example(prompt="q", answer="") for _ in range(n)]

    with pytest.raises(ValueError, match=r"no_answers.*sft\.data"):
        next(batches(NoAnswers(TaskConfig()), None, batch_size=2, seed=0))
