"""Sweeps (`python -m rlrun -m ...`): one complete rlrun run per job, grouped tracker runs,
and a summary that tells the truth about every job, whichever launcher ran it.

Where each piece runs:

- before Hydra starts (`main`): `cli` checks the `hydra/launcher=...` choice.
- the submitting process: `callback.SweepCallback` writes `<sweep>/sweep.json` and
  creates the MLflow store and a parent run once; the launcher starts the jobs (for
  `submitit_local` / `submitit_slurm`: `submitit.launch_submitit`, the body of the
  launchers in `hydra_plugins.rlrun_launcher`); at the end `summary` writes
  `<sweep>/sweep_summary.csv` and prints the table, and `python -m rlrun` exits
  non-zero when a job did not finish.
- each job (in this process for `basic`, a subprocess for `submitit_local`, a Slurm job
  for `submitit_slurm`): `job.prepare_job` names and groups its tracker runs after the
  sweep and resumes a requeued job; `job.run_and_record` writes `<run>/status.json`;
  `submitit.finish_submitit_job` makes a failed run FAILED for Slurm.

Nothing here imports torch, mlflow or submitit at import time (`--cfg job` stays cheap).
"""

from rlrun.launcher import EXIT_CONFIG
from rlrun.sweep.callback import finish_interrupted_sweep, sweep_failed
from rlrun.sweep.cli import check_launcher_args
from rlrun.sweep.job import job_info, prepare_job, run_and_record

__all__ = [
    "EXIT_CONFIG",
    "check_launcher_args",
    "finish_interrupted_sweep",
    "job_info",
    "prepare_job",
    "run_and_record",
    "sweep_failed",
]
