"""Release archives: the tar of a commit's tree that every host unpacks as a release.

A commit's tree comes from whoever can push to the watched branch, so before anything is built
every entry is checked the way `git fsck` checks it (`check_tree`), and the release is bounded
in entries and bytes (`Limits`). A refused tree raises `errors.ReleaseRefused` naming the path
and the rule. The tar itself is written to an unlinked 0600 file (never held whole in memory),
and `Archive.chunks()` reads it back piece by piece, for any number of hosts at once.
`ArchiveCache` keeps recent archives, bounded by their total size in bytes.

This module knows nothing of pygit2: `git.Mirror` hands it raw tree objects and blobs. The
tree is walked here rather than archived by libgit2, whose archive support crashes on
submodule gitlinks and would not show the raw names and modes checked here.

API::

    Limits(max_bytes=1 GiB, max_files=200_000)
    TreeWalk(revision, limits, read_tree, blob_size)   # read_tree(oid) -> raw tree bytes
        .walk(root_oid) -> list[Entry]                  # sorted; ReleaseRefused on any problem
    write_tar(entries, blob, mtime, into) -> int        # bytes written (deterministic)
    Archive(file, revision=, size=, files=, content_bytes=)
        await chunks(size) -> AsyncIterator[bytes]
    ArchiveCache(max_bytes, max_count=16)  .get(revision) / .put(archive)
"""

from __future__ import annotations

import asyncio
import os
import re
import tarfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

from deployd.errors import ReleaseRefused

TREE = 0o040000
BLOB = 0o100644
EXECUTABLE = 0o100755
LINK = 0o120000
GITLINK = 0o160000

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_FILES = 200_000
CHUNK = 1 << 20
MAX_LINK_TARGET = 4095  # PATH_MAX - 1: no host can create a longer symlink
OID_SIZE = 20

# The modes git writes, as they appear in a raw tree. 100664 is what git wrote for
# group-writable files before 2005; git fsck still accepts it, as a plain file.
_MODES = {b"40000": TREE, b"100644": BLOB, b"100755": EXECUTABLE, b"120000": LINK,
          b"160000": GITLINK, b"100664": BLOB}
# Code points HFS+ ignores when it compares names (git's utf8.c, next_hfs_char).
_HFS_IGNORED = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")
# `.git` or its NTFS short name `git~1`, then only dots and spaces up to the end, a directory
# separator or an alternate data stream (git's is_ntfs_dotgit).
_NTFS_DOTGIT = re.compile(rb"(?:\.[gG][iI][tT]|[gG][iI][tT]~1)[. ]*(?:[:\\/].*)?", re.DOTALL)


@dataclass(frozen=True)
class Limits:
    """The most a release may hold: bytes of file content and tree entries (files,
    directories, symlinks, submodules)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES


@dataclass(frozen=True, order=True)
class Entry:
    """One checked tree entry: its path in the release (the sort key), mode and raw oid."""

    name: str  # the path as the tar names it (undecodable bytes as surrogate escapes)
    mode: int
    oid: bytes


# --------------------------------------------------------------------------- checking


def show(path: bytes) -> str:
    """A path for a message or a log line: invisible and control characters escaped."""
    text = path.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_dotgit(name: bytes) -> bool:
    """Whether a name is `.git` to git, NTFS or HFS+ (`.GIT`, `git~1`, `.git.`, `.g\u200cit`)."""
    parts = name.split(b"\\")
    if any(_NTFS_DOTGIT.fullmatch(part) for part in parts):
        return True
    text = _HFS_IGNORED.sub("", name.decode("utf-8", "surrogateescape"))
    return text.isascii() and text.lower() == ".git"


def name_problem(name: bytes) -> str | None:
    """Why git fsck refuses a tree entry's name, or None when it is fine."""
    if not name:
        return "empty name"
    if name in (b".", b".."):
        return f"entry named {name.decode()!r}"
    if b"/" in name:
        return "name contains '/'"
    if is_dotgit(name):
        return "entry named like .git (git refuses it, also its NTFS and HFS+ spellings)"
    return None


