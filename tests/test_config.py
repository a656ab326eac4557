"""config: TOML files in tmp_path read into frozen settings, every mistake with its key path."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from deployd import config
from deployd.cli import main
from deployd.config import (
    HostConfig,
    HttpCheck,
    PrometheusCheck,
    file_problems,
    load,
    parse_duration,
    parse_size,
    render_template,
)
from deployd.errors import ConfigError
from deployd.policy import Threshold
from deployd.rollout_plan import ALL_HOSTS, StepSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "deployd.example.toml"
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # sha256("test")

# Every table a config can have, each with one valid key, so a test can add a line to any level.
BASE = f"""\
[daemon]
state_dir = "state"

[[tokens]]
name = "alice"
token_sha256 = "{DIGEST}"
roles = ["read"]

[apps.shop]
repo = "/srv/git/shop.git"
deploy_to = "/srv/shop"

[apps.shop.ssh]
known_hosts = "/etc/deployd/known_hosts"

[apps.shop.hooks]
restart = "true"

[[apps.shop.hosts]]
address = "web1.example.com"

[[apps.shop.checks]]
name = "http"
url = "http://{{address}}/healthz"

[[apps.shop.checks]]
name = "errors"
type = "prometheus"
server = "http://prometheus.example.com:9090"
query = "up"
max = 1

[apps.shop.rollback]
auto = true

[apps.shop.rescue]
select = "none"
"""

# The header (or "" for the top of the file) under which each level's keys go, and its path.
LEVELS = {
    "top": ("", ""),
    "daemon": ("[daemon]", "daemon"),
    "token": ("[[tokens]]", "tokens[0]"),
    "app": ("[apps.shop]", "apps.shop"),
    "ssh": ("[apps.shop.ssh]", "apps.shop.ssh"),
    "hooks": ("[apps.shop.hooks]", "apps.shop.hooks"),
    "host": ("[[apps.shop.hosts]]", "apps.shop.hosts[0]"),
    "http check": ('name = "http"', "apps.shop.checks[0]"),
    "prometheus check": ('name = "errors"', "apps.shop.checks[1]"),
    "rollback": ("[apps.shop.rollback]", "apps.shop.rollback"),
    "rescue": ("[apps.shop.rescue]", "apps.shop.rescue"),
}


def with_line(level: str, line: str, text: str = BASE) -> str:
    """`text` with `line` added to the table of `level` (replacing that key if it is set)."""
    header, _ = LEVELS[level]
    lines = text.splitlines()
    start = 0 if header == "" else lines.index(header) + 1
    key = line.split("=", 1)[0].strip()
    end = start
    while end < len(lines) and lines[end] and not lines[end].startswith("["):
        end += 1
    block = [old for old in lines[start:end] if old.split("=", 1)[0].strip() != key]
    return "\n".join([*lines[:start], line, *block, *lines[end:]]) + "\n"


def write(tmp_path: Path, text: str, name: str = "deployd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    """The problems load() reports for `text`; fails if it loads."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value.problems


def assert_problem(problems: list[str], key_path: str, *fragments: str) -> None:
    """Some problem is about exactly `key_path` and says every fragment."""
    matching = [p for p in problems if p.startswith(f"{key_path}: ")]
    assert matching, f"no problem for {key_path!r} in {problems}"
    assert any(all(f in p for f in fragments) for p in matching), (key_path, fragments, matching)


# -- a valid file -----------------------------------------------------------------------------

FULL = f"""\
[daemon]
state_dir = "/var/lib/deployd"
listen = "0.0.0.0:9000"
log_format = "json"
metrics_auth = true
shutdown_grace = "1m"

[[tokens]]
name = "alice"
token_sha256 = "{DIGEST.upper()}"
roles = ["read", "approve"]

[[tokens]]
name = "ci"
token_sha256 = "{DIGEST}"
roles = ["deploy"]

[apps.shop]
repo = "ssh://git@git.example.com/acme/shop.git"
repo_key = "/etc/deployd/id_ed25519"
repo_known_hosts = "known_hosts"
branch = "main"
mode = "observe"
poll_interval = "15s"
deploy_to = "/srv/shop/"
keep_releases = 7
linked_dirs = ["log", "tmp/pids"]
linked_files = ["config/database.yml"]
parallel = 10
lock_stale_after = "10m"
max_release_size = "500MB"
max_release_files = 5000

[apps.shop.ssh]
user = "deploy"
key = "~/id_ed25519"
known_hosts = "/etc/deployd/known_hosts"
connect_timeout = "3s"
command_timeout = "2m"
keepalive_interval = "250ms"

[apps.shop.hooks]
build = "make"
restart = "systemctl restart shop"
rollback = "make rollback"
timeout = "1h30m"

[[apps.shop.hosts]]
address = "web1.example.com"
vars = {{ health_port = 8080, role = "web", weight = 0.5 }}

[[apps.shop.hosts]]
address = "web2.example.com"
port = 2222
deploy_to = "/opt/shop"
vars = {{ health_port = "8081" }}

[[apps.shop.checks]]
name = "http"
url = "http://{{address}}:{{health_port}}/healthz"
method = "POST"
expect_status = [200, 204]
json_path = "checks.db"
json_equals = true
headers = {{ Host = "shop.example.com" }}
tls_verify = false
ca_file = "ca.pem"
timeout = "250ms"
interval = "10s"
failures = 2
successes = 3

[[apps.shop.checks]]
name = "errors"
type = "prometheus"
server = "http://prometheus.example.com:9090"
query = "sum(rate(errors_total[1m]))"
max = 5
min = 0.5
timeout = "1s"
interval = "1m"
failures = 4
successes = 2

[apps.shop.rollback]
auto = false
grace = "15s"
bake = "1h30m"
unhealthy_hosts = "30%"

[apps.shop.rescue]
select = "message:^fix"
backup_prefix = "/deployd/saved/"
expire = "2d"
distinct_approver = true
"""


def test_full_file_loads_every_value(tmp_path: Path) -> None:
    """A file setting every key loads into exactly those values, durations in seconds."""
    path = write(tmp_path, FULL)
    cfg = load(path)
    assert cfg.path == path
    d = cfg.daemon
    assert (d.state_dir, d.listen_host, d.listen_port) == (Path("/var/lib/deployd"), "0.0.0.0",
                                                           9000)
    assert (d.log_format, d.metrics_auth, d.shutdown_grace) == ("json", True, 60.0)
    assert [(t.name, t.sha256, t.roles) for t in cfg.tokens] == [
        ("alice", DIGEST, frozenset({"read", "approve"})),
        ("ci", DIGEST, frozenset({"deploy"})),
    ]
    app = cfg.apps["shop"]
    assert app.name == "shop"
    assert app.repo == "ssh://git@git.example.com/acme/shop.git"
    assert app.repo_key == Path("/etc/deployd/id_ed25519")
    assert app.repo_known_hosts == tmp_path.resolve() / "known_hosts"
    assert (app.branch, app.mode, app.poll_interval) == ("main", "observe", 15.0)
    assert (app.deploy_to, app.keep_releases, app.parallel) == ("/srv/shop", 7, 10)
    assert app.linked_dirs == ("log", "tmp/pids")
    assert app.linked_files == ("config/database.yml",)
    assert app.lock_stale_after == 600.0
    assert (app.max_release_size, app.max_release_files) == (500_000_000, 5000)
    assert app.ssh.user == "deploy"
    assert app.ssh.key == Path.home() / "id_ed25519"
    assert app.ssh.known_hosts == Path("/etc/deployd/known_hosts")
    assert (app.ssh.connect_timeout, app.ssh.command_timeout,
            app.ssh.keepalive_interval) == (3.0, 120.0, 0.25)
    assert (app.hooks.build, app.hooks.restart, app.hooks.rollback) == (
        "make", "systemctl restart shop", "make rollback")
    assert app.hook_timeout == 5400.0

    web1, web2 = app.hosts
    assert (web1.address, web1.port, web1.deploy_to, web1.name) == (
        "web1.example.com", 22, "/srv/shop", "web1.example.com")
    assert dict(web1.vars) == {"health_port": "8080", "role": "web", "weight": "0.5"}
    assert (web2.port, web2.deploy_to, web2.name) == (2222, "/opt/shop", "web2.example.com:2222")
    assert dict(web2.vars) == {"health_port": "8081"}

    http, errors = app.checks
    assert isinstance(http, HttpCheck) and isinstance(errors, PrometheusCheck)
    assert (http.name, http.type, http.method) == ("http", "http", "POST")
    assert http.url == "http://{address}:{health_port}/healthz"
    assert http.expect_status == frozenset({200, 204})
    assert (http.json_path, http.json_equals) == ("checks.db", True)
    assert (http.body_contains, http.body_regex) == (None, None)
    assert dict(http.headers) == {"Host": "shop.example.com"}
    assert http.tls_verify is False
    assert http.ca_file == tmp_path.resolve() / "ca.pem"
    assert (http.timeout, http.interval, http.failures, http.successes) == (0.25, 10.0, 2, 3)
    assert (errors.name, errors.type, errors.server) == (
        "errors", "prometheus", "http://prometheus.example.com:9090")
    assert errors.query == "sum(rate(errors_total[1m]))"
    assert (errors.max, errors.min) == (5.0, 0.5)
    assert (errors.timeout, errors.interval, errors.failures, errors.successes) == (
        1.0, 60.0, 4, 2)

    assert app.rollback.auto is False
    assert (app.rollback.grace, app.rollback.bake) == (15.0, 5400.0)
    assert app.rollback.unhealthy_hosts == Threshold(percent=30.0)
    assert (app.rescue.select_kind, app.rescue.select_value) == ("message", "^fix")
    assert app.rescue.backup_prefix == "deployd/saved"
    assert app.rescue.expire == 172800.0
    assert app.rescue.distinct_approver is True


