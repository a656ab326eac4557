"""A bare git mirror per app, driven by pygit2 (the only module of deployd that imports it).

deployd never runs the `git` program. Every pygit2 call blocks, so every public method of
`Mirror` is a coroutine that runs its work in a worker thread (`asyncio.to_thread`), one at a
time per mirror. Every pygit2/libgit2 failure comes out as `errors.GitError` (or a subclass)
naming the app and the remote, with any password in the URL replaced by `***`.

API::

    GitHome(root: Path)                      # created once per daemon, passed to every Mirror
    Mirror(path: Path, url: str, *, name: str, home: GitHome | None = None,
           key: Path | None = None, known_hosts: Path | None = None,
           timeout: float = 30.0, archive_cache: int = DEFAULT_ARCHIVE_CACHE)
        path, url (redacted), name
        await fetch() -> None                           # creates the mirror on first use
        await branch_head(branch: str) -> str | None
        await resolve(revision: str) -> str             # errors.NotFound if unknown
        await resolve_strict(revision: str) -> str      # sha first; errors.Invalid if ambiguous
        await commit_info(revision: str) -> CommitInfo
        await is_ancestor(ancestor: str, descendant: str) -> bool   # True when equal too
        await commits_between(base: str, head: str) -> list[CommitInfo]  # oldest first, no merges
        await archive(revision: str, limits: Limits | None = None) -> archive.Archive
                                                        # the release tar, checked and cached
        await push(updates: list[RefUpdate]) -> None    # errors.PushRejected per lease/server
        await create_ref(name: str, revision: str) -> None  # errors.Conflict if it points elsewhere
        await list_refs(prefix: str = "refs/") -> dict[str, str]
        await cherry_pick(onto: str, commits: list[str], *, committer_name: str,
                          committer_email: str,
                          trailers: list[tuple[str, str]] = []) -> CherryPickResult
        await diff(old: str, new: str) -> str           # unified diff (binary-safe) of two trees
        await apply_patch(base: str, patch: str | bytes) -> str   # tree sha; errors.Invalid
        await commit_tree(tree, parent, *, like: list[str], committer_name, committer_email,
                          trailers=None, author=None) -> str  # a resolved patch as a cherry-pick
        await changes(old: str | None, new: str) -> dict[str, Counter[str]]  # what a diff adds
        await conflicts_alone(onto: str, commits: list[str]) -> dict[str, tuple[str, ...]]
    RefUpdate(source: str, remote_ref: str, expected: str | Lease | None = Lease.ANY)
    CommitInfo(sha, summary, author_name, author_email, time, parents, message, tree)
    CherryPickResult(head, tree, picked, skipped, conflict, conflict_paths); .clean

The mirror fetches `refs/heads/*` and `refs/tags/*` with force and prune, so force-pushed and
deleted branches show up exactly as on the remote. Refs deployd keeps for itself (backups)
belong under `refs/deployd/`: a fetch never prunes them. A ref under `refs/heads/` that exists
only locally is pruned by the next fetch unless it was pushed.

Remotes: local paths, `file://`, `https://` and SSH (`ssh://user@host:port/path` or
`user@host:path`). SSH remotes need `key` (the private key; `<key>.pub` is used when present)
and `known_hosts`: the server's host key must be listed there (for a port other than 22 as
`[host]:port keytype key`), or the connection is refused with `errors.HostKeyError`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import os
import re
import shutil
import stat
import tempfile
import threading
import zlib
from base64 import b64decode, b85decode
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pygit2
from pygit2.enums import (
    ApplyLocation,
    CredentialType,
    DeltaStatus,
    DiffOption,
    FetchPrune,
    FileMode,
    ObjectType,
    RepositoryOpenFlag,
    SortMode,
)

from deployd import errors
from deployd.archive import Archive, ArchiveCache, Limits, TreeWalk, write_tar

T = TypeVar("T")

REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
"""What a mirror fetches: every branch and tag, forced (history rewrites are picked up)."""

ZERO_SHA = "0" * 40
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-fA-F]{4,39}")
_TRAILER_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_TRAILER_LINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*: |\(cherry picked from commit [0-9a-f]+\)$")
_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?!//)")
_OPEN_FLAGS = RepositoryOpenFlag.NO_SEARCH | RepositoryOpenFlag.BARE
_PATCH_FILE = re.compile(rb"diff --git a/(.*) b/(.*?)\r?")
_BINARY_SIZE = re.compile(rb"(literal|delta) ([0-9]+)\r?")
MAX_BINARY_BYTES = 8 * 1024 * 1024
"""The largest size a binary patch may declare for one file, and for all of them together:
libgit2 allocates what a patch declares before it checks the data."""
_MAX_AUTH_ATTEMPTS = 3
_RANGES_KEPT = 2  # commits_between results kept (a range of 10,000 commits: ~10 MB)
DEFAULT_ARCHIVE_CACHE = 256 << 20
"""Bytes of release archives a mirror keeps (on disk, in unlinked files) for reuse."""
_GitObject = pygit2.Object | pygit2.Commit | pygit2.Tree | pygit2.Tag | pygit2.Blob


# --------------------------------------------------------------------------- patches


def check_patch_sizes(patch: bytes) -> None:
    """`errors.Invalid` naming the file when the patch's binary hunks declare (`literal N`,
    `delta N`) more than MAX_BINARY_BYTES for one file or all together, or hold data that
    inflates past what they declare. Pure text work, so it runs before libgit2 sees the
    patch (libgit2 inflates a hunk whole before it compares it with the declared size)."""
    path = "?"
    total = 0
    lines = patch.splitlines()
    for index, line in enumerate(lines):
        if (header := _PATCH_FILE.fullmatch(line)) is not None:
            path = header[2].decode("utf-8", "replace")
            continue
        found = _BINARY_SIZE.fullmatch(line)
        if found is None:
            continue
        digits = found[2].lstrip(b"0") or b"0"
        # Thousands of digits would make int() itself the cost: anything that long is too big.
        declared = int(digits) if len(digits) <= 12 else MAX_BINARY_BYTES + 1
        total += declared
        if declared > MAX_BINARY_BYTES:
            raise errors.Invalid(f"patch: binary change of {path} declares {found[2][:20].decode()}"
                                 f" bytes; at most {MAX_BINARY_BYTES} are accepted")
        if total > MAX_BINARY_BYTES:
            raise errors.Invalid(f"patch: binary changes declare more than {MAX_BINARY_BYTES} "
                                 f"bytes in all (at {path})")
        if _inflated_size(lines, index + 1, declared) > declared:
            raise errors.Invalid(f"patch: binary change of {path} holds more data than the "
                                 f"{declared} bytes it declares")


def _inflated_size(lines: list[bytes], start: int, declared: int) -> int:
    """How many bytes the binary hunk starting at lines[start] inflates to, counting no
    further than declared + 1. Each line is a length letter and base85 data (git's format);
    the hunk ends at an empty line."""
    data = bytearray()
    for line in lines[start:]:
        line = line.rstrip(b"\r")
        if not line:
            break
        count = _LINE_LENGTHS.get(line[0])
        try:
            if count is None:
                raise ValueError(f"bad length letter {line[:1]!r}")
            data += b85decode(line[1:])[:count]
        except ValueError as exc:
            raise errors.Invalid(f"patch: a binary hunk is not valid base85: {exc}") from None
    inflater = zlib.decompressobj()
    try:
        return len(inflater.decompress(bytes(data), declared + 1))
    except zlib.error as exc:
        raise errors.Invalid(f"patch: a binary hunk is not valid zlib data: {exc}") from None


# git's binary hunk lines start with their decoded length: A-Z for 1-26, a-z for 27-52.
_LINE_LENGTHS = {**{ord("A") + n: n + 1 for n in range(26)},
                 **{ord("a") + n: n + 27 for n in range(26)}}


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class CommitInfo:
    """One commit as deployd shows it (author identity and author time, epoch seconds)."""

    sha: str
    summary: str
    author_name: str
    author_email: str
    time: int
    parents: tuple[str, ...]
    message: str
    tree: str


class Lease(enum.Enum):
    """`RefUpdate.expected` value meaning: push whatever the remote ref holds now."""

    ANY = "any"


@dataclass(frozen=True)
class RefUpdate:
    """Set `remote_ref` on the remote to `source` (a full sha or a local ref name).

    `expected` is the lease: the sha the remote ref must hold right now, `None` for "must not
    exist", or `Lease.ANY` to overwrite whatever is there. The push is forced (history may be
    rewritten); the lease is what keeps it from clobbering someone else's push.
    """

    source: str
    remote_ref: str
    expected: str | Lease | None = Lease.ANY

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("RefUpdate.source must name a sha or a local ref")
        if not pygit2.reference_is_valid_name(self.remote_ref):
            raise ValueError(f"RefUpdate.remote_ref is not a full ref name: {self.remote_ref!r}")
        if isinstance(self.expected, str) and not _FULL_SHA.fullmatch(self.expected):
            raise ValueError(f"RefUpdate.expected must be a full sha: {self.expected!r}")


@dataclass(frozen=True)
class CherryPickResult:
    """What an in-memory cherry-pick produced.

    `head` is the last commit created (`onto` itself if none was), `picked` pairs each
    original sha with its new commit, `skipped` lists commits whose change was already in the
    base (no empty commits are made). When a commit does not apply, `conflict` names it and
    `conflict_paths` the files in conflict; no commit is made for it or any later one.
    """

    head: str
    tree: str
    picked: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    conflict: str | None = None
    conflict_paths: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when every commit applied."""
        return self.conflict is None


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