def parse_tree(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(raw mode, name, oid) of every entry of a raw tree object; ValueError if malformed.

    A name cannot hold a NUL: one would end the name early, and the rest no longer parses.
    """
    entries = []
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        end = data.find(b"\0", space + 1) if space >= 0 else -1
        if space < 0 or end < 0 or end + 1 + OID_SIZE > len(data):
            raise ValueError(f"truncated entry at byte {position}")
        mode, name = data[position:space], data[space + 1:end]
        if not mode or not mode.isdigit():
            raise ValueError(f"bad mode {show(mode)!r} at byte {position}")
        entries.append((mode, name, data[end + 1:end + 1 + OID_SIZE]))
        position = end + 1 + OID_SIZE
    return entries


class TreeWalk:
    """Walk a commit's tree, refusing what git fsck refuses and what exceeds the limits.

    `read_tree(oid)` gives a raw tree object (raising ValueError when the oid is not a tree),
    `blob_size(oid)` the size of a blob (ValueError when it is not one) without reading it.
    The walk stops at the first problem, so a tree that reuses one subtree many times is
    refused after `max_files` entries, not after expanding all of them.
    """

    def __init__(self, revision: str, limits: Limits, read_tree: Callable[[bytes], bytes],
                 blob_size: Callable[[bytes], int]) -> None:
        self.revision = revision
        self.limits = limits
        self._read_tree = read_tree
        self._blob_size = blob_size
        self.content_bytes = 0

    def walk(self, root: bytes) -> list[Entry]:
        """Every entry below the root tree, sorted by path (parents before children)."""
        found: list[Entry] = []
        pending = [(b"", root)]  # a stack, not recursion: depth is the commit author's choice
        while pending:
            prefix, oid = pending.pop()
            for mode, name, child in self._entries(prefix, oid):
                path = prefix + name
                found.append(Entry(os.fsdecode(path), mode, child))
                if len(found) > self.limits.max_files:
                    raise self._refused(None, f"more than {self.limits.max_files} entries "
                                              "(max_release_files)")
                if mode == TREE:
                    pending.append((path + b"/", child))
                elif mode != GITLINK:
                    self._count(path, mode, child)
        found.sort()
        return found

    def _entries(self, prefix: bytes, oid: bytes) -> list[tuple[int, bytes, bytes]]:
        where = prefix.rstrip(b"/") or b"."
        try:
            raw = parse_tree(self._read_tree(oid))
        except ValueError as exc:
            raise self._refused(where, f"malformed tree: {exc}") from None
        entries, seen = [], set()
        for mode, name, child in raw:
            path = prefix + name
            problem = name_problem(name)
            if problem is None and name in seen:
                problem = "duplicate entry"
            if problem is None and mode not in _MODES:
                problem = f"unsupported mode {mode.decode()}"
            if problem is not None:
                raise self._refused(path, problem)
            seen.add(name)
            entries.append((_MODES[mode], name, child))
        return entries

    def _count(self, path: bytes, mode: int, oid: bytes) -> None:
        try:
            size = self._blob_size(oid)
        except ValueError as exc:
            raise self._refused(path, str(exc)) from None
        if mode == LINK and size > MAX_LINK_TARGET:
            raise self._refused(path, f"symlink target longer than {MAX_LINK_TARGET} bytes")
        self.content_bytes += size
        if self.content_bytes > self.limits.max_bytes:
            raise self._refused(None, f"more than {self.limits.max_bytes} bytes of files "
                                      "(max_release_size)")

    def _refused(self, path: bytes | None, reason: str) -> ReleaseRefused:
        return ReleaseRefused(self.revision, None if path is None else show(path), reason)


# --------------------------------------------------------------------------- the tar


def write_tar(entries: list[Entry], blob: Callable[[bytes], memoryview], mtime: int,
              into: BinaryIO) -> int:
    """Write a deterministic tar of `entries` (sorted) to `into`; returns its size.

    Files are 0644 or 0755, symlinks stay symlinks, submodules become empty directories,
    mtime is `mtime` and owners are uid/gid 0, so the same tree always gives the same bytes.
    """
    written = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal written
        into.write(data)
        written += len(data)

    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.mtime = mtime
        data: memoryview | None = None
        if entry.mode in (TREE, GITLINK):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        elif entry.mode == LINK:
            info.type, info.mode = tarfile.SYMTYPE, 0o777
            info.linkname = os.fsdecode(bytes(blob(entry.oid)))
        else:
            data = blob(entry.oid)
            info.size = len(data)
            info.mode = 0o755 if entry.mode == EXECUTABLE else 0o644
        put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data is not None:
            put(data)
            put(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
            data.release()
    put(b"\0" * (2 * tarfile.BLOCKSIZE))
    put(b"\0" * (-written % tarfile.RECORDSIZE))
    return written


class Archive:
    """A finished release tar in an unlinked file, read by any number of hosts at once.

    The file is closed when the last reference to the archive goes (the cache may drop it
    while a deploy still streams it).
    """

    def __init__(self, file: BinaryIO, *, revision: str, size: int, files: int,
                 content_bytes: int) -> None:
        self.revision = revision
        self.size = size
        self.files = files
        self.content_bytes = content_bytes
        self._fd = file.fileno()
        weakref.finalize(self, file.close)

    def __repr__(self) -> str:
        return f"Archive({self.revision[:12]}, {self.size} bytes, {self.files} entries)"

    def fits(self, limits: Limits) -> str | None:
        """Which limit this archive exceeds, or None."""
        if self.files > limits.max_files:
            return f"more than {limits.max_files} entries (max_release_files)"
        if self.content_bytes > limits.max_bytes:
            return f"more than {limits.max_bytes} bytes of files (max_release_size)"
        return None

    async def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """The tar from its first byte to its last, `size` bytes at a time."""
        for offset in range(0, self.size, size):
            yield await asyncio.to_thread(self._read_at, offset, min(size, self.size - offset))

    def _read_at(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"release archive of {self.revision[:12]} is shorter than expected")
        return data


class ArchiveCache:
    """The most recently used archives, at most `max_bytes` of them together.

    Each holds an open file, so their number is bounded too (`max_count`).
    """

    def __init__(self, max_bytes: int, max_count: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._archives: OrderedDict[str, Archive] = OrderedDict()

    @property
    def size(self) -> int:
        """Bytes of the archives held now."""
        return sum(archive.size for archive in self._archives.values())

    def get(self, revision: str) -> Archive | None:
        archive = self._archives.get(revision)
        if archive is not None:
            self._archives.move_to_end(revision)
        return archive

    def put(self, archive: Archive) -> None:
        """Keep `archive` (unless it alone is larger than the cache), dropping the oldest."""
        if archive.size > self.max_bytes:
            return
        self._archives[archive.revision] = archive
        self._archives.move_to_end(archive.revision)
        while self.size > self.max_bytes or len(self._archives) > self.max_count:
            self._archives.popitem(last=False)
