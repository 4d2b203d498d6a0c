"""`python -m rlrun.sft --config <run>/config.yaml [key=value ...]`

Supervised fine-tuning of the run's model (`sft.*`), one rank alone or N ranks under
`python -m torch.distributed.run --nproc-per-node N -m rlrun.sft ...`. Each rank logs to
`logs/sft/rank_<N>.log`; metrics go to the run's trackers as job `sft`. SIGTERM / SIGINT
stop after the current step, flush the trackers and exit 0; an error is logged with its
traceback and exits 1.
"""

from __future__ import annotations

import sys

PROG = "python -m rlrun.sft"


def main(argv: list[str] | None = None) -> int:
    from rlrun.sft.loop import SftTrainer
    from rlrun.trainer.dist import run_ranked_job

    return run_ranked_job("sft", PROG, __doc__.splitlines()[0], argv, SftTrainer, lambda cfg: cfg.sft.num_threads)


if __name__ == "__main__":
    sys.exit(main())
