"""HTTP front of the local engine: the OpenAI completions API as vLLM serves it.

    GET  /health            {"status": "ok", "weights_version", "batches", ...}
    GET  /v1/models         the one served model
    POST /v1/completions    prompt (str | [str] | [int] | [[int]]), n, max_tokens, temperature,
                            logprobs, seed, return_tokens_as_token_ids (vLLM's extension)
    POST /update_weights    {"path": "<dir written by rlrun.model.save_weights>"}

Started with a `token`, every POST but `/v1/completions` needs `Authorization: Bearer <token>`
(401 without, 403 with a wrong one); with a `weights_root`, `/update_weights` loads only from
inside it (403 otherwise, symlinks resolved). Each refusal is a warning in the log, never
showing the token (`rlrun.inference.auth`). `python -m rlrun.inference` always sets both: the
run's token and its run directory.

Batching: handler threads validate a request and put it on a queue; one engine thread
takes every queued request (up to `max_batch_size` sequences) and generates them as one
batch, then wakes each handler with its share. Requests that arrive while a batch runs
form the next one, so concurrent clients are served together.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rlrun.inference import Completion
from rlrun.inference.auth import OPEN_POSTS, check_bearer, inside
from rlrun.inference.engine import Engine, GenerationRequest, SamplingParams
from rlrun.log import get_logger
from rlrun.model import encode_prompt

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class RequestError(Exception):
    """A request we refuse; becomes an OpenAI-style error response."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _Pending:
    """A validated completion request waiting for the engine thread."""

    request: GenerationRequest
    as_token_ids: bool
    logprobs: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[Completion]] | None = None
    error: str | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.request.prompts) * self.request.params.n