# --------------------------------------------------------------------------- pure helpers


def _info(commit: pygit2.Commit) -> CommitInfo:
    author = commit.author
    return CommitInfo(
        sha=str(commit.id),
        summary=commit.message.split("\n", 1)[0].strip(),
        author_name=author.name,
        author_email=author.email,
        time=int(author.time),
        parents=tuple(str(parent) for parent in commit.parent_ids),
        message=commit.message,
        tree=str(commit.tree_id),
    )


def _reference_target(repo: pygit2.Repository, name: str) -> _GitObject | None:
    if not pygit2.reference_is_valid_name(name):
        return None
    ref = repo.references.get(name)
    return None if ref is None else ref.peel()


def _lookup(repo: pygit2.Repository, revision: str) -> _GitObject | None:
    """A full sha, a unique short sha or a ref name (full, branch or tag), or None.

    A short sha wins over a branch or tag named like it.
    """
    if _FULL_SHA.fullmatch(revision):
        return repo.get(revision)
    if _SHORT_SHA.fullmatch(revision):
        try:
            by_sha = repo.get(revision.lower())
        except pygit2.AmbiguousError as exc:
            raise errors.NotFound(f"revision {revision!r} is ambiguous") from exc
        if by_sha is not None:
            return by_sha
    for name in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
        if name.startswith("refs/") and (found := _reference_target(repo, name)) is not None:
            return found
    return None


