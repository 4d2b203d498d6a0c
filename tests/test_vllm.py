"""`inference=vllm`, everything that can be checked without a GPU or vLLM itself.

- the `vllm serve` command line and the jobs' environments built from a composed config;
- how the visible GPUs are split between vLLM and the trainer;
- the preflight: a clear message, exit code 2 and no job started when vLLM or a GPU is
  missing (a real `python -m rlrun inference=vllm` run);
- the worker extension's weight update, on a fake vLLM model runner holding a real tiny
  Llama (vLLM's `load_weights` emulated with the HF model's `load_state_dict`);
- the client's weight-update protocol against a stand-in for vLLM's HTTP endpoints
  (`http.server` in this file: vLLM cannot run here), and against the real local server.

What needs a GPU (vLLM serving, its real `load_weights`, `/collective_rpc` reaching real
workers) is in `test_vllm_serves_and_updates_weights_on_gpu`, skipped without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, run_app
from omegaconf import OmegaConf

from rlrun.config import ConfigError, ModelConfig, validate
from rlrun.inference import vllm as vllm_mod
from rlrun.inference.client import InferenceClient, InferenceError
from rlrun.inference.vllm import VllmUnavailable, server_args, split_gpus, vllm_launch
from rlrun.inference.vllm_worker import WeightUpdateExtension, load_weights_into_runner
from rlrun.model import build_tiny_model, encode_prompt, load_model, save_weights


# ---------------------------------------------------------------- the server command line

OVERRIDES = (
    "inference=vllm",
    "inference.gpu_memory_utilization=0.5",
    "inference.tensor_parallel_size=2",
    "inference.extra_args=[--enforce-eager]",
)


def test_vllm_option_composes_and_validates(hydra_compose):
    cfg = hydra_compose(*OVERRIDES)
    validate(cfg)
    assert cfg.inference.backend == "vllm"
    assert cfg.inference.dtype == "float32"  # follows model.dtype unless set
    assert hydra_compose(*OVERRIDES, "model.dtype=bfloat16").inference.dtype == "bfloat16"
    assert hydra_compose().inference.backend == "local"  # the CPU default is unchanged


@pytest.mark.parametrize(
    "override, key",
    [
        ("inference.gpu_memory_utilization=1.5", "inference.gpu_memory_utilization"),
        ("inference.tensor_parallel_size=0", "inference.tensor_parallel_size"),
        ("inference.backend=sglang", "inference.backend"),
        ("inference.num_servers=2", "inference.num_servers"),  # one vLLM server (several: inference=local)
    ],
)
def test_bad_vllm_values_are_config_errors(hydra_compose, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(hydra_compose("inference=vllm", override))


def test_server_args_from_a_composed_config(hydra_compose):
    cfg = hydra_compose(*OVERRIDES)
    assert server_args(cfg, "/runs/r/model", 8123) == [
        "--model", "/runs/r/model",
        "--served-model-name", "tiny",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--dtype", "float32",
        "--gpu-memory-utilization", "0.5",
        "--tensor-parallel-size", "2",
        "--max-num-seqs", "512",
        "--seed", "0",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--worker-extension-cls", "rlrun.inference.vllm_worker.WeightUpdateExtension",
        "--middleware", "rlrun.inference.auth.vllm_middleware",
        "--enforce-eager",
    ]  # fmt: skip


def test_server_args_optional_flags(hydra_compose, tmp_path):
    cfg = hydra_compose(
        "inference=vllm", "model=hf", f"model.path={tmp_path}", "model.trust_remote_code=true",
        "inference.max_model_len=4096", "inference.dtype=bfloat16", "seed=7",
        "inference.extra_args=[--max-logprobs,'5',--enable-prefix-caching]",
    )  # fmt: skip
    args = server_args(cfg, tmp_path, 9000)
    pairs = dict(zip(args[:-4:2], args[1:-4:2]))
    assert pairs["--served-model-name"] == str(tmp_path) and pairs["--dtype"] == "bfloat16"
    assert pairs["--max-model-len"] == "4096" and pairs["--seed"] == "7"
    assert args[-4:] == ["--trust-remote-code", "--max-logprobs", "5", "--enable-prefix-caching"]


def _fake_vllm_here(monkeypatch, gpus: str) -> None:
    """As on a GPU machine with vLLM installed: the version and the device count are faked."""
    monkeypatch.setattr(vllm_mod, "_vllm_version", lambda: "0.11.0")
    monkeypatch.setattr(vllm_mod, "_cuda_device_count", lambda: len(gpus.split(",")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)


def test_job_commands_carry_each_jobs_gpus(hydra_compose, tiny_model, monkeypatch):
    _fake_vllm_here(monkeypatch, "4,5,6,7")
    cfg = hydra_compose(*OVERRIDES, "trainer.device=cuda", "trainer.num_ranks=2", "inference.port=8123",
                        "sft.max_steps=0")  # with an SFT stage vLLM would serve <run>/sft/model  # fmt: skip
    run_dir = tiny_model.parent  # resolve_model_path finds the tiny model there (and leaves it as it is)
    launch = vllm_launch(cfg, run_dir)
    # The run directory (the token's and the weights' home), never the token itself.
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "4,5", "VLLM_SERVER_DEV_MODE": "1", "RLRUN_RUN_DIR": str(run_dir)}
    [command] = launch.commands  # one vLLM server
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert command[3:] == server_args(cfg, tiny_model, 8123)
    assert launch.trainer_env == {"CUDA_VISIBLE_DEVICES": "6,7"}

    cpu_trainer = hydra_compose(*OVERRIDES, "inference.port=8123")  # trainer.device=cpu: its environment is left alone
    assert vllm_launch(cpu_trainer, run_dir).trainer_env == {}
    with pytest.raises(ValueError, match="inference.port"):  # the parent picks it first
        vllm_launch(hydra_compose(*OVERRIDES), run_dir)


# ---------------------------------------------------------------- the GPU split


@pytest.mark.parametrize(
    "visible, tp, ranks, expected",
    [
        (["0", "1", "2", "3"], 2, 2, (["0", "1"], ["2", "3"])),
        (["0", "1", "2", "3"], 1, 2, (["0"], ["1", "2", "3"])),  # the trainer gets the rest
        (["0"], 1, 0, (["0"], [])),  # a CPU trainer needs none
        (["3", "5"], 1, 1, (["3"], ["5"])),  # ids as CUDA_VISIBLE_DEVICES gave them
        (["GPU-a1b2", "GPU-c3d4"], 1, 1, (["GPU-a1b2"], ["GPU-c3d4"])),  # UUIDs too
    ],
)
def test_split_gpus(visible, tp, ranks, expected):
    assert split_gpus(visible, tp, ranks) == expected


@pytest.mark.parametrize(
    "visible, tp, ranks, words",
    [
        (["0", "1"], 2, 1, ["needs 3 GPUs", "2 for vLLM", "1 for the trainer", "2 visible (0,1)",
                            "inference=local inference.device=cuda"]),
        (["0"], 2, 0, ["needs 2 GPUs", "1 visible"]),
        ([], 1, 0, ["needs 1 GPUs", "0 visible (none)"]),
        (["0", "1"], 0, 1, ["tensor_parallel_size=0"]),
    ],
)
def test_split_gpus_too_few(visible, tp, ranks, words):
    with pytest.raises(VllmUnavailable) as err:
        split_gpus(visible, tp, ranks)
    for word in words:
        assert word in str(err.value)


# ---------------------------------------------------------------- preflight


def test_preflight_without_vllm(monkeypatch):
    monkeypatch.setattr(vllm_mod, "_vllm_version", lambda: None)
    with pytest.raises(VllmUnavailable) as err:
        vllm_mod.preflight()
    message = str(err.value)
    assert "pip install -e '.[vllm]'" in message and "inference=local" in message


def test_preflight_old_vllm_and_no_gpu(monkeypatch):
    monkeypatch.setattr(vllm_mod, "_vllm_version", lambda: "0.9.2")
    with pytest.raises(VllmUnavailable, match=r"vLLM >= 0\.10\.2.*vllm 0\.9\.2 is installed"):
        vllm_mod.preflight()
    monkeypatch.setattr(vllm_mod, "_vllm_version", lambda: "0.11.0")
    monkeypatch.setattr(vllm_mod, "_cuda_device_count", lambda: 0)
    with pytest.raises(VllmUnavailable, match="needs a CUDA GPU.*inference=local"):
        vllm_mod.preflight()
    monkeypatch.setattr(vllm_mod, "_cuda_device_count", lambda: 1)
    vllm_mod.preflight()  # passes


@pytest.mark.slow
def test_rlrun_inference_vllm_fails_before_any_job(tmp_path):
    """The real entrypoint here: no vLLM (and no GPU) -> exit 2, a clear message, no job."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # even where vLLM is installed, no GPU is visible
    proc = run_app(run_dir, "inference=vllm", "max_steps=1", "sft.max_steps=0", timeout=240, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "could not start the run: inference=vllm needs" in output
    assert "inference=local" in output and ("vLLM" in output or "vllm" in output)
    assert "Traceback" not in output
    assert "inference=vllm needs" in (run_dir / "logs" / "rl.log").read_text()
    for job_file in ("logs/orchestrator.log", "logs/orchestrator.stdout", "logs/inference.stdout", "logs/trainer.stdout"):
        assert not (run_dir / job_file).exists(), job_file


# ---------------------------------------------------------------- the worker extension


class _CudaGraphWrapper:
    """Like vLLM's CUDAGraphWrapper: the module is under `.runnable`."""

    def __init__(self, runnable):
        self.runnable = runnable


class FakeModelRunner:
    """What the extension uses of vLLM's GPU model runner, holding a real HF tiny Llama whose
    `load_weights` (vLLM's per-model loader) is emulated with `load_state_dict`."""

    def __init__(self, model_dir: Path):
        self.hf_model, _ = load_model(model_dir)
        self.hf_model.load_weights = self._load_weights  # type: ignore[method-assign]
        self.model = _CudaGraphWrapper(self.hf_model)
        self.model_config = type("ModelConfig", (), {"hf_config": self.hf_model.config, "quantization": None})()
        self.calls = 0

    def _load_weights(self, weights):
        """Like vLLM's: takes (name, tensor) pairs, skips the tied lm_head, returns the names it filled."""
        self.calls += 1
        state = dict(weights)
        if self.hf_model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = self.hf_model.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"unexpected weights {unexpected}")
        return {name for name, _ in self.hf_model.named_parameters()} - set(missing)


