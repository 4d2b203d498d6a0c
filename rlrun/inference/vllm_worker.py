"""The vLLM worker extension that loads the trainer's weights into a running server.

`vllm serve ... --worker-extension-cls rlrun.inference.vllm_worker.WeightUpdateExtension`
makes vLLM add this class to the bases of its GPU worker class, in every worker process
(one per tensor-parallel rank). Its methods are then callable by name through
`collective_rpc`, which the OpenAI server exposes as `POST /collective_rpc` when
`VLLM_SERVER_DEV_MODE=1`:

    POST /collective_rpc {"method": "update_weights_from_path", "args": ["<run>/weights/step_3"]}
    -> {"results": [<one dict per worker>]}

Each worker reads `<dir>/model.safetensors` (written by `rlrun.model.save_weights`) and hands
the tensors to the vLLM model's own `load_weights`, which renames them to vLLM's layout
(fused qkv / gate-up projections), keeps its tensor-parallel shard and copies it into the
existing parameters in place: CUDA graphs and the KV cache stay valid, nothing restarts.

Weights load only from inside the run directory, `$RLRUN_RUN_DIR` (set for the vLLM job by
`rlrun.inference.vllm.server_env`, inherited by every worker): `/collective_rpc` is reachable
over the network, so a path elsewhere is refused (PermissionError) even with the token.

vLLM rejects an extension with an attribute its worker already has, so this class defines
nothing but `update_weights_from_path`; helpers are module functions. Importing this module
imports neither vllm nor torch (it is imported, without vLLM, by the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# HF names of weights a model may tie to another; save_weights stores a tied group once.
_TIED = {"lm_head.weight": "model.embed_tokens.weight"}


class WeightUpdateExtension:
    """Mixed into vLLM's worker: `self.model_runner` is its model runner."""

    def update_weights_from_path(self, path: str) -> dict[str, Any]:
        """Load `<path>/model.safetensors` into this worker's model, in place (only from inside the run)."""
        check_in_run(path)
        return load_weights_into_runner(self.model_runner, path)  # type: ignore[attr-defined]


def check_in_run(path: str | Path) -> None:
    """PermissionError unless `path` (symlinks resolved) is inside `$RLRUN_RUN_DIR`."""
    import os

    from rlrun.inference.auth import RUN_DIR_ENV, inside

    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        raise PermissionError(f"refusing to load weights from {path}: {RUN_DIR_ENV} is not set (rlrun sets it "
                              "to the run directory; weights load only from inside it)")  # fmt: skip
    if not inside(path, run_dir):
        raise PermissionError(f"refusing to load weights from {path}: not inside the run directory {run_dir}")


def weights_file(path: str | Path) -> Path:
    from rlrun.model import WEIGHTS_FILE

    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no weights file: {file}")
    return file


def runner_model(model_runner: Any) -> Any:
    """The `nn.Module` inside vLLM's model runner (unwrapping a CUDA-graph wrapper)."""
    model = model_runner.get_model() if hasattr(model_runner, "get_model") else model_runner.model
    while hasattr(model, "runnable"):  # CUDAGraphWrapper and the like keep the module here
        model = model.runnable
    return model


def _tie_aliases(state: dict[str, Any], hf_config: Any) -> None:
    """A tied group saved under the name vLLM skips (lm_head) is given the name it loads."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    for alias, target in _TIED.items():
        if alias in state and target not in state:
            state[target] = state[alias]


def load_weights_into_runner(model_runner: Any, path: str | Path) -> dict[str, Any]:
    """What `update_weights_from_path` does, on any object with vLLM's model-runner shape.

    Raises when a parameter of the model got no value from the file (vLLM's own loader
    checks the same at start-up): a checkpoint of another model never loads half-way unseen.
    """
    import time

    import torch
    from safetensors.torch import load_file

    start = time.perf_counter()
    file = weights_file(path)
    state = load_file(str(file))  # on the CPU; load_weights copies each rank's shard to its GPU
    model_config = getattr(model_runner, "model_config", None)
    _tie_aliases(state, getattr(model_config, "hf_config", None))
    model = runner_model(model_runner)
    with torch.no_grad():
        loaded = model.load_weights(weights=iter(state.items()))
    # Most vLLM models return the names of the parameters they filled; vLLM's loader checks
    # them the same way (quantized models excepted: their parameters are not the checkpoint's).
    if loaded is not None and getattr(model_config, "quantization", None) is None:
        missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
        if missing:
            raise RuntimeError(f"weights in {file} left {len(missing)} parameters unloaded: {missing[:5]}")
    _process_after_loading(model, model_config)
    return {
        "path": str(file),
        "tensors": len(state),
        "loaded": None if loaded is None else len(loaded),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _process_after_loading(model: Any, model_config: Any) -> None:
    """vLLM's post-load step (weight layouts of quantized / special layers), as its loader does."""
    try:
        from vllm.model_executor.model_loader.utils import process_weights_after_loading
    except ImportError:  # not under vLLM (tests), or a vLLM that moved it
        return
    device = next(model.parameters()).device
    process_weights_after_loading(model, model_config, device)
