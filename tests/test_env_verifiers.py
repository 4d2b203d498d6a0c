"""task=verifiers: a verifiers (0.4, `verifiers.v1`) environment package as rlrun's task.

The tests build and install their own environment, `tests/verifiers_envs/rlrun_test_reverse`
(id `rlrun-test-reverse`: reverse `abcd=` -> `dcba`; rewards `exact`, weight 1.0, and
`length_match`, weight 0.5), into a temporary directory that goes on `sys.path` (and on the
app's `PYTHONPATH`); nothing is installed into the venv.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, app_env, metrics, pip_install_site, run_app

pytest.importorskip("verifiers.v1")

from omegaconf import OmegaConf  # noqa: E402

from rlrun.envs.config import EnvConfig, EnvWorkersConfig  # noqa: E402
from rlrun.envs.verifiers_env import Verifiers  # noqa: E402

ENV_ID = "rlrun-test-reverse"
PACKAGE = ROOT / "tests" / "verifiers_envs" / "rlrun_test_reverse"
REWARDS = ("exact", "length_match")
WEIGHTS = {"exact": 1.0, "length_match": 0.5}  # the environment's own (its @vf.reward decorators)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The test environment installed into `<tmp>/site`, which is on sys.path meanwhile."""
    site = pip_install_site(PACKAGE, tmp_path_factory.mktemp("verifiers_env"))
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))  # spawned env workers inherit sys.path
        importlib.invalidate_caches()
        yield site
    for name in [m for m in sys.modules if m == "rlrun_test_reverse" or m.startswith("rlrun_test_reverse.")]:
        del sys.modules[name]


def _cfg(**kw):
    kw.setdefault("env_id", ENV_ID)
    kw.setdefault("num_eval_prompts", 4)
    kw.setdefault("env_args", {"num_tasks": 20})
    return OmegaConf.structured(EnvConfig(name="verifiers", **kw))


def _env(**kw) -> Verifiers:
    cfg = _cfg(**kw)
    Verifiers.check_config(cfg)
    return Verifiers(cfg)


# ---------------------------------------------------------------- loading and sampling


def test_import_is_cheap():
    """Importing the module (the registry, the launcher) imports no verifiers."""
    code = "import sys, rlrun.envs.verifiers_env; assert 'verifiers' not in sys.modules, 'imported verifiers'"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_reward_fns_found_without_loading_or_scoring(site):
    env = _env()
    assert list(env.reward_fns) == list(REWARDS)
    assert env.default_reward_weights == WEIGHTS
    assert env.library_loggers == ["verifiers"]
    assert env._tasks is None, "names and weights come from the Task class, not from loaded tasks"


def test_sample_train_and_eval(site):
    env = _env()
    tasks = env.tasks()
    assert len(tasks) == 20
    held_out = env.sample(random.Random(0), 4, split="eval")
    assert len(held_out) == 4
    assert [ex.info for ex in held_out] == [ex.info for ex in _env().sample(random.Random(99), 4, "eval")], \
        "the held-out set is the same for every rng and instance, in the same order"
    held_idx = {ex.info["task_index"] for ex in held_out}
    train = env.sample(random.Random(1), 200)
    assert not held_idx & {ex.info["task_index"] for ex in train}, "held-out tasks are never trained on"
    assert {ex.info["task_index"] for ex in train} == set(range(20)) - held_idx
    distinct = env.sample(random.Random(2), 16)
    assert len({ex.info["task_index"] for ex in distinct}) == 16, "no repeats within a call while there are enough"
    assert [e.info for e in env.sample(random.Random(3), 8)] == [e.info for e in env.sample(random.Random(3), 8)]

    for ex in held_out + train[:10]:
        task = tasks[ex.info["task_index"]]
        text = task.data.prompt.removesuffix("=")
        assert ex.prompt == text + "=" and ex.answer == text[::-1] == task.data.answer
        assert ex.messages == [{"role": "user", "content": ex.prompt}]
        assert set(ex.info) == {"task_index", "task_key"} and ex.info["task_key"] == task.key
        assert pickle.loads(pickle.dumps(ex)) == ex, "examples travel to spawned workers"


