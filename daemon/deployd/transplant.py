"""Changes moved between trees in memory: cherry-picks, patches and their checks.

Part of `deployd.git` (see its docstring for the API); only the git modules import pygit2.
`Transplanter` does the blocking work of `Mirror.cherry_pick`, `commit_tree`,
`conflicts_alone`, `changes`, `diff` and `apply_patch`, which run it in the mirror's worker
thread: no ref moves and no work tree is written; new objects land in the mirror.
`check_patch_sizes` bounds what a patch's binary hunks may make libgit2 allocate.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from base64 import b85decode
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pygit2
from pygit2.enums import ApplyLocation, DeltaStatus, DiffOption, FileMode, ObjectType

from deployd import errors
from deployd import gitrevisions as revisions

_TRAILER_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_TRAILER_LINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*: |\(cherry picked from commit [0-9a-f]+\)$")
_PATCH_FILE = re.compile(rb"diff --git a/(.*) b/(.*?)\r?")
_BINARY_SIZE = re.compile(rb"(literal|delta) ([0-9]+)\r?")
MAX_BINARY_BYTES = 8 * 1024 * 1024
"""The largest size a binary patch may declare for one file, and for all of them together:
libgit2 allocates what a patch declares before it checks the data."""


# --------------------------------------------------------------------------- values


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


# --------------------------------------------------------------------------- the work


class Transplanter:
    """The in-memory cherry-pick and patch work on one repository (see `Mirror` for each call).

    Every method blocks on libgit2: call them only from the mirror's worker thread.
    """

    def __init__(self, name: str, repository: Callable[[], pygit2.Repository]) -> None:
        self.name = name
        self._repository = repository

    def _commit(self, revision: str) -> pygit2.Commit:
        return revisions.app_commit(self.name, self._repository(), revision)

    def cherry_pick(
        self,
        onto: str,
        commits: list[str],
        committer_identity: tuple[str, str],
        trailer_lines: list[str],
    ) -> CherryPickResult:
        """Replay `commits` onto `onto`, each as a three-way merge of its own change."""
        repo = self._repository()
        committer = pygit2.Signature(*committer_identity)
        state = _Picking(head=self._commit(onto))
        for revision in commits:
            pick = self._commit(revision)
            if len(pick.parent_ids) > 1:
                raise errors.Invalid(f"{self.name}: {pick.id} is a merge; cannot cherry-pick it")
            ancestor = pick.parents[0].tree if pick.parents else revisions.empty_tree(repo)
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

    def commit_tree(
        self,
        tree: str,
        parent: str,
        like: list[str],
        committer_identity: tuple[str, str],
        trailer_lines: list[str],
        author: tuple[str, str] | None,
    ) -> str:
        """The sha of a new commit of `tree` on `parent`, as the cherry-pick of `like`."""
        if not like:
            raise errors.Invalid(f"{self.name}: a resolved patch needs the commits it stands for")
        repo = self._repository()
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

    def conflicts_alone(self, onto: str, commits: list[str]) -> dict[str, tuple[str, ...]]:
        """Each commit's conflicting paths when merged alone onto `onto` (nothing written)."""
        repo = self._repository()
        base = self._commit(onto).tree
        found: dict[str, tuple[str, ...]] = {}
        for revision in commits:
            pick = self._commit(revision)
            ancestor = pick.parents[0].tree if pick.parents else revisions.empty_tree(repo)
            index = repo.merge_trees(ancestor, base, pick.tree)
            found[str(pick.id)] = _conflict_paths(index) if index.conflicts is not None else ()
        return found

    def changes(self, old: str | None, new: str) -> dict[str, Counter[str]]:
        """What turning `old`'s tree (None: the empty tree) into `new`'s adds, per path."""
        repo = self._repository()
        before = revisions.empty_tree(repo) if old is None else revisions.tree(repo, old)
        diff = before.diff_to_tree(revisions.tree(repo, new))
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

    def diff(self, old: str, new: str) -> str:
        """The unified diff (full binary patches, surrogate escapes) of two trees."""
        repo = self._repository()
        diff = revisions.tree(repo, old).diff_to_tree(revisions.tree(repo, new),
                                                      flags=DiffOption.SHOW_BINARY)
        data = b"".join(patch.data for patch in diff if patch is not None)
        return data.decode("utf-8", "surrogateescape")

    def apply_patch(self, base: str, data: bytes) -> str:
        """The sha of the tree `data` (a patch already size-checked) makes of `base`'s tree."""
        repo = self._repository()
        tree = revisions.tree(repo, base)
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


# --------------------------------------------------------------------------- cherry-pick


def check_trailers(trailers: list[tuple[str, str]]) -> list[str]:
    """The message lines of (name, value) trailers; `errors.Invalid` for a bad name."""
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


# --------------------------------------------------------------------------- patches


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
        yield pygit2.Repository(str(scratch), revisions.OPEN_FLAGS)
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

