"""A bare git mirror per app, driven by pygit2 (only the git modules of deployd import it).

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

The work is split by concept: this module opens the mirror, fetches and pushes, resolves
revisions and builds archives; `deployd.gitremote` connects to the remote (URL, credentials,
host key check, libgit2's process-wide settings), `deployd.gitrevisions` looks revisions up
and `deployd.transplant` does the cherry-pick and patch work, which `Mirror` runs in its
worker thread like everything else.
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pygit2
from pygit2.enums import FetchPrune, ObjectType, SortMode

from deployd import errors
from deployd import gitrevisions as revisions
from deployd.archive import Archive, ArchiveCache, Limits, TreeWalk, write_tar
from deployd.gitremote import GitHome, Lease, Remote
from deployd.transplant import (
    MAX_BINARY_BYTES,
    CherryPickResult,
    Transplanter,
    check_patch_sizes,
    check_trailers,
)

__all__ = [
    "DEFAULT_ARCHIVE_CACHE",
    "MAX_BINARY_BYTES",
    "REFSPECS",
    "CherryPickResult",
    "CommitInfo",
    "GitHome",
    "Lease",
    "Mirror",
    "RefUpdate",
    "check_patch_sizes",
]

T = TypeVar("T")

REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
"""What a mirror fetches: every branch and tag, forced (history rewrites are picked up)."""

_RANGES_KEPT = 2  # commits_between results kept (a range of 10,000 commits: ~10 MB)
DEFAULT_ARCHIVE_CACHE = 256 << 20
"""Bytes of release archives a mirror keeps (on disk, in unlinked files) for reuse."""


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
        if isinstance(self.expected, str) and not revisions.FULL_SHA.fullmatch(self.expected):
            raise ValueError(f"RefUpdate.expected must be a full sha: {self.expected!r}")


# --------------------------------------------------------------------------- the mirror


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
        self._remote = Remote(url, app=name, home=home, key=key, known_hosts=known_hosts,
                              timeout=timeout)
        self._archives = ArchiveCache(archive_cache)
        self.archives_built = 0  # how many archives this mirror made (cache misses)
        self._repo: pygit2.Repository | None = None
        self._transplanter = Transplanter(name, self._open)
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
            self._repo = pygit2.Repository(str(self.path), revisions.OPEN_FLAGS)
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

    # ----------------------------------------------------------------- remote

    async def fetch(self) -> None:
        """Bring the mirror up to date with the remote (creating it on first use).

        Branches and tags are forced and pruned: a force-pushed branch moves backwards here too.
        """
        await self._run("fetch", self._fetch)

    def _fetch(self) -> None:
        repo = self._open_or_create()
        with self._remote.connect() as callbacks:
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
            if revisions.FULL_SHA.fullmatch(update.source):
                revisions.commit(repo, update.source)
            elif repo.references.get(update.source) is None:
                raise errors.NotFound(f"{self.name}: no local ref {update.source!r} to push")
        specs = [f"+{update.source}:{update.remote_ref}" for update in updates]
        leases = {update.remote_ref: update.expected for update in updates}
        with self._remote.connect(leases) as callbacks:
            repo.remotes["origin"].push(specs, callbacks=callbacks)
        callbacks.raise_rejections()

    # ----------------------------------------------------------------- reading

    async def branch_head(self, branch: str) -> str | None:
        """The sha `refs/heads/<branch>` points at in the mirror, or None if absent."""
        return await self._run(f"read branch {branch!r}", self._branch_head, branch)

    def _branch_head(self, branch: str) -> str | None:
        target = revisions.reference_target(self._open(), f"refs/heads/{branch}")
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
        return await self._run(f"resolve {revision!r}",
                               lambda: revisions.resolve_strict(self.name, self._open(), revision))

    def _commit(self, revision: str) -> pygit2.Commit:
        return revisions.app_commit(self.name, self._open(), revision)

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
        archive = _build_archive(repo, commit, limits, self.path)
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

    # ----------------------------------------------------------------- transplanting

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
            self._transplanter.cherry_pick,
            onto,
            list(commits),
            (committer_name, committer_email),
            check_trailers(trailers or []),
        )

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
            self._transplanter.commit_tree,
            tree,
            parent,
            list(like),
            (committer_name, committer_email),
            check_trailers(trailers or []),
            author,
        )

    async def conflicts_alone(self, onto: str, commits: list[str]) -> dict[str, tuple[str, ...]]:
        """Each commit cherry-picked alone onto `onto`, in memory: its conflicting paths.

        An empty tuple means it applies cleanly. Only merges are computed (no object is
        written), all in one worker-thread call.
        """
        return await self._run("try commits", self._transplanter.conflicts_alone, onto,
                               list(commits))

    async def changes(self, old: str | None, new: str) -> dict[str, Counter[str]]:
        """What turning `old`'s tree (None: the empty tree) into `new`'s adds, per path.

        Every path the diff touches is a key (a deleted one maps to nothing); its counter
        holds each added line as `+<line>`, the new blob of a binary file as `blob:<sha>`,
        a changed file mode as `mode:<octal>` (the content the change brings in), and under
        `-` how many lines it removes.
        """
        return await self._run("diff", self._transplanter.changes, old, new)

    async def diff(self, old: str, new: str) -> str:
        """The unified diff (with full binary patches) turning `old`'s tree into `new`'s.

        `old` and `new` are commits, tags or tree shas. Bytes that are not UTF-8 are kept as
        surrogate escapes, so `apply_patch` gets back exactly what the diff said.
        """
        return await self._run("diff", self._transplanter.diff, old, new)

    async def apply_patch(self, base: str, patch: str | bytes) -> str:
        """The sha of the tree that `patch` (a unified git diff) makes of `base`'s tree.

        Nothing is committed and no ref moves; the new blobs and trees are written to the
        mirror. Hunks must match exactly where they say (libgit2 applies no offset or fuzz).
        Raises `errors.Invalid` for a text that is not a patch or does not apply, naming the
        files that do not, or that declares binary changes over MAX_BINARY_BYTES.
        """
        data = patch.encode("utf-8", "surrogateescape") if isinstance(patch, str) else patch
        check_patch_sizes(data)
        return await self._run("apply patch", self._transplanter.apply_patch, base, data)


# --------------------------------------------------------------------------- helpers


def _info(commit: pygit2.Commit) -> CommitInfo:
    author = commit.author
    return CommitInfo(
        sha=str(commit.id),
        summary=revisions.summary(commit),
        author_name=author.name,
        author_email=author.email,
        time=int(author.time),
        parents=tuple(str(parent) for parent in commit.parent_ids),
        message=commit.message,
        tree=str(commit.tree_id),
    )


def _build_archive(repo: pygit2.Repository, commit: pygit2.Commit, limits: Limits,
                   directory: Path) -> Archive:
    """The checked release tar of `commit`'s tree, in an unlinked file inside `directory`."""
    sha = str(commit.id)
    walk = TreeWalk(sha, limits, lambda oid: _raw_tree(repo, oid),
                    lambda oid: _blob_size(repo, oid))
    entries = walk.walk(commit.tree_id.raw)
    with tempfile.TemporaryFile(dir=directory, prefix=".archive-") as scratch:
        size = write_tar(entries, lambda oid: _blob_view(repo, oid),
                         int(commit.commit_time), scratch)
        scratch.flush()
        return Archive(os.fdopen(os.dup(scratch.fileno()), "rb"), revision=sha,
                       size=size, files=len(entries), content_bytes=walk.content_bytes)


