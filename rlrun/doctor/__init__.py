"""The run doctor: rules over each job's metric stream that warn while the run goes on.

Each job's Tracker hands the metric points its jsonl record took to a `Doctor`, on the jsonl
writer's thread, so the training loop never waits for it (and no extra thread competes with
it for the CPU). A finding becomes an `Alert`: one warning line in the job's log, then an
`alert` record in the jsonl, a W&B alert, an MLflow tag and a TensorBoard text, through every
enabled backend. A
rule listed in `doctor.stop_on` also asks the job to stop: it exits with `EXIT_DOCTOR` after
flushing its trackers, and the parent stops the run with that code.
"""

from rlrun.doctor.config import RULES, DoctorConfig

__all__ = ["RULES", "DoctorConfig"]
