"""The GPU path, checked on the CPU as far as it goes, the rest on a GPU (`@pytest.mark.gpu`).

- bf16 mixed precision (`rlrun/trainer/precision.py`): fp32 master weights, bf16 autocast in
  the forward, the weights handed to inference cast to its dtype;
- a short bf16 run end to end on the CPU, whose record the device check's summary
  (`scripts/gpu_check_summary.py`) reads;
- on a GPU: one GPU shared by the local inference server and the trainer, in bf16, its
  sampler/trainer mismatch bounded and the monitor's NVML readings real.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_names_planned, metrics, run_app
from omegaconf import OmegaConf

from rlrun.batch import pad_sequences
from rlrun.model import encode_prompt, load_model, load_weights, save_weights
from rlrun.trainer.precision import compute_dtype, inference_dtype, master_dtype
from rlrun.trainer.step import forward_backward, token_logprobs

SUMMARY = ROOT / "scripts" / "gpu_check_summary.py"
# bf16 mismatch/kl on one GPU, with max_async_steps=0 (the backends' disagreement alone), for the
# 512 x 8 tiny model. On the CPU the same run gives ~1e-5 per step (the default 64 x 2 model ~5e-7):
# the bounds leave 100x for CUDA's kernels (another attention, cuBLAS's bf16 reductions) and sit
# 10x / 1x under the run doctor's strict `mismatch` threshold (0.01).
BF16_KL_MEDIAN_BOUND = 1e-3
BF16_KL_MAX_BOUND = 1e-2
BIGGER_MODEL = ("model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.intermediate_size=1024")


# ---------------------------------------------------------------- mixed precision, in process


def _sampled_batch(model, tokenizer, n: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Completions sampled by a local engine on `model`, as a trainer batch, and the sampler's logprobs."""
    from rlrun.inference.engine import Engine

    prompts = [encode_prompt(tokenizer, text) for text in ("abc=", "hgfed=")]
    groups = Engine(model, tokenizer).generate(prompts, n=n, max_tokens=10, temperature=1.0, seed=0)
    rows = [(prompts[i], c.token_ids) for i, group in enumerate(groups) for c in group]
    values = [c.logprobs for group in groups for c in group]
    batch = pad_sequences(rows, tokenizer.pad_token_id, values)
    batch["advantages"] = torch.linspace(-1, 1, len(rows))
    return batch, torch.tensor([x for v in values for x in v])


def test_bf16_trains_fp32_weights_under_bf16_autocast(tiny_model):
    """`model.dtype=bfloat16`: the trainer's weights, gradients and loss are fp32, its matmuls bf16,
    and its logprobs agree with a bf16 sampler's to bf16's precision."""
    assert master_dtype("bfloat16") == "float32" and compute_dtype("bfloat16") is torch.bfloat16
    assert master_dtype("float32") == "float32" and compute_dtype("float32") is None
    sampler, tokenizer = load_model(tiny_model, "bfloat16")
    model, _ = load_model(tiny_model, master_dtype("bfloat16"))
    batch, sampled = _sampled_batch(sampler, tokenizer)

    seen: list[torch.dtype] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.no_grad():
        fp32, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)
        mixed, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0,
                                  compute_dtype=compute_dtype("bfloat16"))  # fmt: skip
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16], "the matmuls run in bf16 under autocast only"
    assert mixed.dtype == torch.float32, "the softmax and logprobs are fp32 either way"
    mask = batch["loss_mask"][:, 1:].bool()
    assert not torch.equal(mixed[mask], fp32[mask]), "autocast changed the numbers"
    assert (mixed[mask] - sampled).abs().max() < 0.05, "the bf16 sampler's logprobs, to bf16's precision"

    stats = forward_backward(model, batch, 1.0, 0.2, 0.28, compute_dtype=torch.bfloat16)
    grads = [p.grad for p in model.parameters()]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert math.isfinite(stats["loss"]) and 0 < stats["mismatch/kl"] < 1e-3