def _raw_tree(repo: pygit2.Repository, oid: bytes) -> bytes:
    """The raw bytes of a tree object (libgit2's parser would hide duplicates and modes)."""
    return bytes(_read_object(repo.odb.read, oid, ObjectType.TREE, "tree"))


def _blob_size(repo: pygit2.Repository, oid: bytes) -> int:
    """A blob's size from its header, without reading (and inflating) the blob."""
    return int(_read_object(repo.odb.read_header, oid, ObjectType.BLOB, "blob"))


def _read_object(read: Callable[[pygit2.Oid], tuple[int, T]], oid: bytes, kind: ObjectType,
                 what: str) -> T:
    """What `read` (the object database's data or header reader) gives for an object that
    must be a `what`; ValueError when it is missing or of another type."""
    try:
        found, value = read(pygit2.Oid(raw=oid))
    except KeyError:
        raise ValueError(f"object {pygit2.Oid(raw=oid)} is missing") from None
    if found != kind:
        raise ValueError(f"{pygit2.Oid(raw=oid)} is not a {what}")
    return value


def _blob_view(repo: pygit2.Repository, oid: bytes) -> memoryview:
    """A blob's content without copying it into a Python bytes object."""
    blob = repo[pygit2.Oid(raw=oid)]
    assert isinstance(blob, pygit2.Blob)
    return memoryview(blob)


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
