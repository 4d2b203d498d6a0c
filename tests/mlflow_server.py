"""A real `mlflow server` on 127.0.0.1 for tests: start, stop, kill, restart on the same store.

    server = MlflowServer(tmp_path).start()     # sqlite:///<tmp>/mlflow.db, artifacts in <tmp>/mlartifacts
    MlflowClient(server.uri) ...
    server.kill(); server.start()               # a crash and a restart on the same store and port
    server.count_requests("/api/2.0/mlflow/runs/log-batch")   # POSTs seen in the access log
    server.stop()

The server runs in its own session, so stop() and kill() signal its whole process group
(the `mlflow server` launcher and the uvicorn worker it spawns) by the launcher's PID,
and nothing else. It takes several seconds to start: share one per test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: str | Path, port: int | None = None, workers: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "mlartifacts"
        self.log_path = self.root / "server.log"
        self.port = port or free_port()
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.db}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start (or restart) on the same port and store; return once /health answers."""
        if self.running():
            return self
        env = dict(os.environ)
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job runner / huey consumer processes
            MLFLOW_DISABLE_TELEMETRY="true",
            PYTHONUNBUFFERED="1",  # the access log must be readable while it runs
        )
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--backend-store-uri", self.store_uri,
            "--artifacts-destination", str(self.artifacts),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log_file:  # append: a restart keeps the earlier log
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.root, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; waits until the port is free again."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        self._signal_group(signal.SIGKILL)  # any worker that outlived the launcher
        self._wait_port_free()
        self.proc = None

    def kill(self) -> None:
        """Crash it: SIGKILL to the whole group, no graceful shutdown."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(15)
        self._wait_port_free()
        self.proc = None

    def restart(self, timeout: float = 90.0) -> MlflowServer:
        self.stop()
        return self.start(timeout)

    def _wait_port_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def count_requests(self, path: str, method: str = "POST") -> int:
        """Requests to `path` in the server's access log so far (each restart appends)."""
        needle = f'"{method} {path} HTTP/'
        return self.log_path.read_text(errors="replace").count(needle) if self.log_path.exists() else 0

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
