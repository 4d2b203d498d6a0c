"""`inference=vllm`: the inference job is vLLM's own OpenAI-compatible server.

The parent calls `vllm_launch` (through `rlrun.inference.launch.plan`) before any job
starts. It

- checks that vLLM can run here (`preflight`): vLLM installed (the optional extra
  `pip install -e '.[vllm]'`, at least `MIN_VERSION`) and a CUDA GPU visible. Otherwise it
  raises `VllmUnavailable` (a `ConfigError`) with what to do; the CPU default stays
  `inference=local`;
- serves on `inference.port`, which the parent has already chosen for every job
  (`inference.num_servers` must be 1: more vLLM servers are refused at validation);
- splits the visible GPUs (`split_gpus`): the first `inference.tensor_parallel_size` go to
  vLLM, the rest to the trainer when `trainer.device=cuda`; each job sees only its own
  through `CUDA_VISIBLE_DEVICES`;
- builds the server command line (`server_args`) and the jobs' environments (`Launch`).

The trainer's new weights reach the running server without a restart: vLLM loads
`rlrun.inference.vllm_worker.WeightUpdateExtension` into each of its GPU workers
(`--worker-extension-cls`), and `InferenceClient.update_weights(path)` calls it through
`POST /collective_rpc` (served with `VLLM_SERVER_DEV_MODE=1`), then empties the prefix cache
(`POST /reset_prefix_cache`) so no KV computed by the old weights is reused.

Those dev-mode routes run methods on vLLM's workers, so they are guarded as the local server's
`/update_weights` is (`rlrun.inference.auth`): vLLM loads `auth.vllm_middleware`
(`--middleware`), which refuses every POST but `/v1/completions` without the run's token, read
from `$RLRUN_RUN_DIR/secrets/inference_token` (the token never reaches vLLM's argv or
environment); the worker extension loads weights only from inside `$RLRUN_RUN_DIR`.

Targets vLLM >= 0.10.2 (V1 engine): `--logprobs-mode processed_logprobs` makes the returned
logprobs those of the distribution actually sampled (after temperature), as the local
engine's and the trainer's are. Imports neither vllm nor torch at module level.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rlrun.config import ConfigError
from rlrun.gpus import cuda_visible_devices
from rlrun.inference import served_model_name
from rlrun.inference.auth import RUN_DIR_ENV
from rlrun.inference.launch import Launch

MIN_VERSION = "0.10.2"
WORKER_EXTENSION = "rlrun.inference.vllm_worker.WeightUpdateExtension"
AUTH_MIDDLEWARE = "rlrun.inference.auth.vllm_middleware"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CPU_HINT = "The CPU default is inference=local."


class VllmUnavailable(ConfigError):
    """`inference=vllm` cannot run on this machine (no vLLM, an old one, no GPU, too few GPUs)."""


# ---------------------------------------------------------------- preflight


def _vllm_version() -> str | None:
    """The installed vLLM's version, or None when it is not installed (vllm is not imported)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:  # importable but not installed as a distribution (a source tree)
        return "0+unknown"


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def preflight() -> None:
    """Raise `VllmUnavailable` unless vLLM and a CUDA GPU are here."""
    found = _vllm_version()
    if found is None:
        raise VllmUnavailable(
            f"inference=vllm needs vLLM, which is not installed in this environment ({sys.executable}). "
            "Install the optional extra on a machine with a CUDA GPU: pip install -e '.[vllm]'. " + CPU_HINT
        )
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(found) < Version(MIN_VERSION)
    except InvalidVersion:
        too_old = False  # a local build: let vLLM itself say what it cannot do
    if too_old:
        raise VllmUnavailable(
            f"inference=vllm needs vLLM >= {MIN_VERSION} (--logprobs-mode processed_logprobs, worker extensions); "
            f"vllm {found} is installed. Upgrade: pip install -e '.[vllm]' --upgrade. " + CPU_HINT
        )
    if _cuda_device_count() == 0:
        smi = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi is present"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        raise VllmUnavailable(
            f"inference=vllm needs a CUDA GPU, and torch sees none ({smi}{shown}). "
            "Run on a GPU machine, or use the CPU default: inference=local."
        )


