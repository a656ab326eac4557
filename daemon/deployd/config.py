"""The TOML config file, read into validated, immutable settings.

`load(path)` returns a `Config` or raises `ConfigError` listing every problem at once, each
with its key path (`apps.shop.hosts[1].port: expected an integer from 1 to 65535, got "x"`).
Unknown keys are errors, durations are parsed once (`"15s"`, `"10m"`, `"1h30m"`, `"500ms"`),
and so are sizes (`"500MB"`, `"1GiB"`, or a number of bytes); nothing here touches the
network or the hosts.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from deployd.errors import ConfigError
from deployd.policy import Threshold
from deployd.rollout_plan import ALL_HOSTS, StepSpec, parse_step, problems

ROLES = frozenset({"read", "deploy", "approve"})
Mode = Literal["deploy", "observe"]
LogFormat = Literal["text", "json"]
T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Names are checked with fullmatch: `$` would also accept a trailing newline.
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `{name}` in a PromQL query; PromQL's own braces always hold a matcher (`{job="x"}`).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HTTP_URL = re.compile(r"https?://[^\s/]+(/\S*)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_duration(text: str) -> float:
    """Seconds in a duration like "15s", "10m", "1h30m" or "250ms"; ValueError otherwise."""
    text = text.strip()
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f'expected a duration like "15s", "10m" or "1h30m", got {text!r}')
    return total


def parse_size(text: str) -> int:
    """Bytes in a size like "500MB", "1GiB" or "4096"; ValueError otherwise.

    kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a size like "500MB", "1GiB" or a number of bytes, '
                         f"got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass(frozen=True)
class Token:
    """An API token: only the sha256 of its secret is kept."""

    name: str
    sha256: str
    roles: frozenset[str]


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8765
    log_format: LogFormat = "text"
    metrics_auth: bool = False
    shutdown_grace: float = 30.0
    public_url: str | None = None

    @property
    def base_url(self) -> str:
        """How humans reach the REST API: `public_url`, or the listen address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.listen_port}"
    client_timeout: float = 15.0
    max_connections_per_client: int = 32
    # PostgreSQL instead of the SQLite file in state_dir: a URL without a password (that is
    # read from `database_password_file` when the store opens).
    database: str | None = None
    database_password_file: Path | None = None
    # Several daemons on one PostgreSQL database (ownership.py): this daemon's name among
    # them, the URL the others reach it at, and how soon a dead node's apps move.
    node: str = field(default_factory=socket.gethostname)
    advertise: str | None = None
    failover: float = 10.0

    @property
    def advertise_url(self) -> str:
        """How the other nodes reach this one: `advertise`, else `base_url`."""
        return self.advertise or self.base_url


@dataclass(frozen=True)
class SSHConfig:
    user: str | None = None
    key: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    keepalive_interval: float = 15.0


@dataclass(frozen=True)
class Hooks:
    """Shell commands run on each host; see the example config for their variables."""

    build: str | None = None
    restart: str | None = None
    rollback: str | None = None


@dataclass(frozen=True)
class HostConfig:
    address: str
    port: int = 22
    deploy_to: str = ""
    vars: Mapping[str, str] = field(default_factory=dict)
    # `local` hosts only: the user whose identity commands (and hooks: code from the
    # repository) run with, or None with `allow_local_as_daemon`, as deployd's own user.
    run_as: str | None = None
    allow_local_as_daemon: bool = False

    @property
    def is_local(self) -> bool:
        return self.address == "local"

    @property
    def name(self) -> str:
        """The host's label in events and metrics: `address` or `address:port`."""
        if self.is_local or self.port == 22:
            return self.address
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class HttpCheck:
    name: str
    url: str
    method: str = "GET"
    expect_status: frozenset[int] = frozenset({200})
    body_contains: str | None = None
    body_regex: str | None = None
    json_path: str | None = None
    json_equals: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tls_verify: bool = True
    ca_file: Path | None = None
    timeout: float = 2.0
    interval: float = 5.0
    failures: int = 3
    successes: int = 1
    type: Literal["http"] = "http"


@dataclass(frozen=True)
class PrometheusCheck:
    name: str
    server: str
    query: str
    max: float | None = None
    min: float | None = None
    timeout: float = 5.0
    interval: float = 30.0
    failures: int = 1
    successes: int = 1
    type: Literal["prometheus"] = "prometheus"


Check = HttpCheck | PrometheusCheck


@dataclass(frozen=True)
class RollbackConfig:
    auto: bool = True
    grace: float = 30.0
    bake: float = 600.0
    unhealthy_hosts: Threshold = field(default_factory=lambda: Threshold(count=1))


@dataclass(frozen=True)
class RolloutConfig:
    """`[apps.X.rollout]`: the steps of a deploy (see `deployd.rollout_plan`); without the
    table, one step of every host."""

    steps: tuple[StepSpec, ...] = (ALL_HOSTS,)
    step_bake: float = 120.0
    compare: bool = False


