"""`python -m rlrun.orchestrator --config <run>/config.yaml [key=value ...]`

Generates, scores and writes one training batch per step (see `loop.py`). SIGTERM / SIGINT
end the current step, flush the trackers and exit 0 (`EXIT_DOCTOR` when the run doctor asked
for the stop); an error is logged with its traceback and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlrun.job import StopFlag, StopRequested, load_job_config, parse_job_args
from rlrun.rundir import job_log

PROG = "python -m rlrun.orchestrator"


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag().install()
    args = parse_job_args(PROG, __doc__.splitlines()[0], argv)
    cfg = load_job_config(args, PROG)

    from rlrun.log import setup_logger

    run_dir = Path(cfg.output_dir)
    log = setup_logger(cfg.log_level, job_log(run_dir, "orchestrator"), job="orchestrator")
    try:
        from rlrun.orchestrator.loop import Orchestrator

        Orchestrator(cfg, run_dir, stop).run()
    except StopRequested as stopped:
        log.info(f"{stopped}; orchestrator exiting cleanly")
        return stop.exit_code()
    except Exception:
        log.exception("orchestrator failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
