"""`python -m rlrun`: compose the config, make the run directory, launch and supervise the jobs."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from rlrun.config import CONF_DIR, register_configs


def _run_dir(resume_from: str | None, default: str) -> str:
    """hydra.run.dir: a resumed run continues in its own directory."""
    return str(resume_from) if resume_from not in (None, "None", "null", "") else default


OmegaConf.register_new_resolver("rlrun_run_dir", _run_dir, replace=True)
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    from rlrun.rl import run

    run_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
    code = run(cfg, run_dir)
    if code and HydraConfig.get().mode.name == "RUN":
        sys.exit(code)  # Hydra ignores the return value; a sweep goes on to its next job
    return code


def main() -> None:
    app()


if __name__ == "__main__":
    main()
