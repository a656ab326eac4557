"""How a mirror reaches its remote: the URL, credentials, host key check and libgit2 settings.

Part of `deployd.git` (see its docstring for the API); only the git modules import pygit2.
`Remote` gives each network call its `pygit2.RemoteCallbacks`: the server's host key must be
in the app's own known_hosts (`errors.HostKeyError` otherwise), SSH authenticates with the
configured key, HTTPS with the URL's user and password, never more than a few attempts, and a
push is refused as a whole when a remote ref is not where its lease expects it. No password
is ever stored in the mirror's config or shown: `Remote.display` and `Remote.redact` hide it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import threading
from base64 import b64decode
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pygit2
from pygit2.enums import CredentialType

from deployd import errors

ZERO_SHA = "0" * 40
_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?!//)")
_MAX_AUTH_ATTEMPTS = 3


class Lease(enum.Enum):
    """`RefUpdate.expected` value meaning: push whatever the remote ref holds now."""

    ANY = "any"


# --------------------------------------------------------------------------- the remote


class Remote:
    """One mirror's remote, and the callbacks and libgit2 settings of each call to it.

    `home` is required for SSH remotes; `key` and `known_hosts` are re-read on every call.
    """

    def __init__(
        self,
        url: str,
        *,
        app: str,
        home: GitHome | None,
        key: Path | None,
        known_hosts: Path | None,
        timeout: float,
    ) -> None:
        self._url = _parse_url(url)
        self.display = self._url.display  # any password replaced by `***`
        self.stored = self._url.stored  # what the mirror's config holds: no password
        self._app = app
        self._home = home
        self._key = key
        self._known_hosts = known_hosts
        self._timeout = timeout

    def redact(self, text: str) -> str:
        """`text` with the URL and its password replaced by their secret-free forms."""
        return self._url.redact(text)

    @contextmanager
    def connect(self, leases: dict[str, str | Lease | None] | None = None) -> Iterator[_Callbacks]:
        """Callbacks for one network call, with libgit2's global settings held for it."""
        known_hosts = self._read_known_hosts()
        callbacks = _Callbacks(
            app=self._app,
            remote=self._url,
            key=self._key,
            known_hosts=known_hosts,
            leases=leases,
        )
        if self._home is None:
            _set_timeouts(self._timeout)
            yield callbacks
            return
        with self._home.session(known_hosts, self._timeout) as lease:
            callbacks.home_lease = lease
            yield callbacks

    def _read_known_hosts(self) -> str | None:
        """The known_hosts text an SSH remote is checked against (None when not SSH)."""
        if not self._url.ssh:
            return None
        if self._known_hosts is None:
            raise errors.GitError(
                f"{self._app}: SSH remote {self.display} has no known_hosts configured: "
                "refusing to connect without checking the server's host key"
            )
        if self._home is None:
            raise errors.GitError(f"{self._app}: SSH remote {self.display} needs a GitHome")
        if self._key is None:
            raise errors.GitError(f"{self._app}: SSH remote {self.display} has no key configured")
        try:
            return self._known_hosts.read_text()
        except OSError as exc:
            raise errors.GitError(
                f"{self._app}: cannot read known_hosts {self._known_hosts}: {exc.strerror}"
            ) from None


# --------------------------------------------------------------------------- libgit2 home


