"""What every package's config schema builds on: `checked` fields and `ConfigError`.

A schema states its value rules on the field itself (`batch_size: int = checked(16, gt=0)`);
`check_fields` walks a composed config and raises ConfigError naming the first bad key.
Types and unknown keys are Hydra's and OmegaConf's job (they fail at composition).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that is well-typed but unusable; the message names the key."""


def checked(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
            one_of: Collection[str] | None = None) -> Any:  # fmt: skip
    """A dataclass field with a default and the rules its value must follow (None passes)."""
    rules = {k: v for k, v in {"gt": gt, "ge": ge, "le": le, "one_of": one_of}.items() if v is not None}
    return dataclasses.field(default=default, metadata={"rules": rules})


def _problem(value: Any, rules: dict[str, Any]) -> str | None:
    if value is None:
        return None
    if "gt" in rules and not value > rules["gt"]:
        return f"must be > {rules['gt']}"
    if "ge" in rules and not value >= rules["ge"]:
        return f"must be >= {rules['ge']}"
    if "le" in rules and not value <= rules["le"]:
        return f"must be <= {rules['le']}"
    if "one_of" in rules and value not in rules["one_of"] and str(value).upper() not in rules["one_of"]:
        return f"must be one of {sorted(rules['one_of'])}"
    return None


def check_fields(node: DictConfig, prefix: str = "") -> None:
    """Raise ConfigError for the first value in `node` (recursively) that breaks its field's rules."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            rules = f.metadata.get("rules")
            if rules and f.name in node:
                problem = _problem(node[f.name], rules)
                if problem:
                    raise ConfigError(f"{prefix}{f.name}={node[f.name]!r}: {problem}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            check_fields(child, f"{prefix}{key}.")