def _logits(model, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0]


def _trained_weights(model_dir: Path, out_dir: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    """A perturbed copy of the model, saved as the trainer does (`save_weights`)."""
    model, _ = load_model(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_weights(model, out_dir, metadata={"step": "1"}), model


def _extension(runner: FakeModelRunner) -> WeightUpdateExtension:
    """How vLLM uses the class: a base of its worker, which has `model_runner`."""

    class Worker(WeightUpdateExtension):
        def __init__(self, model_runner):
            self.model_runner = model_runner

    return Worker(runner)


def test_extension_defines_only_its_rpc_method():
    """vLLM refuses an extension whose attributes clash with its worker's."""
    assert [a for a in dir(WeightUpdateExtension) if not a.startswith("__")] == ["update_weights_from_path"]


def test_worker_module_imports_without_vllm_or_torch():
    code = "import sys, rlrun.inference.vllm_worker; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_update_weights_from_path_changes_the_model(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RLRUN_RUN_DIR", str(tmp_path))  # as rlrun.inference.vllm.server_env sets it
    runner = FakeModelRunner(tiny_model)
    tokenizer_prompt = encode_prompt(load_model(tiny_model)[1], "abc=")
    before = _logits(runner.hf_model, tokenizer_prompt)
    step_dir, trained = _trained_weights(tiny_model, tmp_path / "weights" / "step_1")

    result = _extension(runner).update_weights_from_path(str(step_dir))

    assert runner.calls == 1
    assert result["path"] == str(step_dir / "model.safetensors")
    assert result["tensors"] == result["loaded"] == len(dict(runner.hf_model.named_parameters()))
    after = _logits(runner.hf_model, tokenizer_prompt)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _logits(trained, tokenizer_prompt))
    # The tied head follows the embeddings it shares (saved once, under the embeddings' name).
    assert runner.hf_model.lm_head.weight.data_ptr() == runner.hf_model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(runner.hf_model.lm_head.weight, trained.lm_head.weight)


