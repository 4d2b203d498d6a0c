"""Every metric name each job will log, known before any job starts, and the check that each
enabled tracker backend can take them all (`check_metric_names`, run by the launcher).

Names follow the config: per environment (`<env>/...`, with several), per reward function
(`rewards/<fn>/*`, where the environment declares its functions: `Environment.reward_names`),
per pass@k, per job (`system/rss_mb/<job>`, `gpu/<i>/job_memory_used_gb/<job>`), per node across several
(`system/<node>/...`, `deployment.nodes`, settled inside the allocation). The list is a superset of what a run logs (a
metric logged only on CUDA is listed anyway); tests hold it against every name real runs log.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rlrun.inference.launch import server_jobs
from rlrun.schema import ConfigError

COMPLETION_STATS = tuple(f"completions/{s}" for s in (
    "mean_length", "min_length", "max_length", "mean_terminated_length", "min_terminated_length",
    "max_terminated_length", "clipped_ratio",
))  # fmt: skip
ENV_ERRORS = ("score", "timeout", "worker_restarts")
ORCHESTRATOR_TIMES = ("generate", "score", "update_weights", "wait_for_weights", "write_batch", "eval", "step")
TRAINER_TIMES = ("wait_for_batch", "forward_backward", "optimizer_step", "save_weights", "checkpoint", "step")
SFT_TIMES = ("forward_backward", "optimizer_step", "eval", "step")
TRAINER_SCALARS = (
    "loss", "grad_norm", "lr", "tokens/s", "entropy", "kl", "num_loss_tokens",
    "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean",
    "is/truncated_frac", "is/masked_frac", "perf/tokens_per_s", "perf/mfu", "perf/peak_memory_gb",
    "idle/trainer_wait_frac",
)  # fmt: skip
# What trainer/loss.py's mismatch_stats returns, in its order (here, so the launcher's check imports no torch).
MISMATCH_STATS = tuple(f"mismatch/{name}" for name in (
    "kl", "logprob_diff_mean", "logprob_diff_max", "ppl_ratio", "token_ratio_min", "token_ratio_mean",
    "token_ratio_max", "seq_ratio_min", "seq_ratio_mean", "seq_ratio_max",
))  # fmt: skip
MONITOR_JOBS = ("sft", "orchestrator", "trainer")  # and each inference server's job (`server_jobs`)
SYSTEM = ("system/elapsed_s", "system/train_step", "system/cpu_percent", "system/ram_used_gb", "system/ram_percent",
          "system/disk_used_gb", "system/disk_percent", "system/run_dir_gb")  # fmt: skip
GPU_STATS = ("utilization", "memory_utilization", "memory_used_gb", "memory_total_gb", "power_w", "temperature_c")
GPU_NODE = ("count", "utilization", "memory_used_gb", "memory_total_gb", "power_w", "temperature_c")
MAX_GPUS_LISTED = 8  # gpu/<i>/* for i below this: the GPU count is known only on the node


class JobMetrics(NamedTuple):
    scalars: list[str]  # `Tracker.log_metrics` names
    distributions: list[str]  # `Tracker.log_distribution` names


def _reward_names(fns: list[str] | None) -> list[str]:
    names = ["reward", "reward_std", "frac_reward_zero_std"]
    return names + [f"rewards/{fn}/{stat}" for fn in fns or () for stat in ("mean", "std")]


def _eval_names(fns: list[str] | None, cfg: Any) -> list[str]:
    names = [f"eval/{n}" for n in _reward_names(fns) + list(COMPLETION_STATS) if n != "frac_reward_zero_std"]
    n = int(cfg.orchestrator.eval_samples_per_prompt)
    if n > 1:
        names += [f"eval/avg@{n}"] + [f"eval/pass@{k}" for k in sorted(set(cfg.orchestrator.eval_pass_k)) if 0 < k <= n]
    return names


def planned_metrics(cfg: Any) -> dict[str, JobMetrics]:
    """Per job, the names it will log with `cfg` (imports the environments' classes)."""
    from rlrun.envs import MIXTURE, env_configs, environment_class

    envs = env_configs(cfg.task)
    fns: dict[str, list[str] | None] = {}
    for key, env_cfg in envs.items():
        declared = environment_class(env_cfg.name).reward_names
        fns[key] = None if declared is None else list(declared)
    all_fns = sorted({fn for names in fns.values() for fn in names or ()})  # an undeclared env adds none
    several = cfg.task.name == MIXTURE and len(envs) > 1

    orchestrator = _reward_names(all_fns) + list(COMPLETION_STATS)
    orchestrator += ["num_tokens", "tokens/s", "off_policy_steps", "idle/inference_wait_frac"]
    orchestrator += [f"time/{t}" for t in ORCHESTRATOR_TIMES]
    orchestrator += [f"{key}/errors/{kind}" for key in envs for kind in ENV_ERRORS]
    # Each env's own, beside the totals, when there are several (training's and evaluation's).
    env_train = [f"{key}/{n}" for key in envs for n in _reward_names(fns[key]) + list(COMPLETION_STATS)] if several else []
    env_eval = [f"{key}/{n}" for key in envs for n in _eval_names(fns[key], cfg)] if several else []
    orchestrator += env_train
    if cfg.orchestrator.eval_interval > 0:
        orchestrator += _eval_names(all_fns, cfg) + env_eval

    trainer = list(TRAINER_SCALARS) + list(MISMATCH_STATS) + [f"time/{t}" for t in TRAINER_TIMES]
    sft = ["loss", "grad_norm", "lr", "tokens/s", "num_loss_tokens", "num_tokens"] + [f"time/{t}" for t in SFT_TIMES]
    sft += _eval_names(all_fns, cfg) + env_eval
    jobs = [*MONITOR_JOBS, *server_jobs(int(cfg.inference.num_servers))]
    monitor = list(SYSTEM) + [f"system/{m}/{job}" for m in ("rss_mb", "job_cpu_percent") for job in jobs]
    if cfg.monitor.gpu:
        monitor += [f"gpu/{i}/{s}" for i in range(MAX_GPUS_LISTED) for s in GPU_STATS] + [f"gpu/node/{s}" for s in GPU_NODE]
        monitor += [f"gpu/{i}/job_memory_used_gb/{job}" for i in range(MAX_GPUS_LISTED) for job in jobs]
    monitor += _node_names(cfg)

    plan = {
        "orchestrator": JobMetrics(orchestrator, ["distributions/reward", "distributions/advantage",
                                                  "distributions/completion_length"]),
        "trainer": JobMetrics(trainer, ["distributions/entropy", "distributions/importance_ratio",
                                        "distributions/per_token_loss"]),
    }  # fmt: skip
    if cfg.sft.max_steps > 0:
        plan["sft"] = JobMetrics(sft, [])
    if cfg.monitor.system or cfg.monitor.gpu:
        plan["monitor"] = JobMetrics(monitor, [])
    return plan


def _node_names(cfg: Any) -> list[str]:
    """Each node's usage as the nodes' samplers name it (rlrun.launcher.node.by_node)."""
    nodes = list(getattr(cfg.deployment, "nodes", None) or [])
    jobs = [*MONITOR_JOBS, *server_jobs(int(cfg.inference.num_servers))]  # one server per inference node
    names = []
    for node in nodes:
        names += [f"system/{node}/{m}" for m in ("cpu_percent", "ram_used_gb", "ram_percent")]
        names += [f"system/{node}/{m}/{job}" for m in ("rss_mb", "job_cpu_percent") for job in jobs]
        if cfg.monitor.gpu:
            names += [f"gpu/{node}/{i}/{s}" for i in range(MAX_GPUS_LISTED) for s in GPU_STATS]
            names += [f"gpu/{node}/{s}" for s in GPU_NODE]
    return names


def check_metric_names(cfg: Any) -> None:
    """ConfigError naming the metric, its job and the backend, for a name that some job logs
    twice under one name or that an enabled backend cannot take."""
    from rlrun.tracking.backends import enabled_backends
    from rlrun.tracking.names import NAME_RULES

    plan = planned_metrics(cfg)
    for job, metrics in plan.items():
        seen: set[str] = set()
        for name in metrics.scalars:
            if name in seen:
                raise ConfigError(f"metric {name!r} of the {job} job: two different metrics get this name "
                                  "(an environment key that repeats a metric's name?)")  # fmt: skip
            seen.add(name)
    for backend in enabled_backends(cfg.logger):
        rule = NAME_RULES.get(backend)
        problem = rule(plan, cfg.logger[backend]) if rule else None
        if problem:
            raise ConfigError(f"{problem} (logger.{backend}: rename it, e.g. the environment key in task.envs, "
                              f"or leave {backend} out)")  # fmt: skip