_Peeled = TypeVar("_Peeled", pygit2.Commit, pygit2.Tree)


def _peel(repo: pygit2.Repository, revision: str, kind: type[_Peeled], what: str) -> _Peeled:
    """The object of `kind` a revision names (peeling tags and commits); NotFound otherwise."""
    found = _lookup(repo, revision)
    if found is None:
        raise errors.NotFound(f"unknown revision {revision!r}")
    try:
        peeled = found.peel(kind)
    except (pygit2.GitError, ValueError) as exc:
        raise errors.NotFound(f"revision {revision!r} {what}") from exc
    assert isinstance(peeled, kind)
    return peeled


def _peel_commit(found: _GitObject) -> pygit2.Commit | None:
    """The commit an object is or (as a tag) points at, else None."""
    try:
        peeled = found.peel(pygit2.Commit)
    except (pygit2.GitError, ValueError):
        return None
    return peeled if isinstance(peeled, pygit2.Commit) else None


def _commit(repo: pygit2.Repository, revision: str) -> pygit2.Commit:
    """The commit a revision names; `errors.NotFound` otherwise."""
    return _peel(repo, revision, pygit2.Commit, "is not a commit")


def _tree(repo: pygit2.Repository, revision: str) -> pygit2.Tree:
    """The tree a revision (commit, tag or tree sha) names; `errors.NotFound` otherwise."""
    return _peel(repo, revision, pygit2.Tree, "has no tree")


def _empty_tree(repo: pygit2.Repository) -> pygit2.Tree:
    tree = repo[repo.TreeBuilder().write()]
    assert isinstance(tree, pygit2.Tree)
    return tree


# archive -----------------------------------------------------------------------------


def _raw_tree(repo: pygit2.Repository, oid: bytes) -> bytes:
    """The raw bytes of a tree object (libgit2's parser would hide duplicates and modes)."""
    try:
        kind, data = repo.odb.read(pygit2.Oid(raw=oid))
    except KeyError:
        raise ValueError(f"object {pygit2.Oid(raw=oid)} is missing") from None
    if kind != ObjectType.TREE:
        raise ValueError(f"{pygit2.Oid(raw=oid)} is not a tree")
    return bytes(data)


def _blob_size(repo: pygit2.Repository, oid: bytes) -> int:
    """A blob's size from its header, without reading (and inflating) the blob."""
    try:
        kind, size = repo.odb.read_header(pygit2.Oid(raw=oid))
    except KeyError:
        raise ValueError(f"object {pygit2.Oid(raw=oid)} is missing") from None
    if kind != ObjectType.BLOB:
        raise ValueError(f"{pygit2.Oid(raw=oid)} is not a blob")
    return int(size)


def _blob_view(repo: pygit2.Repository, oid: bytes) -> memoryview:
    """A blob's content without copying it into a Python bytes object."""
    blob = repo[pygit2.Oid(raw=oid)]
    assert isinstance(blob, pygit2.Blob)
    return memoryview(blob)


# cherry-pick -------------------------------------------------------------------------


def _check_trailers(trailers: list[tuple[str, str]]) -> list[str]:
    lines = []
    for key, value in trailers:
        if not _TRAILER_KEY.fullmatch(key):
            raise errors.Invalid(f"not a trailer name: {key!r}")
        lines.append(f"{key}: {' '.join(value.split())}")
    return lines


def _picked_message(message: str, sha: str, trailer_lines: list[str]) -> str:
    """The original message plus `(cherry picked from commit <sha>)` and the trailers.

    Like `git cherry-pick -x`, the lines join the message's trailer block when it ends in one,
    and start a new paragraph otherwise.
    """
    body = message.rstrip()
    paragraphs = body.split("\n\n")
    last = paragraphs[-1].splitlines()
    in_block = len(paragraphs) > 1 and all(_TRAILER_LINE.match(line) for line in last)
    added = "\n".join([f"(cherry picked from commit {sha})", *trailer_lines])
    return f"{body}{chr(10) if in_block else chr(10) * 2}{added}\n"


def _write_merged(repo: pygit2.Repository, index: pygit2.Index, ours: pygit2.Tree) -> pygit2.Oid:
    """The tree of a clean merge index, written as `index.write_tree(repo)` would write it.

    write_tree rebuilds every directory, and libgit2 checks each of the (thousands of)
    entries it inserts against the object database: ~30 ms for 5,000 files. The merge
    differs from `ours` in a few paths only, so only their directories are rebuilt here,
    starting from `ours`' trees, and only the entries that change are inserted.
    """
    changes: _TreeChanges = {}
    for delta in index.diff_to_tree(ours).deltas:
        if delta.status == DeltaStatus.DELETED:
            path, change = delta.old_file.path, None
        else:
            path, change = delta.new_file.path, (delta.new_file.id, int(delta.new_file.mode))
        *directories, name = path.split("/")
        node = changes
        for directory in directories:
            node = node.setdefault("/" + directory, {})
        if change is not None or name not in node:  # a type change is a deletion + an addition
            node[name] = change
    return _rebuild(repo, ours, changes) or repo.TreeBuilder().write()


