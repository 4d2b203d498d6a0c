"""Several inference servers (`inference.num_servers`): the client spreading requests over real
servers, and whole runs with two servers on this machine (`slow`)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import alive, assert_names_planned, metrics, spawn_app

from rlrun.inference.client import InferenceError, InferenceServers, even_shares
from rlrun.inference.engine import Engine
from rlrun.inference.launch import free_port, server_url, split_url
from rlrun.inference.server import InferenceServer
from rlrun.log import setup_logger
from rlrun.model import encode_prompt, load_model, save_weights
from rlrun.rundir import wait_for

TOKEN = "t0ken-for-the-test-servers"


def test_even_shares_split_into_contiguous_ranges_differing_by_at_most_one():
    assert even_shares(16, 2) == [(0, 8), (8, 16)]
    assert even_shares(5, 3) == [(0, 1), (1, 3), (3, 5)]
    assert even_shares(1, 3) == [(0, 0), (0, 0), (0, 1)]  # empty shares are never sent
    for total, parts in ((64, 3), (7, 4), (0, 2)):
        shares = even_shares(total, parts)
        sizes = [hi - lo for lo, hi in shares]
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1 and shares[0][0] == 0


@pytest.fixture
def two_servers(tiny_model, tmp_path):
    """Two real servers on their own ports, each with its own engine, requiring `TOKEN`."""
    setup_logger("DEBUG", tmp_path / "servers.log", job="inference")
    servers = []
    for _ in range(2):
        model, tokenizer = load_model(tiny_model)
        engine = Engine(model, tokenizer, max_batch_size=64)
        servers.append(InferenceServer(engine, "127.0.0.1", 0, model_name="tiny", token=TOKEN,
                                       weights_root=tmp_path).start())  # fmt: skip
    yield servers
    for server in servers:
        if not server._stopping.is_set():
            server.shutdown()


def test_requests_spread_over_every_server_and_weights_reach_all(two_servers, tiny_model, tmp_path):
    urls = [s.url for s in two_servers]
    pool = InferenceServers(urls, ["inference_0", "inference_1"], timeout=60, token=TOKEN)
    alone = InferenceServers(urls[:1], ["inference"], timeout=60, token=TOKEN)
    _, tokenizer = load_model(tiny_model)
    prompts = [encode_prompt(tokenizer, f"{'abcdefgh'[: k + 1]}=") for k in range(5)]

    # Greedy: whichever server samples a prompt, its completions are the same as from one server.
    spread = pool.complete(prompts, n=3, max_tokens=6, temperature=0.0, seed=0)
    assert [[c.token_ids for c in group] for group in spread] == [
        [c.token_ids for c in group] for group in alone.complete(prompts, n=3, max_tokens=6, temperature=0.0, seed=0)
    ]
    first, second = (s.health() for s in two_servers)
    # Prompts 0-1 went to the first server, 2-4 to the second; the one-server call went to the first.
    assert (first["requests"], first["sequences"]) == (2, 2 * 3 + 5 * 3)
    assert (second["requests"], second["sequences"]) == (1, 3 * 3)

    # Sampled shares get different seeds: no two shares repeat one random stream.
    a, b = pool.complete([encode_prompt(tokenizer, "abcd=")] * 2, n=4, max_tokens=8, temperature=1.0, seed=7)
    assert [c.token_ids for c in a] != [c.token_ids for c in b]

    model, _ = load_model(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = save_weights(model, tmp_path / "weights" / "step_1")
    answers = pool.update_weights(weights)
    assert [a["version"] for a in answers] == [1, 1]
    assert [s.health()["weights_path"] for s in two_servers] == [str(weights)] * 2

    # A server that is gone (nothing listens on its port): the error names its job and URL.
    gone = InferenceServers([urls[0], server_url("127.0.0.1", free_port())], ["inference_0", "inference_1"],
                            timeout=60, token=TOKEN)  # fmt: skip
    with pytest.raises(InferenceError, match=rf"'inference_1' at {re.escape(gone.clients[1].base_url)}"):
        gone.update_weights(weights)
    with pytest.raises(InferenceError, match=rf"'inference_1' at {re.escape(gone.clients[1].base_url)}"):
        gone.complete(prompts, n=1, max_tokens=2, temperature=1.0)
    # Without the token, the refusal names the server too.
    no_token = InferenceServers(urls[:1], ["inference_0"], timeout=60)
    with pytest.raises(InferenceError, match=rf"'inference_0' at {re.escape(urls[0])}: POST /update_weights -> 401"):
        no_token.update_weights(weights)
    for p in (pool, alone, gone, no_token):
        p.close()


# ---------------------------------------------------------------- whole runs


def _token_free(proc: psutil.Process, token: bytes) -> bool:
    """Neither the command line nor the environment of `proc` holds the token (True once it is gone)."""
    try:
        cmdline = "\0".join(proc.cmdline()).encode()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return True
    return token not in cmdline and token not in environ




@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_servers_share_each_step_and_all_get_every_weights_update(tmp_path):
    """`inference.num_servers=2`: both servers serve every step, load every weights version the
    orchestrator loads (the last one included), and the run's secret stays in its own file."""
    run_dir = tmp_path / "run"
    max_steps = 30
    proc = spawn_app(run_dir, "inference.num_servers=2", "sft.max_steps=0", f"max_steps={max_steps}",
                     "orchestrator.eval_interval=10")  # fmt: skip
    try:
        def serving() -> bool | None:
            assert proc.poll() is None, f"rlrun exited early: {proc.stdout.read() if proc.stdout else ''}"
            records = metrics(run_dir, "orchestrator") if (run_dir / "metrics" / "orchestrator.jsonl").exists() else []
            return True if records else None

        wait_for(serving, "the orchestrator's first step", timeout_s=120, poll_s=0.1, max_poll_s=0.2)
        token = (run_dir / "secrets" / "inference_token").read_bytes().strip()
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        servers = [p for p in tree if "-m rlrun.inference " in " ".join(p.cmdline())]
        assert len(servers) == 2 and all(_token_free(p, token) for p in tree), "no token in any argv or environment"
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    urls = config["inference"]["urls"]
    assert len(urls) == 2 and len(set(urls)) == 2 and all(split_url(u)[0] == "127.0.0.1" for u in urls)
    assert config["inference"]["port"] == split_url(urls[0])[1]
    rl_log = (run_dir / "logs" / "rl.log").read_text()
    assert f"inference is serving on 2 servers: inference_0 {urls[0]}, inference_1 {urls[1]}" in rl_log

    orchestrator_versions = None
    for k in range(2):
        log = (run_dir / "logs" / f"inference_{k}.stdout").read_text()
        assert f"serving tiny on {urls[k]}" in log
        (served,) = re.findall(rf"inference server {k} of 2 stopped: served (\d+) completion requests", log)
        # One request per step, plus the held-out evaluations' (steps 10, 20, 30).
        assert int(served) == max_steps + 3, log[-2000:]
        loaded = [int(v) for v in re.findall(rf"loaded weights v\d+ from {re.escape(str(run_dir))}/weights/step_(\d+)",
                                              log)]  # fmt: skip
        assert loaded == sorted(loaded) and loaded[-1] == max_steps, "the final weights reach every server"
        orchestrator_versions = orchestrator_versions or loaded
        assert loaded == orchestrator_versions, "both servers load the same versions, every time"
        assert re.search(rf"{len(loaded)} weight updates \(now v{len(loaded)}\), 0 requests refused", log)
    steps = metrics(run_dir, "orchestrator")
    assert [r["step"] for r in steps] == list(range(1, max_steps + 1))
    sampled_by = {int(r["step"] - 1 - r["metrics"]["off_policy_steps"]) for r in steps}
    assert sampled_by - {0} <= set(orchestrator_versions), "every policy that sampled was on both servers"

    usage = metrics(run_dir, "monitor")
    for job in ("inference_0", "inference_1", "orchestrator", "trainer"):
        assert any(f"system/rss_mb/{job}" in r["metrics"] for r in usage), job
    assert not any("system/rss_mb/inference" in r["metrics"] for r in usage)
    assert_names_planned(run_dir)

    # The secret: 0600 in a 0700 folder, and in no other file of the run (binary ones included).
    secret = run_dir / "secrets" / "inference_token"
    assert (secret.stat().st_mode & 0o777, secret.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert len(token) >= 32
    holders = [p for p in run_dir.rglob("*") if p.is_file() and p != secret and token in p.read_bytes()]
    assert holders == [] and token.decode() not in output


@pytest.mark.slow
def test_a_dead_server_stops_the_run_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn_app(run_dir, "inference.num_servers=2", "sft.max_steps=0", "max_steps=100000")
    try:
        def stepping() -> bool | None:
            assert proc.poll() is None, f"rlrun exited early: {proc.stdout.read() if proc.stdout else ''}"
            path = run_dir / "metrics" / "orchestrator.jsonl"
            return True if path.exists() and len(metrics(run_dir, "orchestrator")) >= 2 else None

        wait_for(stepping, "two orchestrator steps", timeout_s=120, poll_s=0.1, max_poll_s=0.2)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        (second,) = [p for p in tree if " ".join(p.cmdline()).strip().endswith("--server-index 1")]
        os.kill(second.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)  # left alone it would train on to step 100000
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "job 'inference_1' failed (killed by SIGKILL); see its log logs/inference_1.stdout" in output
    assert alive(tree) == [], "no process left behind"
