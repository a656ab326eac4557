"""The git mirror against real bare repositories, local and served by a real sshd."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import os
import shutil
import socket
import tarfile
import threading
import time
import zlib
from base64 import b64encode
from collections.abc import Callable, Iterator
from pathlib import Path

import pygit2
import pytest

from deployd import errors
from deployd.archive import Archive, Limits
from deployd.git import (
    MAX_BINARY_BYTES,
    CherryPickResult,
    GitHome,
    Lease,
    Mirror,
    RefUpdate,
    check_patch_sizes,
)
from tests.support.githttp import GitHttpServer
from tests.support.gitrepo import OriginRepo, write_raw_tree
from tests.support.sshd import ClientKey, SshdHost, chown_tree, shared_dir, write_known_hosts


@pytest.fixture
def origin(tmp_path: Path) -> OriginRepo:
    repo = OriginRepo(tmp_path / "origin.git")
    repo.commit({"README": "hello\n"}, "Initial commit")
    return repo


@pytest.fixture
def mirror(tmp_path: Path, origin: OriginRepo) -> Mirror:
    return Mirror(tmp_path / "mirrors" / "shop.git", origin.url, name="shop")


@pytest.fixture
def ssh_origin() -> Iterator[OriginRepo]:
    """An origin repo the sshd test user owns (re-owned after every write)."""
    directory = shared_dir("deployd-git-")
    repo = OriginRepo(directory / "origin.git", on_change=chown_tree)
    repo.commit({"README": "hello\n"}, "Initial commit")
    yield repo
    shutil.rmtree(directory, ignore_errors=True)


def ssh_url(host: SshdHost, repo: OriginRepo) -> str:
    return f"ssh://{host.user}@{host.address}:{host.port}{repo.path}"


@pytest.fixture
def ssh_mirror(
    tmp_path: Path, sshd_host: SshdHost, ssh_origin: OriginRepo, client_key: ClientKey
) -> Mirror:
    return Mirror(
        tmp_path / "ssh-mirror.git",
        ssh_url(sshd_host, ssh_origin),
        name="shop",
        home=GitHome(tmp_path / "git-home"),
        key=client_key.private,
        known_hosts=write_known_hosts(tmp_path / "known_hosts", [sshd_host]),
    )


async def tar_of(archive: Archive) -> bytes:
    """The whole tar of an archive, as every host receives it."""
    return b"".join([chunk async for chunk in archive.chunks(size=4096)])


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {member.name: member for member in archive.getmembers()}


def tar_file(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        extracted = archive.extractfile(name)
        assert extracted is not None
        return extracted.read()


# --------------------------------------------------------------------------- fetching


async def test_fetch_creates_mirror_and_reads_branch_head(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """The first fetch creates a bare mirror whose branch heads equal the origin's."""
    await mirror.fetch()
    assert (mirror.path / "objects").is_dir()
    assert pygit2.Repository(str(mirror.path)).is_bare
    assert await mirror.branch_head("production") == origin.head()
    assert await mirror.branch_head("nope") is None


async def test_reading_before_first_fetch_is_a_git_error(mirror: Mirror) -> None:
    """Reading a mirror that was never fetched raises GitError, not a pygit2 error."""
    with pytest.raises(errors.GitError, match="not fetched yet"):
        await mirror.branch_head("production")


async def test_next_fetch_sees_new_commits_and_branches(mirror: Mirror, origin: OriginRepo) -> None:
    """A commit (and a new branch) pushed after the first fetch shows up on the next one."""
    await mirror.fetch()
    new = origin.commit({"app.txt": "v2\n"}, "Second")
    origin.commit({"x": "1"}, "Feature", branch="feature")
    await mirror.fetch()
    assert await mirror.branch_head("production") == new
    assert await mirror.branch_head("feature") == origin.head("feature")