def test_system_prompt_in_prompt_and_messages(site):
    env = _env(env_args={"num_tasks": 10, "instruction": "Reverse it."})
    (ex,) = env.sample(random.Random(0), 1)
    user = env.tasks()[ex.info["task_index"]].data.prompt
    assert ex.messages == [{"role": "system", "content": "Reverse it."}, {"role": "user", "content": user}]
    assert ex.prompt == "Reverse it.\n\n" + user, "a plain model sees the system prompt, a blank line, the prompt"
    assert env.score(ex.answer, ex)["reward"] == 1.5


def test_too_few_tasks_for_the_held_out_set(site):
    env = _env(env_args={"num_tasks": 4}, num_eval_prompts=4)
    with pytest.raises(ValueError, match="num_eval_prompts=4 would leave none to train on"):
        env.sample(random.Random(0), 1)


# ---------------------------------------------------------------- scoring


def _example(env: Verifiers, answer_len_at_least: int = 3):
    """A training example whose answer is not a palindrome (so its mirror is a wrong answer)."""
    for ex in env.sample(random.Random(0), 16):
        if ex.answer != ex.answer[::-1] and len(ex.answer) >= answer_len_at_least:
            return ex
    raise AssertionError("no non-palindrome in 16 tasks")


def test_score_against_hand_computed_weighted_totals(site):
    env = _env()
    ex = _example(env)
    right, wrong_same_length, short = ex.answer, ex.answer[::-1], ex.answer[:-1]
    # exact * 1.0 + length_match * 0.5
    assert env.score(right, ex) == {"exact": 1.0, "length_match": 1.0, "reward": 1.5}
    assert env.score(right + "</s>", ex) == {"exact": 1.0, "length_match": 1.0, "reward": 1.5}, "cut at EOS"
    assert env.score(right + "</s>abc", ex)["reward"] == 1.5, "nothing after EOS counts"
    assert env.score(wrong_same_length, ex) == {"exact": 0.0, "length_match": 1.0, "reward": 0.5}
    assert env.score(short, ex) == {"exact": 0.0, "length_match": 0.0, "reward": 0.0}
    assert env.score("", ex) == {"exact": 0.0, "length_match": 0.0, "reward": 0.0}
    assert env.reward_fns["length_match"](wrong_same_length, ex) == 1.0, "each function scores its own reward"


def test_reward_weights_replace_the_environments_own(site):
    ex = _example(_env())
    env = _env(reward_weights={"length_match": 2.0})
    assert env.score(ex.answer, ex) == {"exact": 1.0, "length_match": 1.0, "reward": 3.0}
    assert env.score(ex.answer[::-1], ex)["reward"] == 2.0
    env = _env(reward_weights={"exact": 0.0})
    assert env.score(ex.answer, ex) == {"exact": 1.0, "length_match": 1.0, "reward": 0.5}


def test_plugged_reward_with_keyed_sub_scores(site):
    """A reward plugged through env_args (`task.rewards`) is found without scoring; its keyed
    sub-scores count in `reward` with its weight, and its own score is their sum."""
    plug = {"ends": {"fn": "rlrun_test_reverse.taskset:ends", "weight": 0.25}}
    env = _env(env_args={"num_tasks": 20, "task": {"rewards": plug}})
    assert list(env.reward_fns) == ["ends", "exact", "length_match"]  # verifiers' order: priority, then name
    assert env.default_reward_weights == {**WEIGHTS, "ends": 0.25}
    ex = _example(env)
    # first and last characters right (2 * 0.25), exact (1.0), length (0.5)
    assert env.score(ex.answer, ex) == {"ends": 2.0, "exact": 1.0, "length_match": 1.0, "reward": 2.0}
    wrong = ex.answer[0] + "x" * (len(ex.answer) - 1)  # first right, last wrong, same length
    assert env.score(wrong, ex) == {"ends": 1.0, "exact": 0.0, "length_match": 1.0, "reward": 0.75}
    env = _env(env_args={"num_tasks": 20, "task": {"rewards": plug}}, reward_weights={"ends": 1.0})
    assert env.score(wrong, ex)["reward"] == 1.5, "reward_weights.<fn> reweighs its sub-scores"


def test_a_reward_error_propagates(site):
    import verifiers.v1 as vf

    env = _env(env_args={"num_tasks": 20, "raise_on": "!"})
    ex = _example(env)
    assert env.score(ex.answer, ex)["reward"] == 1.5
    with pytest.raises(vf.TaskError, match="ValueError: length_match: refusing"):
        env.score(ex.answer + "!", ex)