def test_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    """Every key left out takes the default the example config documents."""
    cfg = load(write(tmp_path, """\
[daemon]
state_dir = "state"

[apps.blog]
repo = "/srv/git/blog.git"
deploy_to = "/srv/blog"

[[apps.blog.hosts]]
address = "local"
allow_local_as_daemon = true
"""))
    assert cfg.daemon == config.DaemonConfig(state_dir=tmp_path.resolve() / "state")
    assert (cfg.daemon.listen_host, cfg.daemon.listen_port) == ("127.0.0.1", 8765)
    assert (cfg.daemon.log_format, cfg.daemon.metrics_auth, cfg.daemon.shutdown_grace) == (
        "text", False, 30.0)
    assert cfg.tokens == ()
    app = cfg.apps["blog"]
    assert (app.branch, app.mode, app.poll_interval, app.keep_releases) == (
        "production", "deploy", 15.0, 5)
    assert (app.linked_dirs, app.linked_files, app.parallel, app.lock_stale_after) == (
        (), (), 50, 3600.0)
    assert (app.max_release_size, app.max_release_files) == (1 << 30, 200_000)
    assert (app.repo_key, app.repo_known_hosts) == (None, None)
    assert app.ssh == config.SSHConfig()
    assert (app.ssh.connect_timeout, app.ssh.command_timeout, app.ssh.keepalive_interval) == (
        10.0, 600.0, 15.0)
    assert app.hooks == config.Hooks() and app.hook_timeout == 600.0
    assert app.checks == ()
    assert app.rollback == config.RollbackConfig(auto=True, grace=30.0, bake=600.0,
                                                 unhealthy_hosts=Threshold(count=1))
    assert app.rescue == config.RescueConfig(select_kind="trailer", select_value="Rescue",
                                             backup_prefix="deployd/backup", expire=86400.0,
                                             distinct_approver=False)
    assert app.rollout == config.RolloutConfig(steps=(ALL_HOSTS,), step_bake=120.0,
                                               compare=False)
    (host,) = app.hosts
    assert (host.address, host.is_local, host.port, host.deploy_to, host.name) == (
        "local", True, 22, "/srv/blog", "local")


def test_check_defaults(tmp_path: Path) -> None:
    """An http check with only name and url, a prometheus check with only the required keys."""
    app = load(write(tmp_path, BASE)).apps["shop"]
    http, errors = app.checks
    assert http == HttpCheck(name="http", url="http://{address}/healthz")
    assert isinstance(errors, PrometheusCheck)
    assert (http.method, http.expect_status, http.timeout, http.interval) == (
        "GET", frozenset({200}), 2.0, 5.0)
    assert (http.failures, http.successes, http.tls_verify, dict(http.headers)) == (
        3, 1, True, {})
    assert (errors.timeout, errors.interval, errors.failures, errors.successes, errors.min) == (
        5.0, 30.0, 1, 1, None)


def test_settings_are_frozen(tmp_path: Path) -> None:
    """The loaded settings cannot be changed after the fact."""
    cfg = load(write(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.apps["shop"].branch = "main"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.daemon.listen_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("value", "expected"), [
    ('"1"', Threshold(count=1)),
    ("2", Threshold(count=2)),
    ('"12"', Threshold(count=12)),
    ('"30%"', Threshold(percent=30.0)),
    ('"12.5%"', Threshold(percent=12.5)),
    ('"100%"', Threshold(percent=100.0)),
])
def test_unhealthy_hosts_threshold_forms(tmp_path: Path, value: str, expected: Threshold) -> None:
    """unhealthy_hosts reads a count (string or integer) or a percentage."""
    cfg = load(write(tmp_path, with_line("rollback", f"unhealthy_hosts = {value}")))
    assert cfg.apps["shop"].rollback.unhealthy_hosts == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("[200]", {200}),
    ("200", {200}),
    ('"2xx"', set(range(200, 300))),
    ('"200-299"', set(range(200, 300))),
    ('["2xx", 304, "401-403"]', {*range(200, 300), 304, 401, 402, 403}),
])
def test_expect_status_forms(tmp_path: Path, value: str, expected: set[int]) -> None:
    """expect_status reads a list of codes, a class like "2xx", a range, or a mix."""
    cfg = load(write(tmp_path, with_line("http check", f"expect_status = {value}")))
    check = cfg.apps["shop"].checks[0]
    assert isinstance(check, HttpCheck)
    assert check.expect_status == frozenset(expected)


def test_listen_forms(tmp_path: Path) -> None:
    """listen takes host:port, including a bracketed IPv6 address."""
    cfg = load(write(tmp_path, with_line("daemon", 'listen = "[::1]:8800"')))
    assert (cfg.daemon.listen_host, cfg.daemon.listen_port) == ("::1", 8800)


def test_local_only_app_needs_no_ssh_settings(tmp_path: Path) -> None:
    """An app whose hosts are all `local`, with an https repo, needs no known_hosts at all."""
    text = BASE.replace('address = "web1.example.com"',
                        'address = "local"\nallow_local_as_daemon = true').replace(
        'known_hosts = "/etc/deployd/known_hosts"', 'user = "deploy"').replace(
        '"/srv/git/shop.git"', '"https://git.example.com/shop.git"')
    app = load(write(tmp_path, text)).apps["shop"]
    assert app.ssh.known_hosts is None and app.hosts[0].is_local


def test_same_address_on_other_port_or_deploy_to_is_not_a_duplicate(tmp_path: Path) -> None:
    """Two hosts on one machine are fine when their port or deploy_to differs."""
    text = BASE.replace('address = "web1.example.com"\n', """\
address = "web1.example.com"

[[apps.shop.hosts]]
address = "web1.example.com"
port = 2222

[[apps.shop.hosts]]
address = "web1.example.com"
deploy_to = "/srv/shop-staging"
""")
    hosts = load(write(tmp_path, text)).apps["shop"].hosts
    assert [(h.name, h.deploy_to) for h in hosts] == [
        ("web1.example.com", "/srv/shop"), ("web1.example.com:2222", "/srv/shop"),
        ("web1.example.com", "/srv/shop-staging")]


# -- mistakes ---------------------------------------------------------------------------------

def test_base_is_valid(tmp_path: Path) -> None:
    """The file the mistake tests start from loads (so each mistake is the only problem)."""
    assert set(load(write(tmp_path, BASE)).apps) == {"shop"}


@pytest.mark.parametrize("level", list(LEVELS))
def test_unknown_key_at_every_level(tmp_path: Path, level: str) -> None:
    """An unknown key is reported with its full key path at every level of the file."""
    problems = problems_of(tmp_path, with_line(level, "colour = \"blue\""))
    path = LEVELS[level][1]
    assert problems == [f"{path + '.' if path else ''}colour: unknown key"]


