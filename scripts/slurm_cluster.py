#!/usr/bin/env python3
"""A throw-away Slurm cluster on this machine, for trying and testing sweeps and multi-node runs.

    sudo python scripts/slurm_cluster.py up          # install (apt) if needed, start, print the env to use
    export SLURM_CONF=/tmp/rlrun-slurm-XXXX/slurm.conf
    python -m rlrun -m hydra/launcher=submitit_slurm seed=1,2 max_steps=5
    sudo python scripts/slurm_cluster.py down /tmp/rlrun-slurm-XXXX

    sudo python scripts/slurm_cluster.py up --nodes 3   # nodes n1, n2, n3 (one slurmd each)
    salloc -N3 python -m rlrun deployment=slurm ...

Debian's packages (`slurmctld slurmd slurm-client munge`) give a working cluster: a
private `munged` (own key and socket, run as the `munge` user), `slurmctld` and one
`slurmd` per node, all configured under one temporary directory, on free ports, so nothing
of the machine's own (a system munged, a real cluster's /etc/slurm) is used or touched.
Accounting is off (no slurmdbd), so `sacct` does not work here; rlrun's launcher reads
job states from `squeue` / `scontrol` instead.

One node (the default) is `localhost`. With `nodes > 1` the nodes `n1..nN` are several
slurmd daemons on this one host (`slurmd -D -N nK`; Debian's slurmd allows it), each with
its own port and its own spool, pid and log file (`%n` in slurm.conf). What that cannot
show, and what tests must allow for: every node is the same machine (same CPUs, disk,
processes); node names do not resolve (`NodeHostname=localhost NodeAddr=127.0.0.1`: use
`SLURMD_NODENAME` and the node's NodeAddr, never a hostname); with `proctrack/linuxproc` a
process re-parented to PID 1 leaves its step and survives `scancel`.

Everything this module starts is stopped by the PID it recorded (`down`, or
`Cluster.stop()`); the jobs still on the cluster are cancelled first. Needs root.
The test suite uses it through tests/slurm_cluster.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# The executables each package gives (sbin ones may be off a non-root PATH).
EXECUTABLES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "scontrol": "slurm-client",
    "srun": "slurm-client",
    "munged": "munge",
}
PIDS_FILE = "pids.json"


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message says why."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_packages() -> list[str]:
    return sorted({pkg for exe, pkg in EXECUTABLES.items() if which(exe) is None})


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster (None when it can, installing if needed)."""
    if sys.platform != "linux":
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (run the tests as root, e.g. in CI or a container)"
    if missing_packages() and which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing_packages())} missing) and apt-get is not available"
    return None


