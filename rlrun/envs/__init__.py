"""Environments (tasks): prompts plus one or more named reward functions.

The registry maps a task name to an import path so that listing or validating tasks
imports no environment code.
"""

from __future__ import annotations

import importlib

ENVIRONMENTS: dict[str, str] = {
    "reverse_text": "rlrun.envs.reverse_text:ReverseText",
    "reasoning_gym": "rlrun.envs.reasoning_gym_env:ReasoningGym",  # pip install 'rlrun[envs]'
    "verifiers": "rlrun.envs.verifiers_env:Verifiers",  # pip install 'rlrun[envs]'
}
MIXTURE = "mixture"  # task.name of a task made of several environments (task.envs)


def environment_class(name: str):
    module_name, cls_name = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def load_environment(cfg):  # cfg: one environment's config (rlrun.envs.config.EnvConfig)
    return environment_class(cfg.name)(cfg)


def env_configs(task_cfg) -> dict:
    """The task's environments by key: a mixture's `envs`, or the one env under its own name."""
    if task_cfg.name == MIXTURE:
        return dict(task_cfg.envs)
    return {str(task_cfg.name): task_cfg}


def load_task(task_cfg):
    """The task as one Environment: a Mixture of its envs (one env: a mixture of one), whose
    examples carry the key of the env they came from (`Example.env`)."""
    from rlrun.envs.mixture import Mixture

    return Mixture({key: load_environment(cfg) for key, cfg in env_configs(task_cfg).items()},
                   {key: float(cfg.weight) for key, cfg in env_configs(task_cfg).items()})  # fmt: skip
