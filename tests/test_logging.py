"""The daemon's log: one line per event, text or JSON, and never a secret."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deployd.cli import TextFormatter
from tests.support.daemonfixtures import TOKENS, AppSpec, DaemonSpec
from tests.support.gitrepo import OriginRepo
from tests.support.net import free_port, wait_http
from tests.support.waiting import wait_until_blocking

ROOT = Path(__file__).resolve().parents[1]


def run_daemon(tmp_path: Path, log_format: str, pause_reason: str | None = None) -> str:
    """Run `deployd run` until its first deploy baked, poke it with tokens (and pause it with
    `pause_reason`), return stderr."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    spec = DaemonSpec(state_dir=tmp_path / "state", apps=[AppSpec(
        name="shop", repo=origin.url, local_dirs=[tmp_path / "host"],
        rollback={"grace": "0s", "bake": "100ms"})])
    port = free_port()
    text = spec.render().replace("127.0.0.1:0", f"127.0.0.1:{port}")
    text = text.replace("[daemon]\n", f'[daemon]\nlog_format = "{log_format}"\n', 1)
    config = tmp_path / "deployd.toml"
    config.write_text(text)
    process = subprocess.Popen([sys.executable, "-m", "deployd.cli", "run", "-c", str(config)],
                               env={**os.environ, "PYTHONPATH": "daemon"}, cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz")
        for secret in ("wrong-secret-value-42", TOKENS["admin"][0]):
            request = urllib.request.Request(base + "/api/v1/apps",
                                             headers={"Authorization": f"Bearer {secret}"})
            try:
                urllib.request.urlopen(request, timeout=5).close()
            except urllib.error.HTTPError:
                pass
        wait_until_blocking((tmp_path / "host" / "current").exists, within=15, every=0.1,
                            what="the first deploy")
        if pause_reason is not None:
            request = urllib.request.Request(
                base + "/api/v1/apps/shop/pause", method="POST",
                data=json.dumps({"reason": pause_reason}).encode(),
                headers={"Authorization": f"Bearer {TOKENS['admin'][0]}"})
            urllib.request.urlopen(request, timeout=5).close()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    return stderr


def test_json_log_has_one_object_per_line_with_the_events(tmp_path: Path) -> None:
    """With log_format = "json" every line is a JSON object; events carry app and kind."""
    stderr = run_daemon(tmp_path, "json")
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    kinds = [e.get("kind") for e in entries if e.get("logger") == "deployd.events"]
    assert "deploy.started" in kinds and "deploy.succeeded" in kinds
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert all(e["app"] == "shop" for e in entries if e.get("logger") == "deployd.events")


def test_text_log_names_events_and_holds_no_secret(tmp_path: Path) -> None:
    """The plain log says what happened, one event a line, and no token appears in it."""
    stderr = run_daemon(tmp_path, "text")
    assert "deployd.events: shop deploy.succeeded" in stderr
    for secret, _ in TOKENS.values():
        assert secret not in stderr
    assert "wrong-secret-value-42" not in stderr


FORGED = "2026-12-03 10:00:00,000 INFO deployd.events: shop job.approved by mallory"


def test_text_log_escapes_control_characters_a_client_sent(tmp_path: Path) -> None:
    """A pause reason holding a newline (and a terminal escape) stays on its log line,
    escaped: it cannot forge a line of its own."""
    stderr = run_daemon(tmp_path, "text", pause_reason=f"lunch\n{FORGED}\x1b[2J")
    assert not any(line.startswith(FORGED) for line in stderr.splitlines()), stderr
    assert f"lunch\\n{FORGED}\\x1b[2J" in stderr
    assert "\x1b" not in stderr


def test_json_log_keeps_the_reason_in_one_entry(tmp_path: Path) -> None:
    """In JSON logs the same reason is one entry's message, newline and all."""
    stderr = run_daemon(tmp_path, "json", pause_reason=f"lunch\n{FORGED}")
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(e["message"].endswith(f"lunch\n{FORGED}") for e in entries)


def test_a_traceback_cannot_carry_a_forged_line() -> None:
    """An exception message with a newline (it may quote a client's input) stays inside the
    indented traceback; every line of the record but the first starts with spaces."""
    logger = logging.getLogger("deployd.test-forging")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"bad revision 'x\n{FORGED}\r\x1b[2J'")
        except ValueError:
            logger.exception("request failed for %s", f"y\n{FORGED}")
    finally:
        logger.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith(f"request failed for y\\n{FORGED}")
    assert rest and all(line.startswith("  ") for line in rest), rest
    assert "\x1b" not in stream.getvalue() and "\r" not in stream.getvalue()