@dataclass(frozen=True)
class RescueConfig:
    select_kind: Literal["trailer", "message", "none"] = "trailer"
    select_value: str = "Rescue"
    backup_prefix: str = "deployd/backup"
    expire: float = 86400.0
    distinct_approver: bool = False


@dataclass(frozen=True)
class WebhookConfig:
    """`[apps.X.webhook]`: pushes announced by the git server; the secret is never shown."""

    secret: bytes = field(repr=False)
    max_body: int = 1024 * 1024


@dataclass(frozen=True)
class AppConfig:
    name: str
    repo: str
    branch: str
    deploy_to: str
    hosts: tuple[HostConfig, ...]
    repo_key: Path | None = None
    repo_known_hosts: Path | None = None
    mode: Mode = "deploy"
    poll_interval: float = 15.0
    keep_releases: int = 5
    linked_dirs: tuple[str, ...] = ()
    linked_files: tuple[str, ...] = ()
    parallel: int = 50
    lock_stale_after: float = 3600.0
    max_release_size: int = 1 << 30
    max_release_files: int = 200_000
    ssh: SSHConfig = SSHConfig()
    hooks: Hooks = Hooks()
    hook_timeout: float = 600.0
    checks: tuple[Check, ...] = ()
    rollback: RollbackConfig = RollbackConfig()
    rollout: RolloutConfig = RolloutConfig()
    rescue: RescueConfig = RescueConfig()
    webhook: WebhookConfig | None = None

    @property
    def host_labels(self) -> list[str]:
        """Each host's label in events, metrics and REST, in config order.

        `HostConfig.name`; hosts sharing a name (one machine, two deploy_to, or several
        `local` ones) are told apart as `<name>:<deploy_to>`.
        """
        names = [host.name for host in self.hosts]
        return [host.name if names.count(host.name) == 1 else f"{host.name}:{host.deploy_to}"
                for host in self.hosts]


NotifyFormat = Literal["json", "slack"]

# What wakes a human when a target names no `events` of its own.
DEFAULT_NOTIFY_EVENTS = ("rollback.*", "deploy.failed", "bake.failed", "app.paused", "job.*",
                         "rollout.*", "notify.failing")


@dataclass(frozen=True)
class NotifyTarget:
    """`[[notify]]`: where deployd tells humans what happened (URL and secret never shown)."""

    name: str
    url: str = field(repr=False)
    format: NotifyFormat = "json"
    secret: bytes | None = field(default=None, repr=False)
    events: tuple[str, ...] = DEFAULT_NOTIFY_EVENTS
    apps: tuple[str, ...] | None = None
    remind: float = 3600.0
    give_up_after: float = 86400.0
    timeout: float = 10.0

    def wants(self, app: str, kind: str) -> bool:
        """Whether an event of `kind` about `app` goes to this target."""
        if self.apps is not None and app not in self.apps:
            return False
        return any(fnmatch.fnmatchcase(kind, pattern) for pattern in self.events)


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    tokens: tuple[Token, ...]
    apps: Mapping[str, AppConfig]
    notify: tuple[NotifyTarget, ...] = ()


class _Reader:
    """Walks a TOML table, collecting every problem with its key path instead of stopping."""

    def __init__(self, base_dir: Path) -> None:
        self.problems: list[str] = []
        self.base_dir = base_dir

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def table(self, data: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.problem(path, f"expected a table, got {_kind(data)}")
            return {}
        for key in sorted(set(data) - allowed):
            self.problem(f"{path}.{key}" if path else key, "unknown key")
        return data

    def array(self, data: Any, path: str) -> list[Any]:
        """An array of tables (`[[path]]`), or [] and a problem."""
        if not isinstance(data, list):
            self.problem(path, f"expected an array of tables ([[{path}]])")
            return []
        return data

    def unique_name(self, table: dict[str, Any], path: str, seen: set[str], what: str) -> str:
        """The required `name` of one table in an array, which no earlier one may share."""
        name = self.get(table, path, "name", _nonempty, "", required=True)
        if name in seen:
            self.problem(f"{path}.name", f"duplicate {what} name {name!r}")
        seen.add(name)
        return name

    def get(self, table: dict[str, Any], path: str, key: str, check: Callable[[Any], T],
            default: T, *, required: bool = False) -> T:
        full = f"{path}.{key}" if path else key
        if key not in table:
            if required:
                self.problem(full, "missing (required)")
            return default
        try:
            return check(table[key])
        except (TypeError, ValueError) as exc:
            self.problem(full, str(exc))
            return default

    def path_value(self, value: Any) -> Path:
        text = _string(value)
        try:
            path = Path(text).expanduser()
        except RuntimeError:
            raise ValueError(f"cannot expand {text!r}: no such user's home directory") from None
        return path if path.is_absolute() else self.base_dir / path


def _kind(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_kind(value)} {value!r}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_kind(value)} {value!r}")
    return value


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value!r}")
        return value
    return check


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {_kind(value)} {value!r}")
    return float(value)


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise TypeError(f'expected a duration string like "15s", got {_kind(value)} {value!r}')
    return parse_duration(value)


