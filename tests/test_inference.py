"""The sampling engine, the HTTP server (in process and as `python -m rlrun.inference`), the client."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from rlrun.config import schema
from rlrun.inference.auth import read_token
from rlrun.inference.launch import free_port
from rlrun.inference.client import InferenceClient, InferenceError
from rlrun.inference.engine import Engine, GenerationRequest, SamplingParams
from rlrun.inference.server import InferenceServer
from rlrun.log import setup_logger
from rlrun.model import encode_prompt, load_model, save_weights
from rlrun.rundir import wait_for


@pytest.fixture(scope="module")
def engine(tiny_model):
    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_model)
    return Engine(model, tokenizer, max_batch_size=5)  # small: 3 prompts x n=3 needs two chunks


@pytest.fixture
def prompts(engine):
    return [encode_prompt(engine.tokenizer, text) for text in ["abc=", "h=", "abcdefgh="]]


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: log_softmax(logits / T) of one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_engine_logprobs_match_a_teacher_forced_forward(engine, prompts, temperature):
    results = engine.generate(prompts, n=3, max_tokens=20, temperature=temperature, seed=0)
    assert [len(per_prompt) for per_prompt in results] == [3, 3, 3]
    for prompt, per_prompt in zip(prompts, results):
        for c in per_prompt:
            assert len(c.token_ids) == len(c.logprobs) > 0
            expected = teacher_forced_logprobs(engine.model, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_engine_samples_from_the_tempered_distribution(engine, prompts, temperature):
    wide = Engine(engine.model, engine.tokenizer, max_batch_size=4096)
    [samples] = wide.generate(prompts[:1], n=4000, max_tokens=1, temperature=temperature, seed=0)
    with torch.no_grad():
        probs = torch.softmax(engine.model(torch.tensor([prompts[0]])).logits[0, -1].double() / temperature, dim=-1)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in samples]), minlength=len(probs)).double()
    assert (counts / 4000 - probs).abs().max() < 0.02
    expected = 4000 * probs
    enough = expected > 5
    chi2 = ((counts - expected) ** 2 / expected)[enough].sum()
    assert chi2 < 2 * int(enough.sum()) + 30  # ~ its degrees of freedom for a correct sampler


def test_engine_seeds_and_greedy(engine, prompts):
    a = engine.generate(prompts, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert a == engine.generate(prompts, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert a != engine.generate(prompts, n=2, max_tokens=8, temperature=1.0, seed=8)
    greedy = engine.generate(prompts, n=2, max_tokens=8, temperature=0.0)
    for prompt, (first, second) in zip(prompts, greedy):
        assert first.token_ids == second.token_ids
        expected = teacher_forced_logprobs(engine.model, prompt, first.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(first.logprobs), expected, atol=1e-4, rtol=0)


def test_seeded_sampling_does_not_depend_on_batch_company(engine, prompts):
    alone = engine.generate(prompts[:1], n=3, max_tokens=10, temperature=1.0, seed=5)
    together = engine.generate_batch([
        GenerationRequest(prompts[1:], SamplingParams(n=4, max_tokens=3, seed=None)),
        GenerationRequest(prompts[:1], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5)),
    ])
    for a, b in zip(alone[0], together[1][0]):  # same tokens; logprobs equal up to float rounding
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert [len(per_prompt) for per_prompt in together[0]] == [4, 4]


def test_engine_stops_at_eos(engine, prompts, monkeypatch):
    # Declare an eighth of the vocabulary "EOS" so that sequences stop at varied lengths.
    eos = set(range(0, engine.vocab_size, 8))
    monkeypatch.setattr(engine, "eos_ids", torch.tensor(sorted(eos)))
    results = engine.generate(prompts, n=8, max_tokens=6, temperature=1.0, seed=0)
    reasons = set()
    for c in (c for per_prompt in results for c in per_prompt):
        assert not eos & set(c.token_ids[:-1])  # nothing generated after an EOS
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in eos  # the EOS itself is kept (and has a logprob)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 6
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}


def test_engine_rejects_impossible_requests(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        engine.validate(GenerationRequest([[1, 5]], SamplingParams(max_tokens=100)))
    with pytest.raises(ValueError, match="out of range"):
        engine.validate(GenerationRequest([[1, 10_000]]))
    with pytest.raises(ValueError):
        engine.validate(GenerationRequest([[1]], SamplingParams(n=0)))


# ---------------------------------------------------------------- server in process


@pytest.fixture
def server(engine):
    setup_logger("DEBUG", None, job="inference")
    srv = InferenceServer(engine, "127.0.0.1", 0, model_name="tiny").start()
    yield srv
    srv.shutdown()


def test_concurrent_requests_share_one_batch(server, engine, prompts):
    client = InferenceClient(server.url, timeout=30)
    results: dict[int, list] = {}

    def ask(i: int) -> None:
        results[i] = InferenceClient(server.url, timeout=30).complete(prompts[:2], n=1, max_tokens=4, temperature=1.0)

    with engine.lock:  # the engine thread cannot start a batch while we hold this
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: client.health()["in_flight"] >= 2, "both requests to reach the server", timeout_s=30)
    for t in threads:
        t.join(timeout=30)
    health = client.health()
    assert health["batches"] == 1 and health["last_batch_requests"] == 2 and health["requests"] == 2
    assert health["sequences"] == 4
    assert [len(r) for r in results.values()] == [2, 2]


def test_completions_api_shapes(server, engine):
    url = server.url + "/v1/completions"
    body = {"model": "tiny", "prompt": ["ab=", "c="], "n": 2, "max_tokens": 5, "temperature": 1.0,
            "logprobs": 2, "seed": 3}
    out = requests.post(url, json=body, timeout=30).json()
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert lp["text_offset"][0] == 0 and len(lp["text_offset"]) == len(lp["tokens"]) == len(lp["token_logprobs"])
    assert all(tok in top and len(top) <= 3 for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert out["usage"]["prompt_tokens"] == 4 + 3  # counted once per prompt, BOS included
    assert out["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in out["choices"])

    # Prompt-major, like vLLM: choices 0,1 belong to prompt 0; same as asking for it alone.
    alone = requests.post(url, json={**body, "prompt": "ab=", "return_tokens_as_token_ids": True}, timeout=30).json()
    for choice in alone["choices"]:
        ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert choice["text"] == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert [c["text"] for c in alone["choices"]] == [c["text"] for c in out["choices"][:2]]

    # A token-id prompt equals its text: encode_prompt is the one tokenization.
    ids = encode_prompt(engine.tokenizer, "ab=")
    by_ids = requests.post(url, json={**body, "prompt": ids, "n": 1, "logprobs": None}, timeout=30).json()
    by_text = requests.post(url, json={**body, "prompt": "ab=", "n": 1, "logprobs": None}, timeout=30).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["choices"][0]["logprobs"] is None

    models = requests.get(server.url + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": [], "max_tokens": 2}, 400),
        ({"prompt": [[1, 2], "x"]}, 400),
        ({"prompt": "ab=", "n": 0}, 400),
        ({"prompt": "ab=", "n": "2"}, 400),
        ({"prompt": "ab=", "max_tokens": 1000}, 400),
        ({"prompt": [[1, 99999]]}, 400),
        ({"prompt": "ab=", "temperature": -1}, 400),
        ({"prompt": "ab=", "stream": True}, 400),
        ({"prompt": "ab=", "logprobs": 50}, 400),
        ({"prompt": "ab=", "model": "gpt-9"}, 404),
        ({"prompt": "ab=", "logit_bias": {"5": -500}}, 400),
        ({"prompt": "ab=", "logit_bias": {"99999": -100}}, 400),
        ({"prompt": "ab=", "logit_bias": {"x": -100}}, 400),
    ],
)
def test_bad_requests_get_an_error_response(server, body, status):
    response = requests.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["message"]


def test_logit_bias_over_http_bans_tokens(server, engine):
    """OpenAI's `logit_bias` (what the orchestrator sends to keep off special tokens): -100 bans."""
    client = InferenceClient(server.url, timeout=60)
    prompt = encode_prompt(engine.tokenizer, "abc=")
    free = [c for g in client.complete([prompt], n=32, max_tokens=8, temperature=2.0, seed=3) for c in g]
    banned = sorted({t for c in free for t in c.token_ids})[:5]  # tokens this policy does sample
    kept_off = [c for g in client.complete([prompt], n=32, max_tokens=8, temperature=2.0, seed=3,
                                           logit_bias={t: -100 for t in banned}) for c in g]  # fmt: skip
    assert banned and not {t for c in kept_off for t in c.token_ids} & set(banned)
    client.close()


