"""Schemas of the `deployment` group: where the run's jobs run.

`deployment=local` (the default) runs every job on this machine; `deployment=slurm` spreads
one run over the nodes of a Slurm allocation (see rlrun/launcher/deployment/slurm.py). Each
option's YAML names its schema (as `conf/inference/*.yaml` do), so a Slurm-only key given
to `local` fails at composition, naming the key. The Slurm keys carry the sweep launcher's
names (`conf/hydra/launcher/submitit_slurm.yaml`): partition, account, timeout_min,
gpus_per_node, cpus_per_task, mem_gb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rlrun.schema import ConfigError, checked

NAMES = ("local", "slurm")


@dataclass
class DeploymentConfig:
    name: str = checked("local", one_of=NAMES)


@dataclass
class LocalDeploymentConfig(DeploymentConfig):
    """Every job on this machine (inference, orchestrator, trainer ranks under torchrun --standalone)."""


@dataclass
class SlurmDeploymentConfig(DeploymentConfig):
    """One run over several nodes: inference nodes first, then train nodes, in the allocation's order."""

    name: str = checked("slurm", one_of=NAMES)
    num_train_nodes: int = checked(1, gt=0)  # the trainer's torchrun spans them; trainer.num_ranks = nodes x ranks per node
    num_infer_nodes: int = checked(1, gt=0)  # one inference server per node
    gpus_per_node: Optional[int] = checked(None, ge=0)  # --gpus-per-node of the allocation and of each GPU step
    exclusive: bool = True  # whole nodes (sbatch --exclusive): the run's jobs share each node's CPUs and GPUs
    cpus_per_task: Optional[int] = checked(None, gt=0)  # CPUs per node (one task per node); null: what the allocation has
    mem_gb: Optional[int] = checked(None, gt=0)  # --mem per node; null: the partition's default
    partition: Optional[str] = None  # null: the cluster's default partition
    account: Optional[str] = None
    timeout_min: int = checked(60, gt=0)  # --time of the allocation, minutes
    requeue: bool = True  # a preempted or requeued allocation runs again and resumes from the newest checkpoint
    dry_run: bool = False  # outside an allocation: write <run>/rlrun.sbatch, do not submit it
    shared_fs_timeout_s: float = checked(60.0, gt=0)  # the check that every node sees the run directory
    # Settled by the parent inside the allocation (what is given is replaced): the nodes the run
    # uses, inference nodes first; the record of where it ran, and the nodes' metric names.
    nodes: list[str] = field(default_factory=list)


SCHEMAS: dict[str, type[DeploymentConfig]] = {"local": LocalDeploymentConfig, "slurm": SlurmDeploymentConfig}


def check_deployment(cfg: Any) -> None:
    """The rules that span groups; ConfigError naming the key."""
    dep = cfg.deployment
    if dep.name != "slurm":
        return
    nodes, ranks = int(dep.num_train_nodes), int(cfg.trainer.num_ranks)
    if ranks % nodes:
        raise ConfigError(
            f"trainer.num_ranks={ranks}: must be a multiple of deployment.num_train_nodes={nodes} (the same number "
            f"of ranks on every train node), e.g. trainer.num_ranks={nodes * max(1, ranks // nodes)}"
        )
    per_node = ranks // nodes
    if cfg.trainer.device == "cuda" and dep.gpus_per_node is not None and per_node > int(dep.gpus_per_node):
        raise ConfigError(
            f"trainer.num_ranks={ranks}: {per_node} ranks per train node but deployment.gpus_per_node="
            f"{dep.gpus_per_node} (one GPU per rank with trainer.device=cuda)"
        )


def ranks_per_node(cfg: Any) -> int:
    return int(cfg.trainer.num_ranks) // int(cfg.deployment.num_train_nodes)
