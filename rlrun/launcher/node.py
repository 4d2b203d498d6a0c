"""What the parent runs on each node of a Slurm deployment, through `srun` (deployment=slurm).

    python -m rlrun.launcher.node job --run-dir RUN --job NAME -- CMD ...
    python -m rlrun.launcher.node check-fs --dir RUN/.shared_fs --nonce N
    python -m rlrun.launcher.node sample --config RUN/config.yaml

`job` runs one job's processes on this node and answers for them: it makes itself the
child subreaper (so a process orphaned on this node, e.g. the rank of a SIGKILLed torchrun
agent, is re-parented to it instead of PID 1, where `proctrack/linuxproc` and `scancel` no
longer see it), starts the command in its own session with `RLRUN_PARENT_PID` set to its
own pid (the `rl` parent's pid means nothing on another node), forwards SIGTERM, and once
the command has exited stops whatever it left behind. It records where the job ran, its
pids and how it ended in `<run>/logs/nodes/<job>.<node>.json`; ranks add
`<job>.rank_<r>.json` (`record_rank`), so the parent's failure message can name the node
and the log of the rank that died there.

`check-fs` proves the run directory is shared: it reads the file the parent wrote and
writes one of its own that the parent then reads. `sample` is the node's usage sampler
(rlrun.launcher.monitor with names `system/<node>/...`, `gpu/<node>/...`), written to
`<run>/metrics/nodes/<node>.jsonl`, which the parent's monitor merges into its tracker runs.

Imports only the standard library at module level: the parent and every rank import it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NODE_ENV = "RLRUN_NODE"  # set by `job` for the command it runs: the Slurm node's name
PR_SET_CHILD_SUBREAPER = 36


def this_node() -> str:
    """The Slurm node this process runs on (its name, which need not resolve), or the hostname."""
    return os.environ.get(NODE_ENV) or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def records_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / "nodes"


def node_metrics_dir(run_dir: str | Path) -> Path:
    """The per-node usage samples (kept out of metrics/*.jsonl, which holds one record per job)."""
    return Path(run_dir) / "metrics" / "nodes"


def job_records(run_dir: str | Path, job: str) -> list[dict[str, Any]]:
    """`job`'s node records (one per node it ran on), oldest start first."""
    records = []
    for path in records_dir(run_dir).glob(f"{job}.*.json"):
        if ".rank_" in path.name:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("job") == job:
            records.append(record)
    return sorted(records, key=lambda r: r.get("started_at", 0.0))


def rank_records(run_dir: str | Path, job: str) -> list[dict[str, Any]]:
    """`job`'s ranks: {rank, node, pid} each, by rank."""
    records = []
    for path in records_dir(run_dir).glob(f"{job}.rank_*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: int(r.get("rank", 0)))


def record_rank(run_dir: str | Path, job: str, rank: int) -> str | None:
    """A rank started under `job` (deployment=slurm) says which node it runs on; the node, or None."""
    node = os.environ.get(NODE_ENV)
    if node is None:
        return None
    _write_json(records_dir(run_dir) / f"{job}.rank_{rank}.json", {"job": job, "rank": rank, "node": node,
                                                                    "pid": os.getpid()})  # fmt: skip
    return node


def failed_node(run_dir: str | Path, job: str) -> str | None:
    """The node where `job` failed first: the earliest non-zero exit not caused by a stop."""
    ended = [r for r in job_records(run_dir, job) if r.get("exit_code") not in (None, 0) and not r.get("stopped_by")]
    return min(ended, key=lambda r: r.get("ended_at", 0.0))["node"] if ended else None


# ---------------------------------------------------------------- job: one job on this node


def run_job(run_dir: Path, job: str, cmd: list[str], stdout: str | None = None, stop_grace_s: float = 30.0) -> int:
    """Run `cmd` as `job` on this node; its exit code (128 + signal when killed).

    `stdout` (`{node}` in it): where this node's output goes; None: through srun to the parent.
    """
    from rlrun.job import PARENT_PID_ENV

    node = this_node()
    if stdout is not None:  # this node's own file, appended to (a resumed run moves old logs aside)
        path = Path(stdout.format(node=node))
        path.parent.mkdir(parents=True, exist_ok=True)
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    _become_subreaper()
    path = records_dir(run_dir) / f"{job}.{node}.json"
    record: dict[str, Any] = {
        "job": job, "node": node, "agent_pid": os.getpid(), "host": socket.gethostname(),
        "step": f"{os.environ.get('SLURM_JOB_ID', '?')}.{os.environ.get('SLURM_STEP_ID', '?')}",
        "started_at": time.time(),
    }  # fmt: skip
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), NODE_ENV: node}
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    record["pid"] = child.pid
    _write_json(path, record)
    print(f"rlrun.launcher.node: {job} on node {node}: pid {child.pid}", flush=True)

    def forward(signum: int, _frame: Any) -> None:
        record.setdefault("stopped_by", signal.Signals(signum).name)
        _killpg(child.pid, signal.SIGTERM)  # its own group; scancel reached the rest of the step already

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    # What the command left behind (ranks of a killed torchrun agent): reaped here as our orphans.
    record["leftovers"] = _stop_descendants(stop_grace_s if record.get("stopped_by") else 5.0)
    record.update(exit_code=code, ended_at=time.time())
    _write_json(path, record)
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(f"rlrun.launcher.node: {job} on node {node} ended ({how})", flush=True)
    return 128 - code if code < 0 else code


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to PID 1, the parent's scancel still acts
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_descendants(grace_s: float) -> list[int]:
    """SIGTERM every process still below this one, SIGKILL after `grace_s`; their pids."""
    import psutil

    left = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    for proc in left:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    while True:  # reap every orphan handed to us
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return [p.pid for p in left]


# ---------------------------------------------------------------- check-fs: is the run directory shared?

PARENT_FILE = "parent"


def check_fs(directory: Path, nonce: str, timeout_s: float = 10.0) -> int:
    """Read the parent's nonce (an NFS client may need a moment), then write ours back."""
    node = this_node()
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = (directory / PARENT_FILE).read_text().strip()
        except OSError:
            seen = None
        if seen == nonce:
            break
        time.sleep(0.2)
    if seen != nonce:
        print(f"rlrun.launcher.node: node {node} does not see {directory / PARENT_FILE} as the parent wrote it "
              f"(found {seen!r}): the run directory is not on a filesystem this node shares", file=sys.stderr)  # fmt: skip
        return 1
    _write_json(directory / node, {"node": node, "nonce": nonce, "host": socket.gethostname()})
    return 0


# ---------------------------------------------------------------- sample: this node's usage


class NodeSampleWriter:
    """The sampler's 'tracker': this node's samples to `metrics/nodes/<node>.jsonl`, named by node."""

    def __init__(self, path: Path, node: str) -> None:
        self.path, self.node = path, node
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        named = {by_node(name, self.node): value for name, value in metrics.items() if by_node(name, self.node)}
        self._file.write(json.dumps({"type": "metrics", "step": step, "time": time.time(), "metrics": named}) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()


def by_node(name: str, node: str) -> str | None:
    """`system/x` -> `system/<node>/x`, `gpu/<i>/x` and `gpu/node/x` -> `gpu/<node>/<i>/x`, `gpu/<node>/x`;
    None for the run's own axes (elapsed time, train step), which the parent's monitor gives."""
    if name in ("system/elapsed_s", "system/train_step"):
        return None
    group, rest = name.split("/", 1)
    if group == "gpu" and rest.startswith("node/"):
        rest = rest[len("node/"):]
    return f"{group}/{node}/{rest}"


def sample(config: Path) -> int:
    """Sample this node until SIGTERM; 0 always (usage is an observer: it never fails the run)."""
    from omegaconf import OmegaConf

    from rlrun.launcher.monitor import Monitor

    cfg = OmegaConf.load(config)
    run_dir = Path(cfg.output_dir or config.parent)
    node = this_node()
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # the node's every GPU, not the ones Slurm gave this step
    stop = [False]

    def on_signal(_signum: int, _frame: Any) -> None:
        stop[0] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    writer = NodeSampleWriter(node_metrics_dir(run_dir) / f"{node}.jsonl", node)
    interval = float(cfg.monitor.collection_interval)  # each sample written at once: the parent takes the newest
    monitor = Monitor(
        writer, run_dir, system=bool(cfg.monitor.system), gpu=bool(cfg.monitor.gpu), storage=False,
        pids=lambda: node_pids(run_dir, node), collection_interval=interval, flush_interval=interval,
        warn=lambda text: print(f"rlrun.launcher.node: {node}: {text}", file=sys.stderr, flush=True),
    )  # fmt: skip
    monitor.start()
    while not stop[0]:
        time.sleep(0.2)
    monitor.close()
    return 0


def node_pids(run_dir: Path, node: str) -> dict[str, int]:
    """Each job running on `node` now: its command's pid (the sampler sums its process tree)."""
    pids = {}
    for path in records_dir(run_dir).glob(f"*.{node}.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("node") == node and "pid" in record and "ended_at" not in record:
            pids[record["job"]] = int(record["pid"])
    return pids


# ---------------------------------------------------------------- small helpers


def _write_json(path: Path, data: Any) -> None:
    """Atomic (a temporary name, then rename): the parent and other nodes read these files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlrun.launcher.node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    job = sub.add_parser("job", help="run one job's command on this node")
    job.add_argument("--run-dir", type=Path, required=True)
    job.add_argument("--job", required=True)
    job.add_argument("--stdout", help="this node's output file, `{node}` in the path (default: through srun)")
    job.add_argument("cmd", nargs=argparse.REMAINDER)
    fs = sub.add_parser("check-fs", help="read the parent's nonce, write ours")
    fs.add_argument("--dir", type=Path, required=True)
    fs.add_argument("--nonce", required=True)
    smp = sub.add_parser("sample", help="this node's usage until SIGTERM")
    smp.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "job":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run_job(args.run_dir, args.job, cmd, args.stdout)
    if args.command == "check-fs":
        return check_fs(args.dir, args.nonce)
    return sample(args.config)


if __name__ == "__main__":
    sys.exit(main())
