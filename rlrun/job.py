"""What every job entrypoint shares: its command line, its config, and a clean stop.

`python -m rlrun.<job> --config <run>/config.yaml [key=value ...]` loads the run's resolved
config (secrets come back from the environment) so each job can be started alone for
debugging. SIGTERM / SIGINT set a stop flag that the job's loop checks between phases:
it then finishes its trackers and exits 0, which is what the parent's shutdown expects.
A stop the job asks for itself (`StopFlag.request`: a run-doctor rule in `doctor.stop_on`)
ends it the same way, with exit code `EXIT_DOCTOR`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from rlrun.launcher import EXIT_DOCTOR

PARENT_PID_ENV = "RLRUN_PARENT_PID"  # set by rlrun.launcher.supervisor for every job it starts


class StopRequested(Exception):
    """Raised by `StopFlag.check()` once SIGTERM / SIGINT arrived."""


class StopFlag:
    """Set by SIGTERM / SIGINT; `wait(seconds)` sleeps but wakes up at once on a stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None
        self.reason: str | None = None  # set by `request`: the job stops itself

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        parent = os.environ.get(PARENT_PID_ENV)
        if parent:
            threading.Thread(target=self._watch_parent, args=(int(parent),), daemon=True, name="parent-watch").start()
        return self

    def _watch_parent(self, pid: int) -> None:
        """A job never outlives the `rl` parent, even one killed with SIGKILL."""
        while not self._event.wait(1.0):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.signal = signal.SIGHUP
                self._event.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signal = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def request(self, reason: str) -> None:
        """Stop this job from within (any thread): the loop ends as on a signal, with `reason`."""
        self.reason = self.reason or reason
        self._event.set()

    def why(self) -> str:
        return f"stopped: {self.reason}" if self.reason else f"stopped by signal {self.signal}"

    def exit_code(self) -> int:
        """0 for a stop by signal (the parent's shutdown), EXIT_DOCTOR for one the job asked for."""
        return EXIT_DOCTOR if self.reason else 0

    def check(self) -> None:
        if self._event.is_set():
            raise StopRequested(self.why())

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def parse_job_args(prog: str, description: str, argv: list[str] | None = None, **extra: str) -> argparse.Namespace:
    """`--config PATH` and dotlist overrides, plus `extra` options (`name=help`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    for name, help_text in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", help=help_text)
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. max_steps=5")
    return parser.parse_intermixed_args(argv)


def load_job_config(args: argparse.Namespace, prog: str) -> Any:
    """The run config, or exit 2 with a message naming the bad key."""
    from omegaconf.errors import OmegaConfBaseException

    from rlrun.config import ConfigError, load_run_config

    try:
        return load_run_config(args.config, args.overrides)
    except (ConfigError, OSError, ValueError, OmegaConfBaseException) as exc:
        print(f"{prog}: bad config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