@pytest.mark.parametrize(("level", "line", "key_path", "expected"), [
    ("daemon", "state_dir = 5", "daemon.state_dir", "expected a string, got an integer 5"),
    ("daemon", "listen = 8765", "daemon.listen", "expected a string"),
    ("daemon", 'client_timeout = "0s"', "daemon.client_timeout", "above zero"),
    ("daemon", "max_connections_per_client = 0", "daemon.max_connections_per_client",
     "expected an integer from 1 to 10000"),
    ("daemon", 'listen = "localhost"', "daemon.listen", 'expected "host:port"'),
    ("daemon", 'listen = "localhost:99999"', "daemon.listen", 'expected "host:port"'),
    ("daemon", 'log_format = "xml"', "daemon.log_format", "expected one of 'text', 'json'"),
    ("daemon", 'metrics_auth = "yes"', "daemon.metrics_auth", "expected true or false"),
    ("token", 'roles = "read"', "tokens[0].roles", "expected an array of strings"),
    ("token", "name = 7", "tokens[0].name", "expected a string"),
    ("app", "repo = 5", "apps.shop.repo", "expected a string"),
    ("app", 'repo = "  "', "apps.shop.repo", "must not be empty"),
    ("app", 'mode = "push"', "apps.shop.mode", "expected one of 'deploy', 'observe'"),
    ("app", 'keep_releases = "5"', "apps.shop.keep_releases",
     "expected an integer from 1 to 1000, got '5'"),
    ("app", "keep_releases = 0", "apps.shop.keep_releases", "expected an integer from 1 to 1000"),
    ("app", "keep_releases = true", "apps.shop.keep_releases", "expected an integer"),
    ("app", "parallel = 1.5", "apps.shop.parallel", "expected an integer from 1 to 1000"),
    ("app", 'linked_dirs = "log"', "apps.shop.linked_dirs", "expected an array of strings"),
    ("app", 'linked_dirs = ["/var/log"]', "apps.shop.linked_dirs",
     "expected paths inside the release"),
    ("app", 'linked_files = ["../secrets.yml"]', "apps.shop.linked_files",
     "expected paths inside the release"),
    ("app", "repo_key = 5", "apps.shop.repo_key", "expected a string"),
    ("ssh", "user = 5", "apps.shop.ssh.user", "expected a string"),
    ("hooks", "build = 5", "apps.shop.hooks.build", "expected a string"),
    ("hooks", 'build = ""', "apps.shop.hooks.build", "must not be empty"),
    ("host", 'port = "x"', "apps.shop.hosts[0].port",
     "expected an integer from 1 to 65535, got 'x'"),
    ("host", "port = 70000", "apps.shop.hosts[0].port", "expected an integer from 1 to 65535"),
    ("host", 'deploy_to = "relative"', "apps.shop.hosts[0].deploy_to",
     "expected an absolute path"),
    ("host", "vars = 5", "apps.shop.hosts[0].vars", "expected a table"),
    ("host", "vars = { port = [1] }", "apps.shop.hosts[0].vars",
     "variable 'port': expected a string or number, got an array"),
    ("host", 'vars = { "health-port" = 1 }', "apps.shop.hosts[0].vars",
     "variable name 'health-port' must be letters, digits and _"),
    ("host", 'vars = { "port\\n" = 1 }', "apps.shop.hosts[0].vars",
     "variable name 'port\\n' must be letters, digits and _"),
    ("http check", 'type = "tcp"', "apps.shop.checks[0].type",
     "expected \"http\" or \"prometheus\", got 'tcp'"),
    ("http check", 'method = "PUT"', "apps.shop.checks[0].method", "expected one of 'GET'"),
    ("http check", "expect_status = 99", "apps.shop.checks[0].expect_status",
     'expected status codes like [200], "2xx" or "200-299", got 99'),
    ("http check", 'expect_status = "6xx"', "apps.shop.checks[0].expect_status",
     "expected status codes"),
    ("http check", 'expect_status = ["ok"]', "apps.shop.checks[0].expect_status",
     "expected status codes"),
    ("http check", 'body_regex = "("', "apps.shop.checks[0].body_regex",
     "not a valid regular expression"),
    ("http check", 'headers = { X-Probe = 1 }', "apps.shop.checks[0].headers",
     "expected a table of strings"),
    ("http check", 'tls_verify = "no"', "apps.shop.checks[0].tls_verify",
     "expected true or false"),
    ("http check", "failures = 0", "apps.shop.checks[0].failures",
     "expected an integer from 1 to 1000"),
    ("http check", 'successes = "1"', "apps.shop.checks[0].successes",
     "expected an integer from 1 to 1000"),
    ("http check", 'url = ""', "apps.shop.checks[0].url", "must not be empty"),
    ("prometheus check", 'max = "0.05"', "apps.shop.checks[1].max",
     "expected a number, got a string '0.05'"),
    ("prometheus check", "min = false", "apps.shop.checks[1].min", "expected a number"),
    ("prometheus check", "query = 5", "apps.shop.checks[1].query", "expected a string"),
    ("rollback", 'auto = "yes"', "apps.shop.rollback.auto", "expected true or false"),
    ("rollback", "grace = 30", "apps.shop.rollback.grace",
     'expected a duration string like "15s", got an integer 30'),
    ("rollback", 'unhealthy_hosts = "0"', "apps.shop.rollback.unhealthy_hosts",
     'expected a host count like "1" or a share like "30%"'),
    ("rollback", "unhealthy_hosts = 0", "apps.shop.rollback.unhealthy_hosts",
     "expected a host count"),
    ("rollback", 'unhealthy_hosts = "0%"', "apps.shop.rollback.unhealthy_hosts",
     "expected a host count"),
    ("rollback", 'unhealthy_hosts = "150%"', "apps.shop.rollback.unhealthy_hosts",
     "expected a host count"),
    ("rollback", "unhealthy_hosts = 0.3", "apps.shop.rollback.unhealthy_hosts",
     "expected a host count"),
    ("rollback", 'unhealthy_hosts = "one"', "apps.shop.rollback.unhealthy_hosts",
     "expected a host count"),
    ("rescue", 'select = "author:bob"', "apps.shop.rescue.select",
     'expected "trailer:<Name>", "message:<regex>" or "none"'),
    ("rescue", 'select = "trailer:"', "apps.shop.rescue.select", "expected \"trailer:<Name>\""),
    ("rescue", "distinct_approver = 1", "apps.shop.rescue.distinct_approver",
     "expected true or false"),
    ("rescue", 'backup_prefix = ""', "apps.shop.rescue.backup_prefix", "must not be empty"),
])
def test_wrong_value_reported_with_key_path(tmp_path: Path, level: str, line: str,
                                            key_path: str, expected: str) -> None:
    """A wrong type or value is the only problem, at its key path, saying what was expected."""
    problems = problems_of(tmp_path, with_line(level, line))
    assert len(problems) == 1, problems
    assert_problem(problems, key_path, expected)


@pytest.mark.parametrize(("level", "key"), [
    ("daemon", "shutdown_grace"),
    ("app", "poll_interval"),
    ("app", "lock_stale_after"),
    ("ssh", "connect_timeout"),
    ("ssh", "command_timeout"),
    ("ssh", "keepalive_interval"),
    ("hooks", "timeout"),
    ("http check", "timeout"),
    ("http check", "interval"),
    ("prometheus check", "timeout"),
    ("prometheus check", "interval"),
    ("rollback", "grace"),
    ("rollback", "bake"),
    ("rescue", "expire"),
])
def test_bad_duration_reported_everywhere(tmp_path: Path, level: str, key: str) -> None:
    """"5 minutes" is refused by every duration key, with the forms that would work."""
    problems = problems_of(tmp_path, with_line(level, f'{key} = "5 minutes"'))
    assert problems == [
        f"{LEVELS[level][1]}.{key}: "
        "expected a duration like \"15s\", \"10m\" or \"1h30m\", got '5 minutes'"]


@pytest.mark.parametrize(("level", "key"), [
    ("app", "poll_interval"), ("ssh", "connect_timeout"), ("hooks", "timeout"),
    ("http check", "interval"), ("prometheus check", "timeout"), ("rescue", "expire"),
])
def test_zero_duration_refused_where_it_must_be_positive(tmp_path: Path, level: str,
                                                         key: str) -> None:
    """Intervals and timeouts of "0s" are refused (they would spin or never wait)."""
    problems = problems_of(tmp_path, with_line(level, f'{key} = "0s"'))
    assert problems == [f"{LEVELS[level][1]}.{key}: expected a duration above zero, got '0s'"]


def test_relative_app_deploy_to(tmp_path: Path) -> None:
    """A relative app deploy_to is reported at its key (its hosts then have none)."""
    problems = problems_of(tmp_path, with_line("app", 'deploy_to = "srv/shop"'))
    assert_problem(problems, "apps.shop.deploy_to", "expected an absolute path, got 'srv/shop'")


def test_zero_grace_and_bake_are_allowed(tmp_path: Path) -> None:
    """grace and bake may be "0s" (judge at once)."""
    text = with_line("rollback", 'grace = "0s"', with_line("rollback", 'bake = "0ms"'))
    rollback = load(write(tmp_path, text)).apps["shop"].rollback
    assert (rollback.grace, rollback.bake) == (0.0, 0.0)


