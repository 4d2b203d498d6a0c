"""`python -m rlrun`: compose the config, then `rlrun.launcher.run` makes the run directory,
launches and supervises the jobs.

`python -m rlrun -m ...` runs a sweep: every job is the same app in its own run directory
(`outputs/multirun/<date>/<time>/<num>/`), one after another (`hydra/launcher=basic`), at
once (`submitit_local`) or as Slurm jobs (`submitit_slurm`); see rlrun/sweep/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlrun.config import CONF_DIR, register


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    from rlrun import sweep
    from rlrun.launcher.run import run

    hc = HydraConfig.get()
    hydra_dir = Path(hc.runtime.output_dir).resolve()
    run_dir = Path(cfg.output_dir or hydra_dir).resolve()
    if cfg.deployment.name == "slurm" and hc.mode.name != "MULTIRUN":
        from rlrun.launcher.deployment import inside_allocation

        if not inside_allocation():  # write the sbatch script that re-runs this command inside one
            from rlrun.launcher.deployment.sbatch import submit

            code = submit(cfg, run_dir, list(hc.overrides.task))
            if code:
                sys.exit(code)
            return code
    info = None
    if hc.mode.name == "MULTIRUN":
        info = sweep.job_info(hc)
        try:
            cfg = sweep.prepare_job(cfg, run_dir, info)
        except ValueError as exc:
            print(f"rlrun: config error: {exc}", file=sys.stderr)
            return sweep.EXIT_CONFIG
    try:
        code = sweep.run_and_record(run, cfg, run_dir, info, hydra_dir)
    finally:
        if info is not None:  # the next job of a `basic` sweep runs in this process
            from rlrun.log import reset_logger

            reset_logger()
    if code and info is None:
        sys.exit(code)  # Hydra ignores the return value; a sweep goes on to its next job
    if code >= 128 and "rlrun_launcher" not in str(hc.launcher.get("_target_", "")):
        raise KeyboardInterrupt  # Ctrl-C / SIGTERM in a sweep run in this process: stop the sweep
    return code


def main() -> None:
    from rlrun import sweep
    from rlrun.launcher import EXIT_FAILED

    register()
    try:
        from hydra_plugins.rlrun_launcher import quiet_schema_notice

        quiet_schema_notice()
    except ImportError:  # pragma: no cover - rlrun not installed, run from a checkout
        pass
    problem = sweep.check_launcher_args(sys.argv[1:])
    if problem:
        print(f"rlrun: {problem}", file=sys.stderr)
        sys.exit(sweep.EXIT_CONFIG)
    interrupted = False
    try:
        app()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sweep.finish_interrupted_sweep()  # the summary of a sweep that did not reach its end
    if interrupted:
        sys.exit(130)
    if sweep.sweep_failed():
        sys.exit(EXIT_FAILED)  # a sweep whose jobs did not all finish


if __name__ == "__main__":
    main()