def test_weights_for_inference_are_cast_to_its_dtype(tmp_path, tiny_model):
    model, _ = load_model(tiny_model)  # fp32 master weights
    path = save_weights(model, tmp_path / "w", dtype="bfloat16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(path / "model.safetensors")).values()} == {torch.bfloat16}, "half the bytes"
    served, _ = load_model(tiny_model, "bfloat16")
    load_weights(served, path)
    for (name, a), b in zip(served.state_dict().items(), model.state_dict().values()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
    assert {t.dtype for t in load_file(str(save_weights(model, tmp_path / "k") / "model.safetensors")).values()} == {
        torch.float32}, "no dtype: as the model holds them (checkpoints)"  # fmt: skip

    def cfg(**inference):
        return OmegaConf.create({"model": {"dtype": "bfloat16"}, "inference": inference})

    assert inference_dtype(cfg(backend="local")) == "bfloat16"
    assert inference_dtype(cfg(backend="vllm", dtype="float16")) == "float16", "vLLM's own inference.dtype"
    assert inference_dtype(cfg(backend="vllm", dtype="auto")) is None, "vLLM casts an `auto` itself"


# ---------------------------------------------------------------- a bf16 run on the CPU


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """`python -m rlrun model.dtype=bfloat16`, RL only, 4 steps, sampler and trainer in step."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    out = run_app(run_dir, "model.dtype=bfloat16", "sft.max_steps=0", "max_steps=4", "orchestrator.max_async_steps=0",
                  "trainer.checkpoint_interval=2", "logger=jsonl", timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_bf16_run_on_the_cpu_completes_with_a_finite_mismatch(bf16_run):
    from safetensors.torch import load_file

    assert "(fp32 weights, bfloat16 autocast)" in (bf16_run / "logs" / "trainer" / "rank_0.log").read_text()
    trainer = metrics(bf16_run, "trainer")
    assert [r["step"] for r in trainer] == [1, 2, 3, 4]
    kl = [r["metrics"]["mismatch/kl"] for r in trainer]
    # > 0: the server really samples in bf16 (an fp32 one gives exactly 0 here); small: the same weights.
    assert all(math.isfinite(v) and 0 < v < BF16_KL_MEDIAN_BOUND for v in kl), kl
    (weights,) = [d for d in (bf16_run / "weights").iterdir() if d.name == "step_4"]
    assert {t.dtype for t in load_file(str(weights / "model.safetensors")).values()} == {torch.bfloat16}
    checkpoint = bf16_run / "checkpoints" / "step_4" / "model.safetensors"
    assert {t.dtype for t in load_file(str(checkpoint)).values()} == {torch.float32}, "master weights kept"
    assert_names_planned(bf16_run)


# ---------------------------------------------------------------- the device check's summary


def _junit(tmp_path: Path) -> Path:
    """A real pytest report: two passed, one failed, one skipped."""
    tests = tmp_path / "probe" / "test_probe.py"
    tests.parent.mkdir()
    tests.write_text("import pytest\ndef test_a(): pass\ndef test_b(): pass\ndef test_c(): assert 0\n"
                     "@pytest.mark.skip(reason='no GPU')\ndef test_d(): pass\n")  # fmt: skip
    report = tmp_path / "pytest.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), f"--junitxml={report}"],
                   cwd=tests.parent, capture_output=True, timeout=120)  # fmt: skip
    return report


def _summarize(*args: str | Path, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, str(SUMMARY), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


@pytest.mark.slow
def test_gpu_check_summary_of_a_real_run(bf16_run, tmp_path):
    """What the device check writes, from a real run's record: into $OUT, else the run directory."""
    done = _summarize(bf16_run, "--junit", _junit(tmp_path), "--window", "2", "--set", "pytest_s=3.5",
                      out=tmp_path / "out")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary == json.loads(done.stdout), "printed as written"
    assert summary["errors"] == {} and summary["pytest_s"] == 3.5
    assert summary["status"]["status"] == "done" and summary["model"]["dtype"] == "bfloat16"
    rl, trainer = summary["rl"], metrics(bf16_run, "trainer")
    assert rl["steps"] == 4 and rl["steps_per_s"] > 0 and rl["trained_tokens_per_s_median"] > 0
    rewards = [r["metrics"]["reward"] for r in metrics(bf16_run, "orchestrator")]
    assert rl["reward"]["gain"] == pytest.approx((rewards[2] + rewards[3] - rewards[0] - rewards[1]) / 2, rel=1e-4)
    kl = [r["metrics"]["mismatch/kl"] for r in trainer]
    assert rl["mismatch_kl"]["median"] == pytest.approx(statistics.median(kl), rel=1e-5)
    assert rl["mismatch_kl"]["max"] == pytest.approx(max(kl), rel=1e-5)
    assert summary["pytest"]["passed"] == 2 and summary["pytest"]["failed"] == 1 and summary["pytest"]["skipped"] == 1
    assert summary["pytest"]["not_passed"] == ["test_probe::test_c"]
    assert summary["gpu_monitor"] is None and summary["device"]["torch"] == torch.__version__, "the CPU: no GPU record"
    assert summary["sft"] is None, "sft.max_steps=0"
    assert summary["checks"] == {"run_done": True, "no_test_failed": False, "reward_rises": rl["reward"]["gain"] > 0,
                                 "gpu_busy_while_training": None, "mismatch_kl_max_below_0.01": True}  # fmt: skip

    # Without $OUT or --out: into the run directory. A directory with no record: nulls and why, no traceback.
    assert _summarize(bf16_run).returncode == 0 and (bf16_run / "gpu_check.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _summarize(empty)
    assert done.returncode == 0, done.stderr
    bare = json.loads((empty / "gpu_check.json").read_text())
    assert bare["status"] is None and "status" in bare["errors"] and bare["rl"]["steps"] == 0
    assert bare["pytest"] is None and bare["gpu_monitor"] is None
    assert bare["checks"]["run_done"] is False and bare["checks"]["no_test_failed"] is None


def test_gpu_check_summary_of_the_monitors_gpu_records(tmp_path):
    """The GPU part of the summary, from records the monitor's own tracker writes: only samples
    taken while RL trained count (`system/train_step` > 0), each job's memory kept apart."""
    from rlrun.config import LoggerConfig
    from rlrun.tracking import Tracker

    tracker = Tracker(OmegaConf.structured(LoggerConfig), job="monitor", output_dir=tmp_path, rank=0)
    samples = [(0, 0.0, 1.0, {}), (3, 40.0, 20.0, {"inference": 9.0, "trainer": 10.5}),
               (9, 80.0, 22.0, {"inference": 9.5, "trainer": 12.0})]  # fmt: skip
    for i, (train_step, util, used, jobs) in enumerate(samples, start=1):
        m = {"system/train_step": train_step, "gpu/0/utilization": util, "gpu/0/memory_used_gb": used,
             "gpu/0/memory_total_gb": 80.0, "gpu/node/count": 1.0}  # fmt: skip
        m.update({f"gpu/0/job_memory_used_gb/{job}": gb for job, gb in jobs.items()})
        tracker.log_metrics(m, i)
    tracker.finish()
    done = _summarize(tmp_path, out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["gpu_monitor"] == {"samples_while_training": 2, "gpus": {"0": {
        "samples": 2, "utilization_mean": 60.0, "utilization_max": 80.0, "memory_used_gb_max": 22.0,
        "memory_total_gb": 80.0, "power_w_max": None, "job_memory_used_gb_max": {"inference": 9.5, "trainer": 12.0}}}}
    assert summary["checks"]["gpu_busy_while_training"] is True


# ---------------------------------------------------------------- one GPU, for real


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_gpu_shared_in_bf16_bounds_the_mismatch(tmp_path):
    """Local inference server and trainer on the same GPU, bf16: the run trains, the mismatch
    stays under its bound, the monitor reads the GPU once and each job's memory on it."""
    run_dir = tmp_path / "run"
    out = run_app(run_dir, "inference.device=cuda", "trainer.device=cuda", "inference.gpu_memory_fraction=0.3",
                  "model.dtype=bfloat16", *BIGGER_MODEL, "sft.max_steps=0", "max_steps=20",
                  "orchestrator.max_async_steps=0", "monitor=gpu", "monitor.collection_interval=0.5",
                  "logger=jsonl", timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "on cuda:0 (fp32 weights, bfloat16 autocast)" in (run_dir / "logs" / "trainer" / "rank_0.log").read_text()
    assert "at most 30% of cuda:0's memory" in (run_dir / "logs" / "inference.stdout").read_text()

    trainer = [r["metrics"] for r in metrics(run_dir, "trainer")]
    kl = [m["mismatch/kl"] for m in trainer]
    assert len(kl) == 20 and all(math.isfinite(v) for v in kl)
    assert statistics.median(kl) < BF16_KL_MEDIAN_BOUND and max(kl) < BF16_KL_MAX_BOUND, kl
    assert max(m["perf/peak_memory_gb"] for m in trainer) > 0

    monitor = [r["metrics"] for r in metrics(run_dir, "monitor")]
    assert all(m["gpu/node/count"] == torch.cuda.device_count() for m in monitor), "each GPU counted once"
    assert max(m.get("gpu/0/utilization", 0.0) for m in monitor) > 0, "NVML saw the GPU working"
    total = monitor[-1]["gpu/0/memory_total_gb"]
    jobs = {k.rsplit("/", 1)[-1]: max(m.get(k, 0.0) for m in monitor)
            for k in {k for m in monitor for k in m if k.startswith("gpu/0/job_memory_used_gb/")}}  # fmt: skip
    if jobs:  # NVML gives per-process memory here
        assert jobs.get("inference", 0) > 0 and jobs.get("trainer", 0) > 0, jobs
        # torch's share (30%) plus the CUDA context, which the allocator's bound does not cover
        assert jobs["inference"] <= 0.3 * total + 2.0, (jobs, total)
    assert_names_planned(run_dir)
