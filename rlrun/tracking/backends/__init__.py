"""The tracker registry: every backend is a `TrackerPlugin` under the `rlrun.trackers` entry-point
group, rlrun's own (pyproject.toml) and any installed package's alike, so one list of names
comes from the entry points, and a team adds its tracker without editing rlrun. A backend's
library is imported only when the backend is chosen.

A third-party package declares, in its pyproject.toml,

    [project.entry-points."rlrun.trackers"]
    mytracker = "mytracker_rlrun:PLUGIN"     # a TrackerPlugin(config=MyConfig, backend="mytracker_rlrun.backend:MyBackend")

and `python -m rlrun 'logger=[jsonl,mytracker]' logger.mytracker.some_key=...` uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from importlib.metadata import entry_points
from typing import Any

from rlrun.tracking.base import Backend
from rlrun.tracking.config import BUILTIN, DeliveryConfig, TrackerPlugin

ENTRY_POINT_GROUP = "rlrun.trackers"


@functools.cache
def plugins() -> dict[str, TrackerPlugin]:
    """Every registered backend, jsonl first, then by name."""
    found: dict[str, TrackerPlugin] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must say which one
            raise RuntimeError(f"tracker plugin {ep.name!r} ({ep.value}, entry point group "
                               f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}") from exc  # fmt: skip
        if not isinstance(plugin, TrackerPlugin) or not dataclasses.is_dataclass(plugin.config):
            raise RuntimeError(f"tracker plugin {ep.name!r} ({ep.value}): expected an "
                               "rlrun.tracking.config.TrackerPlugin whose `config` is a dataclass")  # fmt: skip
        found[ep.name] = plugin
    # Run from a source tree that was never pip-installed: rlrun's own still work.
    for name, plugin in BUILTIN.items():
        found.setdefault(name, plugin)
    return {"jsonl": found.pop("jsonl"), **found}


@functools.cache
def logger_schema() -> type:
    """The `logger` node's schema: one field per registered backend, plus `delivery`."""
    fields = [(name, p.config, dataclasses.field(default_factory=p.config)) for name, p in plugins().items()]
    fields.append(("delivery", DeliveryConfig, dataclasses.field(default_factory=DeliveryConfig)))
    schema = dataclasses.make_dataclass("LoggerConfig", fields)
    schema.__module__ = __name__
    return schema


def selectable(name: str) -> bool:
    """A backend that `logger.<name>.enabled` turns on (jsonl is always on)."""
    return any(f.name == "enabled" for f in dataclasses.fields(plugins()[name].config))


def enabled_backends(logger_cfg: Any) -> list[str]:
    """Backend names selected by a `logger` config node; jsonl always comes first."""
    return ["jsonl"] + [name for name in plugins() if selectable(name) and logger_cfg[name].enabled]


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, cls_name = plugins()[name].backend.split(":")
    except KeyError:
        raise ValueError(f"unknown tracking backend {name!r}; known: {sorted(plugins())}") from None
    return getattr(importlib.import_module(module_name), cls_name)
