"""`python -m rlrun.inference --config <run>/config.yaml [--server-index k] [key=value ...]`

Loads the run's config, loads the policy, serves it until SIGTERM / SIGINT, exits 0. In a run
the parent has settled every server's address: server k binds `inference.urls[k]` (its host
only). Started alone on a config without `inference.urls`, it binds `inference.host` and
`inference.port` (0: the OS picks a port, and the log says which).

Weights load only from inside the run directory, and `/update_weights` needs the run's token,
read from `<run>/secrets/inference_token` (created here when a server started alone finds none).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from rlrun.inference import served_model_name
from rlrun.job import StopFlag, load_job_config, parse_job_args

PROG = "python -m rlrun.inference"


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag().install()
    args = parse_job_args(
        PROG, __doc__.splitlines()[0], argv,
        model_path="model directory or hub id (default: from the config)",
        server_index="which of inference.urls this server binds (default 0)",
    )  # fmt: skip
    cfg = load_job_config(args, PROG)
    from rlrun.inference.launch import server_jobs, split_url
    from rlrun.log import setup_logger

    index, urls = int(args.server_index or 0), list(cfg.inference.urls)
    if not 0 <= index < max(len(urls), 1):
        print(f"{PROG}: --server-index {index}: the config has {len(urls)} inference.urls", file=sys.stderr)
        return 2
    job = server_jobs(max(len(urls), 1))[index]  # `inference`, or `inference_<k>` of several: each line says which
    log = setup_logger(cfg.log_level, None, job=job)

    import torch

    from rlrun.inference.auth import create_token, read_token, token_path
    from rlrun.inference.engine import Engine
    from rlrun.inference.server import InferenceServer
    from rlrun.model import load_model, policy_path

    torch.set_num_threads(cfg.inference.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    run_dir = Path(cfg.output_dir) if cfg.output_dir else Path(args.config).resolve().parent
    host, port = split_url(urls[index]) if urls else (cfg.inference.host, cfg.inference.port)
    if not token_path(run_dir).is_file():  # started alone: the parent makes it for a run
        log.info(f"no inference token yet: created {create_token(run_dir)}")
    token = read_token(run_dir)
    model_path = args.model_path or policy_path(cfg, run_dir)
    limit_gpu_memory(cfg.inference.device, cfg.inference.gpu_memory_fraction, log)
    log.info(f"loading model from {model_path}")
    model, tokenizer = load_model(
        model_path, dtype=cfg.model.dtype, device=cfg.inference.device, trust_remote_code=cfg.model.trust_remote_code
    )
    engine = Engine(model, tokenizer, device=cfg.inference.device, max_batch_size=cfg.inference.max_batch_size)
    served_name = served_model_name(cfg)

    if stop:  # stopped while loading the model
        return 0
    name = "inference server" if len(urls) <= 1 else f"inference server {index} of {len(urls)}"
    server = InferenceServer(engine, host, port, model_name=served_name, token=token, weights_root=run_dir,
                             name=name).start()  # fmt: skip
    log.info(f"serving {served_name} on {server.url}")
    while not stop.wait(0.5):
        pass
    log.info("stop signal received; shutting down")
    server.shutdown()
    return 0


def limit_gpu_memory(device: str, fraction: float | None, log) -> bool:
    """Bound this process's CUDA allocations to `fraction` of `device`'s memory (before the model
    loads), so a trainer sharing the GPU keeps the rest; True when a bound was set.

    torch's caching allocator enforces it: past it, an allocation raises out-of-memory in this
    process instead of taking the trainer's share. No-op (a debug line) off CUDA or without a fraction.
    """
    if fraction is None:
        return False
    if not str(device).startswith("cuda"):
        log.debug(f"inference.gpu_memory_fraction={fraction} ignored: inference.device={device}")
        return False
    import torch

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(float(fraction), index)
    total = torch.cuda.get_device_properties(index).total_memory
    log.info(f"inference: at most {fraction:.0%} of cuda:{index}'s memory ({fraction * total / 2**30:.1f} GiB)")
    return True


if __name__ == "__main__":
    sys.exit(main())
