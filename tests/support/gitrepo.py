"""Origin repositories for the tests, built with pygit2 (no `git` program).

`OriginRepo` is a bare repository standing in for an app's remote: tests commit to it, move
its branches (force pushes) and read files back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import pygit2
from pygit2.enums import FileMode, ObjectType

COMMITTER = ("Otto Origin", "otto@example.com")


def write_raw_tree(repo: pygit2.Repository, entries: list[tuple[bytes, bytes, str]]) -> str:
    """Write a tree object holding exactly `entries` (raw mode, raw name, sha) into `repo`."""
    data = b"".join(mode + b" " + name + b"\0" + bytes.fromhex(sha)
                    for mode, name, sha in entries)
    return str(repo.odb.write(ObjectType.TREE, data))


class OriginRepo:
    """A bare repository at `path` whose default branch is `branch`.

    `on_change`, if given, is called with `path` after every write (e.g. to hand the files to
    the user an SSH server serves the repository as).
    """

    def __init__(
        self,
        path: Path,
        *,
        branch: str = "production",
        on_change: Callable[[Path], None] | None = None,
    ) -> None:
        self.path = path
        self.url = str(path)
        self.branch = branch
        self.on_change = on_change
        self.repo = pygit2.init_repository(str(path), bare=True)
        self.repo.set_head(f"refs/heads/{branch}")
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.path)

    def commit(
        self,
        files: dict[str, str | bytes | None],
        message: str,
        *,
        branch: str | None = None,
        parents: list[str] | None = None,
        author: tuple[str, str] = ("Ann Author", "ann@example.com"),
        executable: Collection[str] = frozenset(),
        symlinks: dict[str, str] | None = None,
        gitlinks: dict[str, str] | None = None,
    ) -> str:
        """A new commit on `branch` (forced there); its tree is the first parent's with
        `files` applied (None deletes), plus `symlinks` (path -> target) and `gitlinks`
        (path -> submodule commit sha). Parents default to the branch head, if any."""
        branch = branch or self.branch
        if parents is None:
            parents = [self.head(branch)] if self._has(branch) else []
        index = pygit2.Index()
        if parents:
            index.read_tree(self._commit(parents[0]).tree)
        for path, content in files.items():
            if content is None:
                index.remove(path)
                continue
            mode = FileMode.BLOB_EXECUTABLE if path in executable else FileMode.BLOB
            index.add(pygit2.IndexEntry(path, self.repo.create_blob(content), mode))
        for path, target in (symlinks or {}).items():
            index.add(pygit2.IndexEntry(path, self.repo.create_blob(target), FileMode.LINK))
        for path, sha in (gitlinks or {}).items():
            index.add(pygit2.IndexEntry(path, pygit2.Oid(hex=sha), FileMode.COMMIT))
        tree = index.write_tree(self.repo)
        oid = self.repo.create_commit(
            None,
            pygit2.Signature(*author),
            pygit2.Signature(*COMMITTER),
            message,
            tree,
            [pygit2.Oid(hex=parent) for parent in parents],
        )
        self.repo.references.create(f"refs/heads/{branch}", oid, force=True)
        self._changed()
        return str(oid)

    def blob(self, content: bytes) -> str:
        """The sha of a new blob holding `content`."""
        return str(self.repo.create_blob(content))

    def raw_tree(self, entries: list[tuple[bytes, bytes, str]]) -> str:
        """A tree object holding exactly `entries` (raw mode, raw name, sha), in that order.

        Written straight into the object database: libgit2's TreeBuilder refuses names like
        `..` or `.git` and duplicates, but a hostile client pushes whatever objects it likes.
        """
        return write_raw_tree(self.repo, entries)

    def commit_tree(self, tree: str, message: str, *, branch: str | None = None) -> str:
        """A new commit of `tree` on top of `branch` (forced there), as a push would make."""
        branch = branch or self.branch
        parents = [pygit2.Oid(hex=self.head(branch))] if self._has(branch) else []
        oid = self.repo.create_commit(
            f"refs/heads/{branch}", pygit2.Signature(*COMMITTER), pygit2.Signature(*COMMITTER),
            message, pygit2.Oid(hex=tree), parents)
        self._changed()
        return str(oid)

    def head(self, branch: str | None = None) -> str:
        """The sha `branch` (default: the main branch) points at."""
        return str(self.repo.references[f"refs/heads/{branch or self.branch}"].target)

    def set_branch(self, branch: str, sha: str) -> None:
        """Force-move (or create) `branch` to `sha`, as a force push would."""
        self.repo.references.create(f"refs/heads/{branch}", pygit2.Oid(hex=sha), force=True)
        self._changed()

    def read_file(self, sha_or_branch: str, path: str) -> bytes:
        """The content of `path` in a commit (a sha or a branch name)."""
        if self._has(sha_or_branch):
            sha_or_branch = self.head(sha_or_branch)
        blob = self.repo[self._commit(sha_or_branch).tree[path].id]
        assert isinstance(blob, pygit2.Blob)
        return blob.data

    def _has(self, branch: str) -> bool:
        return f"refs/heads/{branch}" in self.repo.references

    def _commit(self, sha: str) -> pygit2.Commit:
        commit = self.repo[sha]
        assert isinstance(commit, pygit2.Commit)
        return commit


def commits_sharing_a_prefix(origin: OriginRepo) -> tuple[str, str]:
    """Two commits on side branches `amb-a` and `amb-b` whose shas share four hex digits."""
    head = origin.repo[origin.head()]
    assert isinstance(head, pygit2.Commit)
    seen: dict[str, str] = {}
    for attempt in range(100_000):
        oid = str(origin.repo.create_commit(
            None, head.author, head.committer, f"try {attempt}\n", head.tree_id, [head.id]))
        other = seen.setdefault(oid[:4], oid)
        if other != oid:
            origin.set_branch("amb-a", other)
            origin.set_branch("amb-b", oid)
            return other, oid
    raise AssertionError("no two commits share a prefix")