def test_update_weights_refuses_an_incomplete_file(tiny_model, tmp_path):
    from safetensors.torch import save_file

    runner = FakeModelRunner(tiny_model)
    state = {k: v.clone() for k, v in runner.hf_model.state_dict().items() if "layers.1." not in k and k != "lm_head.weight"}
    (tmp_path / "partial").mkdir()
    save_file(state, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="parameters unloaded.*layers.1"):
        load_weights_into_runner(runner, tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights_into_runner(runner, tmp_path / "nowhere")


def test_tied_head_saved_under_its_own_name_still_loads(tiny_model, tmp_path):
    """If a tied group were stored as lm_head.weight only, vLLM (which skips lm_head when tied)
    would get it under the embeddings' name."""
    from safetensors.torch import save_file

    runner = FakeModelRunner(tiny_model)
    _, trained = _trained_weights(tiny_model, tmp_path / "unused")
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "model.embed_tokens.weight"}
    (tmp_path / "lm_head_only").mkdir()
    save_file(state, str(tmp_path / "lm_head_only" / "model.safetensors"))
    load_weights_into_runner(runner, tmp_path / "lm_head_only")
    torch.testing.assert_close(runner.hf_model.model.embed_tokens.weight, trained.model.embed_tokens.weight)


# ---------------------------------------------------------------- the client, vLLM side