class GitHome:
    """libgit2's home directory (where it reads `.ssh/known_hosts`), shared by one daemon.

    Create one at start-up (e.g. under `state_dir`) and pass it to every `Mirror`.

    libgit2 checks an SSH server's host key against `<homedir>/.ssh/known_hosts`, and
    `pygit2.settings.homedir` (like the network timeouts) is process-wide. Each app must be
    checked against its own known_hosts only: a union of every app's files would let a stale
    key in one app's file vouch for another app's server. So an SSH call holds this object's
    lock while it points homedir at a directory holding exactly that mirror's known_hosts, and
    releases it as soon as libgit2 has checked the host key (the certificate_check callback,
    which runs in the calling thread right after libgit2 read the file). Only SSH handshakes
    are serialised across mirrors, never transfers.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def _home_for(self, known_hosts: str) -> Path:
        """A directory whose `.ssh/known_hosts` is exactly `known_hosts` (content-addressed)."""
        digest = hashlib.sha256(known_hosts.encode()).hexdigest()[:24]
        home = self.root / digest
        target = home / ".ssh" / "known_hosts"
        if not target.exists():
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            scratch = target.with_name(f".known_hosts.{os.getpid()}.{threading.get_ident()}")
            scratch.write_text(known_hosts)
            scratch.replace(target)
        return home

    @contextmanager
    def session(self, known_hosts: str | None, timeout: float) -> Iterator[_HomeLease]:
        """Hold libgit2's process-wide settings for one connection (see the class docstring).

        With `known_hosts` None (not SSH) only the timeouts are set, and released at once.
        """
        lease = _HomeLease(self._lock)
        try:
            _set_timeouts(timeout)
            if known_hosts is None:
                lease.release()
            else:
                pygit2.settings.homedir = str(self._home_for(known_hosts))
            yield lease
        finally:
            lease.release()


class _HomeLease:
    """The held `GitHome` lock; `release()` may be called any number of times."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        lock.acquire()
        self._held = True

    def release(self) -> None:
        """Let the next connection use the settings (idempotent)."""
        if self._held:
            self._held = False
            self._lock.release()


def _set_timeouts(timeout: float) -> None:
    """libgit2's connect and per-read timeouts (process-wide, in ms; 0 means none)."""
    millis = max(1, int(timeout * 1000))
    pygit2.settings.server_connect_timeout = millis
    pygit2.settings.server_timeout = millis


# --------------------------------------------------------------------------- callbacks