class InferenceServer:
    """Owns the HTTP server and the engine thread; `start()` then `shutdown()`."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, model_name: str = "model", *,
                 token: str | None = None, weights_root: str | Path | None = None,
                 name: str = "inference server") -> None:  # fmt: skip
        """`token`: required on mutating requests; `weights_root`: the only tree weights load from;
        `name`: how the log names this server (its job's name when a run has several)."""
        self.engine = engine
        self.model_name = model_name
        self.token, self.weights_root, self.name = token, weights_root, name
        self.started = int(time.time())
        self.stats = {"batches": 0, "requests": 0, "sequences": 0, "last_batch_requests": 0,
                      "weight_updates": 0, "refused": 0}  # fmt: skip
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._held: deque[_Pending] = deque()  # taken from the queue but too big for the batch
        self._in_flight = 0  # completion requests accepted and not yet answered
        self._in_flight_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._engine_loop, name="engine", daemon=True),
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True),
        ]

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "InferenceServer":
        for thread in self._threads:
            thread.start()
        get_logger().info(
            f"serving {self.model_name} on {self.url} (max_batch_size={self.engine.max_batch_size}, "
            f"device={self.engine.device}, {'token required' if self.token else 'no token'} to update)"
        )
        return self

    def shutdown(self) -> None:
        """Stop accepting connections, finish the running batch, fail whatever is still queued."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._queue.put(None)
        self._threads[0].join(timeout=30)
        leftovers = list(self._held)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        for pending in leftovers:
            pending.error = "server is shutting down"
            pending.done.set()
        st = self.stats
        get_logger().info(
            f"{self.name} stopped: served {st['requests']} completion requests ({st['sequences']} sequences in "
            f"{st['batches']} batches), {st['weight_updates']} weight updates (now v{self.engine.weights_version}), "
            f"{st['refused']} requests refused"
        )

    def authorize(self, method: str, path: str, authorization: str | None, client: str) -> None:
        """RequestError 401 / 403 (and a warning) for a mutating request without the right token."""
        if self.token is None or method != "POST" or path in OPEN_POSTS:
            return
        why = check_bearer(authorization, self.token)
        if why is not None:
            self._refuse(f"{method} {path} from {client}: {why}")
            raise RequestError(f"refused: {why} (the run's inference token is required)",
                               HTTPStatus.UNAUTHORIZED if why == "no token" else HTTPStatus.FORBIDDEN)

    def _refuse(self, what: str) -> None:
        self.stats["refused"] += 1
        get_logger().warning(f"{self.name} refused {what}")

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "weights_version": self.engine.weights_version,
            "weights_path": self.engine.weights_path,
            "queued": self._queue.qsize() + len(self._held),
            "in_flight": self._in_flight,
            **self.stats,
        }

    # ------------------------------------------------------------ engine thread

    def _engine_loop(self) -> None:
        while not self._stopping.is_set():
            first = self._held.popleft() if self._held else self._queue.get()
            if first is None:
                break
            # Take the lock before draining: requests that queue up during a weight swap
            # (or the previous batch) join this batch.
            with self.engine.lock:
                batch = self._drain(first)
                self._run_batch(batch)

    def _drain(self, first: _Pending) -> list[_Pending]:
        batch, size = [first], first.num_sequences
        while True:
            try:
                item = self._held.popleft() if self._held else self._queue.get_nowait()
            except queue.Empty:
                return batch
            if item is None:  # shutdown: serve this batch, then stop
                self._queue.put(None)
                return batch
            if size + item.num_sequences > self.engine.max_batch_size:
                self._held.appendleft(item)
                return batch
            batch.append(item)
            size += item.num_sequences

    def _run_batch(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            results = self.engine.generate_batch([p.request for p in batch])
        except Exception as exc:  # an engine failure answers every request of the batch
            get_logger().exception("generation failed")
            for pending in batch:
                pending.error = f"generation failed: {exc}"
                pending.done.set()
            return
        sequences = sum(p.num_sequences for p in batch)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["sequences"] += sequences
        self.stats["last_batch_requests"] = len(batch)
        get_logger().debug(
            f"batch {self.stats['batches']}: {len(batch)} requests, {sequences} sequences, "
            f"{time.perf_counter() - start:.3f}s"
        )
        for pending, result in zip(batch, results):
            pending.result = result
            pending.done.set()

    # ------------------------------------------------------------ endpoints

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        pending = self._parse_completion_request(body)
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            self._queue.put(pending)
            pending.done.wait()
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
        if pending.error is not None:
            raise RequestError(pending.error, HTTPStatus.SERVICE_UNAVAILABLE)
        return self._completion_response(pending)

    def update_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError("'path' (a weights directory) is required", param="path")
        if self.weights_root is not None and not inside(path, self.weights_root):
            self._refuse(f"/update_weights from {path}: not inside the run directory {self.weights_root}")
            raise RequestError(f"refused: {path} is not inside the run directory", HTTPStatus.FORBIDDEN, "path")
        start = time.perf_counter()
        try:
            version = self.engine.load_weights(path)
        except (OSError, RuntimeError, ValueError) as exc:  # missing file, wrong shapes, corrupt file
            raise RequestError(f"cannot load weights from {path}: {exc}", param="path") from exc
        self.stats["weight_updates"] += 1
        get_logger().info(f"loaded weights v{version} from {path} in {time.perf_counter() - start:.3f}s")
        return {"ok": True, "version": version, "path": path}

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "rlrun",
            "max_model_len": self.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    # ------------------------------------------------------------ request / response shapes

    def _parse_completion_request(self, body: dict[str, Any]) -> _Pending:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"The model `{model}` does not exist.", HTTPStatus.NOT_FOUND, "model")
        for key, default in (("stream", False), ("echo", False), ("suffix", None), ("stop", None),
                             ("presence_penalty", 0), ("frequency_penalty", 0)):
            if body.get(key, default) not in (default, [], {}, 0, False, None):
                raise RequestError(f"'{key}' is not supported by the local engine", param=key)
        if body.get("top_p", 1.0) not in (1, 1.0, None) or body.get("top_k", -1) not in (-1, 0, None):
            raise RequestError("top_p/top_k sampling is not supported by the local engine", param="top_p")

        prompts = self._parse_prompt(body.get("prompt"))
        n = _get(body, "n", int, 1)
        max_tokens = _get(body, "max_tokens", int, 16)
        temperature = float(_get(body, "temperature", (int, float), 1.0))
        seed = _get(body, "seed", int, None)
        logprobs = _get(body, "logprobs", int, None)
        as_token_ids = bool(_get(body, "return_tokens_as_token_ids", bool, False))
        logit_bias = _get(body, "logit_bias", dict, None) or {}
        try:  # OpenAI's shape: {"<token id>": bias}
            logit_bias = {int(token): float(bias) for token, bias in logit_bias.items()}
        except (TypeError, ValueError):
            raise RequestError("logit_bias must map token ids to numbers", param="logit_bias") from None
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        if temperature < 0:
            raise RequestError("temperature must be >= 0", param="temperature")
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                top_logprobs=logprobs or 0, logit_bias=logit_bias)
        request = GenerationRequest(prompts, params)
        try:
            self.engine.validate(request)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        get_logger().debug(
            f"completion request: {len(prompts)} prompts x n={n}, max_tokens={max_tokens}, "
            f"temperature={temperature}, seed={seed}, logprobs={logprobs}"
        )
        return _Pending(request, as_token_ids, logprobs)

    def _parse_prompt(self, prompt: Any) -> list[list[int]]:
        """vLLM's four prompt shapes -> token-id lists (text through `encode_prompt`)."""
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            return [encode_prompt(tokenizer, prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [encode_prompt(tokenizer, p) for p in prompt]
            if all(_is_int(t) for t in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        raise RequestError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param="prompt",
        )

    def _completion_response(self, pending: _Pending) -> dict[str, Any]:
        tokenizer = self.engine.tokenizer
        completions = [c for per_prompt in pending.result or [] for c in per_prompt]  # prompt-major
        choices = []
        for index, completion in enumerate(completions):
            choice: dict[str, Any] = {
                "index": index,
                "text": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
            if pending.logprobs is not None:
                choice["logprobs"] = self._logprobs(completion, pending.as_token_ids)
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in pending.request.prompts)
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _logprobs(self, completion: Completion, as_token_ids: bool) -> dict[str, Any]:
        """OpenAI's logprobs object; tokens as `token_id:<id>` with vLLM's flag."""

        def render(token_id: int) -> str:
            return f"token_id:{token_id}" if as_token_ids else self.engine.tokenizer.decode([token_id])

        tokens = [render(t) for t in completion.token_ids]
        offsets = [0, *itertools.accumulate(len(t) for t in tokens)][: len(tokens)]
        top = []
        for pos, (token_id, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
            # As vLLM: the sampled token plus the top-k alternatives.
            entry = {render(token_id): logprob}
            for alt_id, alt_logprob in (completion.top_logprobs or [[]] * len(tokens))[pos]:
                entry.setdefault(render(alt_id), alt_logprob)
            top.append(entry)
        return {
            "tokens": tokens,
            "token_logprobs": [max(lp, -9999.0) for lp in completion.logprobs],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise RequestError(f"'{key}' has the wrong type: {value!r}", param=key)
    return value


# ---------------------------------------------------------------- HTTP plumbing


_ERROR_TYPES = {HTTPStatus.NOT_FOUND: "NotFoundError", HTTPStatus.BAD_REQUEST: "BadRequestError",
                HTTPStatus.UNAUTHORIZED: "AuthenticationError", HTTPStatus.FORBIDDEN: "PermissionDeniedError"}


def _make_handler(server: InferenceServer) -> type[BaseHTTPRequestHandler]:
    routes_get = {"/health": server.health, "/v1/models": server.models}
    routes_post = {"/v1/completions": server.completions, "/update_weights": server.update_weights}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for the client's requests.Session
        # TCP_NODELAY: the headers and the body go out in two writes; with Nagle's algorithm the
        # second waits for the client's delayed ACK, ~40 ms on every response (Linux).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            route = routes_get.get(self.path.split("?")[0])
            if route is None:
                return self._error(RequestError(f"no route {self.path}", HTTPStatus.NOT_FOUND))
            self._send(HTTPStatus.OK, route())

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            route = routes_post.get(path)
            try:
                body = self._read_json()  # read first: the connection stays usable after a refusal
                server.authorize("POST", path, self.headers.get("Authorization"), self.client_address[0])
                if route is None:
                    raise RequestError(f"no route {self.path}", HTTPStatus.NOT_FOUND)
                self._send(HTTPStatus.OK, route(body))
            except RequestError as exc:
                self._error(exc)
            except Exception as exc:  # a bug must answer 500, not hang the client
                get_logger().exception(f"{self.path} failed")
                self._error(RequestError(f"internal error: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR))

        def _read_json(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as exc:
                raise RequestError(f"body is not valid JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise RequestError("body must be a JSON object")
            return body

        def _error(self, exc: RequestError) -> None:
            get_logger().debug(f"{self.command} {self.path} -> {int(exc.status)}: {exc}")
            kind = _ERROR_TYPES.get(exc.status, "InternalServerError")
            error = {"message": str(exc), "type": kind, "param": exc.param, "code": int(exc.status)}
            self._send(exc.status, {"error": error})

        def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            get_logger().debug(f"{self.address_string()} {format % args}")

    return Handler