def test_worker_pool_scores_and_counts_errors(site, tmp_path):
    """Through the env workers (spawned: the examples are pickled, each worker loads the taskset
    itself): the same scores as in-process, and a raising reward scores 0 and is counted."""
    from rlrun.envs.workers import EnvWorkerPool

    cfg = EnvConfig(name="verifiers", env_id=ENV_ID, num_eval_prompts=4, env_args={"num_tasks": 20, "raise_on": "!"})
    env = Verifiers(OmegaConf.structured(cfg))
    examples = env.sample(random.Random(0), 3)
    completions = [examples[0].answer + "</s>", examples[1].answer + "!", ""]
    with EnvWorkerPool(cfg, EnvWorkersConfig(num_workers=1), tmp_path / "logs") as pool:
        scores = pool.score(completions, examples)
        errors = pool.take_error_counts()
    assert scores[0] == env.score(completions[0], examples[0]) == {"exact": 1.0, "length_match": 1.0, "reward": 1.5}
    assert scores[1] == {"exact": 0.0, "length_match": 0.0, "reward": 0.0}
    assert scores[2] == {"exact": 0.0, "length_match": 0.0, "reward": 0.0}
    assert errors["score"] == 1
    log = (tmp_path / "logs" / "env_workers" / "verifiers.log").read_text()
    assert "TaskError" in log and "length_match" in log


# ---------------------------------------------------------------- bad settings


def test_unknown_env_id_lists_the_installed_ones(site):
    with pytest.raises(ValueError) as info:
        Verifiers.check_config(_cfg(env_id="no-such-env"))
    message = str(info.value)
    assert "env_id='no-such-env'" in message and "no_such_env" in message
    assert ENV_ID in message, "lists the installed environments"


def test_missing_env_id(site):
    with pytest.raises(ValueError, match=f"env_id: required.*{ENV_ID}"):
        Verifiers.check_config(_cfg(env_id=None))


@pytest.mark.parametrize(
    ("env_args", "named"),
    [
        ({"num_taks": 3}, "env_args.num_taks: Extra inputs are not permitted"),
        ({"num_tasks": "many"}, "env_args.num_tasks: Input should be a valid integer"),
        ({"id": "other"}, "env_args.id"),
    ],
)
def test_bad_env_args_name_the_field(site, env_args, named):
    with pytest.raises(ValueError, match=named) as info:
        Verifiers.check_config(_cfg(env_args=env_args))
    if "num_taks" in env_args:
        assert "takes: " in str(info.value) and "num_tasks" in str(info.value), "lists the accepted fields"


def test_reward_weights_must_name_its_rewards(site):
    with pytest.raises(ValueError, match=r"unknown reward functions \['lcs'\].*exact.*length_match"):
        Verifiers.check_config(_cfg(reward_weights={"lcs": 1.0}))


