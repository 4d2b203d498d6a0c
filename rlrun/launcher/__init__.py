"""The `rl` parent: everything `python -m rlrun` does around the jobs.

- `run.py`: check the config, prepare, start the jobs, watch them, stop them all.
- `prepare.py`: the run directory and the settled config every job reads.
- `supervisor.py`: jobs as process groups; one failing stops the rest.
- `monitor.py`: system and GPU usage, sampled in the parent.
- `progress.py`: the console progress bar, read from the jobs' records.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed (or the parent itself did)
EXIT_CONFIG = 2  # the run could not start: a bad config, a tracker or backend that can never work
EXIT_DOCTOR = 3  # a job, and so the run, stopped on a run-doctor finding in `doctor.stop_on`