class _Callbacks(pygit2.RemoteCallbacks):
    """Host key check, credentials, lease check and per-ref results for one network call."""

    def __init__(
        self,
        *,
        app: str,
        remote: _RemoteUrl,
        key: Path | None,
        known_hosts: str | None,
        leases: dict[str, str | Lease | None] | None = None,
    ) -> None:
        super().__init__()
        self._app = app
        self._url = remote
        self._key = key
        self._known_hosts = known_hosts
        self._leases = leases or {}
        self.home_lease: _HomeLease | None = None
        self.rejected: list[tuple[str, str]] = []
        self.remote_output: list[str] = []
        self._auth_attempts = 0

    def certificate_check(self, certificate: None, valid: bool, host: bytes) -> bool:
        """Accept the server only if libgit2 found its key valid (known_hosts / TLS CA)."""
        if self.home_lease is not None:
            self.home_lease.release()
        if valid:
            return True
        if not self._url.ssh:
            raise errors.GitError(
                f"{self._app}: TLS certificate of {host.decode(errors='replace')} is not valid "
                f"(remote {self._url.display})"
            )
        name = self._url.known_hosts_name
        if self._known_hosts is not None and _host_is_listed(self._known_hosts, self._url):
            state = "changed: it does not match the key known_hosts holds for it"
        else:
            state = "unknown: known_hosts has no key for it"
        raise errors.HostKeyError(
            f"{self._app}: SSH host key of {name} is {state} (remote {self._url.display})"
        )

    def credentials(
        self, url: str, username_from_url: str | None, allowed_types: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        """The configured key for SSH, or the URL's user and password for HTTPS."""
        self._auth_attempts += 1
        user = username_from_url or self._url.user or "git"
        if self._auth_attempts > _MAX_AUTH_ATTEMPTS:
            raise errors.GitError(
                f"{self._app}: authentication as {user!r} refused by {self._url.display}"
            )
        if allowed_types & CredentialType.USERNAME:
            return pygit2.Username(user)
        if allowed_types & CredentialType.SSH_KEY and self._key is not None:
            public = self._key.with_name(self._key.name + ".pub")
            return pygit2.Keypair(user, public if public.exists() else None, self._key, "")
        if allowed_types & CredentialType.USERPASS_PLAINTEXT and self._url.password is not None:
            return pygit2.UserPass(user, self._url.password)
        raise errors.GitError(
            f"{self._app}: {self._url.display} asks for credentials deployd does not have"
        )

    def sideband_progress(self, string: str) -> None:
        """Keep what the remote printed (hook output) for a rejection message."""
        self.remote_output.extend(
            line.strip() for line in re.split(r"[\r\n]+", string) if line.strip()
        )

    def push_negotiation(self, updates: list[pygit2.remotes.PushUpdate]) -> None:
        """Refuse the whole push when a remote ref is not where its lease expects it."""
        for update in updates:
            expected = self._leases.get(update.dst_refname, Lease.ANY)
            found = None if str(update.src) == ZERO_SHA else str(update.src)
            if expected is Lease.ANY or found == expected or found == str(update.dst):
                continue
            raise errors.PushRejected(
                update.dst_refname,
                f"remote moved: expected {expected or 'no ref'}, found {found or 'no ref'}",
            )

    def push_update_reference(self, refname: str, message: str | None) -> None:
        """Record a ref the server refused (a refused push does not raise in pygit2)."""
        if message is not None:
            self.rejected.append((refname, message))

    def raise_rejections(self) -> None:
        """Raise `PushRejected` for the first refused ref, naming the others."""
        if not self.rejected:
            return
        ref, reason = self.rejected[0]
        others = [name for name, _ in self.rejected[1:]]
        if self.remote_output:
            reason += " (remote said: " + " / ".join(self.remote_output[-5:]) + ")"
        if others:
            reason += "; also refused: " + ", ".join(others)
        raise errors.PushRejected(ref, reason)


# --------------------------------------------------------------------------- remote URLs


@dataclass(frozen=True)
class _RemoteUrl:
    """The facts deployd needs about a remote URL, and its printable (secret-free) form."""

    raw: str
    display: str
    ssh: bool
    stored: str = ""  # what the mirror's config holds: no password (the callback gives it)
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int = 22

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH (and libssh2) name this host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def redact(self, text: str) -> str:
        """`text` with the raw URL and the password replaced by their secret-free forms."""
        text = text.replace(self.raw, self.display)
        return text.replace(self.password, "***") if self.password else text


def _parse_url(url: str) -> _RemoteUrl:
    """Classify a remote URL (ssh or not) and strip its password for display."""
    if "://" not in url:
        match = _SCP_LIKE.match(url)
        if match is None or url.startswith(("/", ".")):
            return _RemoteUrl(raw=url, display=url, ssh=False, stored=url)
        host = match["host"].strip("[]")
        return _RemoteUrl(raw=url, display=url, ssh=True, stored=url, user=match["user"],
                          host=host)
    parts = urlsplit(url)
    display = stored = url
    if parts.password is not None:
        userinfo = f"{parts.username or ''}:***@"
        host = parts.netloc.rpartition("@")[2]
        display = parts._replace(netloc=userinfo + host).geturl()
        stored = parts._replace(netloc=host).geturl()
    ssh = parts.scheme in ("ssh", "ssh+git", "git+ssh")
    try:
        port = parts.port or 22
    except ValueError:
        port = 22
    return _RemoteUrl(
        raw=url,
        display=display,
        ssh=ssh,
        stored=stored,
        # Percent-decoded, as libgit2 did when the credentials stayed in the URL.
        user=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        host=parts.hostname or "",
        port=port,
    )


def _known_hosts_names(text: str) -> Iterator[str]:
    """Every host pattern in a known_hosts text (hashed `|1|salt|hash` entries as-is)."""
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):  # @cert-authority / @revoked markers
            fields = fields[1:]
        if len(fields) >= 3:
            yield from fields[0].split(",")


def _host_matches(pattern: str, name: str) -> bool:
    """Whether one known_hosts host pattern (plain or hashed) names `name`."""
    if pattern.startswith("|1|"):
        try:
            salt, digest = (b64decode(part) for part in pattern[3:].split("|", 1))
        except ValueError:
            return False
        mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, digest)
    return pattern == name


def _host_is_listed(known_hosts: str, remote: _RemoteUrl) -> bool:
    """Whether known_hosts holds any key for the remote's host (so a refusal means "changed").

    libssh2 also accepts a plain `host` entry for a non-22 port when no `[host]:port` entry
    exists, so both spellings count.
    """
    names = {remote.known_hosts_name, remote.host}
    patterns = list(_known_hosts_names(known_hosts))
    return any(_host_matches(pattern, name) for pattern in patterns for name in names)