# ---------------------------------------------------------------- the whole app


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_app_trains_on_a_verifiers_env(site, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_app(
        run_dir, "task=verifiers", f"task.env_id={ENV_ID}", "task.num_eval_prompts=8", "sft.max_steps=0",
        "max_steps=3", "orchestrator.batch_size=4", "orchestrator.group_size=4", "logger=[jsonl,mlflow,tensorboard]",
        f"logger.mlflow.tracking_uri={uri}", timeout=360,
        env=app_env(tmp_path, PYTHONPATH=str(site), MLFLOW_DISABLE_TELEMETRY="true"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    log = run_dir / "logs" / "env_workers" / "verifiers.log"
    assert log.exists() and "ready" in log.read_text()

    keys = ["reward", *(f"rewards/{fn}/mean" for fn in REWARDS)]
    jsonl = {r["step"]: r["metrics"] for r in metrics(run_dir, "orchestrator")}
    assert sorted(jsonl) == [1, 2, 3]
    for step, m in jsonl.items():
        for key in keys:
            assert 0.0 <= m[key] <= 1.5, (step, key)
        # The mean of a weighted sum is the weighted sum of the means.
        assert m["reward"] == pytest.approx(sum(WEIGHTS[fn] * m[f"rewards/{fn}/mean"] for fn in REWARDS)), step
    assert "eval/reward" in jsonl[3] and "eval/rewards/length_match/mean" in jsonl[3]

    import yaml

    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["mlflow"]["run_id"]
    client = MlflowClient(uri)
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"orchestrator/{key}"))
        assert history == [(s, pytest.approx(jsonl[s][key])) for s in (1, 2, 3)], key

    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*") if "orchestrator" in str(p)}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for key in keys:
        scalars = [(e.step, e.value) for e in acc.Scalars(key)]
        assert scalars == [(s, pytest.approx(jsonl[s][key], abs=1e-6)) for s in (1, 2, 3)], key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["task.env_id=no-such-env"], ["task.env_id='no-such-env': no installed verifiers environment", ENV_ID]),
        ([f"task.env_id={ENV_ID}", "+task.env_args.num_taks=3"], ["task.env_args.num_taks: Extra inputs are not"]),
        (["task.env_id=null"], ["task.env_id: required", ENV_ID]),
    ],
)
def test_a_bad_verifiers_task_fails_before_any_job(site, tmp_path, overrides, named):
    run_dir = tmp_path / "run"
    out = run_app(run_dir, "task=verifiers", *overrides, timeout=120, env=app_env(tmp_path, PYTHONPATH=str(site)))
    assert out.returncode != 0
    for text in named:
        assert text in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert not (run_dir / "logs").exists(), "no job started"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_nan_reward_stops_the_run_through_the_doctor(site, tmp_path):
    """The environment's `exact` turns NaN from step 4 on (16 completions a step) and
    `doctor.stop_on=[nan]`: the run stops within a step with EXIT_DOCTOR, every backend holds
    the alert, and the last checkpoint loads with finite weights (the NaN update was skipped)."""
    import torch
    import yaml
    from conftest import records, wandb_records
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlrun.launcher import EXIT_DOCTOR
    from rlrun.tracking.record import read_alerts
    from rlrun.trainer.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_app(
        run_dir, "task=verifiers", f"task.env_id={ENV_ID}", "+task.env_args.nan_after=48", "sft.max_steps=0",
        "max_steps=30", "orchestrator.batch_size=4", "orchestrator.group_size=4", "orchestrator.eval_interval=0",
        "orchestrator.max_async_steps=0", "trainer.checkpoint_interval=2", "doctor.stop_on=[nan]",
        "logger=[jsonl,mlflow,tensorboard,wandb]", f"logger.mlflow.tracking_uri={uri}", "logger.wandb.offline=true",
        timeout=360, env=app_env(tmp_path, PYTHONPATH=str(site), MLFLOW_DISABLE_TELEMETRY="true"),
    )  # fmt: skip
    assert out.returncode == EXIT_DOCTOR, out.stdout[-3000:] + out.stderr[-3000:]
    assert "the run doctor stopped the run" in out.stdout + out.stderr

    rewards = {r["step"]: r["metrics"]["reward"] for r in metrics(run_dir, "orchestrator")}
    assert all(rewards[s] == rewards[s] for s in (1, 2, 3)) and rewards[4] != rewards[4], "NaN from step 4"
    first = {}
    for alert in read_alerts(run_dir):
        first.setdefault(alert["job"], alert)
    assert (first["orchestrator"]["rule"], first["orchestrator"]["metric"], first["orchestrator"]["step"]) == (
        "nan", "reward", 4)
    assert first["orchestrator"]["stop"] is True
    for job in ("orchestrator", "trainer"):
        assert max(r["step"] for r in metrics(run_dir, job)) <= 5, f"{job} stopped within one step"

    from rlrun.model import load_model

    policy, _ = load_model(str(run_dir / "model"), "float32", "cpu", False)
    optimizer = torch.optim.AdamW(policy.parameters())
    state = load_checkpoint(run_dir, policy, optimizer, torch.device("cpu"))
    assert state is not None and state["step"] in (2, 4)
    assert all(torch.isfinite(p).all() for p in policy.parameters())

    texts = {a["text"] for a in read_alerts(run_dir)}
    run_id = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["mlflow"]["run_id"]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["rlrun.alert.orchestrator.nan"] in texts
    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*") if "orchestrator" in str(p)}
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    assert acc.Tensors("alerts/orchestrator/nan/text_summary")[0].step == 4
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*orchestrator*.wandb")
    assert [r["alert"]["title"] for r in wandb_records(run_file) if r["type"] == "alert"] == ["orchestrator: nan"]
    assert records(run_dir, "orchestrator", "alert")[0]["text"] in texts