def test_malformed_json_and_unknown_route(server):
    response = requests.post(server.url + "/v1/completions", data=b"{not json", timeout=5)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert requests.get(server.url + "/nope", timeout=5).status_code == 404


# ---------------------------------------------------------------- the real job


def _start_job(tmp_path: Path, tiny_model: Path) -> tuple[subprocess.Popen, int, Path]:
    """The job as the parent starts it: a config with the port the parent chose."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "model")
    config = run / "config.yaml"
    port = free_port()
    OmegaConf.save(schema("local"), config)
    out = run / "logs" / "inference.stdout"
    out.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlrun.inference", "--config", str(config), f"output_dir={run}", "log_level=DEBUG",
         f"inference.port={port}", "inference.max_batch_size=64", "inference.gpu_memory_fraction=0.3"],
        cwd=ROOT, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return proc, port, out


def test_inference_job_serves_updates_weights_and_stops(tmp_path, tiny_model):
    proc, port, out = _start_job(tmp_path, tiny_model)
    try:
        probe = InferenceClient(f"http://127.0.0.1:{port}", timeout=60)
        assert probe.wait_healthy(60, proc=proc)["weights_version"] == 0, out.read_text()
        # Started alone, the job made the run's token (<run>/secrets/inference_token) and requires it.
        client = InferenceClient(f"http://127.0.0.1:{port}", timeout=60, token=read_token(tmp_path / "run"))

        model, tokenizer = load_model(tmp_path / "run" / "model")
        prompt_ids = [encode_prompt(tokenizer, "abc="), encode_prompt(tokenizer, "hg=")]
        before = client.complete(prompt_ids, n=4, max_tokens=8, temperature=1.0, seed=1)
        assert [len(per_prompt) for per_prompt in before] == [4, 4]
        assert f"serving tiny on http://127.0.0.1:{port}" in out.read_text(), "a job started alone says where"
        c = before[0][0]
        torch.testing.assert_close(
            torch.tensor(c.logprobs), teacher_forced_logprobs(model, prompt_ids[0], c.token_ids, 1.0), atol=1e-4, rtol=0
        )

        # New weights: the server's logprobs for its completions now follow the new model.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        weights = save_weights(model, tmp_path / "run" / "weights" / "step_1")
        assert client.update_weights(weights)["version"] == 1
        after = client.complete(prompt_ids, n=4, max_tokens=8, temperature=1.0, seed=1)
        c = after[0][0]
        new_lp = teacher_forced_logprobs(model, prompt_ids[0], c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), new_lp, atol=1e-4, rtol=0)
        assert after != before
        assert client.health()["weights_path"] == str(weights)

        with pytest.raises(InferenceError, match="400"):
            client.update_weights(tmp_path / "run" / "weights" / "missing")
        with pytest.raises(InferenceError, match="400"):
            client.complete([[1, 99999]], n=1, max_tokens=2, temperature=1.0)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.read_text()
    assert "serving tiny on http://127.0.0.1:" in log and "inference server stopped" in log
    assert "inference.gpu_memory_fraction=0.3 ignored: inference.device=cpu" in log, "a GPU-only bound, said on the CPU"


@pytest.mark.gpu
def test_gpu_memory_fraction_bounds_the_inference_process():
    """`inference.gpu_memory_fraction`: past it, torch's allocator refuses, whatever the GPU has free."""
    import logging

    from rlrun.inference.__main__ import limit_gpu_memory

    log = logging.getLogger("test")
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        assert limit_gpu_memory("cuda", 0.05, log)
        small = torch.empty(int(0.02 * total), dtype=torch.uint8, device="cuda")  # within the bound
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.10 * total), dtype=torch.uint8, device="cuda")
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_wait_healthy_notices_a_dead_server(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        InferenceClient("http://127.0.0.1:9", timeout=1).wait_healthy(5, proc=proc)
    with pytest.raises(TimeoutError):
        InferenceClient("http://127.0.0.1:9", timeout=1).wait_healthy(0.3)