def _duration_or_never(value: Any) -> float:
    """A duration, or "0" for never."""
    return 0.0 if value == "0" else _duration(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _size(value: Any) -> int:
    """A positive size: an integer number of bytes or a string like "500MB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f'expected a size like "500MB" or a number of bytes, '
                        f"got {_kind(value)} {value!r}")
    size = value if isinstance(value, int) else parse_size(value)
    if size <= 0:
        raise ValueError(f"expected a size above zero, got {value!r}")
    return size


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"expected an array of strings, got {value!r}")
    return tuple(value)


def _relative_paths(value: Any) -> tuple[str, ...]:
    paths = _strings(value)
    for item in paths:
        if not item or item.startswith("/") or ".." in item.split("/"):
            raise ValueError(f"expected paths inside the release, got {item!r}")
    return paths


def _absolute_dir(value: Any) -> str:
    text = _nonempty(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text.rstrip("/") or "/"


def _base_url(value: Any) -> str:
    text = _nonempty(value).rstrip("/")
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", text):
        raise ValueError(f'expected an http:// or https:// URL like "https://deployd.example.com",'
                         f" got {value!r}")
    return text


def _listen(value: Any) -> tuple[str, int]:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port" like "127.0.0.1:8765", got {text!r}')
    return host.strip("[]"), int(port)


def _threshold(value: Any) -> Threshold:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str):
        if re.fullmatch(r"\d+", text) and int(text) >= 1:
            return Threshold(count=int(text))
        match = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
        if match and 0 < float(match.group(1)) <= 100:
            return Threshold(percent=float(match.group(1)))
    raise ValueError(f'expected a host count like "1" or a share like "30%", got {value!r}')


def _statuses(value: Any) -> frozenset[int]:
    """`[200, 204]`, `"2xx"`, `"200-299"` or a list mixing them."""
    items = value if isinstance(value, list) else [value]
    codes: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            codes.add(item)
        elif isinstance(item, str) and re.fullmatch(r"[1-5]xx", item):
            start = int(item[0]) * 100
            codes.update(range(start, start + 100))
        elif (isinstance(item, str) and (m := re.fullmatch(r"(\d{3})-(\d{3})", item))
              and 100 <= int(m.group(1)) <= int(m.group(2)) <= 599):
            codes.update(range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            raise ValueError(
                f'expected status codes like [200], "2xx" or "200-299", got {item!r}'
            )
    if not codes:
        raise ValueError(f'expected status codes like [200], "2xx" or "200-299", got {value!r}')
    return frozenset(codes)


def _selector(value: Any) -> tuple[Literal["trailer", "message", "none"], str]:
    text = _string(value)
    if text == "none":
        return "none", ""
    kind, sep, rest = text.partition(":")
    if sep and rest and kind == "trailer":
        return "trailer", rest
    if sep and rest and kind == "message":
        _regex(rest)
        return "message", rest
    raise ValueError(f'expected "trailer:<Name>", "message:<regex>" or "none", got {text!r}')


_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def _ref_safe(text: str) -> bool:
    """Whether `text` can be part of a git ref name (git check-ref-format's rules)."""
    if not text or text == "@" or _REF_FORBIDDEN.search(text):
        return False
    return all(part and not part.startswith(".") and not part.endswith((".", ".lock"))
               for part in text.split("/"))


def _ref_prefix(value: Any) -> str:
    text = _nonempty(value).strip("/")
    if not _ref_safe(text):
        raise ValueError(f"{text!r} cannot be part of a git branch name "
                         '(like "deployd/backup": no spaces, "..", "~^:?*[\\" or ".lock")')
    return text


def _regex(value: Any) -> str:
    text = _string(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return text


def _vars(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a table, got {_kind(value)}")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not _VAR_NAME.fullmatch(key):
            raise ValueError(f"variable name {key!r} must be letters, digits and _")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise TypeError(f"variable {key!r}: expected a string or number, got {_kind(item)}")
        result[key] = str(item)
    return result


def _user(value: Any) -> str:
    """An existing user other than root and the user this process runs as."""
    name = _nonempty(value)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no such user {name!r} on this machine") from None
    if entry.pw_uid == 0:
        raise ValueError("must not be root: name an unprivileged user")
    if entry.pw_uid == os.geteuid():
        raise ValueError(f"{name!r} is the user deployd runs as; name another user")
    return name


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TypeError("expected a table of strings")
    return dict(value)


def _daemon(r: _Reader, data: Any) -> DaemonConfig:
    table = r.table(data, "daemon", {"state_dir", "listen", "public_url", "log_format",
                                      "metrics_auth", "shutdown_grace", "client_timeout",
                                      "max_connections_per_client", "database",
                                      "database_password_file", "node", "advertise",
                                      "failover"})
    state_dir = r.get(table, "daemon", "state_dir", r.path_value, Path("."), required=True)
    host, port = r.get(table, "daemon", "listen", _listen, ("127.0.0.1", 8765))
    log_format = r.get(table, "daemon", "log_format", _choice(("text", "json")), "text")
    database = r.get(table, "daemon", "database", _database_url, None)
    password_file = r.get(table, "daemon", "database_password_file", r.path_value, None)
    if password_file is not None and "database" not in table:
        r.problem("daemon.database_password_file", "set only with daemon.database")
    return DaemonConfig(
        state_dir=state_dir,
        listen_host=host,
        listen_port=port,
        log_format=log_format,  # type: ignore[arg-type]
        metrics_auth=r.get(table, "daemon", "metrics_auth", _bool, False),
        shutdown_grace=r.get(table, "daemon", "shutdown_grace", _duration, 30.0),
        public_url=r.get(table, "daemon", "public_url", _base_url, None),
        client_timeout=r.get(table, "daemon", "client_timeout", _positive_duration, 15.0),
        max_connections_per_client=r.get(table, "daemon", "max_connections_per_client",
                                         _int_range(1, 10_000), 32),
        database=database,
        database_password_file=password_file,
        node=r.get(table, "daemon", "node", _node_name, socket.gethostname()),
        advertise=r.get(table, "daemon", "advertise", _base_url, None),
        failover=r.get(table, "daemon", "failover", _failover, 10.0),
    )


def _node_name(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ValueError(f"expected 1-63 letters, digits, '.', '_' or '-', got {value!r}")
    return text


def _failover(value: Any) -> float:
    """At least a second: the dedicated connection's timeouts are a fraction of it."""
    seconds = _duration(value)
    if seconds < 1.0 or seconds > 3600.0:
        raise ValueError(f"expected a duration from 1s to 1h, got {value!r}")
    return seconds


def _database_url(value: Any) -> str:
    """A postgresql:// URL that holds no password (a message never repeats the URL)."""
    text = _nonempty(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError('expected a "postgresql://" URL')
    if parts.password is not None or "password" in parse_qs(parts.query, keep_blank_values=True):
        raise ValueError("holds a password: put it in database_password_file instead")
    return text


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(map(repr, options))}, got {value!r}")
        return str(value)
    return check


def _tokens(r: _Reader, data: Any) -> tuple[Token, ...]:
    tokens: list[Token] = []
    names: set[str] = set()
    for index, item in enumerate(r.array(data, "tokens")):
        path = f"tokens[{index}]"
        table = r.table(item, path, {"name", "token_sha256", "token_file", "roles"})
        name = r.unique_name(table, path, names, "token")
        digest = _token_digest(r, table, path)
        roles = r.get(table, path, "roles", _roles, frozenset[str](), required=True)
        if digest:
            tokens.append(Token(name=name, sha256=digest, roles=roles))
    return tuple(tokens)


def _roles(value: Any) -> frozenset[str]:
    roles = _strings(value)
    unknown = sorted(set(roles) - ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; expected some of read, deploy, approve")
    return frozenset(roles)


def _token_digest(r: _Reader, table: dict[str, Any], path: str) -> str:
    """The hex sha256 of the token, given directly or as a file holding it (never the secret)."""
    has_hash, has_file = "token_sha256" in table, "token_file" in table
    if has_hash == has_file:
        r.problem(path, "set exactly one of token_sha256 or token_file")
        return ""
    if has_hash:
        given = r.get(table, path, "token_sha256", _string, None)
        if given is None:  # already reported
            return ""
        digest = given.strip().lower()
        source = f"{path}.token_sha256"
    else:
        file = r.get(table, path, "token_file", r.path_value, None)
        if file is None:  # already reported
            return ""
        source = f"{path}.token_file"
        try:
            digest = file.read_text().strip().lower()
        except OSError as exc:
            r.problem(source, f"cannot read {file}: {exc.strerror}")
            return ""
    if not _HEX64.fullmatch(digest):
        r.problem(source, "expected the 64 hex digit sha256 of the token, not the token itself")
        return ""
    return digest


def _ssh(r: _Reader, data: Any, path: str) -> SSHConfig:
    table = r.table(data, path, {"user", "key", "known_hosts", "connect_timeout",
                                 "command_timeout", "keepalive_interval"})
    return SSHConfig(
        user=r.get(table, path, "user", _nonempty, None),
        key=r.get(table, path, "key", r.path_value, None),
        known_hosts=r.get(table, path, "known_hosts", r.path_value, None),
        connect_timeout=r.get(table, path, "connect_timeout", _positive_duration, 10.0),
        command_timeout=r.get(table, path, "command_timeout", _positive_duration, 600.0),
        keepalive_interval=r.get(table, path, "keepalive_interval", _positive_duration, 15.0),
    )


def _hooks(r: _Reader, data: Any, path: str) -> tuple[Hooks, float]:
    table = r.table(data, path, {"build", "restart", "rollback", "timeout"})
    hooks = Hooks(
        build=r.get(table, path, "build", _nonempty, None),
        restart=r.get(table, path, "restart", _nonempty, None),
        rollback=r.get(table, path, "rollback", _nonempty, None),
    )
    return hooks, r.get(table, path, "timeout", _positive_duration, 600.0)


def _hosts(r: _Reader, data: Any, path: str, deploy_to: str) -> tuple[HostConfig, ...]:
    if not isinstance(data, list) or not data:
        r.problem(path, "expected at least one [[hosts]] entry")
        return ()
    hosts: list[HostConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        here = f"{path}[{index}]"
        table = r.table(item, here, {"address", "port", "deploy_to", "vars", "run_as",
                                     "allow_local_as_daemon"})
        host = HostConfig(
            address=r.get(table, here, "address", _nonempty, "", required=True),
            port=r.get(table, here, "port", _int_range(1, 65535), 22),
            deploy_to=r.get(table, here, "deploy_to", _absolute_dir, deploy_to),
            vars=r.get(table, here, "vars", _vars, {}),
            run_as=r.get(table, here, "run_as", _user, None),
            allow_local_as_daemon=r.get(table, here, "allow_local_as_daemon", _bool, False),
        )
        _check_identity(r, table, here, host)
        key = f"{host.name} {host.deploy_to}"
        if host.address and key in seen:
            r.problem(here, f"duplicate host {host.name} with deploy_to {host.deploy_to}")
        seen.add(key)
        if host.deploy_to == "":
            r.problem(here, "no deploy_to: set it on the app or on the host")
        hosts.append(host)
    return tuple(hosts)


def _check_identity(r: _Reader, table: dict[str, Any], path: str, host: HostConfig) -> None:
    """A `local` host runs repository code (hooks) on this machine: as `run_as`, or as deployd
    itself only when the config says so."""
    if not host.address:
        return
    if not host.is_local:
        for key in ("run_as", "allow_local_as_daemon"):
            if key in table:
                r.problem(f"{path}.{key}", 'only for address = "local" (an SSH host runs '
                                           "commands as ssh.user)")
        return
    if "run_as" in table and host.allow_local_as_daemon:
        r.problem(path, "set run_as or allow_local_as_daemon = true, not both")
    elif "run_as" not in table and not host.allow_local_as_daemon:
        r.problem(f"{path}.run_as", 'required for a "local" host: its hooks run code from the '
                                    "repository, which must not run as deployd's own user "
                                    "(which can read its state, config and keys); name an "
                                    "unprivileged user, or set allow_local_as_daemon = true "
                                    "to accept that risk")


_HTTP_KEYS = {"name", "type", "url", "method", "expect_status", "body_contains", "body_regex",
              "json_path", "json_equals", "headers", "tls_verify", "ca_file", "timeout",
              "interval", "failures", "successes"}
_PROM_KEYS = {"name", "type", "server", "query", "max", "min", "timeout", "interval",
              "failures", "successes"}


def _checks(r: _Reader, data: Any, path: str, hosts: tuple[HostConfig, ...]) -> tuple[Check, ...]:
    if not isinstance(data, list):
        r.problem(path, "expected an array of tables ([[checks]])")
        return ()
    checks: list[Check] = []
    names: set[str] = set()
    for index, item in enumerate(data):
        here = f"{path}[{index}]"
        kind = item.get("type", "http") if isinstance(item, dict) else "http"
        check: Check | None
        if kind == "http":
            check = _http_check(r, item, here, hosts)
        elif kind == "prometheus":
            check = _prometheus_check(r, item, here)
        else:
            r.problem(f"{here}.type", f'expected "http" or "prometheus", got {kind!r}')
            check = None
        if check is not None:
            if check.name in names:
                r.problem(f"{here}.name", f"duplicate check name {check.name!r}")
            names.add(check.name)
            checks.append(check)
    return tuple(checks)


def _http_check(r: _Reader, data: Any, path: str,
                hosts: tuple[HostConfig, ...]) -> HttpCheck | None:
    table = r.table(data, path, _HTTP_KEYS)
    url = r.get(table, path, "url", _nonempty, "", required=True)
    for host in hosts:
        try:
            render_template(url, host)
        except KeyError as exc:
            r.problem(f"{path}.url", f"host {host.name} has no var {exc.args[0]!r}")
            break
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            r.problem(f"{path}.url", f"not a valid url template: {exc}")
            break
    matchers = [key for key in ("body_contains", "body_regex", "json_path") if key in table]
    if len(matchers) > 1:
        r.problem(path, f"set at most one of body_contains, body_regex, json_path (got {matchers})")
    if ("json_equals" in table) != ("json_path" in table):
        r.problem(path, "json_path and json_equals go together")
    return HttpCheck(
        name=r.get(table, path, "name", _nonempty, "", required=True),
        url=url,
        method=r.get(table, path, "method", _choice(("GET", "HEAD", "POST")), "GET"),
        expect_status=r.get(table, path, "expect_status", _statuses, frozenset({200})),
        body_contains=r.get(table, path, "body_contains", _string, None),
        body_regex=r.get(table, path, "body_regex", _regex, None),
        json_path=r.get(table, path, "json_path", _nonempty, None),
        json_equals=table.get("json_equals"),
        headers=r.get(table, path, "headers", _headers, {}),
        tls_verify=r.get(table, path, "tls_verify", _bool, True),
        ca_file=r.get(table, path, "ca_file", r.path_value, None),
        timeout=r.get(table, path, "timeout", _positive_duration, 2.0),
        interval=r.get(table, path, "interval", _positive_duration, 5.0),
        failures=r.get(table, path, "failures", _int_range(1, 1000), 3),
        successes=r.get(table, path, "successes", _int_range(1, 1000), 1),
    )


def _prometheus_check(r: _Reader, data: Any, path: str) -> PrometheusCheck | None:
    table = r.table(data, path, _PROM_KEYS)
    if "max" not in table and "min" not in table:
        r.problem(path, "a prometheus check needs max, min or both")
    query = table.get("query")
    for name in sorted(set(_PLACEHOLDER.findall(query if isinstance(query, str) else ""))
                       - {"hosts"}):
        r.problem(f"{path}.query", f"unknown placeholder {{{name}}}: only {{hosts}} is "
                                   "replaced (a regex of the hosts' addresses)")
    return PrometheusCheck(
        name=r.get(table, path, "name", _nonempty, "", required=True),
        server=r.get(table, path, "server", _nonempty, "", required=True),
        query=r.get(table, path, "query", _nonempty, "", required=True),
        max=r.get(table, path, "max", _number, None),
        min=r.get(table, path, "min", _number, None),
        timeout=r.get(table, path, "timeout", _positive_duration, 5.0),
        interval=r.get(table, path, "interval", _positive_duration, 30.0),
        failures=r.get(table, path, "failures", _int_range(1, 1000), 1),
        successes=r.get(table, path, "successes", _int_range(1, 1000), 1),
    )


def render_template(template: str, host: HostConfig) -> str:
    """Fill `{address}`, `{port}`, `{name}` and the host's vars; KeyError for unknown names."""
    values = {"address": "127.0.0.1" if host.is_local else host.address,
              "port": str(host.port), "name": host.name, **host.vars}
    return template.format_map(_Strict(values))


class _Strict(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


def _rollback(r: _Reader, data: Any, path: str) -> RollbackConfig:
    table = r.table(data, path, {"auto", "grace", "bake", "unhealthy_hosts"})
    return RollbackConfig(
        auto=r.get(table, path, "auto", _bool, True),
        grace=r.get(table, path, "grace", _duration, 30.0),
        bake=r.get(table, path, "bake", _duration, 600.0),
        unhealthy_hosts=r.get(table, path, "unhealthy_hosts", _threshold, Threshold(count=1)),
    )


def _rollout(r: _Reader, data: Any, path: str, hosts: int) -> RolloutConfig:
    table = r.table(data, path, {"steps", "step_bake", "compare"})
    steps = (_rollout_steps(r, table["steps"], f"{path}.steps", hosts) if "steps" in table
             else (ALL_HOSTS,))
    return RolloutConfig(
        steps=steps,
        step_bake=r.get(table, path, "step_bake", _positive_duration, 120.0),
        compare=r.get(table, path, "compare", _bool, False),
    )


def _rollout_steps(r: _Reader, data: Any, path: str, hosts: int) -> tuple[StepSpec, ...]:
    """The steps, checked against the app's host count (skipped when the hosts are wrong)."""
    if not isinstance(data, list):
        r.problem(path, f'expected an array like ["1", "25%", "pause", "100%"], got {_kind(data)}')
        return (ALL_HOSTS,)
    steps: list[StepSpec] = []
    for index, item in enumerate(data):
        try:
            steps.append(parse_step(item))
        except ValueError as exc:
            r.problem(f"{path}[{index}]", str(exc))
    if len(steps) != len(data):
        return (ALL_HOSTS,)
    if hosts:
        for step, message in problems(steps, hosts):
            r.problem(path if step is None else f"{path}[{step}]", message)
    return tuple(steps)


def _rescue(r: _Reader, data: Any, path: str) -> RescueConfig:
    table = r.table(data, path, {"select", "backup_prefix", "expire", "distinct_approver"})
    default: tuple[Literal["trailer", "message", "none"], str] = ("trailer", "Rescue")
    kind, value = r.get(table, path, "select", _selector, default)
    return RescueConfig(
        select_kind=kind,
        select_value=value,
        backup_prefix=r.get(table, path, "backup_prefix", _ref_prefix, "deployd/backup"),
        expire=r.get(table, path, "expire", _positive_duration, 86400.0),
        distinct_approver=r.get(table, path, "distinct_approver", _bool, False),
    )


def _secret_file(r: _Reader, table: dict[str, Any], path: str, key: str) -> bytes | None:
    """The stripped content of a secret file; problems name the key, never the content."""
    file = r.get(table, path, key, r.path_value, None)
    if file is None:
        return None
    try:
        secret = file.read_bytes().strip()
    except OSError as exc:
        r.problem(f"{path}.{key}", f"cannot read {file}: {exc.strerror}")
        return None
    if len(secret) < 16:
        r.problem(f"{path}.{key}", f"{file} holds {len(secret)} bytes; a secret needs 16 or more")
        return None
    return secret


def _webhook(r: _Reader, data: Any, path: str) -> WebhookConfig | None:
    table = r.table(data, path, {"secret_file", "max_body"})
    if "secret_file" not in table:
        r.problem(f"{path}.secret_file", "missing (required): the shared secret of the webhook")
    secret = _secret_file(r, table, path, "secret_file")
    max_body = r.get(table, path, "max_body", _size, 1024 * 1024)
    return WebhookConfig(secret=secret, max_body=max_body) if secret else None


_APP_KEYS = {"repo", "repo_key", "repo_known_hosts", "branch", "mode", "poll_interval",
             "deploy_to", "keep_releases", "linked_dirs", "linked_files", "parallel",
             "lock_stale_after", "max_release_size", "max_release_files", "ssh", "hooks",
             "hosts", "checks", "rollback", "rollout", "rescue", "webhook"}


def _app(r: _Reader, name: str, data: Any) -> AppConfig:
    path = f"apps.{name}"
    if not _APP_NAME.fullmatch(name) or not _ref_safe(name):
        r.problem(path, "app names are letters, digits, '.', '_' and '-' (at most 64), "
                  "usable in a git branch name (no '..', not ending in '.' or '.lock')")
    table = r.table(data, path, _APP_KEYS)
    deploy_to = r.get(table, path, "deploy_to", _absolute_dir, "")
    hosts = _hosts(r, table.get("hosts"), f"{path}.hosts", deploy_to)
    repo = r.get(table, path, "repo", _nonempty, "", required=True)
    hooks, hook_timeout = _hooks(r, table.get("hooks", {}), f"{path}.hooks")
    app = AppConfig(
        name=name,
        repo=repo,
        repo_key=r.get(table, path, "repo_key", r.path_value, None),
        repo_known_hosts=r.get(table, path, "repo_known_hosts", r.path_value, None),
        branch=r.get(table, path, "branch", _nonempty, "production"),
        mode=r.get(table, path, "mode", _choice(("deploy", "observe")), "deploy"),  # type: ignore[arg-type]
        poll_interval=r.get(table, path, "poll_interval", _positive_duration, 15.0),
        deploy_to=deploy_to,
        keep_releases=r.get(table, path, "keep_releases", _int_range(1, 1000), 5),
        linked_dirs=r.get(table, path, "linked_dirs", _relative_paths, ()),
        linked_files=r.get(table, path, "linked_files", _relative_paths, ()),
        parallel=r.get(table, path, "parallel", _int_range(1, 1000), 50),
        lock_stale_after=r.get(table, path, "lock_stale_after", _positive_duration, 3600.0),
        max_release_size=r.get(table, path, "max_release_size", _size, 1 << 30),
        max_release_files=r.get(table, path, "max_release_files",
                                _int_range(1, 10_000_000), 200_000),
        ssh=_ssh(r, table.get("ssh", {}), f"{path}.ssh"),
        hooks=hooks,
        hook_timeout=hook_timeout,
        hosts=hosts,
        checks=_checks(r, table.get("checks", []), f"{path}.checks", hosts),
        rollback=_rollback(r, table.get("rollback", {}), f"{path}.rollback"),
        rollout=_rollout(r, table.get("rollout", {}), f"{path}.rollout", len(hosts)),
        rescue=_rescue(r, table.get("rescue", {}), f"{path}.rescue"),
        webhook=(_webhook(r, table["webhook"], f"{path}.webhook") if "webhook" in table
                 else None),
    )
    if app.mode == "observe" and "rollout" in table:
        r.problem(f"{path}.rollout", 'only for mode = "deploy": deployd does not deploy an '
                                     "observed app")
    if repo.startswith("ssh://") and app.repo_known_hosts is None:
        r.problem(f"{path}.repo_known_hosts",
                  "required for an ssh:// repo (host keys are verified)")
    if any(not host.is_local for host in hosts) and app.ssh.known_hosts is None:
        r.problem(f"{path}.ssh.known_hosts", "required for SSH hosts (host keys are verified)")
    return app


_NOTIFY_KEYS = {"name", "url", "url_file", "format", "secret_file", "events", "apps", "remind",
                "give_up_after", "timeout"}


def _notify_url(r: _Reader, table: dict[str, Any], path: str) -> str:
    """The target's URL, given inline or in a file (it often holds a token)."""
    if ("url" in table) == ("url_file" in table):
        r.problem(path, "set exactly one of url or url_file")
        return ""
    if "url" in table:
        url = r.get(table, path, "url", _nonempty, "")
        source = f"{path}.url"
    else:
        file = r.get(table, path, "url_file", r.path_value, None)
        if file is None:
            return ""
        source = f"{path}.url_file"
        try:
            url = file.read_text().strip()
        except OSError as exc:
            r.problem(source, f"cannot read {file}: {exc.strerror}")
            return ""
    if url and not _HTTP_URL.fullmatch(url):
        # The URL itself is a secret: say what is wrong without echoing it.
        r.problem(source, "expected an http:// or https:// URL")
        return ""
    return url


def _notify(r: _Reader, data: Any, app_names: set[str]) -> tuple[NotifyTarget, ...]:
    targets: list[NotifyTarget] = []
    names: set[str] = set()
    for index, item in enumerate(r.array(data, "notify")):
        path = f"notify[{index}]"
        table = r.table(item, path, _NOTIFY_KEYS)
        name = r.unique_name(table, path, names, "notify")
        url = _notify_url(r, table, path)
        apps = r.get(table, path, "apps", _strings, None)
        for unknown in sorted(set(apps or ()) - app_names):
            r.problem(f"{path}.apps", f"no app named {unknown!r}")
        target = NotifyTarget(
            name=name,
            url=url,
            format=r.get(table, path, "format", _choice(("json", "slack")), "json"),  # type: ignore[arg-type]
            secret=_secret_file(r, table, path, "secret_file"),
            events=r.get(table, path, "events", _strings, DEFAULT_NOTIFY_EVENTS),
            apps=apps,
            remind=r.get(table, path, "remind", _duration_or_never, 3600.0),
            give_up_after=r.get(table, path, "give_up_after", _positive_duration, 86400.0),
            timeout=r.get(table, path, "timeout", _positive_duration, 10.0),
        )
        if name and url:
            targets.append(target)
    return tuple(targets)


def parse(data: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document; raise ConfigError with every problem."""
    r = _Reader(path.parent.resolve())
    top = r.table(dict(data), "", {"daemon", "tokens", "apps", "notify"})
    daemon = _daemon(r, top.get("daemon", {}))
    tokens = _tokens(r, top.get("tokens", []))
    apps_table = top.get("apps", {})
    if not isinstance(apps_table, dict):
        r.problem("apps", "expected a table of apps ([apps.NAME])")
        apps_table = {}
    apps = {name: _app(r, name, body) for name, body in apps_table.items()}
    notify = _notify(r, top.get("notify", []), set(apps))
    if r.problems:
        raise ConfigError(str(path), r.problems)
    return Config(path=path, daemon=daemon, tokens=tokens, apps=apps, notify=notify)


def file_problems(config: Config) -> list[str]:
    """What is wrong with the SSH key, known_hosts and database password files the config
    names, each with its key path: missing, not a file, unreadable, or (for a private key or
    the password) open to group or others.

    Not part of `load` (which reads only the config and its token files), so a config can be
    parsed on a machine without them; `deployd check-config` and `deployd run` call it after.
    """
    problems: list[str] = []
    password_file = config.daemon.database_password_file
    if password_file is not None:
        problem = _file_problem(password_file, private=True, what="password file")
        if problem is not None:
            problems.append(f"daemon.database_password_file: {problem}")
    for name, app in config.apps.items():
        files = [(f"apps.{name}.repo_key", app.repo_key, True),
                 (f"apps.{name}.repo_known_hosts", app.repo_known_hosts, False),
                 (f"apps.{name}.ssh.key", app.ssh.key, True),
                 (f"apps.{name}.ssh.known_hosts", app.ssh.known_hosts, False)]
        for key_path, file, private in files:
            problem = _file_problem(file, private=private) if file is not None else None
            if problem is not None:
                problems.append(f"{key_path}: {problem}")
    return problems


def _file_problem(path: Path, *, private: bool, what: str = "private key") -> str | None:
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            return f"{path} is not a file"
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if private and mode & 0o077:
        return (f"{what} {path} is open to group or others (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 it")
    return None


def check_files(config: Config) -> None:
    """Raise ConfigError listing every `file_problems` of the config."""
    problems = file_problems(config)
    if problems:
        raise ConfigError(str(config.path), problems)


def load(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError naming the file and every problem."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse(data, path)
