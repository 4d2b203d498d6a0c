"""Keep secrets out of config dumps, tracker params and log files.

A value is secret when its key names one (api_key, token, password, secret) or when it
looks like a credential (W&B, Databricks/MLflow, Hugging Face, GitHub, OpenAI styles).
Secrets travel from the parent to its jobs only through the environment
(`RLRUN_SECRETS`), never through files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
SECRETS_ENV = "RLRUN_SECRETS"
# A key *named* like a credential: `api_key`, `hf_token`, `MLFLOW_TRACKING_PASSWORD`,
# `client_secret`, `AWS_SECRET_ACCESS_KEY`. Only the last word counts, so `max_tokens`,
# `num_tokens` or `secret_name_prefix` are ordinary settings.
_SECRET_KEY = re.compile(r"(?:^|[^a-z0-9])(?:api_?key|access_?key|token|password|passwd|secret)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"^(?:[0-9a-f]{40}"  # W&B classic API key
    r"|local-[0-9a-f]{40}"  # W&B local server key
    r"|wandb_v\d+_\w{20,}"  # W&B new-style key
    r"|dapi[0-9a-f]{32}(?:-\d+)?"  # Databricks / managed MLflow token
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face token
    r"|(?:ghp|gho|ghs|github_pat)_\w{20,}"  # GitHub token
    r"|sk-[A-Za-z0-9_-]{20,})$"  # OpenAI-style key
)
_known: set[str] = set()


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def looks_like_secret(value: Any) -> bool:
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value.strip()))


def redact(obj: Any) -> Any:
    """A copy of plain containers with every secret value replaced by `<redacted>`."""
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if looks_like_secret(obj) or (isinstance(obj, str) and obj in _known):
        return REDACTED
    return obj


def flatten(obj: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists become their JSON text."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- scrubbing free text


def register_secret(value: str | None) -> None:
    """Remember a secret value so `scrub` removes it from any text (log lines)."""
    if value and len(value) >= 6:
        _known.add(value)


def register_env_secrets() -> None:
    for name, value in os.environ.items():
        if is_secret_key(name) or looks_like_secret(value):
            register_secret(value)


def scrub(text: str) -> str:
    for value in _known:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


# ---------------------------------------------------------------- parent -> job hand-over


def extract_secrets(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value of every secret in an OmegaConf config (for the job env)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    return {
        k: v
        for k, v in flatten(plain).items()  # type: ignore[arg-type]
        if v not in (None, "") and (is_secret_key(k.rsplit(".", 1)[-1]) or looks_like_secret(v))
    }


def secrets_env(cfg: Any) -> dict[str, str]:
    found = extract_secrets(cfg)
    return {SECRETS_ENV: json.dumps(found)} if found else {}


def restore_secrets(cfg: Any) -> None:
    """Put secrets handed over through the environment back into `cfg`."""
    from omegaconf import OmegaConf

    raw = os.environ.get(SECRETS_ENV)
    if not raw:
        return
    for key, value in json.loads(raw).items():
        register_secret(str(value))
        OmegaConf.update(cfg, key, value, merge=False)
