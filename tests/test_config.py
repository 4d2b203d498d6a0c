"""The Hydra config tree: composition through Hydra's compose API, schema errors, value
checks, and the `python -m rlrun` command line (`--cfg job`, `--help`) as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from rlrun.config import ConfigError, validate
from rlrun.tracking import enabled_backends


def _messages(exc: BaseException) -> str:
    """The exception's message and those of its causes (Hydra wraps OmegaConf's errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ---------------------------------------------------------------- (a) logger selection


def test_two_trackers_by_option_or_by_list(hydra_compose):
    by_option = hydra_compose("logger=wandb+mlflow")
    by_list = hydra_compose("logger=[wandb,mlflow]")
    assert enabled_backends(by_option.logger) == ["jsonl", "mlflow", "wandb"]
    assert enabled_backends(by_list.logger) == ["jsonl", "mlflow", "wandb"]
    assert OmegaConf.to_container(by_option.logger) == OmegaConf.to_container(by_list.logger)


def test_logger_all_and_default(hydra_compose):
    assert enabled_backends(hydra_compose("logger=all").logger) == ["jsonl", "console", "mlflow", "tensorboard", "wandb"]
    default = hydra_compose()
    assert enabled_backends(default.logger) == ["jsonl", "console"], "default: console (jsonl is always on)"
    # The default is typed all the way down: the schema's defaults fill every node.
    assert default.logger.wandb.offline is False and default.logger.delivery.retry_max_s == 30.0


def test_group_option_and_keys_combine(hydra_compose):
    cfg = hydra_compose("logger=[tensorboard,wandb]", "logger.wandb.offline=true", "trainer.lr=1e-4", "max_steps=5")
    assert enabled_backends(cfg.logger) == ["jsonl", "tensorboard", "wandb"]
    assert cfg.logger.wandb.offline is True
    assert cfg.trainer.lr == 1e-4 and cfg.max_steps == 5
    validate(cfg)


# ---------------------------------------------------------------- (b) composition errors


def test_unknown_logger_option_names_it(hydra_compose):
    with pytest.raises(MissingConfigException) as err:
        hydra_compose("logger=nope")
    message = str(err.value)
    assert "logger/nope" in message
    assert "wandb+mlflow" in message, "lists the options that do exist"


@pytest.mark.parametrize("override, key", [("logger.wandb.projct=x", "logger.wandb.projct"), ("nme=x", "nme")])
def test_unknown_key_names_it(hydra_compose, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        hydra_compose(override)
    assert key in str(err.value)


def test_appended_unknown_key_is_rejected(hydra_compose):
    with pytest.raises(Exception) as err:
        validate(hydra_compose("+trainer.nonsense=1"))
    assert "trainer.nonsense" in _messages(err.value)


@pytest.mark.parametrize("key, value", [("trainer.lr", "abc"), ("max_steps", "ten"), ("logger.wandb.offline", "maybe")])
def test_wrong_type_names_the_key(hydra_compose, key, value):
    with pytest.raises(ConfigCompositionException) as err:
        hydra_compose(f"{key}={value}")
    assert key in str(err.value)
    assert f"Value '{value}'" in _messages(err.value) and f"full_key: {key}" in _messages(err.value), (
        "OmegaConf's reason is kept"
    )


# ---------------------------------------------------------------- (c) value checks


def test_validate_accepts_the_default(hydra_compose):
    validate(hydra_compose())


def test_validate_names_group_size(hydra_compose):
    cfg = hydra_compose("orchestrator.group_size=0")  # well-typed: composition accepts it
    with pytest.raises(ConfigError, match=r"orchestrator\.group_size"):
        validate(cfg)


@pytest.mark.parametrize("override, key", [
    ("trainer.loss_type=ppo", "trainer.loss_type"), ("orchestrator.scale_rewards=rank", "orchestrator.scale_rewards"),
    ("trainer.keep_last=1", "trainer.keep_last"), ("log_extras.interval=0", "log_extras.interval"),
    ("orchestrator.log_extras.interval=0", "orchestrator.log_extras.interval"), ("log_level=LOUD", "log_level"),
    ("inference.gpu_memory_fraction=1.5", "inference.gpu_memory_fraction"),
    ("inference.gpu_memory_fraction=0", "inference.gpu_memory_fraction"), ("model.dtype=bf16", "model.dtype"),
    ("inference.num_servers=0", "inference.num_servers"),
])  # fmt: skip
def test_value_rules_on_the_fields_name_the_key(hydra_compose, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        validate(hydra_compose(override))


@pytest.mark.parametrize("overrides", [
    ("inference.num_servers=2", "inference.urls=[http://127.0.0.1:8000]"),  # one URL per server
    ("inference.urls=[ftp://127.0.0.1:8000]",), ("inference.urls=[http://127.0.0.1]",),  # not http://<host>:<port>
])  # fmt: skip
def test_inference_urls_that_do_not_fit_name_the_key(hydra_compose, overrides):
    with pytest.raises(ConfigError, match=r"inference\.urls"):
        validate(hydra_compose(*overrides))


def test_validate_names_model_path(hydra_compose, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path"):
        validate(hydra_compose("model=hf", f"model.path={tmp_path / 'nonexistent'}"))
    with pytest.raises(ConfigError, match=r"model\.path"):
        validate(hydra_compose("model=hf", "model.path=/nonexistent"))
    validate(hydra_compose("model=hf", f"model.path={tmp_path}"))  # an existing directory passes


# ---------------------------------------------------------------- (d) the command line
# `python -m rlrun` as a subprocess: `slow`, like every test that starts the app.


def _rlrun(*args: str, cwd, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "rlrun", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(tmp_path):
    out = _rlrun("--cfg", "job", "logger=wandb+mlflow", "trainer.lr=0.01", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert enabled_backends(printed.logger) == ["jsonl", "mlflow", "wandb"]
    assert printed.trainer.lr == 0.01 and printed.name == "rlrun"
    assert "hydra" not in printed, "--cfg job: the job's config only"
    assert not (tmp_path / "outputs").exists(), "printing the config starts no run"


@pytest.mark.slow
def test_help_lists_the_groups(tmp_path):
    out = _rlrun("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "== Configuration groups ==" in out.stdout
    assert "logger: aim, all, clearml, comet, console, dvclive, jsonl, mlflow, swanlab, tensorboard, trackio, wandb, wandb+mlflow" in out.stdout
    assert "model: hf, tiny" in out.stdout
    assert "python -m rlrun logger=wandb+mlflow" in out.stdout, "the app's own help header"


@pytest.mark.slow
def test_cfg_job_imports_no_heavy_library(tmp_path):
    out = _rlrun("--cfg", "job", "logger=all", cwd=tmp_path, python_flags=("-X", "importtime"))
    assert out.returncode == 0, out.stderr
    imported = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert {"hydra", "omegaconf", "rlrun"} <= imported, "the -X importtime report was read"
    heavy = {"torch", "wandb", "mlflow", "tensorboard", "transformers"} & imported
    assert not heavy, f"`--cfg job` imported {sorted(heavy)}"