def install(log=print) -> None:
    """apt-get install the packages that are missing (as root); ClusterError if that fails."""
    missing = missing_packages()
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    log(f"installing {' '.join(missing)} with apt-get")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # a fresh container has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0 or missing_packages():
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names(nodes: int) -> list[str]:
    """The cluster's node names: `localhost` alone, or n1..nN."""
    return ["localhost"] if nodes == 1 else [f"n{k}" for k in range(1, nodes + 1)]


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path,
               node_ports: dict[str, int] | None = None) -> str:  # fmt: skip
    """slurm.conf for one node (`node_ports` None) or for several slurmd on this host (name -> port)."""
    if not node_ports:
        per_node = [
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=20000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
    else:  # %n: each slurmd (`-N nK`) its own spool, pid file and log
        per_node = [
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={root / 'slurmd-%n.log'}",
            *(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
              "RealMemory=20000 State=UNKNOWN" for name, port in node_ports.items()),
            f"PartitionName=debug Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP",
        ]  # fmt: skip
    return "\n".join([
        "ClusterName=rlrun-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "KillWait=10",  # seconds between SIGTERM and SIGKILL when a job is cancelled / times out
        "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (no sacct here)
        f"StateSaveLocation={root / 'state'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        *per_node,
        "",
    ])  # fmt: skip


class Cluster:
    """`nodes` nodes (`node_names`), one partition (`debug`); `env` is what clients need."""

    def __init__(self, root: str | Path | None = None, cpus: int | None = None, nodes: int = 1) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: a cluster needs at least one node")
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="rlrun-slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.nodes = node_names(nodes)
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(self.root / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=self._client_env(), **kwargs)  # fmt: skip
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        (self.root / PIDS_FILE).write_text(json.dumps(self.pids))

    def start(self, timeout_s: float = 60.0) -> Cluster:
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        install()
        self.root.mkdir(parents=True, exist_ok=True)  # `up DIR` with a DIR not made yet
        os.chmod(self.root, 0o755)  # munged (as `munge`) must reach its directory
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        for sub in ("state", "spool", *(f"spool/{n}" for n in self.nodes if len(self.nodes) > 1)):
            (self.root / sub).mkdir(exist_ok=True)
        munge_user = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(munge_dir, 0o700)
        os.chmod(key, 0o600)
        # The socket's directory must be reachable by the daemons' clients (root here).
        sock_dir = self.root / "munge-socket"
        sock_dir.mkdir(exist_ok=True)
        os.chown(sock_dir, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(sock_dir, 0o755)
        socket_path = sock_dir / "munge.socket"
        node_ports = {name: _free_port() for name in self.nodes} if len(self.nodes) > 1 else None
        self.conf.write_text(slurm_conf(self.root, self.cpus, _free_port(), _free_port(), socket_path, node_ports))
        try:
            self._spawn("munged", [
                which("munged"), "-F", f"--socket={socket_path}", f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ], user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])  # fmt: skip
            self._wait(lambda: socket_path.exists(), "munged's socket", timeout_s)
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                       "slurmctld to answer", timeout_s)  # fmt: skip
            for name in self.nodes:
                self._spawn(self._slurmd(name), [which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._nodes_ready, f"node(s) {','.join(self.nodes)} to be idle", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _out(self, cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self._client_env(), timeout=30)
        return out.stdout + out.stderr

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return subprocess.run(cmd, capture_output=True, env=self._client_env(), timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _slurmd(self, node: str) -> str:
        """The name its slurmd's pid is kept under (`slurmd` alone, as before: `down` of an old dir works)."""
        return "slurmd" if len(self.nodes) == 1 else f"slurmd-{node}"

    def _nodes_ready(self) -> bool:
        states = dict(line.split() for line in self._out(["sinfo", "-h", "-N", "-o", "%N %T"]).lower().splitlines()
                      if len(line.split()) == 2)  # fmt: skip
        return all(states.get(name.lower()) in ("idle", "mixed", "allocated") for name in self.nodes)

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in [*sorted(self.root.glob("*.log")), *sorted(self.root.glob("*.out")), self.root / "munge" / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    def jobs(self) -> list[str]:
        return self._out(["squeue", "-h", "-o", "%i"]).split()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel the jobs still on the cluster, then stop each daemon we started, by PID."""
        pids = self.pids or _read_pids(self.root)
        if pids.get("slurmctld") and _alive(pids["slurmctld"]):
            self._ok(["scancel", "--full", "--quiet", "--user", "root"])  # every job (this is our own cluster)
            deadline = time.monotonic() + timeout_s
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        slurmds = sorted(name for name in pids if name.startswith("slurmd"))
        for name in (*slurmds, "slurmctld", "munged"):  # reverse start order
            pid = pids.get(name)
            if pid:
                _terminate(pid, self._procs.get(name), timeout_s=10.0)
        self.pids = {}
        (self.root / PIDS_FILE).unlink(missing_ok=True)


def _read_pids(root: Path) -> dict[str, int]:
    path = Path(root) / PIDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _terminate(pid: int, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM `pid`, SIGKILL after `timeout_s`; reap it when it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not _alive(pid):
                return
            time.sleep(0.1)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="install if needed and start the cluster; print the env to use")
    up.add_argument("dir", nargs="?", help="its directory (default: a new /tmp/rlrun-slurm-*)")
    up.add_argument("--nodes", type=int, default=1, help="slurmd daemons on this host: localhost alone, or n1..nN")
    down = sub.add_parser("down", help="cancel its jobs and stop its daemons")
    down.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "up":
        cluster = Cluster(args.dir, nodes=args.nodes)
        try:
            cluster.start()
        except ClusterError as exc:
            print(f"slurm_cluster: {exc}", file=sys.stderr)
            return 1
        for proc in cluster._procs.values():  # keep running after we exit
            proc.returncode = 0
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# stop it with: python {sys.argv[0]} down {cluster.root}", file=sys.stderr)
        return 0
    cluster = Cluster(args.dir)
    cluster.stop()
    print(f"stopped the cluster in {cluster.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