def test_missing_file(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.path == str(path)
    assert caught.value.problems == ["file not found"]
    assert caught.value.describe() == f"{path}: file not found"


def test_unreadable_file(tmp_path: Path) -> None:
    """A path that cannot be read (a directory) is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert caught.value.problems[0].startswith("cannot read: ")


def test_not_toml(tmp_path: Path) -> None:
    """A file that is not TOML is reported with the parser's line and column."""
    problems = problems_of(tmp_path, "[daemon]\nstate_dir = /var/lib/deployd\n")
    assert len(problems) == 1
    assert problems[0].startswith("not valid TOML: ")
    assert "line 2" in problems[0]


def test_missing_required_keys(tmp_path: Path) -> None:
    """state_dir, repo, hosts, a host's address and a check's name are required."""
    problems = problems_of(tmp_path, """\
[apps.shop]
deploy_to = "/srv/shop"

[apps.blog]
repo = "/srv/git/blog.git"
deploy_to = "/srv/blog"

[[apps.blog.hosts]]
port = 22

[[apps.blog.checks]]
url = "http://{address}/"
""")
    assert_problem(problems, "daemon.state_dir", "missing (required)")
    assert_problem(problems, "apps.shop.repo", "missing (required)")
    assert_problem(problems, "apps.shop.hosts", "expected at least one [[hosts]] entry")
    assert_problem(problems, "apps.blog.hosts[0].address", "missing (required)")
    assert_problem(problems, "apps.blog.checks[0].name", "missing (required)")


def test_prometheus_check_required_keys(tmp_path: Path) -> None:
    """A prometheus check needs server, query and a bound (max, min or both)."""
    text = BASE.replace('server = "http://prometheus.example.com:9090"\nquery = "up"\nmax = 1\n',
                        "")
    problems = problems_of(tmp_path, text)
    assert_problem(problems, "apps.shop.checks[1].server", "missing (required)")
    assert_problem(problems, "apps.shop.checks[1].query", "missing (required)")
    assert_problem(problems, "apps.shop.checks[1]", "needs max, min or both")
    assert len(problems) == 3


def test_prometheus_query_hosts_placeholder(tmp_path: Path) -> None:
    """{hosts} is the one placeholder of a query; PromQL's own braces are no placeholder."""
    query = "query = 'sum(rate(errors_total{instance=~\"({hosts}):9100\",job=\"shop\"}[1m]))'"
    check = load(write(tmp_path, with_line("prometheus check", query))).apps["shop"].checks[1]
    assert isinstance(check, PrometheusCheck) and "{hosts}" in check.query
    bad = with_line("prometheus check", "query = 'up{instance=~\"{host}|{address}\"}'")
    assert problems_of(tmp_path, bad) == [
        "apps.shop.checks[1].query: unknown placeholder {address}: only {hosts} is replaced "
        "(a regex of the hosts' addresses)",
        "apps.shop.checks[1].query: unknown placeholder {host}: only {hosts} is replaced "
        "(a regex of the hosts' addresses)"]


def test_no_deploy_to_anywhere(tmp_path: Path) -> None:
    """A host with no deploy_to of its own in an app without one is reported."""
    problems = problems_of(tmp_path, BASE.replace('deploy_to = "/srv/shop"\n', ""))
    assert problems == ["apps.shop.hosts[0]: no deploy_to: set it on the app or on the host"]


def test_body_matchers_are_exclusive(tmp_path: Path) -> None:
    """At most one of body_contains, body_regex and json_path; json_path needs json_equals."""
    text = with_line("http check", 'body_contains = "ok"',
                     with_line("http check", 'body_regex = "ok"'))
    assert_problem(problems_of(tmp_path, text), "apps.shop.checks[0]", "set at most one of")
    text = with_line("http check", 'json_path = "status"')
    assert problems_of(tmp_path, text) == [
        "apps.shop.checks[0]: json_path and json_equals go together"]
    text = with_line("http check", 'json_equals = "up"')
    assert problems_of(tmp_path, text) == [
        "apps.shop.checks[0]: json_path and json_equals go together"]


def test_duplicate_host(tmp_path: Path) -> None:
    """The same host (name and deploy_to) twice in an app is reported at the second entry."""
    text = BASE.replace('address = "web1.example.com"\n', """\
address = "web1.example.com"

[[apps.shop.hosts]]
address = "web1.example.com"
port = 22
""")
    assert problems_of(tmp_path, text) == [
        "apps.shop.hosts[1]: duplicate host web1.example.com with deploy_to /srv/shop"]


def test_duplicate_check_name(tmp_path: Path) -> None:
    """Two checks of one app with the same name are reported."""
    text = BASE.replace('name = "errors"', 'name = "http"')
    assert problems_of(tmp_path, text) == ["apps.shop.checks[1].name: duplicate check name 'http'"]


def test_duplicate_token_name(tmp_path: Path) -> None:
    """Two tokens with the same name are reported at the second one."""
    text = BASE.replace("[apps.shop]\n", f"""\
[[tokens]]
name = "alice"
token_sha256 = "{DIGEST}"
roles = ["deploy"]

[apps.shop]
""")
    assert problems_of(tmp_path, text) == ["tokens[1].name: duplicate token name 'alice'"]


def test_unknown_role(tmp_path: Path) -> None:
    """A role other than read, deploy and approve is reported with the allowed ones."""
    problems = problems_of(tmp_path, with_line("token", 'roles = ["read", "admin"]'))
    assert problems == [
        "tokens[0].roles: unknown role(s) ['admin']; expected some of read, deploy, approve"]


@pytest.mark.parametrize("value", ["hunter2", DIGEST[:-1], DIGEST + "0", "g" * 64])
def test_plaintext_token_refused(tmp_path: Path, value: str) -> None:
    """token_sha256 must be 64 hex digits: a secret pasted in is refused, not hashed."""
    problems = problems_of(tmp_path, with_line("token", f'token_sha256 = "{value}"'))
    assert problems == ["tokens[0].token_sha256: expected the 64 hex digit sha256 of the token, "
                        "not the token itself"]


def test_token_needs_exactly_one_source(tmp_path: Path) -> None:
    """A token with neither or both of token_sha256 and token_file is reported."""
    both = with_line("token", 'token_file = "token.sha256"')
    assert problems_of(tmp_path, both) == [
        "tokens[0]: set exactly one of token_sha256 or token_file"]
    neither = BASE.replace(f'token_sha256 = "{DIGEST}"\n', "")
    assert problems_of(tmp_path, neither) == [
        "tokens[0]: set exactly one of token_sha256 or token_file"]


def test_token_file_read_relative_to_the_config(tmp_path: Path) -> None:
    """token_file is read at load, relative to the config's directory, trimmed, lower-cased."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "alice.sha256").write_text(f"  {DIGEST.upper()}\n")
    text = BASE.replace(f'token_sha256 = "{DIGEST}"', 'token_file = "secrets/alice.sha256"')
    (token,) = load(write(tmp_path, text)).tokens
    assert (token.name, token.sha256) == ("alice", DIGEST)


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read {file}: No such file or directory"),
    ("hunter2\n", "expected the 64 hex digit sha256 of the token, not the token itself"),
    ("", "expected the 64 hex digit sha256 of the token, not the token itself"),
])
def test_token_file_errors(tmp_path: Path, content: str | None, expected: str) -> None:
    """A missing token_file, or one holding anything but the hash, is reported at its key."""
    file = tmp_path / "alice.sha256"
    if content is not None:
        file.write_text(content)
    text = BASE.replace(f'token_sha256 = "{DIGEST}"', f'token_file = "{file}"')
    problems = problems_of(tmp_path, text)
    assert problems == [f"tokens[0].token_file: {expected.format(file=file)}"]


def test_token_file_that_is_a_directory(tmp_path: Path) -> None:
    """A token_file naming a directory is a problem, not a traceback."""
    text = BASE.replace(f'token_sha256 = "{DIGEST}"', f'token_file = "{tmp_path}"')
    assert_problem(problems_of(tmp_path, text), "tokens[0].token_file", "cannot read",
                   "Is a directory")


@pytest.mark.parametrize("key", ["token_sha256", "token_file"])
def test_mistyped_token_source_reported_once(tmp_path: Path, key: str) -> None:
    """A token_sha256 or token_file of the wrong type is one problem, not a misleading second."""
    text = BASE.replace(f'token_sha256 = "{DIGEST}"', f"{key} = 5")
    assert problems_of(tmp_path, text) == [f"tokens[0].{key}: expected a string, got an integer 5"]


def test_tokens_must_be_an_array_of_tables(tmp_path: Path) -> None:
    """[tokens] as a plain table is reported as the wrong shape."""
    text = BASE.replace("[[tokens]]", "[tokens]")
    assert problems_of(tmp_path, text) == ["tokens: expected an array of tables ([[tokens]])"]


def test_sections_of_the_wrong_shape(tmp_path: Path) -> None:
    """ssh, hooks, rollback and rescue must be tables, checks an array of tables."""
    problems = problems_of(tmp_path, """\
[daemon]
state_dir = "state"

[apps.shop]
repo = "/srv/git/shop.git"
deploy_to = "/srv/shop"
ssh = 5
hooks = "restart"
checks = 5
rollback = []
rescue = true

[[apps.shop.hosts]]
address = "local"
allow_local_as_daemon = true
""")
    assert sorted(problems) == [
        "apps.shop.checks: expected an array of tables ([[checks]])",
        "apps.shop.hooks: expected a table, got a string",
        "apps.shop.rescue: expected a table, got a boolean",
        "apps.shop.rollback: expected a table, got an array",
        "apps.shop.ssh: expected a table, got an integer",
    ]


def test_apps_must_be_a_table(tmp_path: Path) -> None:
    """apps given as a value is reported as the wrong shape."""
    problems = problems_of(tmp_path, 'apps = ["shop"]\n[daemon]\nstate_dir = "/x"\n')
    assert problems == ["apps: expected a table of apps ([apps.NAME])"]


def test_url_template_naming_an_unknown_host_var(tmp_path: Path) -> None:
    """A check url naming a var some host lacks is reported with that host and var."""
    text = BASE.replace('address = "web1.example.com"\n', """\
address = "web1.example.com"
vars = { health_port = 8080 }

[[apps.shop.hosts]]
address = "web2.example.com"
port = 2200
""").replace("http://{address}/healthz", "http://{address}:{health_port}/healthz")
    assert problems_of(tmp_path, text) == [
        "apps.shop.checks[0].url: host web2.example.com:2200 has no var 'health_port'"]


@pytest.mark.parametrize("url", [
    "http://{address", "http://{0}/", "http://{}/", "http://{address.real}/",
    "http://{address[99]}/", "http://{address!z}/",
])
def test_malformed_url_template_is_a_problem(tmp_path: Path, url: str) -> None:
    """A url whose {braces} are not a valid template is a ConfigError, not a traceback."""
    problems = problems_of(tmp_path, with_line("http check", f'url = "{url}"'))
    assert len(problems) == 1
    assert_problem(problems, "apps.shop.checks[0].url", "not a valid url template")


def test_message_selector_with_bad_regex_is_a_problem(tmp_path: Path) -> None:
    """rescue.select = "message:<regex>" with an invalid regex is reported, not raised."""
    problems = problems_of(tmp_path, with_line("rescue", 'select = "message:fix("'))
    assert len(problems) == 1
    assert_problem(problems, "apps.shop.rescue.select", "not a valid regular expression")


def test_path_under_an_unknown_users_home_is_a_problem(tmp_path: Path) -> None:
    """A "~user/..." path for a user that does not exist is reported at its key."""
    problems = problems_of(tmp_path, with_line("ssh", 'key = "~no-such-user-deployd/id"'))
    assert len(problems) == 1
    assert_problem(problems, "apps.shop.ssh.key", "~no-such-user-deployd")


@pytest.mark.parametrize("value", ["[]", '"299-200"', '"600-699"', '"099-100"'])
def test_expect_status_that_matches_nothing_valid_is_refused(tmp_path: Path, value: str) -> None:
    """An empty list or a range outside 100-599 (which would fail every probe) is refused."""
    problems = problems_of(tmp_path, with_line("http check", f"expect_status = {value}"))
    assert len(problems) == 1
    assert_problem(problems, "apps.shop.checks[0].expect_status", "expected status codes")


def test_ssh_repo_needs_repo_known_hosts(tmp_path: Path) -> None:
    """An ssh:// repo without repo_known_hosts is refused (host keys are verified)."""
    text = with_line("app", 'repo = "ssh://git@git.example.com/acme/shop.git"')
    assert problems_of(tmp_path, text) == [
        "apps.shop.repo_known_hosts: required for an ssh:// repo (host keys are verified)"]
    text = with_line("app", 'repo_known_hosts = "/etc/deployd/known_hosts"', text)
    assert load(write(tmp_path, text)).apps["shop"].repo_known_hosts == Path(
        "/etc/deployd/known_hosts")


def test_ssh_hosts_need_known_hosts(tmp_path: Path) -> None:
    """An app with any SSH host (not `local`) must set ssh.known_hosts."""
    text = BASE.replace('known_hosts = "/etc/deployd/known_hosts"', 'user = "deploy"')
    assert problems_of(tmp_path, text) == [
        "apps.shop.ssh.known_hosts: required for SSH hosts (host keys are verified)"]


@pytest.mark.parametrize("name", ["-shop", ".shop", "shop/web", "shop web", "x" * 65, "shöp",
                                  "a..b", "shop.lock", "shop."])
def test_bad_app_names(tmp_path: Path, name: str) -> None:
    """App names are letters, digits, '.', '_' and '-', start alphanumeric, at most 64, and
    fit in a git branch name (backup branches are named after the app)."""
    text = BASE.replace("apps.shop", f'apps."{name}"')
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert_problem(problems, f"apps.{name}", "app names are letters", "git branch name")


@pytest.mark.parametrize("prefix", ["deployd backup", "a..b", "x/.hidden", "back~up",
                                    "ends.lock"])
def test_backup_prefix_must_fit_a_branch_name(tmp_path: Path, prefix: str) -> None:
    """rescue.backup_prefix is refused when git could not name a branch with it."""
    text = with_line("rescue", f'backup_prefix = "{prefix}"')
    assert_problem(problems_of(tmp_path, text), "apps.shop.rescue.backup_prefix",
                   "cannot be part of a git branch name")


@pytest.mark.parametrize("name", ["a", "shop", "Shop-2.prod_eu", "9lives", "x" * 64])
def test_good_app_names(tmp_path: Path, name: str) -> None:
    """Names within the rules load, keyed by the name."""
    text = BASE.replace("apps.shop", f'apps."{name}"')
    assert list(load(write(tmp_path, text)).apps) == [name]


def test_many_problems_reported_at_once(tmp_path: Path) -> None:
    """Every problem in the file, across sections and apps, comes in one ConfigError."""
    text = BASE.replace('state_dir = "state"', 'state_dir = "state"\nlisten = "nowhere"')
    text = with_line("app", 'poll_interval = "5 minutes"', text)
    text = with_line("host", 'port = "ssh"', text)
    text = with_line("rollback", 'unhealthy_hosts = "half"', text)
    text = with_line("token", 'roles = ["root"]', text)
    text += """
[apps."bad name"]
repo = "ssh://git.example.com/blog.git"
deploy_to = "/srv/blog"
colour = "blue"

[[apps."bad name".hosts]]
address = "local"
allow_local_as_daemon = true
"""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    problems = caught.value.problems
    for key_path in ["daemon.listen", "tokens[0].roles", "apps.shop.poll_interval",
                     "apps.shop.hosts[0].port", "apps.shop.rollback.unhealthy_hosts",
                     "apps.bad name", "apps.bad name.colour", "apps.bad name.repo_known_hosts"]:
        assert_problem(problems, key_path)
    assert len(problems) == 8
    lines = caught.value.describe().splitlines()
    assert lines == [f"{path}: {problem}" for problem in problems]


# -- render_template and parse_duration -------------------------------------------------------

def test_render_template_fills_host_fields_and_vars() -> None:
    """{address}, {port}, {name} and the host's vars are filled in; {{ }} stays literal."""
    host = HostConfig(address="web1.example.com", port=2222, vars={"health_port": "8080"})
    assert render_template("http://{address}:{health_port}/{name}/{port}?q={{x}}", host) == (
        "http://web1.example.com:8080/web1.example.com:2222/2222?q={x}")


def test_render_template_local_host_is_loopback() -> None:
    """A `local` host's {address} is 127.0.0.1 while {name} stays "local"."""
    host = HostConfig(address="local", vars={"health_port": "9000"})
    assert render_template("http://{address}:{health_port}/ {name}", host) == (
        "http://127.0.0.1:9000/ local")


def test_render_template_var_wins_over_builtin() -> None:
    """A var named like a built-in field ({port}) wins over it (vars are spread last)."""
    host = HostConfig(address="web1.example.com", vars={"port": "8080"})
    assert render_template("{address}:{port}", host) == "web1.example.com:8080"


def test_render_template_unknown_name_is_key_error() -> None:
    """A name that is neither a host field nor a var raises KeyError naming it."""
    with pytest.raises(KeyError) as caught:
        render_template("http://{address}:{health_port}/", HostConfig(address="web1"))
    assert caught.value.args == ("health_port",)


@pytest.mark.parametrize(("text", "seconds"), [
    ("15s", 15.0), ("10m", 600.0), ("1h30m", 5400.0), ("250ms", 0.25), ("2d", 172800.0),
    ("1.5h", 5400.0), ("0s", 0.0), ("1h0m30s", 3630.0), ("1m500ms", 60.5), (" 15s ", 15.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations of <number><unit> parts in ms, s, m, h, d read as seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "5 minutes", "15", "", "  ", "1h 30m", "15S", "s", "-5s", ".5s", "1.s", "1h30", "15 s",
    "1w", "15sec", "h1",
])
def test_parse_duration_refuses(text: str) -> None:
    """Anything else is a ValueError saying which forms work."""
    with pytest.raises(ValueError, match='expected a duration like "15s", "10m" or "1h30m"'):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("500MB", 500_000_000), ("1GiB", 1 << 30), ("1.5 KiB", 1536),
    ("2kB", 2000), ("10B", 10), (" 3TB ", 3 * 10**12),
])
def test_parse_size(text: str, size: int) -> None:
    """Sizes are bytes, kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (of 1024)."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "5 megabytes", "-1MB", "1mb", "1e6", "1,000"])
def test_parse_size_refuses(text: str) -> None:
    """Anything else is a ValueError saying which forms work."""
    with pytest.raises(ValueError, match='expected a size like "500MB", "1GiB"'):
        parse_size(text)


@pytest.mark.parametrize(("line", "message"), [
    ('max_release_size = "lots"', "expected a size like \"500MB\", \"1GiB\" or a number of "
                                  "bytes, got 'lots'"),
    ("max_release_size = 0", "expected a size above zero, got 0"),
    ("max_release_size = true", "expected a size like \"500MB\" or a number of bytes, got a "
                                "boolean True"),
    ("max_release_files = 0", "expected an integer from 1 to 10000000, got 0"),
    ('max_release_files = "many"', "expected an integer from 1 to 10000000, got 'many'"),
])
def test_bad_release_limits_are_reported(tmp_path: Path, line: str, message: str) -> None:
    """The release limits are checked like any key, at their key path."""
    key = line.split(" ", 1)[0]
    assert problems_of(tmp_path, with_line("app", line)) == [f"apps.shop.{key}: {message}"]


# -- the CLI ----------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    return subprocess.run([sys.executable, "-m", "deployd.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def example_text() -> str:
    """The example config, its `local` host's run_as user (checked to exist on the machine
    reading the config) swapped for the test user."""
    text = EXAMPLE.read_text()
    assert EXAMPLE_RUN_AS in text
    return text.replace(EXAMPLE_RUN_AS, f'run_as = "{RUN_AS}"')


EXAMPLE_RUN_AS = 'run_as = "blog"'
# An unprivileged user every Debian machine has, and that nobody runs the tests as.
RUN_AS = "nobody"


# What the example's other /etc/deployd files hold, for tests: a secret, a notify URL.
_STAND_INS = {".secret": "s3cret-for-tests-0123456789abcdef\n",
              ".url": "https://hooks.example.com/services/T0/B0/token\n"}


def with_ssh_files(tmp_path: Path, source: Path) -> Path:
    """`source` copied into tmp_path with its /etc/deployd/ files made there (key mode 0600)."""
    text = (example_text() if source == EXAMPLE else source.read_text()
            ).replace("/etc/deployd/", f"{tmp_path}/")
    for name in set(re.findall(rf'"{re.escape(str(tmp_path))}/([^"/]+)"', text)):
        file = tmp_path / name
        file.write_text(_STAND_INS.get(Path(name).suffix, "")
                        if "id_" not in name else "-----BEGIN OPENSSH PRIVATE KEY-----\n")
        file.chmod(0o600)
    return write(tmp_path, text, source.name)


def test_cli_check_config_accepts_the_example(tmp_path: Path) -> None:
    """`deployd check-config` on the example, its key files present, exits 0 and says what it
    found."""
    path = with_ssh_files(tmp_path, EXAMPLE)
    result = _cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (2 app(s), 3 host(s), 2 token(s))"
    assert result.stderr == ""


def test_cli_check_config_names_the_examples_missing_ssh_files(tmp_path: Path) -> None:
    """On a machine without /etc/deployd, the example as shipped fails on exactly its SSH
    files, each named with its key path."""
    if Path("/etc/deployd").exists():
        pytest.skip("this machine has an /etc/deployd")
    missing = "No such file or directory"
    shipped = write(tmp_path, example_text(), "shipped.toml")  # run_as: a user that exists
    result = _cli("check-config", str(shipped))
    assert result.returncode == 2
    # Secrets are read as the file loads, so their problems come first and alone.
    assert sorted(result.stderr.splitlines()) == [
        f"{shipped}: apps.shop.webhook.secret_file: cannot read "
        f"/etc/deployd/shop-webhook.secret: {missing}",
        f"{shipped}: notify[0].url_file: cannot read /etc/deployd/oncall-slack.url: {missing}",
        f"{shipped}: notify[1].secret_file: cannot read /etc/deployd/audit.secret: {missing}",
    ]
    text = example_text()
    for key in ("secret_file", "url_file"):
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.MULTILINE)
    text = text.replace('name = "oncall"\n', 'name = "oncall"\nurl = "https://x.example"\n')
    text = text.replace('[apps.shop.webhook]\n', '').replace('max_body = "1MiB"\n', "")
    without_secrets = tmp_path / EXAMPLE.name
    without_secrets.write_text(text)
    result = _cli("check-config", str(without_secrets))
    assert result.returncode == 2
    path = without_secrets
    assert sorted(result.stderr.splitlines()) == [
        f"{path}: apps.shop.repo_key: cannot read /etc/deployd/id_ed25519: {missing}",
        f"{path}: apps.shop.repo_known_hosts: cannot read /etc/deployd/known_hosts: {missing}",
        f"{path}: apps.shop.ssh.key: cannot read /etc/deployd/id_ed25519: {missing}",
        f"{path}: apps.shop.ssh.known_hosts: cannot read /etc/deployd/known_hosts: {missing}",
    ]


def test_cli_check_config_reports_problems_with_exit_2(tmp_path: Path) -> None:
    """A bad file exits 2, printing each problem with the file and key path on stderr."""
    text = with_line("app", 'poll_interval = "5 minutes"', with_line("host", "colour = 1"))
    path = write(tmp_path, text)
    result = _cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert sorted(result.stderr.splitlines()) == [
        f"{path}: apps.shop.hosts[0].colour: unknown key",
        f"{path}: apps.shop.poll_interval: expected a duration like \"15s\", \"10m\" or "
        "\"1h30m\", got '5 minutes'",
    ]
    assert "Traceback" not in result.stderr


def test_cli_main_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() for a missing file returns 2 with one line naming it on stderr."""
    path = tmp_path / "missing.toml"
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"{path}: file not found\n"
    assert captured.out == ""


