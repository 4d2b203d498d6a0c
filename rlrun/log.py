"""Text logs: one isolated loguru logger per process.

`setup_logger` once at each entrypoint, `get_logger` anywhere after, `reset_logger` in
subprocesses that inherit state and between tests. The logger is a private loguru
`Logger` (not the global `loguru.logger`), so third-party code that configures loguru
cannot redirect or silence ours; stdlib `logging` records (hydra, urllib3, mlflow, wandb)
are routed into it so one file holds a job's whole story.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlrun.redact import register_env_secrets, scrub

if TYPE_CHECKING:
    from loguru import Logger

_LOGGER: "Logger | None" = None
_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[job]}</cyan> {message}"
)
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[job]} {name}:{line} {message}"
# Third-party loggers that are chatty at INFO; they still reach the file at WARNING.
_NOISY = ("urllib3", "filelock", "git", "alembic", "httpx", "httpcore", "matplotlib", "PIL")


class _InterceptHandler(logging.Handler):
    """Hands stdlib logging records to our loguru logger, keeping level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = _LOGGER
        if logger is None:
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:  # a malformed third-party record must not kill the job
            message = str(record.msg)
        logger.patch(lambda r: r.update(name=record.name, line=record.lineno)).opt(
            exception=record.exc_info
        ).log(level, message)


def _scrub_record(record: dict) -> None:
    record["message"] = scrub(record["message"])


def setup_logger(
    level: str = "INFO", log_file: str | Path | None = None, *, job: str = "rlrun", colorize: bool | None = None
) -> "Logger":
    """Create this process's logger: colorized stdout plus, if given, a fresh log file."""
    global _LOGGER
    if _LOGGER is not None:
        raise RuntimeError("setup_logger() was already called in this process; call reset_logger() first")
    from loguru._logger import Core, Logger

    register_env_secrets()
    logger = Logger(
        core=Core(), exception=None, depth=0, record=False, lazy=False, colors=False,
        raw=False, capture=True, patchers=[_scrub_record], extra={"job": job},
    )
    level = level.upper()
    logger.add(sys.stdout, level=level, format=_FORMAT, colorize=colorize, enqueue=False, diagnose=False)
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a fresh file per run, never appended to an old one
        logger.add(path, level=level, format=_FILE_FORMAT, colorize=False, enqueue=False, encoding="utf-8", diagnose=False)
    _LOGGER = logger
    _route_stdlib_logging(level)
    return logger


def _route_stdlib_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _InterceptHandler)]
    root.addHandler(_InterceptHandler())
    root.setLevel(logging.getLevelName(level) if level in logging._nameToLevel else logging.INFO)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


def get_logger() -> "Logger":
    if _LOGGER is None:
        raise RuntimeError("the logger is not set up: call rlrun.log.setup_logger() at the entrypoint first")
    return _LOGGER


def reset_logger() -> None:
    """Forget this process's logger (closing its files) so setup_logger may run again."""
    global _LOGGER
    if _LOGGER is not None:
        _LOGGER.remove()
    _LOGGER = None
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _InterceptHandler)]


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int = 160) -> str:
    """A rich table as plain text (for a log file); floats with 4 significant digits.

    Cells are literal text, never rich markup: a completion such as `[/]` or `[bold]` is
    shown as written (a markup string would raise or vanish).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), show_lines=False)
    for column in columns:
        table.add_column(Text(str(column)), overflow="fold")
    for row in rows:
        table.add_row(*(Text(f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row))
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()