# ---------------------------------------------------------------- GPUs and port


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: `CUDA_VISIBLE_DEVICES` as given, else 0..count-1."""
    visible = cuda_visible_devices()
    return visible if visible is not None else [str(i) for i in range(_cuda_device_count())]


def split_gpus(visible: list[str], tp: int, trainer_ranks: int) -> tuple[list[str], list[str]]:
    """(inference devices, trainer devices): the first `tp` for vLLM, the rest for the trainer.

    `trainer_ranks` is how many GPUs the trainer needs (0 for a CPU trainer). Raises
    `VllmUnavailable` when fewer than `tp + trainer_ranks` are visible.
    """
    if tp < 1:
        raise VllmUnavailable(f"inference.tensor_parallel_size={tp}: must be >= 1")
    if trainer_ranks < 0:
        raise ValueError(f"trainer_ranks={trainer_ranks}: must be >= 0")
    need = tp + trainer_ranks
    if len(visible) < need:
        trainer = f" + {trainer_ranks} for the trainer (trainer.num_ranks with trainer.device=cuda)" if trainer_ranks else ""
        raise VllmUnavailable(
            f"inference=vllm needs {need} GPUs on this node: {tp} for vLLM (inference.tensor_parallel_size){trainer}; "
            f"{len(visible)} visible ({','.join(visible) or 'none'}). vLLM shares no GPU with the trainer: "
            "lower inference.tensor_parallel_size or trainer.num_ranks, train on the CPU (trainer.device=cpu), "
            "or on one GPU use the local server beside the trainer (inference=local inference.device=cuda "
            "inference.gpu_memory_fraction=0.3)."
        )
    return list(visible[:tp]), list(visible[tp:])


# ---------------------------------------------------------------- the command lines


def server_args(cfg: Any, model_path: str | Path, port: int) -> list[str]:
    """`vllm serve` arguments for the run config `cfg` (without the program itself)."""
    icfg = cfg.inference
    args = [
        "--model", str(model_path),
        "--served-model-name", served_model_name(cfg),
        "--host", str(icfg.host),
        "--port", str(port),
        "--dtype", str(icfg.dtype),
        "--gpu-memory-utilization", str(icfg.gpu_memory_utilization),
        "--tensor-parallel-size", str(icfg.tensor_parallel_size),
        "--max-num-seqs", str(icfg.max_batch_size),
        "--seed", str(cfg.seed),
        # The logprobs of what was sampled (after temperature), as the trainer computes them.
        "--logprobs-mode", "processed_logprobs",
        # vLLM's neutral sampling defaults, not the model's generation_config.json (top_k, top_p...):
        # the orchestrator samples with temperature only.
        "--generation-config", "vllm",
        "--worker-extension-cls", WORKER_EXTENSION,
        # The run's token on every POST but completions (/collective_rpc: the workers' methods).
        "--middleware", AUTH_MIDDLEWARE,
    ]  # fmt: skip
    if icfg.max_model_len is not None:
        args += ["--max-model-len", str(icfg.max_model_len)]
    if cfg.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args + [str(a) for a in icfg.extra_args]


def server_env(inference_gpus: list[str], run_dir: str | Path) -> dict[str, str]:
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(inference_gpus),
        "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc and /reset_prefix_cache, guarded by AUTH_MIDDLEWARE
        RUN_DIR_ENV: str(Path(run_dir).resolve()),  # where the middleware finds the token, the workers' weights root
    }


def vllm_launch(cfg: Any, run_dir: str | Path) -> Launch:
    """The vLLM server as the inference job, on its GPUs; the trainer gets the GPUs after them.

    `cfg.inference.port` must be set (not 0): the parent picks it. Raises `VllmUnavailable`
    (with what to do) when vLLM cannot run here.
    """
    preflight()
    if not cfg.inference.port:
        raise ValueError("inference.port must be chosen before building the vLLM command (see launch.choose_port)")
    from rlrun.model import policy_path  # built by now (the tiny model, the SFT stage's output)

    trainer_ranks = int(cfg.trainer.num_ranks) if cfg.trainer.device == "cuda" else 0
    inference_gpus, trainer_gpus = split_gpus(visible_gpus(), int(cfg.inference.tensor_parallel_size), trainer_ranks)
    model_path = policy_path(cfg, run_dir)
    server = [sys.executable, "-m", SERVER_MODULE, *server_args(cfg, model_path, int(cfg.inference.port))]
    trainer_env = {"CUDA_VISIBLE_DEVICES": ",".join(trainer_gpus)} if trainer_ranks else {}
    return Launch([server], env=server_env(inference_gpus, run_dir), trainer_env=trainer_env)