def test_cli_main_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns 0 and prints the summary for a valid file."""
    (tmp_path / "known_hosts").write_text("")
    path = write(tmp_path, BASE.replace("/etc/deployd/known_hosts", "known_hosts"))
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (1 app(s), 1 host(s), 1 token(s))\n"


# -- [apps.X.rollout] --------------------------------------------------------------------------


def with_rollout(lines: str, hosts: int = 6) -> str:
    """BASE with `hosts` SSH hosts (web1..webN) and a [apps.shop.rollout] table of `lines`."""
    more = "".join(f'[[apps.shop.hosts]]\naddress = "web{n}.example.com"\n\n'
                   for n in range(2, hosts + 1))
    text = BASE.replace("[[apps.shop.checks]]", more + "[[apps.shop.checks]]", 1)
    return text + "\n[apps.shop.rollout]\n" + lines + "\n"


def test_rollout_reads_counts_shares_and_pauses(tmp_path: Path) -> None:
    """steps mixes counts (string or integer), shares and pauses; step_bake and compare read."""
    text = with_rollout('steps = ["1", 2, "50%", "pause", "100%"]\nstep_bake = "30s"\n'
                        "compare = true")
    rollout = load(write(tmp_path, text)).apps["shop"].rollout
    assert rollout.steps == (StepSpec(count=1), StepSpec(count=2),
                             StepSpec(share=Fraction(1, 2)), StepSpec(pause=True), ALL_HOSTS)
    assert [str(step) for step in rollout.steps] == ["1", "2", "50%", "pause", "100%"]
    assert (rollout.step_bake, rollout.compare) == (30.0, True)


def test_rollout_last_step_may_be_a_count_of_every_host(tmp_path: Path) -> None:
    """A count equal to the number of hosts reaches every host, like "100%"."""
    rollout = load(write(tmp_path, with_rollout('steps = ["1", "3"]', hosts=3))
                   ).apps["shop"].rollout
    assert rollout.steps == (StepSpec(count=1), StepSpec(count=3))


@pytest.mark.parametrize(("steps", "key", "fragment"), [
    ('["0", "100%"]', "steps[0]", 'expected a host count like "1"'),
    ("[0, 6]", "steps[0]", "got 0"),
    ('["1", "0%", "100%"]', "steps[1]", "above 0% and at most 100%"),
    ('["1", "120%"]', "steps[1]", "above 0% and at most 100%"),
    ('["1", "-5%", "100%"]', "steps[1]", 'a share like "25%"'),
    ('["1", "half", "100%"]', "steps[1]", "got 'half'"),
    ('["1", true, "100%"]', "steps[1]", "got True"),
    ('["1", 2.5, "100%"]', "steps[1]", "got 2.5"),
    ('["1", "7"]', "steps[1]", "7 hosts, but the app has 6"),
    ('["1", "50%"]', "steps[1]", 'the last step must reach every host (6 or "100%"), got 50%'),
    ('["1", "pause", "5", "pause"]', "steps[3]", "cannot end with a pause"),
    ('["1", "pause", "5"]', "steps[2]", "the last step must reach every host"),
    ('["pause", "100%"]', "steps[0]", "cannot start with a pause"),
    ('["1", "pause", "pause", "100%"]', "steps[2]", "two pauses in a row"),
    ('["2", "2", "100%"]', "steps[1]", "not more than the 2 the step before reaches"),
    # 10% of 6 hosts rounds up to 1: no more than the step before.
    ('["1", "10%", "100%"]', "steps[1]", "10% is 1 host of 6"),
    ('["3", "25%", "100%"]', "steps[1]", "25% is 2 hosts of 6, not more than the 3"),
    ("[]", "steps", "at least one step"),
    ('"100%"', "steps", "expected an array"),
    ("step_bake = 1", "step_bake", "duration"),
    ('step_bake = "0s"', "step_bake", "above zero"),
    ('compare = "yes"', "compare", "expected true or false"),
    ("colour = 1", "colour", "unknown key"),
])
def test_rollout_problems_name_the_step(tmp_path: Path, steps: str, key: str,
                                        fragment: str) -> None:
    """Each bad steps entry (or other rollout key) is reported with its key path."""
    line = steps if "=" in steps else f"steps = {steps}"
    problems = problems_of(tmp_path, with_rollout(line))
    assert_problem(problems, f"apps.shop.rollout.{key}", fragment)


def test_rollout_reports_every_bad_step_at_once(tmp_path: Path) -> None:
    """Several bad steps: one problem each, in order."""
    problems = problems_of(tmp_path, with_rollout('steps = ["pause", "x", "200%"]'))
    assert [p.split(":")[0] for p in problems] == [
        "apps.shop.rollout.steps[1]", "apps.shop.rollout.steps[2]"]


def test_rollout_not_a_table(tmp_path: Path) -> None:
    """rollout must be a table."""
    text = BASE.replace('deploy_to = "/srv/shop"\n', 'deploy_to = "/srv/shop"\nrollout = 1\n', 1)
    assert_problem(problems_of(tmp_path, text), "apps.shop.rollout", "expected a table")


def test_rollout_only_in_deploy_mode(tmp_path: Path) -> None:
    """An observed app is never deployed by deployd: a rollout table there is a mistake."""
    text = with_line("app", 'mode = "observe"', with_rollout('steps = ["1", "100%"]'))
    assert problems_of(tmp_path, text) == [
        'apps.shop.rollout: only for mode = "deploy": deployd does not deploy an observed app']


def test_cli_check_config_reports_rollout_problems(tmp_path: Path) -> None:
    """`deployd check-config` reports a rollout that never reaches every host, exit 2."""
    path = write(tmp_path, with_rollout('steps = ["1", "2"]', hosts=3))
    result = _cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f'{path}: apps.shop.rollout.steps[1]: the last step must reach every host (3 or '
        '"100%"), got 2']


# -- the example config -----------------------------------------------------------------------

def test_example_config_validates(tmp_path: Path) -> None:
    """config/deployd.example.toml loads without a single problem (its files present)."""
    cfg = load(with_ssh_files(tmp_path, EXAMPLE))
    assert [target.name for target in cfg.notify] == ["oncall", "audit"]
    assert cfg.apps["shop"].webhook is not None
    assert set(cfg.apps) == {"shop", "blog"}
    assert {c.type for c in cfg.apps["shop"].checks} == {"http", "prometheus"}


def _accepted_keys() -> dict[str, set[str]]:
    """Each config.py reader function and the key set it passes to `_Reader.table`."""
    tree = ast.parse(Path(config.__file__).read_text())
    found: dict[str, set[str]] = {}
    for function in tree.body:
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "table" and len(node.args) == 3):
                keys_node = node.args[2]
                if isinstance(keys_node, ast.Name):
                    keys = set(getattr(config, keys_node.id))
                else:
                    keys = set(ast.literal_eval(keys_node))
                found.setdefault(function.name, set()).update(keys)
    return found


def _example_tables(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The example's tables, grouped by the config.py function that reads them."""
    apps = list(doc.get("apps", {}).values())
    checks = [c for app in apps for c in app.get("checks", [])]
    return {
        "parse": [doc],
        "_daemon": [doc["daemon"]],
        "_tokens": doc.get("tokens", []),
        "_app": apps,
        "_ssh": [app["ssh"] for app in apps if "ssh" in app],
        "_hooks": [app["hooks"] for app in apps if "hooks" in app],
        "_hosts": [host for app in apps for host in app.get("hosts", [])],
        "_http_check": [c for c in checks if c.get("type", "http") == "http"],
        "_prometheus_check": [c for c in checks if c.get("type") == "prometheus"],
        "_rollback": [app["rollback"] for app in apps if "rollback" in app],
        "_rollout": [app["rollout"] for app in apps if "rollout" in app],
        "_rescue": [app["rescue"] for app in apps if "rescue" in app],
        "_webhook": [app["webhook"] for app in apps if "webhook" in app],
        "_notify": doc.get("notify", []),
    }


