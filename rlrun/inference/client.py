"""Client of the inference job, for rlrun's local server and for vLLM's OpenAI server.

Prompts go out as token ids and completions come back as token ids with their logprobs
(`return_tokens_as_token_ids`, a vLLM extension the local server also speaks), so no text
ever round-trips through a tokenizer between sampling and training. Imports no torch.

`update_weights(path)` is the one call for new weights on either server; the client tells
them apart by `/v1/models` (vLLM's cards are `owned_by: "vllm"`) unless given `backend`:
- local: `POST /update_weights {"path": ...}`;
- vLLM: `POST /collective_rpc {"method": "update_weights_from_path", "args": [path]}` (the
  worker extension `rlrun.inference.vllm_worker`), then `POST /reset_prefix_cache`.
With the run's `token` every request carries `Authorization: Bearer <token>` (mutating ones
need it: `rlrun.inference.auth`).

`InferenceServers` is the orchestrator's view of a run's servers (`inference.urls`): each
step's prompts split evenly over them, new weights loaded into all of them, and an error
naming the server (its job and URL) when one fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import requests

from rlrun.inference import Completion

_TOKEN_ID_PREFIX = "token_id:"
BACKENDS = ("local", "vllm")
VLLM_UPDATE_METHOD = "update_weights_from_path"  # rlrun.inference.vllm_worker.WeightUpdateExtension


class InferenceError(RuntimeError):
    """The server answered with an error (the message carries its status and text)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InferenceClient:
    def __init__(self, base_url: str, timeout: float = 300.0, model: str | None = None, backend: str | None = None,
                 token: str | None = None) -> None:  # fmt: skip
        """`base_url` like `http://127.0.0.1:8000` (no `/v1`); `model` defaults to the served one;
        `backend` ("local" or "vllm") defaults to what the server says it is; `token`: the run's
        secret, sent with every request."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._model = model
        self._backend = backend
        self._session = requests.Session()  # keep-alive: one connection for the whole run
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        response = self._session.request(method, self.base_url + path, timeout=timeout or self.timeout, **kwargs)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:500]
            raise InferenceError(f"{method} {path} -> {response.status_code}: {message}", response.status_code)
        # The standard library's C decoder: requests' .json() takes simplejson where installed.
        return json.loads(response.content) if response.content else {}  # vLLM answers some routes with an empty 200

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------ endpoints

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._request("GET", "/health", timeout=timeout)

    def wait_healthy(self, timeout_s: float, proc: Any = None, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """Poll `/health` until it answers; raise if `proc` (a Popen) exits or time runs out.

        `check`, called between polls, may raise to give up early (the parent's other jobs failing).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"inference server exited with code {proc.returncode} before becoming healthy")
            if check is not None:
                check()
            try:
                return self.health(timeout=2.0)
            except (requests.ConnectionError, requests.Timeout, InferenceError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for the inference server at {self.base_url} "
                                   "to answer /health")
            time.sleep(0.1)

    @property
    def model(self) -> str:
        """The served model's name (vLLM requires it in every request)."""
        if self._model is None:
            self._read_model_card()
        return self._model  # type: ignore[return-value]

    @property
    def backend(self) -> str:
        """"vllm" or "local": which server this is (from `/v1/models` unless given)."""
        if self._backend is None:
            self._read_model_card()
        return self._backend  # type: ignore[return-value]

    def _read_model_card(self) -> None:
        card = self._request("GET", "/v1/models")["data"][0]
        if self._model is None:
            self._model = card["id"]
        if self._backend is None:
            self._backend = "vllm" if card.get("owned_by") == "vllm" else "local"

    def complete(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions per prompt: result[i][j] is prompt i's j-th completion.

        `logit_bias` (OpenAI's, both servers): added to those tokens' logits before the
        temperature; -100 bans a token.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "logprobs": 0,  # the sampled token's logprob only
            "return_tokens_as_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        if logit_bias:
            body["logit_bias"] = {str(token): float(bias) for token, bias in logit_bias.items()}
        choices = sorted(self._request("POST", "/v1/completions", json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompt_ids) * n:
            raise InferenceError(f"expected {len(prompt_ids) * n} choices, got {len(choices)}")
        completions = [_parse_choice(choice) for choice in choices]
        # Choices are prompt-major: prompt i's completions are i*n .. i*n+n-1.
        return [completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def update_weights(self, path: str | Path) -> dict[str, Any]:
        """Tell the server to load weights written by `rlrun.model.save_weights`, in place.

        On vLLM: every worker loads them (`/collective_rpc`), then the prefix cache is
        emptied so no KV computed with the old weights is reused.
        """
        if self.backend == "vllm":
            body = {"method": VLLM_UPDATE_METHOD, "args": [str(path)]}
            try:
                result = self._request("POST", "/collective_rpc", json=body)
            except InferenceError as exc:
                if exc.status == 404:  # started by hand without what rlrun.inference.vllm sets
                    raise InferenceError(
                        f"{exc} (vLLM serves /collective_rpc only with VLLM_SERVER_DEV_MODE=1, and "
                        f"{VLLM_UPDATE_METHOD} only with --worker-extension-cls "
                        "rlrun.inference.vllm_worker.WeightUpdateExtension)", exc.status
                    ) from exc
                raise
            self._request("POST", "/reset_prefix_cache")
            return result
        return self._request("POST", "/update_weights", json={"path": str(path)})


class InferenceServers:
    """A run's inference servers behind the one client interface the orchestrator uses.

    `complete` splits the prompts into one contiguous, even share per server (a prompt's `n`
    completions, its GRPO group, stay on one server), sends the shares at once and joins the
    results in prompt order. Every prompt of a step costs about the same (same `max_tokens`,
    similar lengths), so even shares balance the servers without any bookkeeping; share k is
    sampled with `seed + k` so no two shares repeat one random stream. `update_weights` loads
    the weights into every server at once and returns when all have them. A failing server
    raises InferenceError naming its job and URL. With one server, calls go straight through.
    """

    def __init__(self, urls: Sequence[str], jobs: Sequence[str], timeout: float = 300.0,
                 token: str | None = None) -> None:  # fmt: skip
        if not urls or len(urls) != len(jobs):
            raise ValueError(f"{len(urls)} URLs for {len(jobs)} jobs")
        self.clients = [InferenceClient(url, timeout=timeout, token=token) for url in urls]
        self.jobs = list(jobs)
        self._pool = ThreadPoolExecutor(len(urls), thread_name_prefix="inference") if len(urls) > 1 else None

    def __len__(self) -> int:
        return len(self.clients)

    def _on_each(self, calls: list[tuple[int, Callable[[], Any]]]) -> list[Any]:
        """Run `(server index, call)` pairs, at once when there are several; errors name the server."""

        def named(k: int, call: Callable[[], Any]) -> Any:
            try:
                return call()
            except (InferenceError, requests.RequestException, TimeoutError) as exc:
                where = f"inference server '{self.jobs[k]}' at {self.clients[k].base_url}"
                if isinstance(exc, TimeoutError):
                    raise TimeoutError(f"{where}: {exc}") from exc
                raise InferenceError(f"{where}: {exc}", getattr(exc, "status", None)) from exc

        if self._pool is None or len(calls) == 1:
            return [named(k, call) for k, call in calls]
        futures = [self._pool.submit(named, k, call) for k, call in calls]
        wait(futures)  # every server done (none left loading) before a failure is raised
        return [f.result() for f in futures]  # the first failure in server order

    def wait_healthy(self, timeout_s: float, check: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Until every server answers `/health` (they load their models at the same time)."""
        return [self._on_each([(k, lambda c=c: c.wait_healthy(timeout_s, check=check))])[0]
                for k, c in enumerate(self.clients)]  # fmt: skip

    def complete(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> list[list[Completion]]:
        """`InferenceClient.complete` over every server: result[i] is prompt i's `n` completions."""
        shares = even_shares(len(prompt_ids), len(self.clients))
        calls = [
            (k, lambda k=k, lo=lo, hi=hi: self.clients[k].complete(
                prompt_ids[lo:hi], n=n, max_tokens=max_tokens, temperature=temperature,
                seed=None if seed is None else seed + k, logit_bias=logit_bias))
            for k, (lo, hi) in enumerate(shares) if hi > lo
        ]  # fmt: skip
        return [group for part in self._on_each(calls) for group in part]

    def update_weights(self, path: str | Path) -> list[dict[str, Any]]:
        """Every server loads the weights at `path`; returns each one's answer once all have them."""
        return self._on_each([(k, lambda c=c: c.update_weights(path)) for k, c in enumerate(self.clients)])

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def even_shares(total: int, parts: int) -> list[tuple[int, int]]:
    """`[lo, hi)` ranges splitting `total` items into `parts` contiguous shares differing by at most one."""
    bounds = [total * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _parse_choice(choice: dict[str, Any]) -> Completion:
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens")
    if tokens is None:
        raise InferenceError("the server returned no logprobs")
    token_ids = []
    for token in tokens:
        if not token.startswith(_TOKEN_ID_PREFIX):
            raise InferenceError(f"token {token!r} is not rendered as an id (return_tokens_as_token_ids ignored?)")
        token_ids.append(int(token[len(_TOKEN_ID_PREFIX) :]))
    return Completion(
        token_ids=token_ids,
        logprobs=[float(lp) for lp in logprobs["token_logprobs"]],
        finish_reason=choice.get("finish_reason") or "length",
    )
