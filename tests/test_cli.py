"""The `deployd` command line as a user runs it: real processes, exit codes, stderr."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


def deployd(*args: str, stdin: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "deployd.cli", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT, check=False)


def good_config(tmp_path: Path) -> str:
    app = AppSpec(name="shop", repo=str(tmp_path / "origin.git"),
                  local_dirs=[tmp_path / "host1", tmp_path / "host2"])
    return DaemonSpec(state_dir=tmp_path / "state", apps=[app]).render()


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    """check-config on a valid file: exit 0 and an "ok" line naming the file."""
    path = tmp_path / "deployd.toml"
    path.write_text(good_config(tmp_path))
    result = deployd("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout and "ok" in result.stdout
    assert "1 app(s), 2 host(s), 4 token(s)" in result.stdout


@pytest.mark.parametrize(("old", "new", "key_path", "expected"), [
    ('poll_interval = "200ms"', 'poll_interval = "200ms"\nbogus = 1', "apps.shop.bogus",
     "unknown"),
    ('poll_interval = "200ms"', 'poll_interval = "5 minutes"', "apps.shop.poll_interval",
     "duration"),
    ('shutdown_grace = "10s"', "shutdown_grace = 30", "daemon.shutdown_grace", "duration"),
    ('poll_interval = "200ms"', 'poll_interval = "200ms"\nkeep_releases = "five"',
     "apps.shop.keep_releases", "integer"),
    ("host2", "host1", "apps.shop.hosts[1]", "duplicate"),
])
def test_check_config_names_file_and_key_path_of_a_mistake(
        tmp_path: Path, old: str, new: str, key_path: str, expected: str) -> None:
    """check-config on a file with one mistake: exit 2, stderr names the file and the key path
    and says what was wrong, with no traceback."""
    text = good_config(tmp_path)
    assert old in text
    text = text.replace(old, new, 1)
    path = tmp_path / "deployd.toml"
    path.write_text(text)
    result = deployd("check-config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert str(path) in result.stderr
    assert key_path in result.stderr
    assert expected.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_check_config_reports_a_missing_file(tmp_path: Path) -> None:
    """check-config on a file that does not exist: exit 2 naming the file."""
    path = tmp_path / "nowhere.toml"
    result = deployd("check-config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, one line each."""
    text = good_config(tmp_path).replace('poll_interval = "200ms"',
                                         'poll_interval = "5 minutes"\nbogus = 1')
    path = tmp_path / "deployd.toml"
    path.write_text(text)
    result = deployd("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(line.startswith(f"{path}: ") for line in lines)


@pytest.mark.parametrize("mistake", ["unknown key", "bad duration", "missing file", "toml"])
def test_run_with_a_bad_config_exits_2_with_one_clear_message(tmp_path: Path,
                                                              mistake: str) -> None:
    """`deployd run` with a bad config does not start: exit 2, one line naming the file, no
    traceback, nothing listening and no state written."""
    path = tmp_path / "deployd.toml"
    text = good_config(tmp_path)
    if mistake == "unknown key":
        path.write_text(text.replace("[daemon]", "[daemon]\nlisten_on = 1", 1))
    elif mistake == "bad duration":
        path.write_text(text.replace('"200ms"', '"5 minutes"', 1))
    elif mistake == "toml":
        path.write_text(text + "[apps.shop\n")
    result = deployd("run", "--config", str(path), timeout=20)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{path}: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_hash_token_prints_the_sha256_of_stdin() -> None:
    """hash-token reads the secret on stdin (trailing newline ignored) and prints its sha256;
    an empty secret is refused with exit 2."""
    secret = "s3cret-token-value"
    result = deployd("hash-token", stdin=secret + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(secret.encode()).hexdigest() + "\n"
    assert secret not in result.stderr
    empty = deployd("hash-token", stdin="")
    assert empty.returncode == 2
    assert empty.stdout == ""


def test_usage_errors_exit_2() -> None:
    """An unknown command or a missing --config is a usage error (exit 2)."""
    assert deployd("frobnicate").returncode == 2
    assert deployd("run").returncode == 2
    assert deployd("--version").stdout.startswith("deployd ")


def test_run_on_a_taken_port_exits_1_with_one_clear_message(tmp_path: Path) -> None:
    """`deployd run` when its listen address is taken: exit 1 and a message naming the
    address, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "deployd.toml"
        path.write_text(good_config(tmp_path).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = deployd("run", "--config", str(path), timeout=30)
    assert result.returncode == 1, result.stderr
    assert f"deployd: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_an_unusable_state_dir_exits_1_with_one_clear_message(tmp_path: Path) -> None:
    """`deployd run` whose state_dir cannot be made (a file is in the way): exit 1 and one
    line naming the state store, not a traceback."""
    (tmp_path / "file").write_text("in the way\n")
    path = tmp_path / "deployd.toml"
    text = good_config(tmp_path)
    state = str(tmp_path / "state")
    assert state in text
    path.write_text(text.replace(state, str(tmp_path / "file" / "state")))
    result = deployd("run", "--config", str(path), timeout=30)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("deployd: cannot open state store ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
