"""`python -m rlrun.sft --config <run>/config.yaml [key=value ...]`

Supervised fine-tuning of the run's model (`sft.*`), one rank alone or N ranks under
`python -m torch.distributed.run --nproc-per-node N -m rlrun.sft ...`. Each rank logs to
`logs/sft/rank_<N>.log`; metrics go to the run's trackers as job `sft`. SIGTERM / SIGINT
stop after the current step, flush the trackers and exit 0; an error is logged with its
traceback and exits 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rlrun.job import StopFlag, StopRequested, load_job_config, parse_job_args
from rlrun.rundir import job_log

PROG = "python -m rlrun.sft"


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag().install()
    args = parse_job_args(PROG, __doc__.splitlines()[0], argv)
    cfg = load_job_config(args, PROG)

    from rlrun.log import setup_logger

    run_dir = Path(cfg.output_dir) if cfg.output_dir else Path(args.config).resolve().parent
    rank = int(os.environ.get("RANK", "0"))
    log = setup_logger(cfg.log_level, job_log(run_dir, "sft", rank), job=f"sft[{rank}]")

    import torch

    from rlrun.sft.loop import SftTrainer
    from rlrun.trainer.dist import Ranks, barrier, init_distributed

    torch.set_num_threads(cfg.sft.num_threads)
    ranks = Ranks()
    code = 0
    try:
        ranks = init_distributed(cfg.trainer.device)
        SftTrainer(cfg, run_dir, stop, ranks).run()
        barrier(ranks)
    except StopRequested as stopped:
        log.info(f"{stopped}; sft exiting cleanly")
        barrier(ranks)  # every rank agreed to stop at the same step
    except Exception:
        log.exception("sft failed")
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