_TreeChanges = dict[str, Any]
"""name -> (oid, mode) or None (deleted); "/name" -> the changes inside directory `name`."""


def _rebuild(repo: pygit2.Repository, tree: pygit2.Tree | None,
             changes: _TreeChanges) -> pygit2.Oid | None:
    """`tree` (None: a new directory) with `changes` applied; None when nothing is left."""
    builder = repo.TreeBuilder(tree) if tree is not None else repo.TreeBuilder()
    for name, change in changes.items():
        if change is None and builder.get(name) is not None:
            builder.remove(name)
    for key, inner in changes.items():
        if key.startswith("/"):
            name = key[1:]
            entry = builder.get(name)
            subtree = repo[entry.id] if entry is not None and entry.type == ObjectType.TREE \
                else None
            assert subtree is None or isinstance(subtree, pygit2.Tree)
            oid = _rebuild(repo, subtree, inner)
            if oid is not None:
                builder.insert(name, oid, FileMode.TREE)
            elif entry is not None:
                builder.remove(name)
    for name, change in changes.items():
        if not name.startswith("/") and change is not None:
            builder.insert(name, *change)
    return builder.write() if len(builder) else None


def _conflict_paths(index: pygit2.Index) -> tuple[str, ...]:
    paths = set()
    for ancestor, ours, theirs in index.conflicts or ():
        entry = ours or theirs or ancestor
        if entry is not None:
            paths.add(entry.path)
    return tuple(sorted(paths))


# --------------------------------------------------------------------------- the mirror


@dataclass
class _Picking:
    """Progress of one cherry-pick run."""

    head: pygit2.Commit
    picked: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def result(self, conflict: str | None = None, paths: tuple[str, ...] = ()) -> CherryPickResult:
        return CherryPickResult(
            head=str(self.head.id),
            tree=str(self.head.tree_id),
            picked=tuple(self.picked),
            skipped=tuple(self.skipped),
            conflict=conflict,
            conflict_paths=paths,
        )