# Keys that cannot be set beside their alternative, so the example shows them commented out.
# The database keys replace the default SQLite file, which the example keeps.
COMMENTED_ALTERNATIVES = {("_tokens", "token_file"), ("_hosts", "allow_local_as_daemon"),
                          ("_daemon", "database"), ("_daemon", "database_password_file"),
                          ("_daemon", "node"), ("_daemon", "advertise"), ("_daemon", "failover")}


def test_example_config_documents_every_accepted_key() -> None:
    """Every key any config.py reader accepts appears in the example (derived from config.py)."""
    accepted = _accepted_keys()
    text = EXAMPLE.read_text()
    tables = _example_tables(tomllib.loads(text))
    assert set(accepted) == set(tables), "a new config table: teach this test where it lives"
    missing = []
    for reader, keys in sorted(accepted.items()):
        present = {key for table in tables[reader] for key in table}
        for key in sorted(keys - present):
            if (reader, key) in COMMENTED_ALTERNATIVES:
                if re.search(rf"^#\s*{key}\s*=", text, re.MULTILINE):
                    continue
            missing.append(f"{reader}: {key}")
    assert missing == []


def test_example_config_comments_every_key() -> None:
    """Each key set in the example has a comment line naming it, with its type or default."""
    text = EXAMPLE.read_text()
    tables = {"daemon", "tokens", "apps", "ssh", "hooks", "hosts", "checks", "rollback",
              "rollout", "rescue", "webhook", "notify"}
    accepted = set().union(*_accepted_keys().values()) - tables
    for key in sorted(accepted):
        assert re.search(rf"^#\s*{key} \(", text, re.MULTILINE), f"no comment for {key}"