class VllmStandIn:
    """A stand-in for the vLLM OpenAI server's endpoints that rlrun uses (vLLM cannot run
    here): their paths, bodies and answers as vLLM >= 0.10.2 gives them with
    VLLM_SERVER_DEV_MODE=1. `/collective_rpc` calls the worker extension on a fake runner,
    as vLLM calls it on each worker."""

    def __init__(self, worker: WeightUpdateExtension | None = None, dev_mode: bool = True):
        self.requests: list[tuple[str, str, Any]] = []
        self.worker, self.dev_mode = worker, dev_mode
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                stand_in.requests.append(("GET", self.path, None))
                if self.path == "/health":
                    return self._send(200, None)  # vLLM: 200 with an empty body
                if self.path == "/v1/models":
                    card = {"id": "tiny", "object": "model", "created": 0, "owned_by": "vllm", "root": "/m",
                            "parent": None, "max_model_len": 64, "permission": []}  # fmt: skip
                    return self._send(200, {"object": "list", "data": [card]})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stand_in.requests.append(("POST", self.path, body))
                if self.path == "/v1/completions":
                    return self._send(200, stand_in.completion(body))
                if not stand_in.dev_mode:  # vLLM registers the dev routes only with VLLM_SERVER_DEV_MODE=1
                    return self._send(404, {"detail": "Not Found"})
                if self.path == "/collective_rpc":
                    method = getattr(stand_in.worker, body["method"])
                    return self._send(200, {"results": [method(*body.get("args", []), **body.get("kwargs", {}))]})
                if self.path == "/reset_prefix_cache":
                    return self._send(200, None)
                self._send(404, {"detail": "Not Found"})

            def _send(self, status, payload):
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def completion(body: dict) -> dict:
        """vLLM's CompletionResponse shape, with `return_tokens_as_token_ids` tokens."""
        choices = []
        for i, _prompt in enumerate(body["prompt"]):
            for j in range(body["n"]):
                ids = [10 + i, 20 + j, 2]
                choices.append({
                    "index": len(choices), "text": "xy",
                    "logprobs": {"text_offset": [0, 1, 2], "token_logprobs": [-0.5, -1.25, -0.125],
                                 "tokens": [f"token_id:{t}" for t in ids],
                                 "top_logprobs": [{f"token_id:{t}": -0.5} for t in ids]},
                    "finish_reason": "stop", "stop_reason": None, "prompt_logprobs": None,
                })  # fmt: skip
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_worker_loads_weights_only_from_inside_the_run(tiny_model, tmp_path, monkeypatch):
    """`/collective_rpc` is reachable over the network: the extension refuses a path outside
    `$RLRUN_RUN_DIR` (also through a symlink inside it), and everything when it is not set."""
    runner = FakeModelRunner(tiny_model)
    run_dir = tmp_path / "run"
    outside, _ = _trained_weights(tiny_model, tmp_path / "elsewhere" / "step_1")
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "step_1").symlink_to(outside)
    monkeypatch.delenv("RLRUN_RUN_DIR", raising=False)
    with pytest.raises(PermissionError, match="RLRUN_RUN_DIR is not set"):
        _extension(runner).update_weights_from_path(str(outside))
    monkeypatch.setenv("RLRUN_RUN_DIR", str(run_dir))
    for path in (outside, run_dir / "weights" / "step_1", run_dir / ".." / "elsewhere" / "step_1"):
        with pytest.raises(PermissionError, match="not inside the run directory"):
            _extension(runner).update_weights_from_path(str(path))
    assert runner.calls == 0, "nothing loaded"
    inside, _ = _trained_weights(tiny_model, run_dir / "weights" / "step_2")
    assert _extension(runner).update_weights_from_path(str(inside))["tensors"] > 0 and runner.calls == 1


