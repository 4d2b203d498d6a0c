"""Who may change what an inference server serves: the run's secret and its weights.

Once a server listens beyond loopback, anyone on the network could tell it to load any file
it can read as weights. So every run has a secret: `<run>/secrets/inference_token` (the
folder 0700, the file 0600), created by the parent before any job starts and read from that
file by each job that needs it (the servers and the orchestrator). It never travels in argv,
the environment, `config.yaml`, a log line or tracker params; `read_token` registers it with
`rlrun.redact` so that a log line that did carry it would be scrubbed.

- Every mutating request (`POST /update_weights` on the local server; every POST but
  `/v1/completions` on vLLM, `/collective_rpc` included, through `vllm_middleware`) needs
  `Authorization: Bearer <token>`: none gets 401, a wrong one 403, and a warning in the
  server's log (never the token). Completions and `GET` routes stay open: they change nothing.
- Weights load only from inside the run directory (`inside`, symlinks resolved).

Imports nothing heavy (the vLLM middleware imports starlette when it runs, inside vLLM).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from rlrun.redact import register_secret

TOKEN_FILE = Path("secrets") / "inference_token"
RUN_DIR_ENV = "RLRUN_RUN_DIR"  # the vLLM job's run directory (its middleware and workers read the token / check paths)
OPEN_POSTS = frozenset({"/v1/completions"})  # sampling changes nothing on the server


def token_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TOKEN_FILE


def create_token(run_dir: str | Path) -> Path:
    """A fresh secret in `<run>/secrets/inference_token` (0600 in a 0700 folder); the file's path.

    Written to a temporary name (created 0600, never wider) and renamed, so a reader never
    sees a partial token; a resumed run gets a new one (its servers start anew too).
    """
    path = token_path(run_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask, and an old folder keeps its own
    token = secrets.token_urlsafe(32)
    register_secret(token)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    os.replace(tmp, path)
    return path


def read_token(run_dir: str | Path) -> str:
    """The run's secret (FileNotFoundError naming the file when the parent made none)."""
    path = token_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no inference token at {path} (the parent creates it; "
                                "rlrun.inference.auth.create_token for a server started alone)")  # fmt: skip
    token = path.read_text().strip()
    register_secret(token)
    return token


def check_bearer(header: str | None, token: str) -> str | None:
    """Why an `Authorization` header does not carry `token` ("no token" / "wrong token"), or None."""
    if not header or not header.startswith("Bearer "):
        return "no token"
    return None if hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode()) else "wrong token"


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, symlinks resolved, is `root` or under it (`..` and links pointing out are not)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


# ---------------------------------------------------------------- vLLM


async def vllm_middleware(request, call_next):  # noqa: ANN001, ANN201 (starlette's Request and handler)
    """vLLM's `--middleware rlrun.inference.auth.vllm_middleware`: every POST but completions
    (`/collective_rpc`, `/reset_prefix_cache`, `/sleep`, ...) needs the run's token.

    The token is read from `$RLRUN_RUN_DIR/secrets/inference_token` at the first request; without
    it every mutating request is refused (fail closed).
    """
    if request.method in ("GET", "HEAD", "OPTIONS") or request.url.path in OPEN_POSTS:
        return await call_next(request)
    global _vllm_token
    if _vllm_token is None:
        try:
            _vllm_token = read_token(os.environ[RUN_DIR_ENV])
        except (KeyError, OSError) as exc:
            return _vllm_refusal(request, 403, f"no run token to check against ({exc})")
    why = check_bearer(request.headers.get("authorization"), _vllm_token)
    if why is not None:
        return _vllm_refusal(request, 401 if why == "no token" else 403, why)
    return await call_next(request)


_vllm_token: str | None = None


def _vllm_refusal(request, status: int, why: str):  # noqa: ANN001, ANN202
    import logging

    from starlette.responses import JSONResponse

    client = request.client.host if request.client else "?"
    logging.getLogger("vllm.rlrun").warning(f"refused {request.method} {request.url.path} from {client}: {why}")
    message = f"refused: {why} (the run's inference token is required)"
    error = {"message": message, "type": "AuthenticationError", "code": status}
    return JSONResponse({"error": error}, status_code=status)
