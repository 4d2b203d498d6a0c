"""Environments (tasks): prompts plus one or more named reward functions.

The registry maps a task name to an import path so that listing or validating tasks
imports no environment code.
"""

from __future__ import annotations

import importlib

ENVIRONMENTS: dict[str, str] = {
    "reverse_text": "rlrun.envs.reverse_text:ReverseText",
}


def load_environment(cfg):  # cfg: the `task` config node
    module_name, cls_name = ENVIRONMENTS[cfg.name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg)