def test_client_speaks_to_vllm_endpoints(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RLRUN_RUN_DIR", str(tmp_path))
    runner = FakeModelRunner(tiny_model)
    server = VllmStandIn(_extension(runner))
    try:
        client = InferenceClient(server.url, timeout=30)
        assert client.wait_healthy(10) == {}  # an empty 200 is healthy
        assert client.backend == "vllm" and client.model == "tiny"

        [[a, b], [c, _]] = client.complete([[1, 5], [1, 6]], n=2, max_tokens=3, temperature=1.0, seed=3)
        assert (a.token_ids, b.token_ids, c.token_ids) == ([10, 20, 2], [10, 21, 2], [11, 20, 2])
        assert a.logprobs == [-0.5, -1.25, -0.125] and a.finish_reason == "stop"
        sent = server.requests[-1][2]
        assert sent["return_tokens_as_token_ids"] is True and sent["logprobs"] == 0 and sent["model"] == "tiny"

        step_dir, trained = _trained_weights(tiny_model, tmp_path / "weights" / "step_1")
        del server.requests[:]
        result = client.update_weights(step_dir)
        assert server.requests == [
            ("POST", "/collective_rpc", {"method": "update_weights_from_path", "args": [str(step_dir)]}),
            ("POST", "/reset_prefix_cache", None),
        ]
        assert result["results"][0]["tensors"] == len(dict(runner.hf_model.named_parameters()))
        prompt = [1, 5, 6]
        torch.testing.assert_close(_logits(runner.hf_model, prompt), _logits(trained, prompt))
        client.close()
    finally:
        server.close()


def test_client_explains_a_vllm_without_dev_mode():
    server = VllmStandIn(dev_mode=False)
    try:
        client = InferenceClient(server.url, timeout=10)
        with pytest.raises(InferenceError, match="404.*VLLM_SERVER_DEV_MODE=1.*worker-extension-cls") as err:
            client.update_weights("/runs/r/weights/step_1")
        assert err.value.status == 404
        assert [p for _, p, _ in server.requests] == ["/v1/models", "/collective_rpc"]  # no cache reset after a failure
        client.close()
    finally:
        server.close()


def test_client_backend_can_be_given():
    with pytest.raises(ValueError, match="backend"):
        InferenceClient("http://127.0.0.1:1", backend="sglang")
    assert InferenceClient("http://127.0.0.1:1", backend="vllm").backend == "vllm"  # no request made


# ---------------------------------------------------------------- the client, local side


def test_client_speaks_to_the_local_server_through_the_same_api(tiny_model, tmp_path):
    from rlrun.inference.engine import Engine
    from rlrun.inference.server import InferenceServer
    from rlrun.log import setup_logger

    setup_logger("WARNING", None, job="inference")
    model, tokenizer = load_model(tiny_model)
    server = InferenceServer(Engine(model, tokenizer, max_batch_size=8), "127.0.0.1", 0, model_name="tiny").start()
    try:
        client = InferenceClient(server.url, timeout=30)
        assert client.wait_healthy(10)["weights_version"] == 0
        assert client.backend == "local"
        prompt = encode_prompt(tokenizer, "abc=")
        [[c]] = client.complete([prompt], n=1, max_tokens=4, temperature=1.0, seed=0)
        assert len(c.token_ids) == len(c.logprobs) > 0

        step_dir, trained = _trained_weights(tiny_model, tmp_path / "weights" / "step_1")
        assert client.update_weights(step_dir)["version"] == 1
        torch.testing.assert_close(_logits(model, prompt), _logits(trained, prompt))
        client.close()
    finally:
        server.shutdown()


# ---------------------------------------------------------------- on a GPU, for real


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(1200)  # up to 600 s for vLLM to come up, then 120 s a request and 60 s to stop
def test_vllm_serves_and_updates_weights_on_gpu(tmp_path):
    """vLLM's real server on this machine's first GPU: serve, update in place, serve the new weights."""
    pytest.importorskip("vllm")
    import time

    # Head size 64 (the default tiny model's 16 is below what vLLM's attention kernels take).
    tiny_dir = build_tiny_model(tmp_path / "model", ModelConfig(hidden_size=128, num_heads=2, intermediate_size=256), 0)

    from rlrun.config import schema
    from rlrun.inference.auth import create_token, read_token
    from rlrun.inference.launch import free_port
    from rlrun.inference.vllm import server_env

    cfg = schema("vllm")
    cfg.inference.port = free_port()
    cfg.inference.gpu_memory_utilization = 0.3
    cfg.inference.dtype = "bfloat16"
    cfg.inference.extra_args = ["--enforce-eager"]
    OmegaConf.resolve(cfg)
    cmd = [sys.executable, "-m", vllm_mod.SERVER_MODULE, *server_args(cfg, tiny_dir, cfg.inference.port)]
    env = {**os.environ, **server_env([os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]], tmp_path)}
    create_token(tmp_path)  # tmp_path is the run directory: the token's home, the only tree weights load from
    log = tmp_path / "inference.stdout"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        url = f"http://127.0.0.1:{cfg.inference.port}"
        client = InferenceClient(url, timeout=120, token=read_token(tmp_path))
        try:
            client.wait_healthy(600, proc)
        except Exception:
            raise AssertionError(log.read_text()[-4000:])
        assert client.backend == "vllm"
        _, tokenizer = load_model(tiny_dir)
        prompt = encode_prompt(tokenizer, "abc=")
        [before] = client.complete([prompt], n=4, max_tokens=6, temperature=1.0, seed=0)
        assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in before)

        step_dir, trained = _trained_weights(tiny_dir, tmp_path / "weights" / "step_1", seed=2)
        # rlrun's middleware: no token, no /collective_rpc (nor any other POST but completions).
        for token, status in ((None, 401), ("wrong", 403)):
            with pytest.raises(InferenceError) as refused:
                InferenceClient(url, timeout=60, token=token, backend="vllm").update_weights(step_dir)
            assert refused.value.status == status
        assert "refused POST /collective_rpc" in log.read_text()
        start = time.monotonic()
        result = client.update_weights(step_dir)
        assert result["results"][0]["tensors"] > 0, result
        assert proc.poll() is None and time.monotonic() - start < 60
        # Greedy-ish sampling now follows the trained model: compare the first token's logprob.
        [after] = client.complete([prompt], n=1, max_tokens=1, temperature=1.0, seed=0)
        c = after[0]
        with torch.no_grad():
            logp = torch.log_softmax(trained(torch.tensor([prompt])).logits[0, -1].float(), -1)[c.token_ids[0]]
        assert abs(c.logprobs[0] - float(logp)) < 0.05, (c.logprobs[0], float(logp))
        outside, _ = _trained_weights(tiny_dir, tmp_path.parent / f"{tmp_path.name}-elsewhere", seed=3)
        with pytest.raises(InferenceError, match="not inside the run directory"):  # the right token, a path outside
            client.update_weights(outside)
        client.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