class Mirror:
    """One app's bare mirror of its remote repository (see the module docstring for the API).

    Calls on one mirror run one at a time; different mirrors run in parallel. `home` is
    required for SSH remotes; `key` and `known_hosts` are re-read on every network call.
    """

    def __init__(
        self,
        path: Path,
        url: str,
        *,
        name: str,
        home: GitHome | None = None,
        key: Path | None = None,
        known_hosts: Path | None = None,
        timeout: float = 30.0,
        archive_cache: int = DEFAULT_ARCHIVE_CACHE,
    ) -> None:
        self.path = path
        self.name = name
        self._remote = _parse_url(url)
        self._home = home
        self._key = key
        self._known_hosts = known_hosts
        self._timeout = timeout
        self._archives = ArchiveCache(archive_cache)
        self.archives_built = 0  # how many archives this mirror made (cache misses)
        self._repo: pygit2.Repository | None = None
        self._ranges: dict[tuple[str, str], tuple[CommitInfo, ...]] = {}  # most recent last
        self._lock = asyncio.Lock()
        # Held by the worker thread itself: a cancelled caller releases the asyncio lock while
        # its thread still runs, and the next call must still wait for that thread.
        self._thread_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The remote URL with any password replaced by `***`."""
        return self._remote.display

    def __repr__(self) -> str:
        return f"Mirror({self.name!r}, {self.url!r}, path={str(self.path)!r})"

    # ----------------------------------------------------------------- plumbing

    async def _run(self, action: str, work: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(self._guarded, action, work, *args)

    def _guarded(self, action: str, work: Callable[..., T], *args: Any) -> T:
        with self._thread_lock:
            try:
                return work(*args)
            except errors.DeploydError:
                raise
            except (pygit2.GitError, OSError, KeyError, ValueError) as exc:
                error = self._error(action, exc)
                # Chain the original only when it holds no secret (tracebacks get logged).
                raise error from (None if self._remote.redact(str(exc)) != str(exc) else exc)

    def _error(self, action: str, exc: BaseException) -> errors.GitError:
        detail = self._remote.redact(str(exc) or type(exc).__name__)
        return errors.GitError(f"{self.name}: {action} ({self.url}) failed: {detail}")

    def _open(self) -> pygit2.Repository:
        """The mirror's repository; `errors.GitError` if it was never fetched."""
        if self._repo is None:
            if not (self.path / "objects").is_dir():
                raise errors.GitError(f"{self.name}: mirror {self.path} not fetched yet")
            self._repo = pygit2.Repository(str(self.path), _OPEN_FLAGS)
        return self._repo

    def _open_or_create(self) -> pygit2.Repository:
        if self._repo is None and not (self.path / "objects").is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repo = pygit2.init_repository(str(self.path), bare=True)
        repo = self._open()
        self._configure_origin(repo)
        return repo

    def _configure_origin(self, repo: pygit2.Repository) -> None:
        """Remote `origin` with the configured URL and the mirror refspecs."""
        names = list(repo.remotes.names())
        if "origin" not in names:
            repo.remotes.create("origin", self._remote.stored, REFSPECS[0])
        remote = repo.remotes["origin"]
        if remote.url != self._remote.stored:
            repo.remotes.set_url("origin", self._remote.stored)
        if list(remote.fetch_refspecs) != list(REFSPECS):
            if remote.fetch_refspecs:
                repo.config.delete_multivar("remote.origin.fetch", ".*")
            for refspec in REFSPECS:
                repo.remotes.add_fetch("origin", refspec)

    def _read_known_hosts(self) -> str | None:
        """The known_hosts text an SSH remote is checked against (None when not SSH)."""
        if not self._remote.ssh:
            return None
        if self._known_hosts is None:
            raise errors.GitError(
                f"{self.name}: SSH remote {self.url} has no known_hosts configured: "
                "refusing to connect without checking the server's host key"
            )
        if self._home is None:
            raise errors.GitError(f"{self.name}: SSH remote {self.url} needs a GitHome")
        if self._key is None:
            raise errors.GitError(f"{self.name}: SSH remote {self.url} has no key configured")
        try:
            return self._known_hosts.read_text()
        except OSError as exc:
            raise errors.GitError(
                f"{self.name}: cannot read known_hosts {self._known_hosts}: {exc.strerror}"
            ) from None

    @contextmanager
    def _network(self, leases: dict[str, str | Lease | None] | None = None) -> Iterator[_Callbacks]:
        """Callbacks for one network call, with libgit2's global settings held for it."""
        known_hosts = self._read_known_hosts()
        callbacks = _Callbacks(
            app=self.name,
            remote=self._remote,
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

    # ----------------------------------------------------------------- remote

    async def fetch(self) -> None:
        """Bring the mirror up to date with the remote (creating it on first use).

        Branches and tags are forced and pruned: a force-pushed branch moves backwards here too.
        """
        await self._run("fetch", self._fetch)

    def _fetch(self) -> None:
        repo = self._open_or_create()
        with self._network() as callbacks:
            repo.remotes["origin"].fetch(callbacks=callbacks, prune=FetchPrune.PRUNE)
        _make_private(self.path)

    async def push(self, updates: list[RefUpdate]) -> None:
        """Push each update (forced, under its lease); `errors.PushRejected` if any is refused.

        The lease is checked against the refs the server advertises for this very push, and
        the server itself refuses a ref that moves between that and the update (over SSH and
        HTTPS; a local-path remote gives no such guarantee). Updates are not atomic: refs the
        server accepted stay pushed when another one is refused.
        """
        if updates:
            await self._run("push", self._push, list(updates))

    def _push(self, updates: list[RefUpdate]) -> None:
        repo = self._open_or_create()
        for update in updates:
            if _FULL_SHA.fullmatch(update.source):
                _commit(repo, update.source)
            elif repo.references.get(update.source) is None:
                raise errors.NotFound(f"{self.name}: no local ref {update.source!r} to push")
        specs = [f"+{update.source}:{update.remote_ref}" for update in updates]
        leases = {update.remote_ref: update.expected for update in updates}
        with self._network(leases) as callbacks:
            repo.remotes["origin"].push(specs, callbacks=callbacks)
        callbacks.raise_rejections()

    # ----------------------------------------------------------------- reading

    async def branch_head(self, branch: str) -> str | None:
        """The sha `refs/heads/<branch>` points at in the mirror, or None if absent."""
        return await self._run(f"read branch {branch!r}", self._branch_head, branch)

    def _branch_head(self, branch: str) -> str | None:
        target = _reference_target(self._open(), f"refs/heads/{branch}")
        return None if target is None else str(target.id)

    async def resolve(self, revision: str) -> str:
        """The full sha of the commit a sha, short sha, branch, tag or full ref names.

        Raises `errors.NotFound` for an unknown, ambiguous or non-commit revision.
        """
        commit = await self._run(f"resolve {revision!r}", self._commit, revision)
        return str(commit.id)

    async def resolve_strict(self, revision: str) -> str:
        """The full sha of the commit `revision` names, by rules that leave no doubt.

        - 40 hex digits: that commit;
        - 4 to 39 hex digits: the one commit whose sha starts so, never a ref of that name
          (several: `errors.Invalid` listing them);
        - `refs/...`: exactly that ref;
        - any other name: the branch or tag of that name (both, at different commits:
          `errors.Invalid`).

        Raises `errors.NotFound` when nothing matches.
        """
        return await self._run(f"resolve {revision!r}", self._resolve_strict, revision)

    def _resolve_strict(self, revision: str) -> str:
        repo = self._open()
        if _FULL_SHA.fullmatch(revision.lower()) or _SHORT_SHA.fullmatch(revision):
            return self._by_prefix(repo, revision.lower())
        names = [revision] if revision.startswith("refs/") else \
            [f"refs/heads/{revision}", f"refs/tags/{revision}"]
        found: dict[str, str] = {}
        for name in names:
            target = _reference_target(repo, name)
            if target is not None:
                found[name] = str(_commit(repo, str(target.id)).id)
        if not found:
            raise errors.NotFound(f"{self.name}: no commit, branch or tag {revision!r}")
        if len(set(found.values())) > 1:
            listed = ", ".join(f"{name} ({sha[:12]})" for name, sha in found.items())
            raise errors.Invalid(f"{self.name}: {revision!r} is ambiguous: {listed}; "
                                 "name the ref in full")
        return next(iter(found.values()))

    def _by_prefix(self, repo: pygit2.Repository, prefix: str) -> str:
        """The one commit whose sha starts with `prefix` (tags peeled), or an error."""
        try:
            found = repo.get(prefix)
        except pygit2.AmbiguousError:
            found = None
            matches = sorted({str(commit.id) for oid in repo.odb
                              if str(oid).startswith(prefix)
                              and (commit := _peel_commit(repo[oid])) is not None})
            if len(matches) == 1:
                return matches[0]
            if matches:
                listed = ", ".join(f"{sha[:12]} ({_info(_commit(repo, sha)).summary})"
                                   for sha in matches[:10])
                raise errors.Invalid(
                    f"{self.name}: {prefix!r} is ambiguous: {len(matches)} commits start "
                    f"with it: {listed}; give more digits") from None
        commit = None if found is None else _peel_commit(found)
        if commit is None:
            raise errors.NotFound(
                f"{self.name}: no commit {prefix!r} (hex names are commit ids; a branch or "
                f"tag named so is refs/heads/{prefix} or refs/tags/{prefix})")
        return str(commit.id)

    def _commit(self, revision: str) -> pygit2.Commit:
        try:
            return _commit(self._open(), revision)
        except errors.NotFound as exc:
            raise errors.NotFound(f"{self.name}: {exc}") from None

    async def commit_info(self, revision: str) -> CommitInfo:
        """Author, message, parents and tree of one commit."""
        return await self._run(f"read {revision!r}", lambda: _info(self._commit(revision)))

    async def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether `ancestor` is reachable from `descendant` (True when they are equal)."""
        return await self._run("ancestry check", self._is_ancestor, ancestor, descendant)

    def _is_ancestor(self, ancestor: str, descendant: str) -> bool:
        old, new = self._commit(ancestor).id, self._commit(descendant).id
        return old == new or self._open().descendant_of(new, old)

    async def commits_between(self, base: str, head: str) -> list[CommitInfo]:
        """Commits reachable from `head` but not from `base`, merges left out, oldest first."""
        return await self._run("list commits", self._commits_between, base, head)

    def _commits_between(self, base: str, head: str) -> list[CommitInfo]:
        old, new = self._commit(base), self._commit(head)
        key = (str(old.id), str(new.id))
        found = self._ranges.pop(key, None)
        if found is None:
            # A walk of 10,000 commits costs ~100 ms; every job on the same range (the one
            # opened after a rollback, those opened by hand) lists the same, immutable commits.
            walker = self._open().walk(new.id, SortMode.TOPOLOGICAL | SortMode.REVERSE)
            walker.hide(old.id)
            found = tuple(_info(commit) for commit in walker if len(commit.parent_ids) <= 1)
        self._ranges[key] = found
        while len(self._ranges) > _RANGES_KEPT:
            del self._ranges[next(iter(self._ranges))]
        return list(found)

    async def list_refs(self, prefix: str = "refs/") -> dict[str, str]:
        """Every ref under `prefix` and the sha it points at."""
        return await self._run("list refs", self._list_refs, prefix)

    def _list_refs(self, prefix: str) -> dict[str, str]:
        repo = self._open()
        found = {}
        for name in repo.references:
            if name.startswith(prefix):
                found[name] = str(repo.references[name].resolve().target)
        return found

    async def archive(self, revision: str, limits: Limits | None = None) -> Archive:
        """The release tar of a commit's tree (see `deployd.archive`), built once and cached.

        Every tree entry is checked as git fsck would, and the release must fit `limits`
        (default `Limits()`): otherwise `errors.ReleaseRefused` names the path or the limit.
        The tar goes to an unlinked 0600 file inside the mirror, never whole into memory;
        recent archives are kept up to the cache's byte bound and shared by every caller.
        """
        return await self._run(f"archive {revision!r}", self._archive, revision,
                               limits or Limits())

    def _archive(self, revision: str, limits: Limits) -> Archive:
        repo = self._open()
        commit = self._commit(revision)
        sha = str(commit.id)
        cached = self._archives.get(sha)
        if cached is not None:
            exceeded = cached.fits(limits)
            if exceeded is not None:
                raise errors.ReleaseRefused(sha, None, exceeded)
            return cached
        walk = TreeWalk(sha, limits, lambda oid: _raw_tree(repo, oid),
                        lambda oid: _blob_size(repo, oid))
        entries = walk.walk(commit.tree_id.raw)
        with tempfile.TemporaryFile(dir=self.path, prefix=".archive-") as scratch:
            size = write_tar(entries, lambda oid: _blob_view(repo, oid),
                             int(commit.commit_time), scratch)
            scratch.flush()
            archive = Archive(os.fdopen(os.dup(scratch.fileno()), "rb"), revision=sha,
                              size=size, files=len(entries), content_bytes=walk.content_bytes)
        self.archives_built += 1
        self._archives.put(archive)
        # libgit2 keeps the pack windows it read mapped (up to 8 GiB) while the repository
        # holds its object database open: a 100 MiB blob would stay in RSS. free() closes
        # the database (reopened on next use) without waiting for the garbage collector.
        repo.free()
        return archive

    # ----------------------------------------------------------------- writing

    async def create_ref(self, name: str, revision: str) -> None:
        """Create the local ref `name` (e.g. `refs/deployd/backup/...`) at a commit.

        Succeeds when it already points there; raises `errors.Conflict` when it points
        elsewhere. Refs under `refs/deployd/` survive fetches; see the module docstring.
        """
        await self._run(f"create ref {name!r}", self._create_ref, name, revision)

    def _create_ref(self, name: str, revision: str) -> None:
        if not name.startswith("refs/") or not pygit2.reference_is_valid_name(name):
            raise errors.Invalid(f"{self.name}: not a valid full ref name: {name!r}")
        repo = self._open()
        commit = self._commit(revision)
        existing = repo.references.get(name)
        if existing is None:
            repo.references.create(name, commit.id)
        elif existing.resolve().target != commit.id:
            raise errors.Conflict(
                f"{self.name}: ref {name} already points at {existing.resolve().target}"
            )

    async def cherry_pick(
        self,
        onto: str,
        commits: list[str],
        *,
        committer_name: str,
        committer_email: str,
        trailers: list[tuple[str, str]] | None = None,
    ) -> CherryPickResult:
        """Replay `commits` (in the order given) onto `onto` in memory, with no ref moved.

        Each commit is a three-way merge of its change (its first parent -> it) into the
        current head; the new commit keeps the original author and gains
        `(cherry picked from commit <sha>)` plus `trailers` (name, value) in its message.
        A commit whose change is already in the head is skipped. The first conflicting commit
        stops the run: the result names it and the conflicting paths.
        """
        return await self._run(
            "cherry-pick",
            self._cherry_pick,
            onto,
            list(commits),
            (committer_name, committer_email),
            _check_trailers(trailers or []),
        )

    def _cherry_pick(
        self,
        onto: str,
        commits: list[str],
        committer_identity: tuple[str, str],
        trailer_lines: list[str],
    ) -> CherryPickResult:
        repo = self._open()
        committer = pygit2.Signature(*committer_identity)
        state = _Picking(head=self._commit(onto))
        for revision in commits:
            pick = self._commit(revision)
            if len(pick.parent_ids) > 1:
                raise errors.Invalid(f"{self.name}: {pick.id} is a merge; cannot cherry-pick it")
            ancestor = pick.parents[0].tree if pick.parents else _empty_tree(repo)
            index = repo.merge_trees(ancestor, state.head.tree, pick.tree)
            if index.conflicts is not None:
                return state.result(str(pick.id), _conflict_paths(index))
            tree = _write_merged(repo, index, state.head.tree)
            if tree == state.head.tree_id:
                state.skipped.append(str(pick.id))
                continue
            message = _picked_message(pick.message, str(pick.id), trailer_lines)
            oid = repo.create_commit(None, pick.author, committer, message, tree, [state.head.id])
            state.picked.append((str(pick.id), str(oid)))
            state.head = self._commit(str(oid))
        return state.result()

    async def commit_tree(
        self,
        tree: str,
        parent: str,
        *,
        like: list[str],
        committer_name: str,
        committer_email: str,
        trailers: list[tuple[str, str]] | None = None,
        author: tuple[str, str] | None = None,
    ) -> str:
        """Commit `tree` on `parent` as the cherry-pick of the commits `like` (no ref moves).

        For a hand-resolved patch: the commit keeps the first original's message and gains
        one `(cherry picked from commit <sha>)` line per original plus `trailers`, which
        `git cherry-pick -x` would drop on a conflict. Its author is `author` (name, email)
        when given, else the first original's.
        """
        return await self._run(
            "commit resolved patch",
            self._commit_tree,
            tree,
            parent,
            list(like),
            (committer_name, committer_email),
            _check_trailers(trailers or []),
            author,
        )

    def _commit_tree(
        self,
        tree: str,
        parent: str,
        like: list[str],
        committer_identity: tuple[str, str],
        trailer_lines: list[str],
        author: tuple[str, str] | None,
    ) -> str:
        if not like:
            raise errors.Invalid(f"{self.name}: a resolved patch needs the commits it stands for")
        repo = self._open()
        originals = [self._commit(revision) for revision in like]
        message = originals[0].message
        for original in originals[1:]:
            message = message.rstrip("\n") + f"\n\n{original.message}"
        for original in originals[:-1]:
            message = _picked_message(message, str(original.id), [])
        message = _picked_message(message, str(originals[-1].id), trailer_lines)
        committer = pygit2.Signature(*committer_identity)
        signature = originals[0].author if author is None else pygit2.Signature(*author)
        oid = repo.create_commit(None, signature, committer, message,
                                 pygit2.Oid(hex=tree), [self._commit(parent).id])
        return str(oid)

    async def conflicts_alone(self, onto: str, commits: list[str]) -> dict[str, tuple[str, ...]]:
        """Each commit cherry-picked alone onto `onto`, in memory: its conflicting paths.

        An empty tuple means it applies cleanly. Only merges are computed (no object is
        written), all in one worker-thread call.
        """
        return await self._run("try commits", self._conflicts_alone, onto, list(commits))

    def _conflicts_alone(self, onto: str, commits: list[str]) -> dict[str, tuple[str, ...]]:
        repo = self._open()
        base = self._commit(onto).tree
        found: dict[str, tuple[str, ...]] = {}
        for revision in commits:
            pick = self._commit(revision)
            ancestor = pick.parents[0].tree if pick.parents else _empty_tree(repo)
            index = repo.merge_trees(ancestor, base, pick.tree)
            found[str(pick.id)] = _conflict_paths(index) if index.conflicts is not None else ()
        return found

    async def changes(self, old: str | None, new: str) -> dict[str, Counter[str]]:
        """What turning `old`'s tree (None: the empty tree) into `new`'s adds, per path.

        Every path the diff touches is a key (a deleted one maps to nothing); its counter
        holds each added line as `+<line>`, the new blob of a binary file as `blob:<sha>`,
        a changed file mode as `mode:<octal>` (the content the change brings in), and under
        `-` how many lines it removes.
        """
        return await self._run("diff", self._changes, old, new)

    def _changes(self, old: str | None, new: str) -> dict[str, Counter[str]]:
        repo = self._open()
        before = _empty_tree(repo) if old is None else _tree(repo, old)
        diff = before.diff_to_tree(_tree(repo, new))
        found: dict[str, Counter[str]] = {}
        for patch in diff:
            if patch is None:
                continue
            delta = patch.delta
            for path in {delta.old_file.path, delta.new_file.path} - {None, ""}:
                found.setdefault(path, Counter())
            if delta.status_char() == "D":
                continue
            added = found[delta.new_file.path]
            if delta.is_binary:
                added[f"blob:{delta.new_file.id}"] += 1
            if delta.old_file.mode != delta.new_file.mode:
                added[f"mode:{int(delta.new_file.mode):o}"] += 1
            for hunk in patch.hunks:
                for line in hunk.lines:
                    if line.origin == "+":
                        added["+" + line.raw_content.decode("utf-8", "surrogateescape")] += 1
                    elif line.origin == "-":
                        added["-"] += 1
        return found

    async def diff(self, old: str, new: str) -> str:
        """The unified diff (with full binary patches) turning `old`'s tree into `new`'s.

        `old` and `new` are commits, tags or tree shas. Bytes that are not UTF-8 are kept as
        surrogate escapes, so `apply_patch` gets back exactly what the diff said.
        """
        return await self._run("diff", self._diff, old, new)

    def _diff(self, old: str, new: str) -> str:
        repo = self._open()
        diff = _tree(repo, old).diff_to_tree(_tree(repo, new), flags=DiffOption.SHOW_BINARY)
        data = b"".join(patch.data for patch in diff if patch is not None)
        return data.decode("utf-8", "surrogateescape")

    async def apply_patch(self, base: str, patch: str | bytes) -> str:
        """The sha of the tree that `patch` (a unified git diff) makes of `base`'s tree.

        Nothing is committed and no ref moves; the new blobs and trees are written to the
        mirror. Hunks must match exactly where they say (libgit2 applies no offset or fuzz).
        Raises `errors.Invalid` for a text that is not a patch or does not apply, naming the
        files that do not, or that declares binary changes over MAX_BINARY_BYTES.
        """
        data = patch.encode("utf-8", "surrogateescape") if isinstance(patch, str) else patch
        check_patch_sizes(data)
        return await self._run("apply patch", self._apply_patch, base, data)

    def _apply_patch(self, base: str, data: bytes) -> str:
        repo = self._open()
        tree = _tree(repo, base)
        try:
            diff = pygit2.Diff.parse_diff(data)
        except pygit2.GitError as exc:
            raise errors.Invalid(f"{self.name}: not a patch: {exc}") from None
        with _scratch_repository(repo) as scratch:
            index = scratch.index
            index.read_tree(tree)
            index.write()
            try:
                scratch.apply(diff, ApplyLocation.INDEX)
            except pygit2.GitError as exc:
                failing = _failing_files(scratch, diff)
                raise errors.Invalid(
                    f"{self.name}: patch does not apply to {base}: {exc}"
                    + (f" (in {', '.join(failing)})" if failing else "")
                ) from None
            index.read(force=True)
            return str(index.write_tree(repo))


def _make_private(root: Path) -> None:
    """Take every permission of group and others away under `root` (libgit2 creates files
    after the umask, and the mirror holds code that may not be public yet)."""
    for directory, _subdirectories, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in files)]:
            try:
                mode = os.lstat(path).st_mode
                if mode & 0o077 and not stat.S_ISLNK(mode):
                    os.chmod(path, stat.S_IMODE(mode) & 0o700)
            except FileNotFoundError:  # gone meanwhile (a lock file): nothing to protect
                continue


@contextmanager
def _scratch_repository(repo: pygit2.Repository) -> Iterator[pygit2.Repository]:
    """A throwaway bare repository sharing `repo`'s objects but with its own index.

    libgit2 applies a patch to a repository's on-disk index only (pygit2 does not expose
    `git_apply_to_tree`); this keeps that index out of the mirror. It lives inside the mirror
    directory (cleaned up afterwards); objects it writes land in the mirror's object store.
    """
    mirror = Path(repo.path)
    scratch = Path(tempfile.mkdtemp(prefix="deployd-apply-", dir=mirror))
    try:
        (scratch / "refs").mkdir()
        (scratch / "HEAD").write_text("ref: refs/heads/scratch\n")
        (scratch / "config").write_text("[core]\n\tbare = true\n")
        (scratch / "objects").symlink_to(mirror / "objects")
        yield pygit2.Repository(str(scratch), _OPEN_FLAGS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _failing_files(scratch: pygit2.Repository, diff: pygit2.Diff) -> list[str]:
    """Which files of a patch do not apply to the scratch index (on its own)."""
    failing = []
    for patch in diff:
        if patch is None:
            continue
        try:
            # libgit2 re-serialises a file's patch without the `index` line it lacked, and
            # cannot always parse that back: then this file cannot be named.
            single = pygit2.Diff.parse_diff(patch.data)
        except pygit2.GitError:
            continue
        if not scratch.applies(single, ApplyLocation.INDEX):
            delta = patch.delta
            failing.append(delta.new_file.path or delta.old_file.path)
    return failing
