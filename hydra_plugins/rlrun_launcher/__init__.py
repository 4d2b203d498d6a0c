"""rlrun's submitit launchers: `hydra/launcher=submitit_slurm` and `submitit_local`.

Hydra loads launcher classes only from the `hydra_plugins` namespace, so they live here;
the work is in `rlrun.sweep.submitit`. They are hydra-submitit-launcher's launchers, except that

- a job whose rlrun run failed exits non-zero in Slurm (FAILED, not COMPLETED), and a job
  that failed, timed out or was killed is reported by the sweep summary instead of
  aborting the sweep with an exception;
- job states are right on a cluster without accounting (`sacct` failing);
- the partition, the node/task layout and every job's config are checked before
  anything is submitted.

Without the `slurm` extra (hydra-submitit-launcher) the same names exist but say how to
install it. This module is imported whenever Hydra starts: keep it light.
"""

import warnings
from typing import Any


def quiet_schema_notice() -> None:
    """conf/hydra/launcher/submitit_{slurm,local}.yaml keep the plugin's names, so Hydra checks
    them against the plugin's typed configs of the same name (a misspelt key fails at
    composition): what we want, without Hydra's deprecation notice about it. (Called at
    start-up and in each job: Hydra's plugin scan restores the warning filters.)"""
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore")


try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

    HAVE_SUBMITIT = True
except ImportError:  # the slurm extra is not installed
    HAVE_SUBMITIT = False

if HAVE_SUBMITIT:

    class _RlrunSubmitit:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:  # in the job
            from rlrun.sweep.submitit import finish_submitit_job

            quiet_schema_notice()
            return finish_submitit_job(super().__call__(*args, **kwargs))  # type: ignore[misc]

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:  # in the submitting process
            from rlrun.sweep.submitit import launch_submitit

            return launch_submitit(self, job_overrides, initial_job_idx)

    class SlurmLauncher(_RlrunSubmitit, _SubmititSlurm):
        pass

    class LocalLauncher(_RlrunSubmitit, _SubmititLocal):
        pass

else:
    from hydra.plugins.launcher import Launcher

    class _Missing(Launcher):
        name = "submitit"

        def __init__(self, **_params: Any) -> None:
            from rlrun.sweep.cli import SweepError, missing_extra_message

            raise SweepError(missing_extra_message(self.name))

        def setup(self, **_kwargs: Any) -> None:  # pragma: no cover - never constructed
            pass

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:  # pragma: no cover
            raise NotImplementedError

    class SlurmLauncher(_Missing):  # type: ignore[no-redef]
        name = "submitit_slurm"

    class LocalLauncher(_Missing):  # type: ignore[no-redef]
        name = "submitit_local"
