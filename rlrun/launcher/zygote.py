"""Jobs forked from one interpreter that has already imported torch and transformers.

Each local job (inference, orchestrator, trainer) imports the same heavy libraries: torch
and transformers' model code take ~3.5 s of one core per process on a laptop CPU, so three
jobs importing at once on two cores were most of the time to the first training step. The
zygote imports them once, while the parent is still preparing the run; each plain
`python -m <module>` job is then forked from it, starts with those modules loaded and shares
their memory (copy-on-write). Jobs under torchrun, vLLM or with an environment of their
own are started as ordinary subprocesses (`Zygote.accepts`).

Protocol, one JSON object per line: the parent writes `{"module", "args", "env", "stdout"}`
to the zygote's stdin; the zygote forks, answers `{"pid"}`, and later `{"exited", "code"}`
when it has reaped that job (it is the jobs' parent, so only it learns their exit codes).
The zygote ends when its stdin closes (the parent finished or died); a running job is
watched by its own parent-pid check (`rlrun.job.StopFlag`), not by the zygote.

    python -m rlrun.launcher.zygote MODULE [MODULE ...]   # the modules to import up front
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class ForkedProcess:
    """The part of `subprocess.Popen` the Supervisor uses, for a job the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, args

    @property
    def returncode(self) -> int | None:
        return self.zygote.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.returncode) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        return code


class Zygote:
    """The parent's side: start the zygote early, fork jobs from it, learn their exit codes."""

    def __init__(self, modules: list[str], env: dict[str, str], extra: dict[str, str], stderr: Path) -> None:
        self.extra = extra  # what the jobs it forks add to the parent's environment (it imported under it)
        stderr.parent.mkdir(parents=True, exist_ok=True)
        with open(stderr, "ab") as err:  # an import that fails says why here; jobs then start as subprocesses
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlrun.launcher.zygote", *modules],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1,
            )  # fmt: skip
        self._codes: dict[int, int] = {}
        self._pids: list[int] = []
        self._started = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()

    def accepts(self, cmd: list[str], extra: dict[str, str]) -> bool:
        """A plain `python -m module` job that adds to the environment what the zygote's jobs add."""
        return self.proc.poll() is None and cmd[:2] == [sys.executable, "-m"] and extra == self.extra

    def start(self, cmd: list[str], stdout: Path, env: dict[str, str]) -> ForkedProcess:
        """Fork `python -m <module> <args>` (as `cmd` says) with stdout/stderr to `stdout`, in
        `env` (sent through the pipe, never on a command line: it may hold secrets)."""
        assert self.proc.stdin is not None
        with self._started:
            known = len(self._pids)
            try:
                self.proc.stdin.write(json.dumps({"module": cmd[2], "args": cmd[3:], "stdout": str(stdout), "env": env}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:  # gone, or closed
                raise RuntimeError(f"the zygote cannot fork {cmd[2]}: {exc}") from None
            if not self._started.wait_for(lambda: len(self._pids) > known or self.proc.poll() is not None, 120.0):
                raise RuntimeError("the zygote did not fork the job within 120 s")
            if len(self._pids) == known:
                raise RuntimeError(f"the zygote exited (code {self.proc.poll()}) before forking {cmd[2]}")
            return ForkedProcess(self, self._pids[-1], cmd)

    def exit_code(self, pid: int) -> int | None:
        code = self._codes.get(pid)
        if code is None and self.proc.poll() is not None and not _alive(pid):
            return 1  # the zygote died before it could reap the job: its own code is lost
        return code

    def close(self) -> None:
        """End the zygote (after the jobs: it reaps them); idempotent."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._started:
                if "pid" in msg:
                    self._pids.append(int(msg["pid"]))
                else:
                    self._codes[int(msg["exited"])] = int(msg["code"])
                self._started.notify_all()
        with self._started:
            self._started.notify_all()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the zygote process


def _serve() -> dict[str, Any] | None:
    """Fork a job per request; return the request in the child (which then runs it), None
    in the zygote once stdin is closed and every job it forked has been reaped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    running: set[int] = set()
    stdin_open = True
    buffer = b""
    while stdin_open or running:
        readable = select.select([0] if stdin_open else [], [], [], 0.05)[0]
        if readable:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_r)
                    os.setsid()  # like start_new_session=True: stopping the job's group reaches all it starts
                    os.close(ready_w)
                    return request
                os.close(ready_w)
                os.read(ready_r, 1)  # end of file once the child has its own session: only then is its pid
                os.close(ready_r)  # reported, so a signal to its process group can never miss it
                running.add(pid)
                _reply({"pid": pid})
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            _reply({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    return None


def _reply(msg: dict[str, Any]) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def _become(request: dict[str, Any]) -> None:
    """In the forked child (already in its own session): its log as stdout/stderr, then the job's module."""
    import runpy

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fd = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()  # the parent's environment now (the zygote's is from when it started)
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    _title([sys.executable, "-m", request["module"], *request["args"]])  # what ps shows: the job's own command
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def _title(argv: list[str]) -> None:
    from setproctitle import setproctitle

    setproctitle(" ".join(argv))


if __name__ == "__main__":
    _title([sys.executable, "-m", "rlrun.launcher.zygote"])  # not the module list: ps would show job names
    for name in sys.argv[1:]:
        try:
            __import__(name)
        except Exception as exc:  # only a lost head start: the job imports (and reports) it itself
            print(f"rlrun zygote: could not preload {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    job = _serve()
    if job is not None:
        _become(job)  # the job's own `sys.exit(main())` ends this process with its code
