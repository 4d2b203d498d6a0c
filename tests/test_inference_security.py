"""No open doors (`rlrun.inference.auth`): the run's token on every mutating request, weights only
from inside the run directory, each server bound to its own address only; on the local server
(the real job) and through the middleware rlrun gives vLLM."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import requests
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from rlrun.config import schema
from rlrun.inference.auth import create_token, read_token
from rlrun.inference.client import InferenceClient
from rlrun.inference.launch import free_port, server_url
from rlrun.model import load_model, save_weights


def _outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return addr.address
    return None


HOSTS = [
    "127.0.0.1",
    pytest.param(_outside_address(), marks=pytest.mark.skipif(_outside_address() is None,
                                                              reason="this machine has no non-loopback IPv4 address"),
                 id="non-loopback"),
]  # fmt: skip


def _weights(tiny_model: Path, out_dir: Path) -> Path:
    model, _ = load_model(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return save_weights(model, out_dir)


@pytest.mark.parametrize("host", HOSTS)
def test_update_weights_needs_the_token_and_a_path_inside_the_run(tmp_path, tiny_model, host):
    """The real job, as the parent starts it (its URL in `inference.urls`, the token in its file)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "model")
    url = server_url(host, free_port(host))
    cfg = schema("local")
    cfg.output_dir, cfg.inference.host, cfg.inference.urls = str(run), host, [url]
    OmegaConf.save(cfg, run / "config.yaml")
    create_token(run)
    token = read_token(run)
    out = run / "logs" / "inference.stdout"
    out.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlrun.inference", "--config", str(run / "config.yaml"), "--server-index", "0"],
        cwd=ROOT, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert InferenceClient(url, timeout=60).wait_healthy(60, proc=proc)["weights_version"] == 0, out.read_text()
        port = int(url.rsplit(":", 1)[1])
        if host != "127.0.0.1":  # bound to that address only: nothing listens on loopback
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()

        # Reads and sampling change nothing: open.
        assert requests.get(url + "/health", timeout=10).status_code == 200
        body = {"prompt": "ab=", "max_tokens": 2}
        assert requests.post(url + "/v1/completions", json=body, timeout=30).status_code == 200

        inside = _weights(tiny_model, run / "weights" / "step_1")
        outside = _weights(tiny_model, tmp_path / "elsewhere" / "step_1")
        (run / "weights" / "step_9").symlink_to(outside)  # a link inside the run pointing out of it
        update = url + "/update_weights"
        right = {"Authorization": f"Bearer {token}"}
        refusals = [
            ({}, str(inside), 401, "no token"),
            ({"Authorization": "Bearer not-the-token"}, str(inside), 403, "wrong token"),
            ({"Authorization": token}, str(inside), 401, "no token"),  # not a bearer header
            (right, str(outside), 403, f"from {outside}: not inside the run directory"),
            (right, str(run / "weights" / "step_9"), 403, "step_9: not inside the run directory"),
            (right, str(run / ".." / "elsewhere" / "step_1"), 403, "step_1: not inside the run directory"),
        ]
        for headers, path, status, logged in refusals:
            answer = requests.post(update, json={"path": path}, headers=headers, timeout=30)
            assert answer.status_code == status, (headers.keys(), path, answer.text)
            assert "refused" in answer.json()["error"]["message"]
            assert_logged(out, "refused ", logged)
        health = requests.get(url + "/health", timeout=10).json()
        assert health["weights_version"] == 0 and health["refused"] == len(refusals), "nothing was loaded"

        answer = requests.post(update, json={"path": str(inside)}, headers=right, timeout=30)
        assert answer.status_code == 200 and answer.json()["version"] == 1
        assert requests.get(url + "/health", timeout=10).json()["weights_path"] == str(inside)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.read_text()
    assert f"refused POST /update_weights from {host}: no token" in log
    assert f"1 weight updates (now v1), {len(refusals)} requests refused" in log
    assert token not in log, "the token is never logged"


def assert_logged(path: Path, *parts: str) -> None:
    """A line of `path` holds every part (the server logs a refusal before it answers)."""
    lines = [line for line in path.read_text().splitlines() if all(p in line for p in parts)]
    assert lines, (parts, path.read_text()[-2000:])


def test_the_token_file_is_private_and_renewed(tmp_path):
    path = create_token(tmp_path)
    first = read_token(tmp_path)
    assert path == tmp_path / "secrets" / "inference_token" and len(first) >= 32
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    create_token(tmp_path)  # a new launch (a resume): a new secret, still private
    assert read_token(tmp_path) != first and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["inference_token"], "no temporary file left"
    with pytest.raises(FileNotFoundError, match="no inference token"):
        read_token(tmp_path / "other")


# ---------------------------------------------------------------- vLLM's routes, through rlrun's middleware


def test_vllm_middleware_guards_every_post_but_completions(tmp_path, monkeypatch, caplog):
    """`--middleware rlrun.inference.auth.vllm_middleware`, registered as vLLM's `build_app` does
    (`app.middleware("http")(...)`), on a FastAPI app with the routes rlrun calls, served by uvicorn."""
    fastapi = pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from rlrun.inference import auth

    app = fastapi.FastAPI()
    calls: list[str] = []
    for route in ("/collective_rpc", "/reset_prefix_cache", "/v1/completions"):
        app.post(route)(lambda route=route: calls.append(route) or {"ok": route})
    app.get("/health")(lambda: {})
    app.middleware("http")(auth.vllm_middleware)

    monkeypatch.setattr(auth, "_vllm_token", None)
    monkeypatch.setenv(auth.RUN_DIR_ENV, str(tmp_path))
    create_token(tmp_path)
    token = read_token(tmp_path)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        InferenceClient(url, timeout=10).wait_healthy(30)
        with caplog.at_level(logging.WARNING, logger="vllm.rlrun"):
            for route in ("/collective_rpc", "/reset_prefix_cache"):
                assert requests.post(url + route, json={}, timeout=10).status_code == 401
                bad = {"Authorization": "Bearer nope"}
                assert requests.post(url + route, json={}, headers=bad, timeout=10).status_code == 403
            assert calls == [], "no refused request reached vLLM's handlers"
            assert requests.post(url + "/v1/completions", json={}, timeout=10).status_code == 200  # open
            right = {"Authorization": f"Bearer {token}"}
            assert requests.post(url + "/collective_rpc", json={}, headers=right, timeout=10).status_code == 200
            assert calls == ["/v1/completions", "/collective_rpc"]
            refusals = [r.getMessage() for r in caplog.records if r.name == "vllm.rlrun"]
            assert len(refusals) == 4 and "refused POST /collective_rpc from 127.0.0.1: no token" in refusals[0]
            assert not any(token in m for m in refusals)

            # Without a token file to check against, every mutating request is refused (fail closed).
            monkeypatch.setattr(auth, "_vllm_token", None)
            monkeypatch.setenv(auth.RUN_DIR_ENV, str(tmp_path / "no-run"))
            assert requests.post(url + "/collective_rpc", json={}, headers=right, timeout=10).status_code == 403
            assert calls == ["/v1/completions", "/collective_rpc"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
