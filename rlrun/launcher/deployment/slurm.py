"""`deployment=slurm` inside an allocation: every job through `srun` on its node(s).

The allocation's nodes (`SLURM_JOB_NODELIST`, in Slurm's order) are laid out as
`deployment.num_infer_nodes` inference nodes, then `deployment.num_train_nodes` train nodes:

- one inference server per inference node, bound to that node's address (its `NodeAddr`
  from `scontrol show node`: node names need not resolve) on a port the parent picks, so
  servers sharing an address (one test host) still differ; the URLs go into
  `inference.urls` before any job starts;
- the orchestrator on the first node;
- the trainer as one `srun -N<k> torchrun --nnodes=<k>` step across the train nodes, with
  c10d rendezvous on the first train node's address, `trainer.num_ranks / k` ranks each;
  the SFT stage (when on) on the first train node;
- a usage sampler on every node (`python -m rlrun.launcher.node sample`) when the monitor is on.

Each step is `srun --overlap` (several steps share a node), named `rlrun.<job>` so that the
parent can find it in `squeue -s` and stop it with `scancel -s TERM <job>.<step>` (a signal
to `srun` itself would reach the tasks as SIGKILL), `--kill-on-bad-exit` (a rank that dies
ends its step). The command on each node runs under `rlrun.launcher.node job`, which records
where it runs and stops whatever its command leaves behind. Before any job starts, a step on
every node proves the run directory is on a shared filesystem.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlrun.launcher.deployment import DeploymentError
from rlrun.launcher.deployment.config import ranks_per_node
from rlrun.launcher.node import PARENT_FILE, node_metrics_dir
from rlrun.metric_names import check_metric_names
from rlrun.launcher.supervisor import Job, python_module, torchrun
from rlrun.rundir import job_log
from rlrun.schema import ConfigError

STEP_PREFIX = "rlrun."


def _slurm(*args: str, timeout: float = 60.0) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise DeploymentError(f"`{' '.join(args)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


@dataclass
class Allocation:
    """The Slurm allocation this process runs in: its job id, its nodes in order, each node's address."""

    job_id: str
    nodes: list[str]
    addrs: dict[str, str]
    cpus: dict[str, int]  # CPUs the allocation has on each node (SLURM_JOB_CPUS_PER_NODE)

    @classmethod
    def current(cls) -> Allocation:
        job_id = os.environ.get("SLURM_JOB_ID")
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if not job_id or not nodelist:
            raise DeploymentError("not inside a Slurm allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST unset)")
        nodes = _slurm("scontrol", "show", "hostnames", nodelist).split()
        addrs = {}
        for line in _slurm("scontrol", "-o", "show", "node", ",".join(nodes)).splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "NodeName" in fields:
                addrs[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
        missing = [n for n in nodes if n not in addrs]
        if missing:
            raise DeploymentError(f"`scontrol show node` gave no NodeAddr for {', '.join(missing)}")
        counts = _expand_counts(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
        return cls(job_id, nodes, addrs, dict(zip(nodes, counts)) if len(counts) == len(nodes) else {})


def _expand_counts(value: str) -> list[int]:
    """Slurm's compressed per-node counts: `72(x2),36` -> [72, 72, 36]."""
    counts: list[int] = []
    for part in filter(None, value.split(",")):
        number, _, repeat = part.partition("(x")
        if not number.isdigit():
            return []
        counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


class SlurmDeployment:
    """Builds each job as an srun step on its node(s); see the module docstring for the layout."""

    def __init__(self, cfg: Any, run_dir: Path, alloc: Allocation) -> None:
        dep = cfg.deployment
        wanted = int(dep.num_infer_nodes) + int(dep.num_train_nodes)
        if len(alloc.nodes) < wanted:
            raise ConfigError(
                f"deployment.num_infer_nodes={dep.num_infer_nodes} + deployment.num_train_nodes="
                f"{dep.num_train_nodes} = {wanted} nodes, but this allocation (job {alloc.job_id}) has "
                f"{len(alloc.nodes)}: {','.join(alloc.nodes)}"
            )
        self.cfg, self.run_dir, self.alloc = cfg, run_dir, alloc
        self.infer_nodes = alloc.nodes[: int(dep.num_infer_nodes)]
        self.train_nodes = alloc.nodes[len(self.infer_nodes) : wanted]
        self.nodes = self.infer_nodes + self.train_nodes  # an allocation larger than asked: the rest idle
        self.orchestrator_node = self.nodes[0]
        self.nodes_dir = node_metrics_dir(run_dir)
        self.servers: list[tuple[str, str, int]] = []  # (node, addr, port) per inference server

    @classmethod
    def start(cls, cfg: Any, run_dir: Path, log: Any) -> SlurmDeployment:
        """Read the allocation, lay the jobs out, check the run directory is shared; log where each job goes."""
        deployment = cls(cfg, run_dir, Allocation.current())
        log.info(f"deployment=slurm in allocation {deployment.alloc.job_id}: inference on "
                 f"{','.join(deployment.infer_nodes)}, orchestrator on {deployment.orchestrator_node}, trainer "
                 f"on {','.join(deployment.train_nodes)} ({ranks_per_node(cfg)} rank(s) per node)")  # fmt: skip
        deployment.check_shared_fs(float(cfg.deployment.shared_fs_timeout_s))
        log.info(f"the run directory is shared by {','.join(deployment.nodes)} (checked: {run_dir / '.shared_fs'})")
        return deployment

    # ------------------------------------------------------------ settling the config

    def configure(self, cfg: Any) -> Any:
        """Each inference server's address and port into the config (`inference.urls`) before it is written."""
        from rlrun.inference.launch import free_port

        cfg = cfg.copy()
        ports: set[int] = set()
        self.servers = []
        for node in self.infer_nodes:
            addr = self.alloc.addrs[node]
            port = int(cfg.inference.port) if cfg.inference.port and not self.servers else 0
            while not port or port in ports:  # servers sharing an address (one test host) need their own ports
                port = free_port("127.0.0.1" if _is_loopback(addr) else "0.0.0.0")
            ports.add(port)
            self.servers.append((node, addr, port))
        _, cfg.inference.host, cfg.inference.port = self.servers[0]
        cfg.inference.urls = [f"http://{_url_host(addr)}:{port}" for _, addr, port in self.servers]
        cfg.inference.num_servers = len(self.servers)  # one server per inference node
        cfg.deployment.nodes = list(self.nodes)
        check_metric_names(cfg)  # the nodes' own names, now that they are known
        return cfg

    # ------------------------------------------------------------ the jobs

    def _srun(self, name: str, nodes: list[str], *, gpus: bool = False) -> list[str]:
        dep = self.cfg.deployment
        cmd = [
            "srun", "--overlap", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
            f"--nodelist={','.join(nodes)}", f"--job-name={STEP_PREFIX}{name}", "--kill-on-bad-exit=1",
            "--input=none", f"--jobid={self.alloc.job_id}",
        ]  # fmt: skip
        # Every CPU the allocation has there (steps share them, --overlap): one task with srun's default
        # of one CPU would confine a trainer to one core where Slurm binds steps to their CPUs.
        cpus = dep.cpus_per_task or min((self.alloc.cpus.get(n, 0) for n in nodes), default=0)
        if cpus:
            cmd.append(f"--cpus-per-task={cpus}")
        if gpus and dep.gpus_per_node:
            cmd.append(f"--gpus-per-node={dep.gpus_per_node}")
        return cmd

    def _agent(self, name: str, cmd: list[str], stdout: str | None) -> list[str]:
        own = ["--stdout", stdout] if stdout else []
        return python_module("rlrun.launcher.node", "job", "--run-dir", str(self.run_dir), "--job", name, *own, "--", *cmd)

    def _step(self, name: str, nodes: list[str], cmd: list[str], env: dict[str, str], *, gpus: bool = False,
              log_file: Path | None = None, stdout: Path | None = None, per_node: bool = False) -> Job:  # fmt: skip
        """`cmd` as job `name` on `nodes`. Its output comes back through srun to `stdout`; with `per_node`
        each node's goes to logs/<name>/node_<node>.stdout instead (written on that node: Slurm's `%N` is
        the hostname, not the node's name), and srun's own messages to `stdout`."""
        node_stdout = str(self.run_dir / "logs" / name / "node_{node}.stdout") if per_node else None
        srun = self._srun(name, nodes, gpus=gpus)
        return Job(name, [*srun, *self._agent(name, cmd, node_stdout)], log_file=log_file or job_log(self.run_dir, name),
                   stdout_file=stdout or self.run_dir / "logs" / f"{name}.stdout", env=env, nodes=tuple(nodes),
                   step=f"{STEP_PREFIX}{name}", node_stdout=node_stdout)  # fmt: skip

    def job(self, name: str, cmd: list[str], env: dict[str, str]) -> Job:
        """A one-process job (the orchestrator) on the first node."""
        return self._step(name, [self.orchestrator_node], cmd, env)

    def ranked(self, name: str, module: str, num_ranks: int, args: list[str], env: dict[str, str]) -> Job:
        """The trainer across the train nodes (torchrun, c10d rendezvous on the first); the SFT stage on the first."""
        if name != "trainer" or len(self.train_nodes) == 1:
            cmd = torchrun(module, num_ranks, *args) if num_ranks > 1 else python_module(module, *args)
            return self._step(name, self.train_nodes[:1], cmd, env, gpus=True)
        from rlrun.inference.launch import free_port

        head = self.alloc.addrs[self.train_nodes[0]]
        endpoint = f"{_url_host(head)}:{free_port('127.0.0.1' if _is_loopback(head) else '0.0.0.0')}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(self.train_nodes)}",
            f"--nproc-per-node={ranks_per_node(self.cfg)}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={self.alloc.job_id}-{name}", "--max-restarts=0", "-m", module, *args,
        ]  # fmt: skip
        return self._step(name, self.train_nodes, cmd, env, gpus=True, per_node=True)

    def inference(self, cfg: Any, launch: Any, env: dict[str, str]) -> list[Job]:
        """One server per inference node, each on its own address and port (logs/inference/node_<k>.stdout)."""
        jobs = []
        for k, (node, addr, port) in enumerate(self.servers):
            name = "inference" if len(self.servers) == 1 else f"inference_{k}"
            cmd, extra = self._server_command(cfg, launch, k, addr, port)
            stdout = self.run_dir / "logs" / "inference" / f"node_{k}.stdout"
            jobs.append(self._step(name, [node], cmd, {**env, **extra}, gpus=True, log_file=stdout, stdout=stdout))
        return jobs

    def _server_command(self, cfg: Any, launch: Any, k: int, addr: str, port: int) -> tuple[list[str], dict[str, str]]:
        if cfg.inference.backend == "local":  # server k binds inference.urls[k]: this node's address and port
            return launch.commands[k], dict(launch.env)
        from rlrun.inference.launch import plan

        node_cfg = cfg.copy()
        node_cfg.inference.host, node_cfg.inference.port = addr, port
        node_cfg.trainer.device = "cpu"  # the trainer has nodes of its own: every GPU here is inference's
        node_launch = plan(node_cfg, self.run_dir)
        # The node's GPUs are the ones Slurm gives the step, not those the parent sees.
        return node_launch.commands[0], {k: v for k, v in node_launch.env.items() if k != "CUDA_VISIBLE_DEVICES"}

    def samplers(self, cfg: Any) -> list[Job]:
        """A usage sampler on every node (not required: its failure is reported, never fatal)."""
        if not (cfg.monitor.system or cfg.monitor.gpu):
            return []
        cmd = python_module("rlrun.launcher.node", "sample", "--config", str(self.run_dir / "config.yaml"))
        srun = self._srun("monitor", self.nodes)
        return [Job("monitor", [*srun, *cmd], log_file=self.run_dir / "logs" / "monitor.stdout",
                    stdout_file=self.run_dir / "logs" / "monitor.stdout", nodes=tuple(self.nodes),
                    step=f"{STEP_PREFIX}monitor", required=False)]  # fmt: skip

    # ------------------------------------------------------------ the shared filesystem

    def check_shared_fs(self, timeout_s: float) -> None:
        """A step on every node reads the parent's nonce and writes its own file, which the parent reads."""
        directory = self.run_dir / ".shared_fs"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        nonce = secrets.token_hex(16)
        (directory / PARENT_FILE).write_text(nonce)
        cmd = [*self._srun("shared_fs", self.nodes),
               *python_module("rlrun.launcher.node", "check-fs", "--dir", str(directory), "--nonce", nonce)]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
            said, code = (out.stdout + out.stderr).strip(), out.returncode
        except subprocess.TimeoutExpired:
            signal_steps([f"{STEP_PREFIX}shared_fs"], "KILL")
            said, code = f"no answer within deployment.shared_fs_timeout_s={timeout_s:g}", None
        deadline = time.monotonic() + (10.0 if code == 0 else 0.0)  # an NFS client may list a new file late
        while True:
            unseen = [node for node in self.nodes if not _has_nonce(directory / node, nonce)]
            if not unseen or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if unseen or code != 0:
            raise DeploymentError(
                f"the run directory {self.run_dir} is not shared by every node: no answer from node(s) "
                f"{', '.join(unseen) or '?'} in {directory}. deployment=slurm needs the run directory on a "
                "filesystem every node mounts at the same path (set hydra.run.dir=/shared/path/...)."
                + (f"\nsrun said:\n{said[-2000:]}" if said else "")
            )

    def where(self, job: Job) -> str:
        return f" on node{'s' if len(job.nodes) > 1 else ''} {','.join(job.nodes)}" if job.nodes else ""


def _has_nonce(path: Path, nonce: str) -> bool:
    import json

    try:
        return json.loads(path.read_text()).get("nonce") == nonce
    except (OSError, ValueError, AttributeError):
        return False


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "localhost")


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def signal_steps(names: Iterable[str], sig: str) -> list[str]:
    """`scancel -s <sig>` the steps of this allocation with these names; the step ids signalled."""
    job_id = os.environ.get("SLURM_JOB_ID")
    wanted = set(names)
    if not job_id or not wanted:
        return []
    try:
        listed = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"], capture_output=True,
                                text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    steps = [line.split()[0] for line in listed.splitlines() if len(line.split()) == 2 and line.split()[1] in wanted]
    if steps:
        try:
            subprocess.run(["scancel", "--quiet", "-s", sig, *steps], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return steps