async def test_force_push_and_deleted_branch_are_mirrored(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A non-fast-forward branch move is picked up, and a deleted branch is pruned."""
    first = origin.head()
    origin.commit({"bad.txt": "bad\n"}, "Bad")
    origin.commit({"x": "1"}, "Feature", branch="feature")
    await mirror.fetch()
    origin.set_branch("production", first)
    origin.repo.references.delete("refs/heads/feature")
    await mirror.fetch()
    assert await mirror.branch_head("production") == first
    assert await mirror.branch_head("feature") is None


async def test_fetch_keeps_deployd_local_refs(mirror: Mirror, origin: OriginRepo) -> None:
    """Refs under refs/deployd/ survive fetches (prune only touches heads and tags)."""
    await mirror.fetch()
    await mirror.create_ref("refs/deployd/backup/one", origin.head())
    await mirror.fetch()
    assert await mirror.list_refs("refs/deployd/") == {"refs/deployd/backup/one": origin.head()}


async def test_file_url_and_a_changed_url_are_followed(
    tmp_path: Path, mirror: Mirror, origin: OriginRepo
) -> None:
    """A file:// remote works, and a mirror reopened with a new URL fetches from it."""
    await mirror.fetch()
    moved = OriginRepo(tmp_path / "moved.git")
    sha = moved.commit({"m": "1"}, "Elsewhere")
    again = Mirror(mirror.path, f"file://{moved.path}", name="shop")
    await again.fetch()
    assert await again.branch_head("production") == sha


async def test_fetch_from_missing_remote_is_a_git_error(tmp_path: Path) -> None:
    """A remote that does not exist gives a GitError naming the app."""
    mirror = Mirror(tmp_path / "m.git", str(tmp_path / "nowhere.git"), name="shop")
    with pytest.raises(errors.GitError, match="shop: fetch"):
        await mirror.fetch()


async def test_password_never_appears_in_errors(tmp_path: Path) -> None:
    """An HTTPS URL's password is replaced by *** in the URL shown and in error messages."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"https://deploy:s3cret@127.0.0.1:{port}/shop.git"
    mirror = Mirror(tmp_path / "m.git", url, name="shop", timeout=2)
    assert mirror.url == f"https://deploy:***@127.0.0.1:{port}/shop.git"
    with pytest.raises(errors.GitError) as caught:
        await mirror.fetch()
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in str(caught.value.__cause__)
    assert "deploy:***@" in str(caught.value)


def binary_hunk(content: bytes) -> bytes:
    """`content` deflated and written as git writes a binary hunk's lines (no header)."""
    data = zlib.compress(content)
    lines = []
    for offset in range(0, len(data), 52):
        chunk = data[offset:offset + 52]
        letter = chr(ord("A") + len(chunk) - 1) if len(chunk) <= 26 else \
            chr(ord("a") + len(chunk) - 27)
        lines.append(letter.encode() + base64.b85encode(chunk, pad=True))
    return b"\n".join(lines) + b"\n\n"


def test_declared_binary_sizes_are_read_without_trusting_them() -> None:
    """A size with thousands of digits is refused without building the number; leading
    zeros do not hide a size; small declarations pass."""
    head = b"diff --git a/logo.bin b/logo.bin\nGIT binary patch\n"
    check_patch_sizes(head + b"literal 0000000000000000000012\n" + binary_hunk(b"x" * 12))
    for size in (b"9" * 5000, b"0" * 30 + b"9" * 9, str(MAX_BINARY_BYTES + 1).encode()):
        with pytest.raises(errors.Invalid, match=r"logo\.bin"):
            check_patch_sizes(head + b"literal " + size + b"\r\nxyz\n")


def test_a_binary_hunk_inflating_past_its_declared_size_is_refused() -> None:
    """A small patch declaring 100 bytes whose data inflates to 1 MiB (libgit2 would inflate
    it whole before comparing) is refused unread by libgit2; broken data is refused too."""
    head = b"diff --git a/logo.bin b/logo.bin\nGIT binary patch\nliteral 100\n"
    bomb = binary_hunk(b"\0" * (1 << 20))
    assert len(bomb) < 2000
    with pytest.raises(errors.Invalid, match=r"logo\.bin holds more data than the 100 bytes"):
        check_patch_sizes(head + bomb)
    check_patch_sizes(head + binary_hunk(b"\0" * 100))
    with pytest.raises(errors.Invalid, match="not valid"):
        check_patch_sizes(head + b"zzzz\n\n")


async def test_a_percent_encoded_repo_password_is_decoded(
    tmp_path: Path, origin: OriginRepo
) -> None:
    """A password with URL-special characters is written percent-encoded in the URL, as it
    must be; the server is given the password itself."""
    server = GitHttpServer(origin.path.parent, "deploy", "p@ss:w/rd%")
    await server.start()
    try:
        url = server.url(origin.path.name, "deploy:p%40ss%3Aw%2Frd%25@")
        mirror = Mirror(tmp_path / "m.git", url, name="shop", timeout=5)
        await mirror.fetch()
        assert await mirror.branch_head("production") == origin.head("production")
    finally:
        await server.stop()


def files_holding(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


async def test_a_repo_password_reaches_the_server_but_never_the_mirror_files(
    tmp_path: Path, origin: OriginRepo, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP(S) URL's password is given through the credentials callback: the fetch works,
    the mirror's config (and every file of the mirror) holds the URL without it, a mirror
    written by an older deployd with the password is cleaned, and no log line holds it."""
    caplog.set_level("DEBUG")
    server = GitHttpServer(origin.path.parent, "deploy", "s3cret")
    await server.start()
    try:
        url = server.url(origin.path.name, "deploy:s3cret@")
        old = tmp_path / "old.git"
        pygit2.init_repository(str(old), bare=True).remotes.create("origin", url)
        assert files_holding(old, b"s3cret")
        for path in (tmp_path / "m.git", old):
            mirror = Mirror(path, url, name="shop", timeout=5)
            await mirror.fetch()
            assert await mirror.branch_head("production") == origin.head()
            assert files_holding(path, b"s3cret") == []
            config = (path / "config").read_text()
            assert server.url(origin.path.name) in config
        assert server.seen_authorization  # the password did reach the server
        assert "s3cret" not in caplog.text
    finally:
        await server.stop()


# --------------------------------------------------------------------------- reading


async def test_resolve_sha_short_sha_branch_tag_and_unknown(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """resolve() accepts full/short shas, branches and tags; unknown names raise NotFound."""
    sha = origin.head()
    origin.repo.references.create("refs/tags/v1", pygit2.Oid(hex=sha))
    await mirror.fetch()
    for revision in (sha, sha[:7], sha[:7].upper(), "production", "v1", "refs/heads/production"):
        assert await mirror.resolve(revision) == sha
    for unknown in ("nope", "0000000", "0" * 40, "HEAD~1", ""):
        with pytest.raises(errors.NotFound, match="shop"):
            await mirror.resolve(unknown)


async def test_a_short_sha_wins_over_a_branch_named_like_it(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """resolve() and resolve_strict() read hex as a commit id before any ref of that name;
    resolve_strict() then refuses the ref unless named in full."""
    sha = origin.head()
    decoy = origin.commit({"a": "decoy"}, "decoy", branch=sha[:8])
    origin.set_branch("twin", decoy)
    origin.repo.references.create("refs/tags/twin", pygit2.Oid(hex=sha))
    await mirror.fetch()
    assert await mirror.resolve(sha[:8]) == sha
    assert await mirror.resolve_strict(sha[:8]) == sha
    assert await mirror.resolve_strict(f"refs/heads/{sha[:8]}") == decoy
    assert await mirror.resolve_strict("refs/tags/twin") == sha
    with pytest.raises(errors.Invalid, match="ambiguous"):
        await mirror.resolve_strict("twin")
    with pytest.raises(errors.NotFound, match="refs/heads/deadbeef"):
        await mirror.resolve_strict("deadbeef")
    assert await mirror.resolve_strict("production") == sha
    assert await mirror.resolve_strict(sha.upper()) == sha


async def test_commit_info_fields(mirror: Mirror, origin: OriginRepo) -> None:
    """commit_info() gives author identity, author time, parents, summary and tree."""
    parent = origin.head()
    sha = origin.commit(
        {"a": "1"}, "Fix the thing\n\nLonger text.\n", author=("Bo Dev", "bo@example.com")
    )
    await mirror.fetch()
    info = await mirror.commit_info(sha[:10])
    assert info.sha == sha
    assert (info.summary, info.author_name, info.author_email) == (
        "Fix the thing",
        "Bo Dev",
        "bo@example.com",
    )
    assert info.parents == (parent,)
    assert info.message == "Fix the thing\n\nLonger text.\n"
    assert abs(info.time - time.time()) < 60
    assert info.tree == str(origin.repo[sha].peel(pygit2.Commit).tree_id)


async def test_is_ancestor(mirror: Mirror, origin: OriginRepo) -> None:
    """is_ancestor() is true along history and for the commit itself, false otherwise."""
    first = origin.head()
    second = origin.commit({"a": "1"}, "Second")
    other = origin.commit({"b": "1"}, "Side", branch="side", parents=[first])
    await mirror.fetch()
    assert await mirror.is_ancestor(first, second)
    assert await mirror.is_ancestor(second, second)
    assert not await mirror.is_ancestor(second, first)
    assert not await mirror.is_ancestor(other, second)


async def test_commits_between_oldest_first_without_merges(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """commits_between() lists head-only commits oldest first and leaves merges out."""
    base = origin.head()
    one = origin.commit({"a": "1"}, "One")
    side = origin.commit({"s": "1"}, "Side", branch="side", parents=[base])
    two = origin.commit({"a": "2"}, "Two")
    merge = origin.commit({"s": "1"}, "Merge side", parents=[two, side])
    three = origin.commit({"a": "3"}, "Three")
    await mirror.fetch()
    shas = [info.sha for info in await mirror.commits_between(base, three)]
    assert merge not in shas
    assert sorted(shas) == sorted([one, side, two, three])
    assert shas.index(one) < shas.index(two) < shas.index(three)
    assert shas[-1] == three
    assert await mirror.commits_between(three, three) == []


# --------------------------------------------------------------------------- archives


async def test_archive_keeps_modes_symlinks_dirs_and_survives_gitlinks(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """archive(): 0644/0755 files, symlinks, nested dirs, a gitlink as an empty directory."""
    sha = origin.commit(
        {"bin/run": "#!/bin/sh\necho hi\n", "app/deep/x.txt": b"\x00binary", "a-b": "dash"},
        "Layout",
        executable={"bin/run"},
        symlinks={"current-config": "app/deep/x.txt"},
        gitlinks={"vendor/lib": "1" * 40},
    )
    await mirror.fetch()
    data = await tar_of(await mirror.archive("production"))
    members = tar_members(data)
    names = list(members)
    assert names == sorted(names)
    assert members["bin/run"].mode == 0o755 and members["bin/run"].isfile()
    assert members["README"].mode == 0o644
    assert members["app/deep/x.txt"].mode == 0o644
    assert members["app"].isdir() and members["app/deep"].isdir()
    assert members["current-config"].issym()
    assert members["current-config"].linkname == "app/deep/x.txt"
    assert members["vendor/lib"].isdir()
    assert not [name for name in names if name.startswith("vendor/lib/")]
    commit_time = origin.repo[sha].peel(pygit2.Commit).commit_time
    assert {(m.mtime, m.uid, m.gid) for m in members.values()} == {(commit_time, 0, 0)}
    assert tar_file(data, "app/deep/x.txt") == b"\x00binary"
    assert tar_file(data, "bin/run") == b"#!/bin/sh\necho hi\n"


async def test_archive_is_deterministic_and_cached(
    tmp_path: Path, mirror: Mirror, origin: OriginRepo
) -> None:
    """The same commit gives the same bytes, from the cache, and from a fresh mirror too."""
    sha = origin.head()
    await mirror.fetch()
    first = await mirror.archive(sha)
    assert await mirror.archive("production") is first
    assert mirror.archives_built == 1
    fresh = Mirror(tmp_path / "other.git", origin.url, name="shop", archive_cache=0)
    await fresh.fetch()
    again = await fresh.archive(sha)
    assert again is not first and await tar_of(again) == await tar_of(first)
    assert await fresh.archive(sha) is not again and fresh.archives_built == 2


async def test_archive_of_5000_files(mirror: Mirror, origin: OriginRepo) -> None:
    """A 5,000-file tree archives in well under the budget (measured: ~0.3 s here)."""
    origin.commit(
        {f"dir{i % 50}/sub{i % 7}/file{i}.txt": f"line {i}\n" * 20 for i in range(5000)},
        "Big tree",
    )
    await mirror.fetch()
    started = time.perf_counter()
    data = await tar_of(await mirror.archive("production"))
    elapsed = time.perf_counter() - started
    print(f"archive of 5,000 files: {elapsed:.2f} s, {len(data)} bytes")
    assert sum(1 for m in tar_members(data).values() if m.isfile()) == 5001
    assert elapsed < 5


# --------------------------------------------------------------------------- hostile trees

FILE, DIR = b"100644", b"40000"


def hostile_commit(origin: OriginRepo, entries: list[tuple[bytes, bytes, str]]) -> str:
    """A commit whose tree holds README plus, under app/, exactly `entries`."""
    inner = origin.raw_tree(entries)
    readme = origin.blob(b"hello\n")
    return origin.commit_tree(origin.raw_tree([(FILE, b"README", readme), (DIR, b"app", inner)]),
                              "hostile")


@pytest.mark.parametrize(("name", "shown"), [
    (b"..", ".."), (b".", "."), (b"etc/passwd", "etc/passwd"),
    (b".git", ".git"), (b".GIT", ".GIT"), (b".Git", ".Git"), (b"git~1", "git~1"),
    (b"GIT~1", "GIT~1"), (b".git.", ".git."), (b".git  ", ".git  "),
    (b".git::$INDEX_ALLOCATION", ".git::$INDEX_ALLOCATION"), (b"x\\.git", "x\\.git"),
    (".g\u200cit".encode(), ".g\\u200cit"), ("\ufeff.GIT".encode(), "\\ufeff.GIT"),
])
async def test_archive_refuses_names_git_fsck_refuses(
    mirror: Mirror, origin: OriginRepo, name: bytes, shown: str
) -> None:
    """`..`, `.`, empty, names with `/`, and `.git` in any spelling git refuses (case, NTFS
    short names and streams, HFS+ ignored code points) refuse the commit, naming the path."""
    sha = hostile_commit(origin, [(FILE, name, origin.blob(b"evil\n"))])
    await mirror.fetch()
    with pytest.raises(errors.ReleaseRefused) as caught:
        await mirror.archive(sha)
    assert caught.value.path == f"app/{shown}"
    assert f"at path 'app/{shown}'" in str(caught.value)
    assert mirror.archives_built == 0


async def test_archive_refuses_a_git_directory_holding_hooks(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A `.GIT` directory (case folded to .git on macOS hosts and on Windows) is refused."""
    hooks = origin.raw_tree([(b"100755", b"post-checkout", origin.blob(b"#!/bin/sh\nid\n"))])
    sha = hostile_commit(origin, [(DIR, b".GIT", origin.raw_tree([(DIR, b"hooks", hooks)]))])
    await mirror.fetch()
    with pytest.raises(errors.ReleaseRefused, match=r"at path 'app/\.GIT'"):
        await mirror.archive(sha)


@pytest.mark.parametrize("second", [FILE, DIR, b"120000"])
async def test_archive_refuses_duplicate_names(
    mirror: Mirror, origin: OriginRepo, second: bytes
) -> None:
    """Two entries of one name (a file twice, a file and a directory, a file and a symlink
    through which the other would be written) refuse the commit."""
    blob = origin.blob(b"x")
    other = origin.raw_tree([(FILE, b"x", blob)]) if second == DIR else blob
    sha = hostile_commit(origin, [(FILE, b"a", blob), (second, b"a", other)])
    await mirror.fetch()
    with pytest.raises(errors.ReleaseRefused, match="at path 'app/a': duplicate entry"):
        await mirror.archive(sha)


@pytest.mark.parametrize("mode", [b"100600", b"100777", b"040000", b"0100644", b"140000",
                                  b"160755", b"1"])
async def test_archive_refuses_modes_other_than_git_writes(
    mirror: Mirror, origin: OriginRepo, mode: bytes
) -> None:
    """Only tree, file, executable, symlink and submodule modes (and git's legacy 100664)."""
    target = origin.raw_tree([]) if mode.startswith(b"04") else origin.blob(b"x")
    sha = hostile_commit(origin, [(mode, b"f", target)])
    await mirror.fetch()
    with pytest.raises(errors.ReleaseRefused,
                       match=f"at path 'app/f': unsupported mode {mode.decode()}"):
        await mirror.archive(sha)


@pytest.mark.parametrize(("mode", "name", "kind", "message"), [
    (FILE, b"", "blob", "at path 'app/': empty name"),
    (FILE, b"a\0b", "blob", "at path 'app': malformed tree: truncated entry"),
    (FILE, b"f", "tree", "at path 'app/f': .* is not a blob"),
    (DIR, b"d", "blob", "at path 'app/d': malformed tree: .* is not a tree"),
    (DIR, b"d", "missing", "at path 'app/d': malformed tree: object .* is missing"),
    (FILE, b"f", "missing", "at path 'app/f': object .* is missing"),
])
async def test_archive_refuses_trees_no_git_would_send(
    mirror: Mirror, origin: OriginRepo, mode: bytes, name: bytes, kind: str, message: str
) -> None:
    """An empty name, a NUL inside a name (which ends it early, so the rest of the tree does
    not parse), a file entry naming a tree, a directory entry naming a blob and an entry
    whose object is missing are refused.
    Neither git nor libgit2 packs such trees, so the objects are written straight into the
    mirror, as a transport that does not look would."""
    await mirror.fetch()
    repo = pygit2.Repository(str(mirror.path))
    blob = str(repo.create_blob(b"x"))
    targets = {"blob": blob, "tree": write_raw_tree(repo, [(FILE, b"x", blob)]),
               "missing": "ab" * 20}
    target = targets[kind]
    inner = write_raw_tree(repo, [(mode, name, target)])
    top = write_raw_tree(repo, [(DIR, b"app", inner)])
    signature = pygit2.Signature("Eve", "eve@example.com")
    sha = str(repo.create_commit(None, signature, signature, "planted", pygit2.Oid(hex=top), []))
    with pytest.raises(errors.ReleaseRefused, match=message):
        await mirror.archive(sha)


async def test_archive_accepts_names_git_accepts(mirror: Mirror, origin: OriginRepo) -> None:
    """Names that only look like the refused ones are fine: .gitignore, .github, ...,
    git~2, a.git, and git's legacy group-writable mode 100664 as a 0644 file."""
    blob = origin.blob(b"x")
    names = [b"...", b"..a", b".gitignore", b".github", b".gitmodules", b"a.git", b"git~2",
             b"\xff raw bytes"]
    sha = hostile_commit(origin, [(FILE, name, blob) for name in sorted(names)]
                         + [(b"100664", b"z-legacy", blob)])
    await mirror.fetch()
    members = tar_members(await tar_of(await mirror.archive(sha)))
    assert {f"app/{os.fsdecode(name)}" for name in names} < set(members)
    assert members["app/z-legacy"].mode == 0o644


async def test_archive_limits_entries_and_bytes(mirror: Mirror, origin: OriginRepo) -> None:
    """More entries or more bytes of files than the limits allow refuse the commit, naming
    the config key; a tree that reuses one subtree 200 times is refused without walking it
    all; a cached archive is checked against the limits of each call."""
    sha = origin.commit({f"f{i}": "12345" for i in range(10)}, "ten files")
    await mirror.fetch()
    with pytest.raises(errors.ReleaseRefused, match=r"more than 10 entries \(max_release_files\)"):
        await mirror.archive(sha, Limits(max_files=10))
    with pytest.raises(errors.ReleaseRefused, match=r"more than 49 bytes .*max_release_size"):
        await mirror.archive(sha, Limits(max_bytes=49))
    archive = await mirror.archive(sha, Limits(max_files=11, max_bytes=56))
    assert (archive.files, archive.content_bytes) == (11, 56)
    with pytest.raises(errors.ReleaseRefused, match="max_release_files"):
        await mirror.archive(sha, Limits(max_files=10))

    leaf = origin.raw_tree([(FILE, f"f{i:03d}".encode(), origin.blob(b"x")) for i in range(200)])
    bomb = origin.raw_tree([(DIR, f"d{i:03d}".encode(), leaf) for i in range(200)])
    for _ in range(3):
        bomb = origin.raw_tree([(DIR, f"d{i:03d}".encode(), bomb) for i in range(200)])
    bombed = origin.commit_tree(bomb, "1.6e9 entries")
    await mirror.fetch()
    started = time.perf_counter()
    with pytest.raises(errors.ReleaseRefused, match="more than 200000 entries"):
        await mirror.archive(bombed)
    assert time.perf_counter() - started < 10


async def test_archive_of_a_deep_tree(mirror: Mirror, origin: OriginRepo) -> None:
    """A tree nested 1,500 levels deep is walked without recursion (no RecursionError)."""
    tree = origin.raw_tree([(FILE, b"leaf", origin.blob(b"deep"))])
    for _ in range(1500):
        tree = origin.raw_tree([(DIR, b"d", tree)])
    sha = origin.commit_tree(tree, "deep")
    await mirror.fetch()
    archive = await mirror.archive(sha)
    assert archive.files == 1501
    assert tar_file(await tar_of(archive), "d/" * 1500 + "leaf") == b"deep"


async def test_archive_lives_in_an_unlinked_private_file_and_cache_is_bounded_by_bytes(
    tmp_path: Path, origin: OriginRepo
) -> None:
    """The tar is in a 0600 file with no name (nothing left on disk); the cache keeps as
    many archives as fit in its byte bound and builds again what it dropped."""
    mirror = Mirror(tmp_path / "m.git", origin.url, name="shop", archive_cache=300_000)
    one = origin.commit({"blob": os.urandom(120_000)}, "one")
    two = origin.commit({"blob": os.urandom(120_000)}, "two")
    three = origin.commit({"blob": os.urandom(120_000)}, "three")
    await mirror.fetch()
    before = set(os.listdir(mirror.path))
    first = await mirror.archive(one)
    stat = os.fstat(first._fd)
    assert (stat.st_mode & 0o777, stat.st_nlink) == (0o600, 0)
    assert set(os.listdir(mirror.path)) == before
    assert first.size > 120_000
    await mirror.archive(two)
    assert await mirror.archive(one) is first and mirror.archives_built == 2
    await mirror.archive(three)  # 3 x ~121 kB > 300 kB: the least recently used (two) goes
    assert mirror.archives_built == 3
    assert await mirror.archive(one) is first
    await mirror.archive(two)
    assert mirror.archives_built == 4
    big = Mirror(tmp_path / "m2.git", origin.url, name="shop", archive_cache=100_000)
    await big.fetch()
    assert await big.archive(one) is not await big.archive(one)  # larger than the cache


# --------------------------------------------------------------------------- SSH


async def test_ssh_fetch_with_known_host_key(ssh_mirror: Mirror, ssh_origin: OriginRepo) -> None:
    """Over SSH, a host key listed as [host]:port in known_hosts lets the fetch through."""
    await ssh_mirror.fetch()
    assert await ssh_mirror.branch_head("production") == ssh_origin.head()


async def test_ssh_hashed_known_hosts_entry_is_accepted(
    tmp_path: Path, sshd_host: SshdHost, ssh_origin: OriginRepo, client_key: ClientKey
) -> None:
    """A hashed known_hosts entry (as ssh-keygen -H writes it) is honoured like a plain one."""
    salt = os.urandom(20)
    name = f"[{sshd_host.address}]:{sshd_host.port}".encode()
    digest = hmac.new(salt, name, hashlib.sha1).digest()
    hashed = f"|1|{b64encode(salt).decode()}|{b64encode(digest).decode()}"
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{hashed} {sshd_host.host_key_line}\n")
    mirror = Mirror(
        tmp_path / "m.git",
        ssh_url(sshd_host, ssh_origin),
        name="shop",
        home=GitHome(tmp_path / "home"),
        key=client_key.private,
        known_hosts=known_hosts,
    )
    await mirror.fetch()
    assert await mirror.branch_head("production") == ssh_origin.head()


async def test_ssh_unknown_host_key_is_refused(
    tmp_path: Path, sshd_host: SshdHost, ssh_origin: OriginRepo, client_key: ClientKey
) -> None:
    """A host missing from known_hosts is refused with HostKeyError saying "unknown"."""
    other = tmp_path / "known_hosts"
    other.write_text("[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample0000000000000000\n")
    mirror = Mirror(
        tmp_path / "m.git",
        ssh_url(sshd_host, ssh_origin),
        name="shop",
        home=GitHome(tmp_path / "home"),
        key=client_key.private,
        known_hosts=other,
    )
    with pytest.raises(errors.HostKeyError, match=rf"\[127.0.0.1\]:{sshd_host.port} is unknown"):
        await mirror.fetch()


async def test_ssh_changed_host_key_is_refused(
    tmp_path: Path,
    sshd_factory: Callable[[], SshdHost],
    ssh_origin: OriginRepo,
    client_key: ClientKey,
) -> None:
    """known_hosts holding another key for host:port is refused with HostKeyError "changed"."""
    host, impostor = sshd_factory(), sshd_factory()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{host.address}]:{host.port} {impostor.host_key_line}\n")
    mirror = Mirror(
        tmp_path / "m.git",
        ssh_url(host, ssh_origin),
        name="shop",
        home=GitHome(tmp_path / "home"),
        key=client_key.private,
        known_hosts=known_hosts,
    )
    with pytest.raises(errors.HostKeyError, match="changed"):
        await mirror.fetch()


async def test_ssh_without_known_hosts_is_refused(
    tmp_path: Path, sshd_host: SshdHost, ssh_origin: OriginRepo, client_key: ClientKey
) -> None:
    """An ssh:// remote with no known_hosts configured is refused before connecting."""
    mirror = Mirror(
        tmp_path / "m.git",
        ssh_url(sshd_host, ssh_origin),
        name="shop",
        home=GitHome(tmp_path / "home"),
        key=client_key.private,
    )
    with pytest.raises(errors.GitError, match="no known_hosts"):
        await mirror.fetch()


@pytest.mark.parametrize(
    "url", ["git@git.example.com:acme/shop.git", "ssh://git.example.com/acme/shop.git"]
)
async def test_ssh_urls_without_known_hosts_are_refused(tmp_path: Path, url: str) -> None:
    """scp-like and ssh:// URLs both count as SSH and need known_hosts."""
    mirror = Mirror(tmp_path / "m.git", url, name="shop", key=tmp_path / "key")
    with pytest.raises(errors.GitError, match="no known_hosts"):
        await mirror.fetch()


async def test_each_mirror_is_checked_against_its_own_known_hosts(
    tmp_path: Path,
    sshd_factory: Callable[[], SshdHost],
    ssh_origin: OriginRepo,
    client_key: ClientKey,
) -> None:
    """Mirrors sharing one GitHome use only their own known_hosts, even fetching at once."""
    home = GitHome(tmp_path / "home")
    hosts = [sshd_factory(), sshd_factory()]

    def make(index: int, host: SshdHost, trusted: SshdHost) -> Mirror:
        known_hosts = write_known_hosts(tmp_path / f"kh{index}", [trusted])
        return Mirror(
            tmp_path / f"m{index}.git",
            ssh_url(host, ssh_origin),
            name=f"app{index}",
            home=home,
            key=client_key.private,
            known_hosts=known_hosts,
        )

    good = [make(0, hosts[0], hosts[0]), make(1, hosts[1], hosts[1])]
    wrong = make(2, hosts[0], hosts[1])
    results = await asyncio.gather(
        *(m.fetch() for m in good * 3), wrong.fetch(), return_exceptions=True
    )
    assert results[:-1] == [None] * 6
    assert isinstance(results[-1], errors.HostKeyError)


async def test_ssh_server_that_never_answers_times_out(
    tmp_path: Path, client_key: ClientKey
) -> None:
    """A server that accepts but never speaks fails after the timeout, not never."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text("")
        mirror = Mirror(
            tmp_path / "m.git",
            f"ssh://git@127.0.0.1:{port}/shop.git",
            name="shop",
            home=GitHome(tmp_path / "home"),
            key=client_key.private,
            known_hosts=known_hosts,
            timeout=0.5,
        )
        started = time.monotonic()
        with pytest.raises(errors.GitError, match="shop: fetch"):
            await mirror.fetch()
        assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- pushing


async def rescue_commit(mirror: Mirror, origin: OriginRepo) -> tuple[str, str]:
    """Origin gets base -> bad -> fix; returns (bad head, fix cherry-picked onto base)."""
    base = origin.head()
    origin.commit({"bad.txt": "bad\n"}, "Bad")
    fix = origin.commit({"fix.txt": "fix\n"}, "Fix")
    await mirror.fetch()
    result = await mirror.cherry_pick(
        base, [fix], committer_name="deployd", committer_email="deployd@localhost"
    )
    return fix, result.head


async def test_push_with_lease_succeeds_when_remote_unchanged(
    ssh_mirror: Mirror, ssh_origin: OriginRepo
) -> None:
    """A forced push under a holding lease moves the remote branch (and the mirror's copy)."""
    head, new = await rescue_commit(ssh_mirror, ssh_origin)
    await ssh_mirror.create_ref("refs/deployd/backup/1", head)
    await ssh_mirror.push(
        [
            RefUpdate("refs/deployd/backup/1", "refs/heads/deployd/backup/1", expected=None),
            RefUpdate(new, "refs/heads/production", expected=head),
        ]
    )
    assert ssh_origin.head() == new
    assert ssh_origin.head("deployd/backup/1") == head
    assert await ssh_mirror.branch_head("production") == new


async def test_push_lease_lost_when_someone_else_pushed(
    ssh_mirror: Mirror, ssh_origin: OriginRepo
) -> None:
    """A push whose lease no longer holds is PushRejected and the other push stays."""
    head, new = await rescue_commit(ssh_mirror, ssh_origin)
    theirs = ssh_origin.commit({"theirs.txt": "1\n"}, "Someone else's push")
    with pytest.raises(errors.PushRejected, match="remote moved") as caught:
        await ssh_mirror.push([RefUpdate(new, "refs/heads/production", expected=head)])
    assert caught.value.ref == "refs/heads/production"
    assert f"expected {head}, found {theirs}" in caught.value.reason
    assert ssh_origin.head() == theirs


async def test_push_lease_holds_against_a_push_racing_the_upload(
    ssh_mirror: Mirror, ssh_origin: OriginRepo
) -> None:
    """A ref moved after the lease check but before the update is refused by the server."""
    head, new = await rescue_commit(ssh_mirror, ssh_origin)
    theirs = ssh_origin.commit({"theirs.txt": "1\n"}, "Racing push", branch="racer")
    hook = ssh_origin.path / "hooks" / "pre-receive"
    # Runs after the lease check, before the update: moves the branch like a concurrent push.
    hook.write_text(
        f"#!/bin/sh\nunset GIT_QUARANTINE_PATH\ngit update-ref refs/heads/production {theirs}\n"
    )
    hook.chmod(0o755)
    chown_tree(ssh_origin.path)
    with pytest.raises(errors.PushRejected) as caught:
        await ssh_mirror.push([RefUpdate(new, "refs/heads/production", expected=head)])
    assert "cannot lock ref" in caught.value.reason
    assert caught.value.ref == "refs/heads/production"
    assert ssh_origin.head() == theirs


async def test_push_must_not_exist_lease(mirror: Mirror, origin: OriginRepo) -> None:
    """expected=None pushes a new ref once; a second push to that name is PushRejected."""
    await mirror.fetch()
    first = origin.head()
    second = origin.commit({"a": "1"}, "Second")
    await mirror.fetch()
    await mirror.push([RefUpdate(first, "refs/heads/deployd/backup/x", expected=None)])
    with pytest.raises(errors.PushRejected, match="expected no ref"):
        await mirror.push([RefUpdate(second, "refs/heads/deployd/backup/x", expected=None)])
    await mirror.push([RefUpdate(second, "refs/heads/deployd/backup/x", expected=Lease.ANY)])
    assert origin.head("deployd/backup/x") == second


async def test_push_refused_by_server_hook(ssh_mirror: Mirror, ssh_origin: OriginRepo) -> None:
    """A pre-receive hook's refusal (which pygit2 does not raise) becomes PushRejected."""
    head, new = await rescue_commit(ssh_mirror, ssh_origin)
    hook = ssh_origin.path / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'branch frozen by ops' >&2\nexit 1\n")
    hook.chmod(0o755)
    chown_tree(ssh_origin.path)
    with pytest.raises(errors.PushRejected, match="pre-receive hook declined") as caught:
        await ssh_mirror.push([RefUpdate(new, "refs/heads/production", expected=head)])
    assert "branch frozen by ops" in caught.value.reason
    assert ssh_origin.head() == head


async def test_push_of_unknown_source_is_not_found(mirror: Mirror) -> None:
    """Pushing a sha or local ref the mirror does not have raises NotFound."""
    await mirror.fetch()
    with pytest.raises(errors.NotFound):
        await mirror.push([RefUpdate("1" * 40, "refs/heads/production")])
    with pytest.raises(errors.NotFound):
        await mirror.push([RefUpdate("refs/deployd/none", "refs/heads/production")])


async def test_create_ref_is_idempotent_but_never_moves(mirror: Mirror, origin: OriginRepo) -> None:
    """create_ref() accepts the same target again and raises Conflict for another one."""
    first = origin.head()
    second = origin.commit({"a": "1"}, "Second")
    await mirror.fetch()
    await mirror.create_ref("refs/deployd/backup/a", first)
    await mirror.create_ref("refs/deployd/backup/a", first)
    with pytest.raises(errors.Conflict):
        await mirror.create_ref("refs/deployd/backup/a", second)
    with pytest.raises(errors.Invalid):
        await mirror.create_ref("deployd/backup/b", first)


# --------------------------------------------------------------------------- cherry-pick


def tree_files(repo: pygit2.Repository, sha: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}

    def walk(tree: pygit2.Tree, prefix: str) -> None:
        for entry in tree:
            obj = repo[entry.id]
            if isinstance(obj, pygit2.Tree):
                walk(obj, f"{prefix}{entry.name}/")
            else:
                assert isinstance(obj, pygit2.Blob)
                files[f"{prefix}{entry.name}"] = obj.data

    obj = repo[sha]
    walk(obj if isinstance(obj, pygit2.Tree) else obj.peel(pygit2.Tree), "")
    return files


async def test_cherry_pick_clean_keeps_author_and_adds_trailers(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A clean pick: base + only P's change, P's author, -x line and trailers, no ref moved."""
    base = origin.commit({"app.txt": "1\n2\n3\n4\n5\n6\n7\n8\n9\n"}, "Base")
    origin.commit({"app.txt": "1\n2\n3\n4\n5\n6\n7\n8\nBAD\n", "bad.txt": "x"}, "Bad")
    fix = origin.commit(
        {"app.txt": "FIX\n2\n3\n4\n5\n6\n7\n8\nBAD\n"},
        "Fix login\n\nRescue: yes\n",
        author=("Fay Fixer", "fay@example.com"),
    )
    await mirror.fetch()
    before = await mirror.list_refs()
    result = await mirror.cherry_pick(
        base,
        [fix],
        committer_name="deployd",
        committer_email="deployd@example.com",
        trailers=[("Rescue-Job", "7"), ("Approved-by", "alice")],
    )
    assert result.clean and result.conflict is None and result.skipped == ()
    assert result.picked == ((fix, result.head),)
    info = await mirror.commit_info(result.head)
    assert (info.author_name, info.author_email) == ("Fay Fixer", "fay@example.com")
    assert info.time == (await mirror.commit_info(fix)).time
    assert info.parents == (base,)
    assert info.message == (
        "Fix login\n\nRescue: yes\n"
        f"(cherry picked from commit {fix})\nRescue-Job: 7\nApproved-by: alice\n"
    )
    repo = pygit2.Repository(str(mirror.path))
    assert repo[result.head].peel(pygit2.Commit).committer.name == "deployd"
    assert tree_files(repo, result.head) == {
        "README": b"hello\n",
        "app.txt": b"FIX\n2\n3\n4\n5\n6\n7\n8\n9\n",
    }
    assert result.tree == info.tree
    assert await mirror.list_refs() == before


async def test_cherry_pick_message_without_trailer_block(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A message without trailers gets the -x line as a new paragraph."""
    base = origin.head()
    fix = origin.commit({"f": "1"}, "Just a subject")
    await mirror.fetch()
    result = await mirror.cherry_pick(
        base, [fix], committer_name="d", committer_email="d@x", trailers=[("Job", "1")]
    )
    info = await mirror.commit_info(result.head)
    assert info.message == f"Just a subject\n\n(cherry picked from commit {fix})\nJob: 1\n"


async def test_cherry_pick_conflict_reports_commit_and_paths(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A conflicting commit stops the run: it and its paths are named, nothing is made for it."""
    base = origin.commit({"app.txt": "one\n", "lib.txt": "a\n"}, "Base")
    origin.commit({"app.txt": "two\n", "lib.txt": "b\n"}, "Bad")
    fix = origin.commit({"app.txt": "three\n", "lib.txt": "c\n"}, "Fix")
    other = origin.commit({"new.txt": "n\n"}, "Clean")
    await mirror.fetch()
    result = await mirror.cherry_pick(base, [other, fix], committer_name="d", committer_email="d@x")
    assert isinstance(result, CherryPickResult)
    assert not result.clean
    assert result.conflict == fix
    assert result.conflict_paths == ("app.txt", "lib.txt")
    assert [original for original, _ in result.picked] == [other]
    assert result.head == result.picked[0][1]


@pytest.mark.parametrize("onto_base", [True, False])
async def test_cherry_pick_tree_is_exactly_the_merge(
    mirror: Mirror, origin: OriginRepo, onto_base: bool
) -> None:
    """The picked tree is byte for byte what the merge index holds (only the directories it
    touches are rebuilt): edits, new nested directories, a directory emptied, a file that
    becomes a directory and back, a symlink that becomes a file, an exec bit, a gitlink."""
    gitlink = "1" * 40
    base = origin.commit({"keep/a.txt": "a\n", "keep/b.txt": "b\n", "gone/only.txt": "x\n",
                          "flip": "file\n", "dir2file/x.txt": "x\n", "run.sh": "echo\n"},
                         "Base", symlinks={"link": "keep/a.txt"})
    if not onto_base:  # ours differs from the pick's parent elsewhere
        base = origin.commit({"keep/b.txt": "b2\n", "other/o.txt": "o\n"}, "Elsewhere",
                             parents=[base], branch="other")
    pick = origin.commit({"keep/a.txt": "a2\n", "gone/only.txt": None, "flip": None,
                          "flip/inner.txt": "in\n", "dir2file/x.txt": None,
                          "dir2file": "now a file\n", "link": "plain\n",
                          "run.sh": "echo 2\n", "new/deep/er/file.txt": "deep\n"},
                         "Everything", executable={"run.sh"}, gitlinks={"vendor/lib": gitlink})
    await mirror.fetch()
    result = await mirror.cherry_pick(base, [pick], committer_name="d", committer_email="d@x")
    assert result.clean
    repo = pygit2.Repository(str(mirror.path))
    picked = repo[pick].peel(pygit2.Commit)
    ancestor, ours, theirs = picked.parents[0].tree, repo[base].peel(pygit2.Tree), picked.tree
    assert result.tree == str(repo.merge_trees(ancestor, ours, theirs).write_tree(repo))
    if onto_base:
        assert result.tree == str(theirs.id)


async def test_cherry_pick_skips_change_already_in_base(mirror: Mirror, origin: OriginRepo) -> None:
    """A commit whose change the base already has is skipped, not committed empty."""
    fix = origin.commit({"f": "fixed\n"}, "Fix")
    await mirror.fetch()
    result = await mirror.cherry_pick(fix, [fix], committer_name="d", committer_email="d@x")
    assert result.clean and result.skipped == (fix,) and result.head == fix


async def test_cherry_pick_refuses_merges_and_bad_trailers(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """Merge commits and malformed trailer names raise Invalid."""
    base = origin.head()
    side = origin.commit({"s": "1"}, "Side", branch="side")
    main = origin.commit({"m": "1"}, "Main")
    merge = origin.commit({"s": "1"}, "Merge", parents=[main, side])
    await mirror.fetch()
    with pytest.raises(errors.Invalid, match="merge"):
        await mirror.cherry_pick(base, [merge], committer_name="d", committer_email="d@x")
    with pytest.raises(errors.Invalid, match="trailer"):
        await mirror.cherry_pick(
            base, [main], committer_name="d", committer_email="d@x", trailers=[("A B", "x")]
        )


# --------------------------------------------------------------------------- diff and apply


async def test_diff_then_apply_patch_round_trips(mirror: Mirror, origin: OriginRepo) -> None:
    """apply_patch(base, diff(base, P)) gives P's tree, binary files and deletions included."""
    base = origin.commit({"a.txt": "1\n2\n3\n", "gone.txt": "x\n", "d/k": "k\n"}, "Base")
    new = origin.commit(
        {"a.txt": "1\nTWO\n3\n", "gone.txt": None, "bin.dat": bytes(range(256)), "d/k2": "\xe9"},
        "Change",
    )
    await mirror.fetch()
    patch = await mirror.diff(base, new)
    assert "-2\n+TWO" in patch and "GIT binary patch" in patch
    tree = await mirror.apply_patch(base, patch)
    assert tree == (await mirror.commit_info(new)).tree
    assert await mirror.diff(new, new) == ""
    assert os_listdir_clean(mirror.path)


def os_listdir_clean(path: Path) -> bool:
    """No scratch directory or index file is left in the mirror."""
    return not [
        p.name for p in path.iterdir() if p.name.startswith("deployd-") or p.name == "index"
    ]


async def test_apply_patch_rejects_garbage_and_moved_context(
    mirror: Mirror, origin: OriginRepo
) -> None:
    """A text that is no patch, or whose hunks do not match, raises Invalid naming the file."""
    base = origin.commit({"a.txt": "1\n2\n3\n4\n5\n6\n", "b.txt": "b\n"}, "Base")
    new = origin.commit({"a.txt": "1\n2\nTHREE\n4\n5\n6\n", "b.txt": "B\n"}, "Change")
    moved = origin.commit(
        {"a.txt": "0\n0\n1\n2\n3\n4\n5\n6\n"}, "Moved", branch="moved", parents=[base]
    )
    await mirror.fetch()
    with pytest.raises(errors.Invalid, match="not a patch"):
        await mirror.apply_patch(base, "this is not a diff\n")
    patch = await mirror.diff(base, new)
    with pytest.raises(errors.Invalid, match=r"does not apply.*a\.txt") as caught:
        await mirror.apply_patch(moved, patch)
    assert "b.txt" not in str(caught.value)
    assert os_listdir_clean(mirror.path)


# --------------------------------------------------------------------------- concurrency


async def test_calls_on_one_mirror_never_overlap(mirror: Mirror, origin: OriginRepo) -> None:
    """Many concurrent calls on one mirror run one at a time in worker threads."""
    await mirror.fetch()
    active: list[int] = []
    peak = 0
    guard = threading.Lock()
    original = mirror._commit

    def tracking(revision: str) -> pygit2.Commit:
        nonlocal peak
        with guard:
            active.append(1)
            peak = max(peak, len(active))
        time.sleep(0.005)
        with guard:
            active.pop()
        return original(revision)

    mirror._commit = tracking  # type: ignore[method-assign]
    await asyncio.gather(*(mirror.resolve("production") for _ in range(20)))
    assert peak == 1
