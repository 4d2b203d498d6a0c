"""`deployment=slurm` outside an allocation: write `<run>/rlrun.sbatch` and submit it.

The script asks for `num_infer_nodes + num_train_nodes` nodes (one task each) and re-runs the
same `python -m rlrun ...` command inside the allocation, from the same directory and with
the same Python, `hydra.run.dir` pinned to this run directory, where `deployment=slurm`
then places the jobs with srun (rlrun/launcher/deployment/slurm.py). sbatch passes the
submitting shell's environment on (its default `--export=ALL`: PATH, PYTHONPATH, API keys).
A requeued allocation (preemption, node failure, `scontrol requeue`) runs the script again
and resumes the run from its newest checkpoint (`resume_from`), as a single-node run does.
`deployment.dry_run=true` writes the script only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from rlrun.schema import ConfigError

SCRIPT = "rlrun.sbatch"
_DROPPED = ("deployment.dry_run=", "hydra.run.dir=", "resume_from=")  # the script sets these itself


def check_overrides(overrides: list[str], cfg: Any) -> None:
    """A secret typed on the command line would be written into the script: refuse it, naming the key."""
    from rlrun.redact import extract_secrets

    found = extract_secrets(cfg)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if any(str(secret) and str(secret) in value for secret in found.values()):
            raise ConfigError(f"{key}: a secret on the command line would be written into {SCRIPT}; with "
                              "deployment=slurm pass it through the environment (e.g. WANDB_API_KEY), which sbatch "
                              "hands to the allocation")  # fmt: skip


def sbatch_script(cfg: Any, run_dir: Path, overrides: list[str], cwd: Path | None = None) -> str:
    """The batch script for this run (see the module docstring)."""
    dep = cfg.deployment
    run = shlex.quote(str(run_dir))
    lines = [
        "#!/bin/bash",
        "# Written by `python -m rlrun deployment=slurm` (rlrun/launcher/deployment/sbatch.py).",
        f"#SBATCH --job-name={cfg.name}",
        f"#SBATCH --nodes={int(dep.num_infer_nodes) + int(dep.num_train_nodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={int(dep.timeout_min)}",
        f"#SBATCH --output={run_dir / 'slurm-%j.out'}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue" if dep.requeue else "#SBATCH --no-requeue",
        *(["#SBATCH --exclusive"] if dep.exclusive else []),
    ]
    for option, value in (("partition", dep.partition), ("account", dep.account), ("gpus-per-node", dep.gpus_per_node),
                          ("cpus-per-task", dep.cpus_per_task)):  # fmt: skip
        if value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    if dep.mem_gb is not None:
        lines.append(f"#SBATCH --mem={int(dep.mem_gb)}G")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(_DROPPED)]
    command = [sys.executable, "-m", "rlrun", *kept, f"hydra.run.dir={run_dir}"]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd or Path.cwd()))}",
        "# A requeued allocation resumes this run from its newest checkpoint.",
        'resume=""',
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && [ -f {run}/config.yaml ]; then resume={shlex.quote(f"resume_from={run_dir}")}; fi',
        f'exec {shlex.join(command)} ${{resume:+"$resume"}}',
        "",
    ]
    return "\n".join(lines)


def submit(cfg: Any, run_dir: Path, overrides: list[str]) -> int:
    """Write the script; submit it unless `deployment.dry_run`. The process exit code."""
    from rlrun.config import validate
    from rlrun.launcher import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

    try:
        validate(cfg)
        check_overrides(overrides, cfg)
    except ConfigError as exc:
        print(f"rlrun: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SCRIPT
    path.write_text(sbatch_script(cfg, run_dir, overrides))
    os.chmod(path, 0o755)
    if cfg.deployment.dry_run:
        print(f"rlrun: wrote {path} (deployment.dry_run=true: not submitted; submit it with `sbatch {path}`)")
        return EXIT_OK
    if shutil.which("sbatch") is None:
        print(f"rlrun: deployment=slurm: `sbatch` not found, so this is not a Slurm login node (wrote {path}). "
              "Run where Slurm's commands work, inside an allocation (salloc), or with deployment=local.",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        print(f"rlrun: sbatch refused {path} (exit {out.returncode}): {out.stderr.strip()}", file=sys.stderr)
        return EXIT_FAILED
    job_id = out.stdout.strip().split(";")[0]
    print(f"rlrun: submitted Slurm job {job_id} ({path})\n"
          f"  the run's logs: {run_dir / 'logs'} (rl.log first); Slurm's output: {run_dir / f'slurm-{job_id}.out'}\n"
          f"  watch it: squeue -j {job_id}; stop it: scancel {job_id}")  # fmt: skip
    return EXIT_OK
