"""The trainer: the loss by hand, the logprobs it recomputes, and the real job end to end."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, metrics, records
from omegaconf import OmegaConf

from rlrun.batch import write_batch
from rlrun.config import RunConfig
from rlrun.job import StopFlag
from rlrun.model import encode_prompt, load_model, load_weights
from rlrun.rundir import list_steps, read_json, wait_for
from rlrun.trainer.loss import LOSS_TYPES, normalizer, per_token_loss, reduce_loss
from rlrun.trainer.dist import Ranks, gather_token_values
from rlrun.trainer.step import forward_backward, token_logprobs

METRICS = [
    "loss", "grad_norm", "lr", "entropy", "num_loss_tokens", "tokens/s",
    "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
    "clip_ratio/region_mean", "time/wait_for_batch", "time/forward_backward", "time/optimizer_step",
    "time/save_weights", "time/step", "perf/tokens_per_s", "perf/mfu", "idle/trainer_wait_frac",
    "mismatch/kl", "mismatch/logprob_diff_mean", "mismatch/logprob_diff_max", "mismatch/ppl_ratio",
    "mismatch/token_ratio_min", "mismatch/token_ratio_mean", "mismatch/token_ratio_max", "mismatch/seq_ratio_min",
    "mismatch/seq_ratio_mean", "mismatch/seq_ratio_max",
]  # fmt: skip


# ---------------------------------------------------------------- the loss, by hand


def grpo_loss(logprobs, old_logprobs, advantages, loss_mask, clip_eps_low=0.2, clip_eps_high=0.28,
              ref_logprobs=None, kl_coef=0.0, token_values=None, loss_type="dapo", max_tokens=None):  # fmt: skip
    """The loss of one batch alone (one rank, one micro-batch), put together as `forward_backward` does."""
    per_token, stats = per_token_loss(logprobs, old_logprobs, advantages, loss_mask, loss_type, clip_eps_low,
                                      clip_eps_high, ref_logprobs, kl_coef, token_values)  # fmt: skip
    tokens = float((loss_mask > 0).sum())
    denominator = normalizer(loss_type, batch_tokens=tokens, rank_tokens=tokens, rank_rows=logprobs.shape[0],
                             max_tokens=max_tokens or logprobs.shape[1])  # fmt: skip
    return reduce_loss(per_token, loss_mask, loss_type) / denominator, stats


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def test_ratio_one_gives_minus_the_token_mean_advantage():
    lp = torch.log(torch.full((2, 4), 0.3))
    mask = _mask([3, 1], 4)  # 3 tokens with A=1, 1 token with A=-2
    loss, stats = grpo_loss(lp, lp.clone(), torch.tensor([1.0, -2.0]), mask)
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0) / 4)
    assert all(stats[k].item() == 0.0 for k in stats)
    assert "kl" not in stats


def test_padding_never_reaches_the_loss():
    lp = torch.zeros(1, 3, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    garbage = torch.tensor([[0.0, float("nan"), float("inf")]])
    loss, _ = grpo_loss(lp + garbage, old, torch.tensor([1.0]), _mask([1], 3))
    loss.backward()
    assert loss.item() == -1.0 and torch.isfinite(lp.grad).all()


def test_clipping_engages_exactly_past_the_asymmetric_bounds():
    eps_low, eps_high = 0.2, 0.28
    ratios = torch.tensor([[1.27, 1.29, 0.81, 0.79], [1.29, 0.79, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -1.0])
    old = torch.full_like(ratios, -1.0)
    lp = (old + ratios.log()).requires_grad_(True)
    loss, stats = grpo_loss(lp, old, advantages, torch.ones_like(ratios), eps_low, eps_high)
    # Row 0 (A>0): only 1.29 > 1.28 is clipped (high). Row 1 (A<0): only 0.79 < 0.8 (low).
    # 0.79 with A>0 and 1.29 with A<0 are outside the clip range but not clipped: the
    # pessimistic min keeps the unclipped term there.
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 8)
    assert stats["clip_ratio/high_max"].item() == pytest.approx(1 / 8)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 8)
    assert stats["clip_ratio/low_min"].item() == pytest.approx(1 / 8)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 8)
    per_token = torch.tensor([[-1.27, -1.28, -0.81, -0.79], [1.29, 0.80, 1.0, 1.0]])
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-6)

    loss.backward()
    clipped = torch.tensor([[False, True, False, False], [False, True, False, False]])
    assert (lp.grad[clipped] == 0).all()
    # d(-ratio*A/N)/d(logprob) = -ratio*A/N elsewhere.
    expected = -(ratios * advantages[:, None]) / 8
    torch.testing.assert_close(lp.grad[~clipped], expected[~clipped])


def test_clip_stats_count_only_masked_tokens():
    ratios = torch.tensor([[1.5, 1.5, 1.5]])
    old = torch.zeros_like(ratios)
    _, stats = grpo_loss(old + ratios.log(), old, torch.tensor([1.0]), _mask([2], 3))
    assert stats["clip_ratio/high_mean"].item() == 1.0


def test_kl_term_is_zero_at_the_reference_and_k3_elsewhere():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    loss, stats = grpo_loss(lp, lp, adv, mask, ref_logprobs=lp.clone(), kl_coef=0.5)
    assert stats["kl"].item() == 0.0 and loss.item() == pytest.approx(-1.0)

    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, stats = grpo_loss(lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.5)
    k3 = 0.5 - torch.log(torch.tensor(0.5)).item() - 1  # exp(log 1/2) - log(1/2) - 1 on the first token
    assert stats["kl"].item() == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(-1.0 + 0.5 * k3 / 2)


def _two_sequences(ratios: list[list[float]] | None = None):
    """Two sequences of 2 and 1 tokens (width 3), advantages 1 and -3, logprobs log(1/2)."""
    mask = _mask([2, 1], 3)
    lp = torch.full((2, 3), math.log(0.5), requires_grad=True)
    ratio = torch.tensor(ratios) if ratios else torch.ones(2, 3)
    return lp, lp.detach() - ratio.log(), torch.tensor([1.0, -3.0]), mask


@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", (-1 - 1 + 3) / 3),  # token sum / tokens
    ("bnpo", (-1 - 1 + 3) / 3),  # the same on one batch (it differs across ranks: local tokens)
    ("grpo", ((-1 - 1) / 2 + 3 / 1) / 2),  # mean over sequences of each one's token mean
    ("gspo", ((-1 - 1) / 2 + 3 / 1) / 2),  # ratio 1 everywhere: as grpo
    ("dr_grpo", (-1 - 1 + 3) / (2 * 4)),  # token sum / (sequences * max_tokens)
    ("cispo", (math.log(2) * (1 + 1 - 3)) / 3),  # -w * A * logprob, w = 1: A * log 2 per token
])  # fmt: skip
def test_loss_types_on_policy_by_hand(loss_type, expected):
    lp, old, adv, mask = _two_sequences()
    loss, _ = grpo_loss(lp, old, adv, mask, loss_type=loss_type, max_tokens=4)
    assert loss.item() == pytest.approx(expected)


def test_gspo_uses_one_ratio_per_sequence_by_hand():
    # Sequence 0 (A=1): token ratios 1.1 and 1.3 -> one ratio sqrt(1.1 * 1.3) = 1.1958, inside the clip.
    # Sequence 1 (A=-3): ratio 0.5 < 0.8 with A<0 -> clipped to 0.8: loss 2.4.
    lp, old, adv, mask = _two_sequences([[1.1, 1.3, 1.0], [0.5, 1.0, 1.0]])
    seq_ratio = math.sqrt(1.1 * 1.3)
    loss, stats = grpo_loss(lp, old, adv, mask, loss_type="gspo")
    assert loss.item() == pytest.approx((-seq_ratio + 2.4) / 2)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3) and stats["clip_ratio/high_mean"].item() == 0
    # Token level (grpo): 1.3 is clipped to 1.28 for A>0, so the sequence mean differs.
    token_loss, _ = grpo_loss(lp, old, adv, mask, loss_type="grpo")
    assert token_loss.item() == pytest.approx(((-1.1 - 1.28) / 2 + 2.4) / 2)


def test_cispo_weighs_the_logprob_by_the_truncated_ratio_by_hand():
    lp, old, adv, mask = _two_sequences([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss, stats = grpo_loss(lp, old, adv, mask, loss_type="cispo")
    # -sg(min(ratio, 1.28)) * A * logprob, token mean: weights 1.28, 1 (A=1) and 1 (A=-3), logprob -log 2.
    assert loss.item() == pytest.approx(math.log(2) * (1.28 + 1.0 - 3.0) / 3)
    loss.backward()  # the weight carries no gradient: d/d logprob = -w * A / 3
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.28 / 3, -1 / 3, 0.0], [1.0, 0.0, 0.0]]))
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 3), "the truncated token"


def test_mask_truncated_completions_drops_their_tokens(tmp_path, tiny):
    """`trainer.mask_truncated_completions`: rows cut off at max_tokens get no loss (TRL's)."""
    run, (_, model, tokenizer) = tmp_path, tiny
    batch = _batch_tensors(_rows(tokenizer), ADVANTAGES, model, temperature=1.0)
    batch["truncated"] = torch.tensor([1.0] + [0.0] * (batch["input_ids"].shape[0] - 1))
    from rlrun.trainer.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # only the batch-reading part, on a batch written to disk
    trainer.cfg = OmegaConf.create({"orchestrator": {"temperature": 1.0}})
    trainer.tcfg = OmegaConf.create({"mask_truncated_completions": True})
    trainer.run_dir, trainer.stop, trainer.ranks = run, StopFlag(), Ranks()
    write_batch(run, 1, batch, {"policy_version": 0, "temperature": 1.0})
    rows, _ = trainer._wait_for_batch(1)
    assert rows["loss_mask"][0].sum() == 0 and rows["loss_mask"][1:].sum() == batch["loss_mask"][1:].sum()
    trainer.tcfg.mask_truncated_completions = False
    rows, _ = trainer._wait_for_batch(1)
    assert torch.equal(rows["loss_mask"], batch["loss_mask"])


# ---------------------------------------------------------------- the recomputed logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tokenizer = load_model(tiny_model)
    return tiny_model, model, tokenizer


def test_token_logprobs_match_the_sampler(tiny):
    """The trainer's log_softmax(logits / T) at t-1 is what the engine recorded for token t."""
    from rlrun.inference.engine import Engine

    _, model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, "abc="), encode_prompt(tokenizer, "hgfed=")]
    engine = Engine(model, tokenizer)
    completions = [c for group in engine.generate(prompts, n=3, max_tokens=6, temperature=0.7, seed=0) for c in group]
    rows = [(prompts[i // 3], c) for i, c in enumerate(completions)]
    tensors = _batch_tensors([(p, c.token_ids) for p, c in rows], [0.0] * len(rows), model, temperature=1.0)
    lp, entropy = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"], 0.7)
    mask = tensors["loss_mask"][:, 1:].bool()
    expected = torch.tensor([x for _, c in rows for x in c.logprobs])
    torch.testing.assert_close(lp[mask], expected, atol=1e-4, rtol=0)
    assert (entropy[mask] > 0).all() and not entropy.requires_grad
    model.train()  # the engine put it in eval mode; nothing else in this module cares


def test_token_logprobs_match_a_sampler_kept_off_special_tokens(tiny):
    """With the orchestrator's logit_bias, the engine never emits <pad>/<s>/<unk>, and the trainer's
    logprobs (the same bias from the batch's meta) are still exactly the sampler's."""
    from rlrun.inference.engine import Engine
    from rlrun.model import special_token_bias
    from rlrun.model import bias_tensor

    _, model, tokenizer = tiny
    ban = special_token_bias(tokenizer)
    assert set(ban) == set(tokenizer.all_special_ids) - {tokenizer.eos_token_id} and len(ban) == 3
    prompts = [encode_prompt(tokenizer, "abc="), encode_prompt(tokenizer, "hgfed=")]
    engine = Engine(model, tokenizer)
    groups = engine.generate(prompts, n=16, max_tokens=12, temperature=1.5, seed=0, logit_bias=ban)
    completions = [c for group in groups for c in group]
    assert not {t for c in completions for t in c.token_ids} & set(ban), "banned tokens never sampled"
    unbiased = [c for g in engine.generate(prompts, n=16, max_tokens=12, temperature=1.5, seed=0) for c in g]
    assert {t for c in unbiased for t in c.token_ids} & set(ban), "without the bias this untrained model emits them"

    rows = [(prompts[i // 16], c) for i, c in enumerate(completions)]
    tensors = _batch_tensors([(p, c.token_ids) for p, c in rows], [0.0] * len(rows), model, temperature=1.0)
    bias = bias_tensor({str(t): b for t, b in ban.items()}, model.get_output_embeddings().weight.shape[0])  # as meta.json
    lp, _ = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"], 1.5, bias)
    mask = tensors["loss_mask"][:, 1:].bool()
    torch.testing.assert_close(lp[mask], torch.tensor([x for _, c in rows for x in c.logprobs]), atol=1e-4, rtol=0)
    plain, _ = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"], 1.5)
    assert (plain[mask] < lp[mask] - 1e-3).all(), "without the bias the trainer would see another distribution"
    model.train()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_change_nothing_but_memory(tiny, loss_type):
    _, model, tokenizer = tiny
    model.eval()
    batch = _batch_tensors(_rows(tokenizer), ADVANTAGES, model, temperature=1.0)
    batch["old_logprobs"] = batch["old_logprobs"] - 0.3 * batch["loss_mask"]  # ratios past the clip
    results = []
    for size in (None, 3):
        model.zero_grad()
        stats = forward_backward(model, batch, 1.0, 0.2, 0.28, kl_coef=0.5, ref_model=model, micro_batch_size=size,
                                 loss_type=loss_type, max_tokens=8)  # fmt: skip
        results.append((stats, [p.grad.clone() for p in model.parameters()]))
    model.zero_grad()
    (whole, grads_whole), (micro, grads_micro) = results
    assert whole.keys() == micro.keys() and whole["clip_ratio/high_mean"] > 0
    for name in whole:
        assert micro[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name
    for a, b in zip(grads_whole, grads_micro):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_per_token_values_only_when_asked(tiny):
    """Logging steps get every masked token's entropy, ratio and loss; the scalars are the same either way."""
    _, model, tokenizer = tiny
    model.eval()
    batch = _batch_tensors(_rows(tokenizer), ADVANTAGES, model, temperature=1.0)
    batch["old_logprobs"] = batch["old_logprobs"] - 0.3 * batch["loss_mask"]  # ratio exp(0.3) everywhere
    num_tokens = int(batch["loss_mask"][:, 1:].sum())
    plain = forward_backward(model, batch, 1.0, 0.2, 0.28)
    gathered = []
    for size in (None, 3):
        values: dict = {}
        model.zero_grad()
        stats = forward_backward(model, batch, 1.0, 0.2, 0.28, micro_batch_size=size, token_values=values)
        assert stats == pytest.approx(plain, rel=1e-5, abs=1e-7), "asking for values changes no scalar"
        assert sorted(values) == ["entropy", "importance_ratio", "per_token_loss"]
        assert all(not v.requires_grad for parts in values.values() for v in parts)
        gathered.append(gather_token_values(values, Ranks()))
    model.zero_grad()
    whole, micro = gathered
    for name, tensor in whole.items():
        assert tensor.shape == (num_tokens,) and tensor.device.type == "cpu", name
        torch.testing.assert_close(micro[name], tensor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole["importance_ratio"], torch.full((num_tokens,), 0.3).exp(), atol=1e-4, rtol=0)
    assert whole["per_token_loss"].mean().item() == pytest.approx(plain["loss"], rel=1e-5)
    assert whole["entropy"].mean().item() == pytest.approx(plain["entropy"], rel=1e-5)


# ---------------------------------------------------------------- the job


PROMPTS = ["abc=", "hgf="]
COMPLETIONS = [["cba", "aaaa", "cb", "xyz"], ["fgh", "h", "ggg", "abcd"]]  # the first of each is rewarded
ADVANTAGES = [1.5, -0.5, -0.5, -0.5] * 2


def _batch_tensors(rows, advantages, model, temperature):
    width = max(len(p) + len(c) for p, c in rows)
    n = len(rows)
    input_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width))
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        loss_mask[i, len(p) : len(p) + len(c)] = 1.0
    with torch.no_grad():  # old_logprobs: an independent teacher-forced pass, row by row
        old = torch.zeros((n, width))
        for i, (p, c) in enumerate(rows):
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
            for j, token in enumerate(c):
                old[i, len(p) + j] = logp[len(p) + j - 1, token]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "old_logprobs": old,
        "advantages": torch.tensor(advantages, dtype=torch.float32),
    }


def _rows(tokenizer):
    eos = tokenizer.eos_token_id
    return [
        (encode_prompt(tokenizer, p), tokenizer.encode(c, add_special_tokens=False) + [eos])
        for p, group in zip(PROMPTS, COMPLETIONS)
        for c in group
    ]


def _rewarded_logprob(model, tokenizer) -> float:
    """Sum of the rewarded completions' logprobs (temperature 1)."""
    rows = [r for i, r in enumerate(_rows(tokenizer)) if ADVANTAGES[i] > 0]
    t = _batch_tensors(rows, [1.0] * len(rows), model, 1.0)
    with torch.no_grad():
        lp, _ = token_logprobs(model, t["input_ids"], t["attention_mask"], 1.0)
    return float((lp * t["loss_mask"][:, 1:]).sum())


def _new_run(root: Path, tiny, max_steps: int, **trainer) -> Path:
    run = root / "run"
    shutil.copytree(tiny[0], run / "model")
    cfg = OmegaConf.structured(RunConfig(output_dir=str(run), max_steps=max_steps, log_level="DEBUG"))
    cfg.trainer.checkpoint_interval = 2
    cfg.trainer.keep_last = 3
    for key, value in trainer.items():
        cfg.trainer[key] = value
    OmegaConf.save(cfg, run / "config.yaml")
    return run


def _write_batches(run: Path, tiny, steps) -> None:
    _, model, tokenizer = tiny
    model.eval()
    tensors = _batch_tensors(_rows(tokenizer), ADVANTAGES, model, temperature=1.0)
    for step in steps:
        write_batch(run, step, tensors, {"policy_version": 0, "temperature": 1.0})


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _trainer(run: Path, *overrides: str, nproc: int = 1, timeout: float = 60) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "rlrun.trainer", "--config", str(run / "config.yaml"), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A 3-step run of the real job on 3 synthetic batches."""
    run = _new_run(tmp_path_factory.mktemp("e2e"), tiny, max_steps=3)
    _write_batches(run, tiny, [1, 2, 3])
    return run, _trainer(run, "perf.peak_flops=1e12")  # MFU on the CPU needs a peak to divide by


def test_trainer_job_trains_publishes_checkpoints_and_logs(trained, tiny):
    run, result = trained
    assert result.returncode == 0, result.stdout + result.stderr
    assert list_steps(run / "weights") == [1, 2, 3]
    assert list_steps(run / "checkpoints") == [2, 3]  # every 2 steps and at the last
    for step in (2, 3):
        folder = run / "checkpoints" / f"step_{step}"
        assert read_json(folder / "state.json")["step"] == step
        assert (folder / "model.safetensors").is_file() and (folder / "optimizer.pt").is_file()
    assert not [p for p in (run / "weights").iterdir() if p.name.startswith(".")]  # no staging left over

    steps = metrics(run, "trainer")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert set(METRICS) <= set(r["metrics"]), set(METRICS) - set(r["metrics"])
        assert "kl" not in r["metrics"]
        assert r["metrics"]["num_loss_tokens"] == sum(len(c) for _, c in _rows(tiny[2]))
    assert "off_policy_steps" not in steps[0]["metrics"], "the orchestrator logs how old the sampler was"
    log = (run / "logs" / "trainer" / "rank_0.log").read_text()
    assert [line.split("sampled by ")[1].split()[0] for line in log.splitlines() if "sampled by" in line] == ["v0"] * 3
    assert steps[0]["metrics"]["loss"] == pytest.approx(-sum(  # step 1 is on-policy: ratio 1
        a * len(c) for a, (_, c) in zip(ADVANTAGES, _rows(tiny[2]))) / steps[0]["metrics"]["num_loss_tokens"], abs=1e-5)
    assert steps[0]["metrics"]["clip_ratio/region_mean"] == 0.0
    m = steps[0]["metrics"]  # the batch's old_logprobs are these weights' own: no mismatch
    assert m["mismatch/kl"] < 1e-6 and m["mismatch/logprob_diff_max"] < 1e-3 and m["mismatch/token_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    from rlrun.trainer.perf import flops_per_token

    tokens = sum(len(p) + len(c) for p, c in _rows(tiny[2]))
    width = max(len(p) + len(c) for p, c in _rows(tiny[2]))
    for r in steps:
        m = r["metrics"]
        assert m["perf/tokens_per_s"] == pytest.approx(tokens / m["time/step"], rel=1e-3)
        assert m["perf/mfu"] == pytest.approx(flops_per_token(tiny[1], width) * tokens / m["time/step"] / 1e12, rel=1e-3)
        assert m["idle/trainer_wait_frac"] == pytest.approx(m["time/wait_for_batch"] / m["time/step"], rel=1e-3)
    hyper = records(run, "trainer", "hyperparams")
    assert len(hyper) == 1 and hyper[0]["params"]["trainer.lr"] == 3e-3
    assert not records(run, "trainer", "distribution"), "log_extras is off by default"

    log = (run / "logs" / "trainer" / "rank_0.log").read_text()
    for step in (1, 2, 3):
        assert f"step {step}/3 | loss " in log

    # Training moved probability onto the rewarded completions.
    model, tokenizer = load_model(run / "model")
    before = _rewarded_logprob(model, tokenizer)
    load_weights(model, run / "weights" / "step_3")
    after = _rewarded_logprob(model, tokenizer)
    assert after > before + 0.1, (before, after)


def test_trainer_resumes_after_its_newest_checkpoint_and_stops_on_sigterm(trained, tiny, tmp_path):
    """Resume after checkpoint 3 with batch 4 there, then SIGTERM while waiting for batch 5."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "weights" / "step_3")  # as after a crash: the parent removes newer weights
    _write_batches(run, tiny, [4])
    log = run / "logs" / "trainer" / "rank_0.log"
    log.unlink()
    cmd = [sys.executable, "-m", "rlrun.trainer", "--config", str(run / "config.yaml"), "max_steps=5"]
    cmd.append(f"output_dir={run}")  # the copied config names the old run dir
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def step_4_done() -> bool:
        if log.is_file() and "step 4/5 | loss" in log.read_text():
            return True
        assert proc.poll() is None, proc.stdout.read()
        return False

    try:
        wait_for(step_4_done, "step 4 to finish", timeout_s=60, poll_s=0.05, max_poll_s=0.1)
        time.sleep(0.3)  # now waiting for rollouts/step_5
        proc.send_signal(signal.SIGTERM)
        # It stops on the signal (TimeoutExpired otherwise): it would wait for batch 5 for good.
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "resumed from checkpoints/step_3" in text and "step 3/" not in text
    assert "stopped by signal 15 (before step 5); trainer exiting cleanly" in text
    assert [r["step"] for r in metrics(run, "trainer")] == [1, 2, 3, 4]  # each step once
    assert list_steps(run / "weights") == [2, 3, 4]  # step 3 re-published from the checkpoint; keep_last=3
    assert list_steps(run / "checkpoints") == [3, 4]
    model, _ = load_model(run / "model")
    load_weights(model, run / "checkpoints" / "step_3")
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, run / "weights" / "step_3")
    assert all(torch.equal(ckpt[k], v) for k, v in model.state_dict().items())


def test_trainer_two_ranks(trained, tmp_path, tiny):
    """Two ranks take the same step as one process: the loss is a token mean over the whole batch.

    Distributions (every 2 steps) hold every token of the batch, gathered from both ranks.
    """
    run = _new_run(tmp_path, tiny, max_steps=2, kl_coef=0.1)
    _write_batches(run, tiny, [1, 2])
    result = _trainer(run, "trainer.log_extras.distributions=true", "trainer.log_extras.interval=2", nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        log = (run / "logs" / "trainer" / f"rank_{rank}.log").read_text()
        assert f"trainer rank {rank}/2" in log and "step 2/2 | loss " in log
    steps = metrics(run, "trainer")
    assert [r["step"] for r in steps] == [1, 2]
    total = sum(len(c) for _, c in _rows(tiny[2]))
    for r in steps:
        assert r["metrics"]["num_loss_tokens"] == total  # summed over both ranks' rows
        assert "kl" in r["metrics"]
    assert steps[0]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    # At step 1 the KL term and its gradient are 0, so the step is the one-process step of `trained`.
    alone = metrics(trained[0], "trainer")[0]["metrics"]
    for name in ("loss", "grad_norm", "num_loss_tokens"):
        assert steps[0]["metrics"][name] == pytest.approx(alone[name], rel=1e-5), name
    assert list_steps(run / "weights") == [1, 2] and list_steps(run / "checkpoints") == [2]

    dists = records(run, "trainer", "distribution")
    assert sorted((r["step"], r["name"]) for r in dists) == [
        (2, "distributions/entropy"), (2, "distributions/importance_ratio"), (2, "distributions/per_token_loss"),
    ], "only on logging steps, once (rank 0)"  # fmt: skip
    assert all(len(r["values"]) == total for r in dists), "both ranks' tokens"
    (loss,) = [r["values"] for r in dists if r["name"] == "distributions/per_token_loss"]
    assert sum(loss) / total == pytest.approx(steps[1]["metrics"]["loss"], rel=1e-4), "the batch's token mean"


# ---------------------------------------------------------------- mismatch and importance-sampling correction


def test_is_weights_by_hand():
    from rlrun.trainer.loss import is_weights

    log_rho = torch.log(torch.tensor([[3.0, 0.25, 1.0], [3.0, 3.0, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    log_rho = torch.where(mask, log_rho, 0.0)
    assert is_weights(log_rho, mask, "none", 2.0) == (None, {})
    weight, stats = is_weights(log_rho, mask, "token_truncate", 2.0)
    torch.testing.assert_close(weight, torch.tensor([[2 / 3, 1.0, 1.0], [2 / 3, 2 / 3, 1.0]]))
    assert float(stats["is/truncated_frac"]) == pytest.approx(3 / 5)
    weight, stats = is_weights(log_rho, mask, "token_mask", 2.0)  # keep rho in [0.5, 2]
    torch.testing.assert_close(weight, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    assert float(stats["is/masked_frac"]) == pytest.approx(4 / 5)
    weight, stats = is_weights(log_rho, mask, "sequence_mask", 2.0)  # geometric means 0.75^(1/3) = 0.91 and 3
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert float(stats["is/masked_frac"]) == pytest.approx(2 / 5)


def test_token_truncate_caps_a_tokens_importance_weight():
    """TIS: with rho = 3 > cap = 2, the token's loss is scaled by 2/3, so its gradient
    d loss / d logprob = -A * rho * (cap / rho) = -A * cap."""
    logprobs = torch.tensor([[math.log(0.3)]], requires_grad=True)
    old = torch.tensor([[math.log(0.1)]])  # rho = 3
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 1)
    per_token, stats = per_token_loss(logprobs, old, adv, mask, "dapo", 0.2, 0.28, is_correction="token_truncate",
                                      is_cap=2.0)  # fmt: skip
    assert float(per_token.detach()) == pytest.approx(3.0 * 2 / 3)  # -min(3 * -1, 1.28 * -1) = 3, times 2/3
    per_token.sum().backward()
    assert float(logprobs.grad) == pytest.approx(2.0)
    assert float(stats["is/truncated_frac"]) == 1.0
    masked, stats = per_token_loss(logprobs.detach(), old, adv, mask, "dapo", 0.2, 0.28, is_correction="token_mask")
    assert float(masked) == 0.0 and float(stats["is/masked_frac"]) == 1.0


def test_mismatch_stats_by_hand():
    from rlrun.trainer.loss import mismatch_stats

    new = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    old = torch.tensor([[-1.1, -2.0], [-0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    d = [0.1, 0.0, 0.2]

    def near(x):  # the inputs are float32
        return pytest.approx(x, rel=1e-5, abs=1e-7)

    stats = mismatch_stats(new, old, mask)
    assert stats["mismatch/kl"] == near(sum(math.exp(x) - 1 - x for x in d) / 3)
    assert stats["mismatch/logprob_diff_mean"] == near(0.1) and stats["mismatch/logprob_diff_max"] == near(0.2)
    assert stats["mismatch/ppl_ratio"] == near(math.exp(-0.1))
    assert stats["mismatch/token_ratio_min"] == near(1.0)
    assert stats["mismatch/token_ratio_max"] == near(math.exp(0.2))
    assert stats["mismatch/seq_ratio_min"] == near(math.exp(0.1))
    assert stats["mismatch/seq_ratio_max"] == near(math.exp(0.2))
    assert stats["mismatch/seq_ratio_mean"] == near((math.exp(0.1) + math.exp(0.2)) / 2)


def test_a_sampler_at_another_temperature_shows_as_mismatch(tiny):
    """The engine samples at T=1.0; the trainer scoring at T=1.0 sees no mismatch (float noise),
    at T=0.5 (a wrong temperature on one side) a clear one."""
    from rlrun.inference.engine import Engine

    _, model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, "abc="), encode_prompt(tokenizer, "hgfed=")]
    groups = Engine(model, tokenizer).generate(prompts, n=8, max_tokens=8, temperature=1.0, seed=0)
    rows = [(prompts[i // 8], c) for i, c in enumerate(c for group in groups for c in group)]
    batch = _batch_tensors([(p, c.token_ids) for p, c in rows], [0.0] * len(rows), model, temperature=1.0)
    for i, (p, c) in enumerate(rows):  # the sampler's own logprobs, as the orchestrator writes them
        batch["old_logprobs"][i, len(p) : len(p) + len(c.token_ids)] = torch.tensor(c.logprobs)
    same = forward_backward(model, batch, 1.0, 0.2, 0.28)
    other = forward_backward(model, batch, 0.5, 0.2, 0.28)
    model.zero_grad()
    model.train()
    assert same["mismatch/kl"] < 1e-6 and same["mismatch/logprob_diff_max"] < 1e-3
    assert abs(same["mismatch/token_ratio_mean"] - 1.0) < 1e-3 and abs(same["mismatch/ppl_ratio"] - 1.0) < 1e-3
    assert other["mismatch/kl"] > max(1e-3, 1e3 * same["mismatch/kl"]) and other["mismatch/logprob_diff_max"] > 0.1
    assert other["mismatch/seq_ratio_max"] > other["mismatch/seq_ratio_min"] > 0


def test_flops_per_token_and_peak_by_hand(tiny):
    from rlrun.trainer.perf import flops_per_token, peak_flops

    model = tiny[1]
    cfg = model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    # Llama block: q,k,v,o (4 h^2, no biases) + gate/up/down (3 h i) + 2 RMSNorm weights (2 h); final norm h.
    params = layers * (4 * h * h + 3 * h * i + 2 * h) + h  # the (tied) embedding is left out
    assert flops_per_token(model, 20) == 6 * params + 12 * layers * h * 20
    assert peak_flops("cpu", None) is None and peak_flops("cpu", 5e12) == 5e12
