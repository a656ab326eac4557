"""What a revision (a sha, short sha, branch, tag or full ref name) names in a repository.

Blocking pygit2 lookups shared by `git.Mirror` and `transplant.Transplanter`: call them only
from the mirror's worker thread. An unknown revision is `errors.NotFound`.
"""

from __future__ import annotations

import re
from typing import TypeVar

import pygit2
from pygit2.enums import RepositoryOpenFlag

from deployd import errors

FULL_SHA = re.compile(r"[0-9a-f]{40}")
SHORT_SHA = re.compile(r"[0-9a-fA-F]{4,39}")
OPEN_FLAGS = RepositoryOpenFlag.NO_SEARCH | RepositoryOpenFlag.BARE
"""How deployd opens a repository: bare, at exactly the path given (no search upwards)."""

GitObject = pygit2.Object | pygit2.Commit | pygit2.Tree | pygit2.Tag | pygit2.Blob
_Peeled = TypeVar("_Peeled", pygit2.Commit, pygit2.Tree)


def app_commit(app: str, repo: pygit2.Repository, revision: str) -> pygit2.Commit:
    """`commit`, with the app named in the `errors.NotFound` message."""
    try:
        return commit(repo, revision)
    except errors.NotFound as exc:
        raise errors.NotFound(f"{app}: {exc}") from None


def commit(repo: pygit2.Repository, revision: str) -> pygit2.Commit:
    """The commit a revision names; `errors.NotFound` otherwise."""
    return _peel(repo, revision, pygit2.Commit, "is not a commit")


def tree(repo: pygit2.Repository, revision: str) -> pygit2.Tree:
    """The tree a revision (commit, tag or tree sha) names; `errors.NotFound` otherwise."""
    return _peel(repo, revision, pygit2.Tree, "has no tree")


def empty_tree(repo: pygit2.Repository) -> pygit2.Tree:
    """The tree with no entries (written to the object store when missing)."""
    found = repo[repo.TreeBuilder().write()]
    assert isinstance(found, pygit2.Tree)
    return found


def resolve_strict(app: str, repo: pygit2.Repository, revision: str) -> str:
    """The full sha of the commit `revision` names, by the rules of `Mirror.resolve_strict`
    (a hex name is a commit id, never a ref; a ref name must not be ambiguous). `app` is
    named in the errors."""
    lowered = revision.lower()
    if FULL_SHA.fullmatch(lowered) or SHORT_SHA.fullmatch(revision):
        return _by_prefix(app, repo, lowered)
    names = [revision] if revision.startswith("refs/") else \
        [f"refs/heads/{revision}", f"refs/tags/{revision}"]
    found: dict[str, str] = {}
    for name in names:
        target = reference_target(repo, name)
        if target is not None:
            found[name] = str(commit(repo, str(target.id)).id)
    if not found:
        raise errors.NotFound(f"{app}: no commit, branch or tag {revision!r}")
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name} ({sha[:12]})" for name, sha in found.items())
        raise errors.Invalid(f"{app}: {revision!r} is ambiguous: {listed}; "
                             "name the ref in full")
    return next(iter(found.values()))


def summary(found: pygit2.Commit) -> str:
    """The first line of a commit's message."""
    return found.message.split("\n", 1)[0].strip()


def peel_commit(found: GitObject) -> pygit2.Commit | None:
    """The commit an object is or (as a tag) points at, else None."""
    try:
        peeled = found.peel(pygit2.Commit)
    except (pygit2.GitError, ValueError):
        return None
    return peeled if isinstance(peeled, pygit2.Commit) else None


def reference_target(repo: pygit2.Repository, name: str) -> GitObject | None:
    """The object the ref `name` ends at (tags peeled), or None when there is no such ref."""
    if not pygit2.reference_is_valid_name(name):
        return None
    ref = repo.references.get(name)
    return None if ref is None else ref.peel()


def _by_prefix(app: str, repo: pygit2.Repository, prefix: str) -> str:
    """The one commit whose sha starts with `prefix` (tags peeled), or an error."""
    try:
        found = repo.get(prefix)
    except pygit2.AmbiguousError:
        found = None
        matches = sorted({str(peeled.id) for oid in repo.odb
                          if str(oid).startswith(prefix)
                          and (peeled := peel_commit(repo[oid])) is not None})
        if len(matches) == 1:
            return matches[0]
        if matches:
            listed = ", ".join(f"{sha[:12]} ({summary(commit(repo, sha))})"
                               for sha in matches[:10])
            raise errors.Invalid(
                f"{app}: {prefix!r} is ambiguous: {len(matches)} commits start "
                f"with it: {listed}; give more digits") from None
    peeled = None if found is None else peel_commit(found)
    if peeled is None:
        raise errors.NotFound(
            f"{app}: no commit {prefix!r} (hex names are commit ids; a branch or "
            f"tag named so is refs/heads/{prefix} or refs/tags/{prefix})")
    return str(peeled.id)


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


def _lookup(repo: pygit2.Repository, revision: str) -> GitObject | None:
    """A full sha, a unique short sha or a ref name (full, branch or tag), or None.

    A short sha wins over a branch or tag named like it.
    """
    if FULL_SHA.fullmatch(revision):
        return repo.get(revision)
    if SHORT_SHA.fullmatch(revision):
        try:
            by_sha = repo.get(revision.lower())
        except pygit2.AmbiguousError as exc:
            raise errors.NotFound(f"revision {revision!r} is ambiguous") from exc
        if by_sha is not None:
            return by_sha
    for name in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
        if name.startswith("refs/") and (found := reference_target(repo, name)) is not None:
            return found
    return None