def test_example_config_names_every_hook_variable() -> None:
    """The hooks section lists every DEPLOYD_* variable a hook sees."""
    text = EXAMPLE.read_text()
    for name in ["DEPLOYD_APP", "DEPLOYD_REVISION", "DEPLOYD_RELEASE_PATH", "DEPLOYD_DEPLOY_TO",
                 "DEPLOYD_HOST", "DEPLOYD_VAR_<NAME>"]:
        assert name in text, name


def test_example_token_file_alternative_validates(tmp_path: Path) -> None:
    """The commented-out token_file line, swapped in for token_sha256, validates too."""
    text = with_ssh_files(tmp_path, EXAMPLE).read_text()
    match = re.search(r'^# (token_file = "(.*)")$', text, re.MULTILINE)
    assert match is not None
    (tmp_path / "ci.sha256").write_text(DIGEST + "\n")
    ci_hash = re.search(r'name = "ci"\ntoken_sha256 = "[0-9a-f]{64}"\n', text)
    assert ci_hash is not None
    text = text.replace(ci_hash.group(0), 'name = "ci"\n').replace(
        match.group(0), 'token_file = "ci.sha256"')
    tokens = load(write(tmp_path, text)).tokens
    assert [(t.name, t.sha256) for t in tokens][1] == ("ci", DIGEST)


# -- the SSH files the config names (check-config and run, not load) ---------------------------

SSH_FILES = """\
[daemon]
state_dir = "state"

[apps.shop]
repo = "ssh://git@git.example.com/shop.git"
repo_key = "keys/repo_key"
repo_known_hosts = "keys/repo_known_hosts"
deploy_to = "/srv/shop"

[apps.shop.ssh]
key = "keys/id_ed25519"
known_hosts = "keys/known_hosts"

[[apps.shop.hosts]]
address = "web1.example.com"
"""
SSH_FILE_KEYS = {"repo_key": "apps.shop.repo_key", "repo_known_hosts": "apps.shop.repo_known_hosts",
                 "id_ed25519": "apps.shop.ssh.key", "known_hosts": "apps.shop.ssh.known_hosts"}


def ssh_files(tmp_path: Path) -> Path:
    """The keys/ directory of SSH_FILES with every file present, keys mode 0600."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in SSH_FILE_KEYS:
        (keys / name).write_text("x\n")
        (keys / name).chmod(0o600 if name in ("repo_key", "id_ed25519") else 0o644)
    return keys


def test_ssh_files_present_and_private_pass(tmp_path: Path) -> None:
    """Every named file there, keys readable by their owner only: no problem."""
    ssh_files(tmp_path)
    assert file_problems(load(write(tmp_path, SSH_FILES))) == []


@pytest.mark.parametrize("name", sorted(SSH_FILE_KEYS))
def test_a_missing_ssh_file_is_named_with_its_key_path(tmp_path: Path, name: str) -> None:
    """Each of repo_key, repo_known_hosts, ssh.key and ssh.known_hosts is checked; load alone
    does not look (a config can be validated elsewhere), check-config and run do."""
    keys = ssh_files(tmp_path)
    (keys / name).unlink()
    path = write(tmp_path, SSH_FILES)
    assert file_problems(load(path)) == [
        f"{SSH_FILE_KEYS[name]}: cannot read {keys / name}: No such file or directory"]
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = _cli(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr == (f"{path}: {SSH_FILE_KEYS[name]}: cannot read {keys / name}: "
                                 "No such file or directory\n")


@pytest.mark.parametrize(("name", "mode"), [("id_ed25519", 0o640), ("repo_key", 0o604),
                                            ("id_ed25519", 0o700 | 0o020)])
def test_a_private_key_open_to_others_is_refused(tmp_path: Path, name: str, mode: int) -> None:
    """A key file group- or world-accessible is refused like OpenSSH refuses it, naming the key
    path, the file and its mode."""
    keys = ssh_files(tmp_path)
    (keys / name).chmod(mode)
    assert file_problems(load(write(tmp_path, SSH_FILES))) == [
        f"{SSH_FILE_KEYS[name]}: private key {keys / name} is open to group or others "
        f"(mode {mode:04o}): chmod 600 it"]


def test_a_world_readable_known_hosts_is_fine(tmp_path: Path) -> None:
    """known_hosts files hold public keys: any mode that lets deployd read them will do."""
    keys = ssh_files(tmp_path)
    (keys / "known_hosts").chmod(0o644)
    (keys / "repo_known_hosts").chmod(0o666)
    assert file_problems(load(write(tmp_path, SSH_FILES))) == []


def test_an_ssh_file_that_is_a_directory(tmp_path: Path) -> None:
    """A directory where a file is expected is named as such, not a traceback."""
    keys = ssh_files(tmp_path)
    (keys / "known_hosts").unlink()
    (keys / "known_hosts").mkdir()
    assert file_problems(load(write(tmp_path, SSH_FILES))) == [
        f"apps.shop.ssh.known_hosts: {keys / 'known_hosts'} is not a file"]


def test_only_configured_ssh_files_are_checked(tmp_path: Path) -> None:
    """An app on `local` hosts with no SSH settings names no file, so nothing is checked."""
    text = """\
