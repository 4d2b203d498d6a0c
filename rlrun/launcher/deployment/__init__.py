"""Where the run's jobs run: `deployment=local` (this machine) or `deployment=slurm` (several nodes).

- `config.py`: the group's schemas and the rules that span groups (`trainer.num_ranks`).
- `local.py`: every job here, as a process group of the parent (the default).
- `slurm.py`: inside an allocation, every job through `srun` on its node(s); the
  shared-filesystem check; stopping steps with `scancel`.
- `sbatch.py`: outside an allocation, the sbatch script that re-runs the same command
  inside one, written into the run directory and submitted.

The jobs stay unaware of nodes except through their config (`inference.urls`) and
environment; `rlrun.launcher.node` is what runs on each node around them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DeploymentError(RuntimeError):
    """The run cannot be placed (the allocation, a filesystem the nodes do not share); the message says
    why and what to do."""


def inside_allocation() -> bool:
    """This process runs inside a Slurm allocation (salloc, sbatch), so srun can place steps."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def make_deployment(cfg: Any, run_dir: Path, log: Any) -> Any:
    """The deployment of `cfg.deployment.name` for this run (slurm: reads the allocation, checks the filesystem)."""
    if cfg.deployment.name == "slurm":
        from rlrun.launcher.deployment.slurm import SlurmDeployment

        return SlurmDeployment.start(cfg, run_dir, log)
    from rlrun.launcher.deployment.local import LocalDeployment

    return LocalDeployment(run_dir)
