"""The process text logger: isolated, one per process, files fresh, stdlib routed in."""

from __future__ import annotations

import logging

import loguru
import pytest

from rlrun.log import get_logger, reset_logger, setup_logger


def test_get_logger_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup_logger"):
        get_logger()


def test_second_setup_raises(tmp_path):
    setup_logger("INFO", tmp_path / "a.log")
    with pytest.raises(RuntimeError, match="already called"):
        setup_logger("INFO", tmp_path / "b.log")


def test_file_sink_replaces_old_file_and_receives_messages(tmp_path):
    path = tmp_path / "logs" / "job.log"
    path.parent.mkdir()
    path.write_text("stale line from an earlier run\n")
    logger = setup_logger("DEBUG", path, job="trainer")
    logger.debug("fresh debug line")
    get_logger().info("fresh info line")
    reset_logger()  # closes the file
    text = path.read_text()
    assert "stale line" not in text
    assert "fresh debug line" in text and "fresh info line" in text
    assert "trainer" in text


def test_level_filters_file(tmp_path):
    path = tmp_path / "job.log"
    logger = setup_logger("WARNING", path)
    logger.info("not wanted")
    logger.warning("wanted")
    reset_logger()
    text = path.read_text()
    assert "wanted" in text and "not wanted" not in text


def test_logger_is_isolated_from_global_loguru(tmp_path):
    path = tmp_path / "job.log"
    logger = setup_logger("INFO", path)
    assert logger is not loguru.logger
    loguru.logger.remove()  # third-party code reconfiguring loguru must not silence us
    logger.info("still here")
    reset_logger()
    assert "still here" in path.read_text()


def test_stdlib_logging_from_third_party_lands_in_file(tmp_path):
    path = tmp_path / "job.log"
    setup_logger("INFO", path)
    logging.getLogger("some.thirdparty.lib").warning("third party says %s", "hello")
    logging.getLogger("another").debug("below level")
    reset_logger()
    text = path.read_text()
    assert "third party says hello" in text
    assert "some.thirdparty.lib" in text
    assert "below level" not in text


def test_secrets_are_scrubbed_from_log_lines(tmp_path, monkeypatch):
    secret = "wandb_v1_" + "Q" * 40
    monkeypatch.setenv("WANDB_API_KEY", secret)
    path = tmp_path / "job.log"
    logger = setup_logger("INFO", path)
    logger.info(f"connecting with key {secret}")
    reset_logger()
    text = path.read_text()
    assert "connecting with key" in text
    assert secret not in text


def test_render_table_shows_markup_like_text_literally():
    from rlrun.log import render_table

    text = render_table("samples", ["prompt", "completion", "reward"], [["ab=", "[/]", 0.123456], ["x", "[bold]y", 1.0]])
    assert "[/]" in text and "[bold]y" in text
    assert "0.1235" in text and "samples" in text