[daemon]
state_dir = "state"

[apps.blog]
repo = "/srv/git/blog.git"
deploy_to = "/srv/blog"

[[apps.blog.hosts]]
address = "local"
allow_local_as_daemon = true
"""
    assert file_problems(load(write(tmp_path, text))) == []


@pytest.mark.parametrize(("value", "expected"), [
    ("https://deployd.example.com", "https://deployd.example.com"),
    ("http://10.0.0.5:8765/", "http://10.0.0.5:8765"),
    ("https://ops.example.com/deployd", "https://ops.example.com/deployd"),
])
def test_public_url_forms(tmp_path: Path, value: str, expected: str) -> None:
    """daemon.public_url takes an http(s) URL, kept without a trailing slash."""
    cfg = load(write(tmp_path, with_line("daemon", f'public_url = "{value}"')))
    assert cfg.daemon.public_url == expected


@pytest.mark.parametrize("value", ["deployd.example.com", "ftp://x", "http://", "", "http://a b"])
def test_public_url_refuses_anything_but_an_http_url(tmp_path: Path, value: str) -> None:
    """Anything else is a problem at daemon.public_url."""
    problems = problems_of(tmp_path, with_line("daemon", f'public_url = "{value}"'))
    assert len(problems) == 1 and problems[0].startswith("daemon.public_url: "), problems


LOCAL = BASE.replace('address = "web1.example.com"', 'address = "local"')


def test_local_host_without_run_as_is_refused_naming_the_key(tmp_path: Path) -> None:
    """A `local` host runs repository code on this machine: it needs run_as, or the explicit
    allow_local_as_daemon opt-in; check-config names the key path."""
    found = problems_of(tmp_path, LOCAL)
    assert len(found) == 1 and found[0].startswith("apps.shop.hosts[0].run_as: required")
    assert "allow_local_as_daemon" in found[0]
    run = subprocess.run([sys.executable, "-m", "deployd.cli", "check-config",
                          str(write(tmp_path, LOCAL))], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 2 and "apps.shop.hosts[0].run_as: required" in run.stderr
    assert load(write(tmp_path, with_line("host", "allow_local_as_daemon = true", LOCAL))
                ).apps["shop"].hosts[0].allow_local_as_daemon
    host = load(write(tmp_path, with_line("host", f'run_as = "{RUN_AS}"', LOCAL))
                ).apps["shop"].hosts[0]
    assert (host.run_as, host.allow_local_as_daemon) == (RUN_AS, False)


@pytest.mark.parametrize(("text", "expected"), [
    (with_line("host", 'run_as = "no-such-user-here"', LOCAL),
     "apps.shop.hosts[0].run_as: no such user 'no-such-user-here' on this machine"),
    (with_line("host", 'run_as = "root"', LOCAL),
     "apps.shop.hosts[0].run_as: must not be root: name an unprivileged user"),
    (with_line("host", f'run_as = "{RUN_AS}"',
               with_line("host", "allow_local_as_daemon = true", LOCAL)),
     "apps.shop.hosts[0]: set run_as or allow_local_as_daemon = true, not both"),
    (with_line("host", f'run_as = "{RUN_AS}"'),
     'apps.shop.hosts[0].run_as: only for address = "local" (an SSH host runs commands as '
     "ssh.user)"),
    (with_line("host", "allow_local_as_daemon = true"),
     'apps.shop.hosts[0].allow_local_as_daemon: only for address = "local" (an SSH host runs '
     "commands as ssh.user)"),
])
def test_run_as_mistakes_are_named(tmp_path: Path, text: str, expected: str) -> None:
    assert problems_of(tmp_path, text) == [expected]


# -- [daemon] database ---------------------------------------------------------------------------

PG_URL = "postgresql://deployd@db.internal:5432/deployd"


def test_database_defaults_to_none_and_takes_a_postgresql_url(tmp_path: Path) -> None:
    """Without `database` the store is SQLite in state_dir; with it, the URL and the password
    file (relative to the config's directory) are kept."""
    plain = load(write(tmp_path, BASE)).daemon
    assert (plain.database, plain.database_password_file) == (None, None)
    text = with_line("daemon", f'database = "{PG_URL}"')
    text = with_line("daemon", 'database_password_file = "db.password"', text)
    daemon = load(write(tmp_path, text)).daemon
    assert daemon.database == PG_URL
    assert daemon.database_password_file == tmp_path / "db.password"


@pytest.mark.parametrize(("url", "fragment"), [
    ("postgresql://deployd:hunter2-secret@db/deployd", "holds a password"),
    ("postgresql://db/deployd?password=hunter2-secret", "holds a password"),
    ("postgresql://db/deployd?sslmode=require&password=", "holds a password"),
    ("mysql://deployd@db/deployd", 'expected a "postgresql://" URL'),
    ("postgresql://db:hunter2-secret/deployd", "not a valid URL"),
    ("", "must not be empty"),
])
def test_database_url_problems_never_repeat_the_url(tmp_path: Path, url: str,
                                                    fragment: str) -> None:
    """A URL with a password in it, of another scheme or not a URL is refused, and the
    problem does not echo it (it may hold the password)."""
    problems = problems_of(tmp_path, with_line("daemon", f'database = "{url}"'))
    assert_problem(problems, "daemon.database", fragment)
    assert not any("hunter2" in problem for problem in problems)


def test_node_advertise_and_failover(tmp_path: Path) -> None:
    """Defaults: the host name, the daemon's own base URL, 10 s; each can be set."""
    plain = load(write(tmp_path, BASE)).daemon
    assert plain.node == socket.gethostname()
    assert (plain.advertise, plain.advertise_url, plain.failover) == (
        None, plain.base_url, 10.0)
    text = with_line("daemon", 'node = "deployd-a"')
    text = with_line("daemon", 'advertise = "http://10.0.0.5:8765/"', text)
    text = with_line("daemon", 'failover = "5s"', text)
    daemon = load(write(tmp_path, text)).daemon
    assert (daemon.node, daemon.advertise_url, daemon.failover) == (
        "deployd-a", "http://10.0.0.5:8765", 5.0)


@pytest.mark.parametrize(("line", "key", "fragment"), [
    ('node = "a b"', "daemon.node", "letters, digits"),
    ('node = ""', "daemon.node", "letters, digits"),
    ('advertise = "10.0.0.5:8765"', "daemon.advertise", "http://"),
    ('failover = "500ms"', "daemon.failover", "from 1s to 1h"),
    ('failover = 10', "daemon.failover", "duration string"),
])
def test_node_settings_problems(tmp_path: Path, line: str, key: str, fragment: str) -> None:
    assert_problem(problems_of(tmp_path, with_line("daemon", line)), key, fragment)


def test_database_password_file_needs_a_database(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_line("daemon", 'database_password_file = "pw"'))
    assert_problem(problems, "daemon.database_password_file", "only with daemon.database")


def test_database_password_file_must_be_private(tmp_path: Path) -> None:
    """The password file is checked like an SSH key: present, readable, and 0600 (a file
    group or others can read is a problem naming it, without its content)."""
    text = with_line("daemon", f'database = "{PG_URL}"')
    text = with_line("daemon", 'database_password_file = "db.password"', text)
    loaded = load(write(tmp_path, text))

    def daemon_file_problems() -> list[str]:
        return [p for p in file_problems(loaded) if p.startswith("daemon.")]

    assert daemon_file_problems() == [
        f"daemon.database_password_file: cannot read {tmp_path / 'db.password'}: "
        "No such file or directory"]
    password = tmp_path / "db.password"
    password.write_text("hunter2-secret\n")
    password.chmod(0o640)
    assert daemon_file_problems() == [
        f"daemon.database_password_file: password file {password} is open to group or others "
        "(mode 0640): chmod 600 it"]
    password.chmod(0o600)
    assert daemon_file_problems() == []
