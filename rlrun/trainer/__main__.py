"""`python -m rlrun.trainer --config <run>/config.yaml [key=value ...]`

One rank alone, or N ranks under `python -m torch.distributed.run --nproc-per-node N -m
rlrun.trainer ...`. Each rank logs to `logs/trainer/rank_<N>.log`. SIGTERM / SIGINT finish
the current step (or end the wait for the next batch), flush the trackers and exit 0; an
error is logged with its traceback and exits 1.
"""

from __future__ import annotations

import sys

PROG = "python -m rlrun.trainer"


def main(argv: list[str] | None = None) -> int:
    from rlrun.trainer.dist import run_ranked_job
    from rlrun.trainer.loop import Trainer

    return run_ranked_job("trainer", PROG, __doc__.splitlines()[0], argv, Trainer, lambda cfg: cfg.trainer.num_threads)


if __name__ == "__main__":
    sys.exit(main())
