"""`python -m rlrun.inference --config <run>/config.yaml [key=value ...] [--port-file PATH]`

Loads the run's config, loads the policy, serves it until SIGTERM / SIGINT, exits 0.
With `inference.port=0` the OS picks a free port; `--port-file` tells the parent which.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlrun.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    parser.add_argument("--port-file", help="write the bound port here (atomically) once serving")
    parser.add_argument("--model-path", help="model directory or hub id (default: from the config)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. inference.port=8000")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Until the server runs, a stop signal just ends the process (model loading can be long);
    # after, it lets the server finish its batch and close cleanly.
    stop = threading.Event()
    serving = False

    def on_signal(signum: int, _frame) -> None:
        if not serving:
            raise SystemExit(0)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    from rlrun.config import ConfigError, load_run_config
    from rlrun.log import setup_logger

    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"rlrun.inference: bad config: {exc}", file=sys.stderr)
        return 2
    log = setup_logger(cfg.log_level, None, job="inference")

    import torch

    from rlrun.inference.engine import Engine
    from rlrun.inference.server import InferenceServer
    from rlrun.model import load_model, resolve_model_path

    torch.set_num_threads(cfg.inference.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    if args.model_path:
        model_path: str | Path = args.model_path
    else:
        run_dir = Path(cfg.output_dir) if cfg.output_dir else Path(args.config).resolve().parent
        model_path = resolve_model_path(cfg.model, run_dir, cfg.seed)
    log.info(f"loading model from {model_path}")
    model, tokenizer = load_model(
        model_path, dtype=cfg.model.dtype, device=cfg.inference.device, trust_remote_code=cfg.model.trust_remote_code
    )
    engine = Engine(model, tokenizer, device=cfg.inference.device, max_batch_size=cfg.inference.max_batch_size)
    served_name = "tiny" if cfg.model.name == "tiny" else str(cfg.model.path)

    server = InferenceServer(engine, cfg.inference.host, cfg.inference.port, model_name=served_name).start()
    serving = True
    if args.port_file:
        _write_atomically(Path(args.port_file), f"{server.port}\n")
    while not stop.wait(0.5):
        pass
    log.info("stop signal received; shutting down")
    server.shutdown()
    return 0


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
