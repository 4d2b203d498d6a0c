"""Launcher choice, checked before Hydra starts (`python -m rlrun -m hydra/launcher=...`).

Hydra would refuse an unknown launcher too, but with a traceback for a missing plugin;
this says which launchers exist and what to install.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hydra.errors import CompactHydraException

LAUNCHERS = {
    "basic": "Hydra's default: the jobs one after another, in this process",
    "submitit_local": "the jobs at the same time, as local processes (submitit)",
    "submitit_slurm": "one Slurm job per sweep job (submitit); settings under hydra.launcher.*",
    "submitit_slurm_gpu": "submitit_slurm with GPUs: gpus_per_node, more cpus and memory",
}
SUBMITIT_LAUNCHERS = {name for name in LAUNCHERS if name.startswith("submitit")}
INSTALL_HINT = "pip install 'rlrun[slurm]'  (or: pip install hydra-submitit-launcher)"


class SweepError(CompactHydraException):
    """A sweep that cannot start; Hydra prints just this message."""


def submitit_available() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


def missing_extra_message(launcher: str) -> str:
    return (
        f"hydra/launcher={launcher} needs hydra-submitit-launcher, which is not installed. "
        f"Install the slurm extra: {INSTALL_HINT}; or run the sweep without it: "
        "hydra/launcher=basic (the default)."
    )


def check_launcher_args(args: Sequence[str]) -> str | None:
    """What is wrong with the `hydra/launcher=...` on the command line (None: nothing)."""
    for arg in args:
        match = re.fullmatch(r"\+*hydra/launcher=(.*)", arg.strip())
        if not match:
            continue
        name = match.group(1).strip().strip("'\"")
        if name in SUBMITIT_LAUNCHERS and not submitit_available():
            return missing_extra_message(name)
        known = _known_launchers()
        if name not in known:
            choices = "\n".join(f"  hydra/launcher={n:<20} {LAUNCHERS.get(n, '(a Hydra plugin)')}" for n in known)
            return f"unknown launcher {name!r} (hydra/launcher={name}). Choose one of:\n{choices}"
    return None


def _known_launchers() -> list[str]:
    """Launcher configs Hydra can load: ours (conf/hydra/launcher), Hydra's, installed plugins'."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from rlrun.config import CONF_DIR

    names = {p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")} | {"basic"}
    Plugins.instance()  # plugins register their launcher configs when scanned
    try:
        names |= {n.removesuffix(".yaml") for n in ConfigStore.instance().list("hydra/launcher")}
    except OSError:
        pass
    return sorted(n for n in names if not n.startswith("_"))
