"""What a commit may put in a release, end to end: real daemon, real origin, real sshd hosts.

A hostile commit (built object by object, as a client that pushes whatever it likes would)
must be refused before anything reaches a host, with a deploy error naming the path; a big
release must fit the app's limits; one archive serves every host.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.daemonfixtures import RunningDaemon
from tests.support.daemonlab import APP, WorldFactory, app_dir, releases
from tests.support.gitrepo import OriginRepo
from tests.support.sshd import SshdHost

FILE, EXEC, DIR, LINK = b"100644", b"100755", b"40000", b"120000"


def tree_on(host: SshdHost) -> dict[str, tuple[str, int]]:
    """Everything under the host's home (not only deploy_to: `..` would climb out of it)."""
    found = {}
    for root, dirs, files in os.walk(host.home):
        for name in dirs + files:
            path = Path(root, name)
            stat = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[str(path.relative_to(host.home))] = (kind, stat.st_size)
    return found


def hostile(origin: OriginRepo, entries: list[tuple[bytes, bytes, str]], message: str) -> str:
    """A commit on the branch whose tree is index.html plus exactly `entries`."""
    index = (FILE, b"index.html", origin.blob(b"v1\n"))
    return origin.commit_tree(origin.raw_tree(sorted([index, *entries], key=lambda e: e[1])),
                              message)


async def refused(daemon: RunningDaemon, n: int) -> str:
    """The message of the n-th deploy.failed event."""
    return str((await daemon.wait_for_event(APP, "deploy.failed", count=n))["message"])


async def test_hostile_trees_are_refused_before_any_host_sees_them(
        daemon_lab: WorldFactory) -> None:
    """`..`, `.GIT`, `git~1`, a symlink and a directory of one name (a write through the
    link), an unknown mode, and releases over max_release_files or max_release_size: each
    pushed head fails its deploy naming the path (or the limit); no host gets a byte of it,
    the live release stays."""
    world = daemon_lab(hosts=2, settings={"max_release_files": 20,
                                          "max_release_size": "64KiB"})
    origin = world.origin
    origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    live = (await daemon.wait_for_event(APP, "deploy.succeeded"))["data"]["release"]
    before = {host.port: tree_on(host) for host in world.hosts}

    passwd = origin.raw_tree([(FILE, b"passwd", origin.blob(b"root::0:0::/:/bin/sh\n"))])
    hook = origin.raw_tree([(EXEC, b"post-checkout", origin.blob(b"#!/bin/sh\nid\n"))])
    cases = [
        ([(DIR, b"..", passwd)], "at path '..'"),
        ([(DIR, b".GIT", origin.raw_tree([(DIR, b"hooks", hook)]))], "at path '.GIT'"),
        ([(DIR, b"git~1", passwd)], "at path 'git~1'"),
        ([(LINK, b"etc", origin.blob(b"/etc")), (DIR, b"etc", passwd)],
         "at path 'etc': duplicate entry"),
        ([(b"100600", b"secret", origin.blob(b"x"))], "at path 'secret': unsupported mode"),
        ([(FILE, f"f{i:02d}".encode(), origin.blob(b"x")) for i in range(25)],
         "more than 20 entries (max_release_files)"),
        ([(FILE, b"big", origin.blob(os.urandom(70_000)))],
         "more than 65536 bytes of files (max_release_size)"),
    ]
    for n, (entries, expected) in enumerate(cases, start=1):
        sha = hostile(origin, entries, f"hostile {n}")
        message = await refused(daemon, n)
        assert sha[:12] in message and expected in message, message
    for host in world.hosts:
        assert tree_on(host) == before[host.port]
        assert releases(host) == [live]
        assert not (app_dir(host) / ".deployd.lock").exists()

    # The REST path is the same: a hostile revision asked for by hand is refused too.
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         json_body={"revision": origin.head()})
    assert status == 202, body
    assert "max_release_size" in await refused(daemon, len(cases) + 1)
    assert all(tree_on(host) == before[host.port] for host in world.hosts)


async def test_one_archive_per_revision_for_every_host(daemon_lab: WorldFactory) -> None:
    """A deploy to three hosts builds the revision's archive once; deploying the same
    revision again reuses it from the cache."""
    world = daemon_lab(hosts=3)
    first = world.origin.commit({"index.html": "v1\n", "big.bin": os.urandom(3 << 20)}, "one")
    daemon = await world.start()
    await daemon.wait_for_event(APP, "deploy.succeeded")
    mirror = daemon.daemon.supervisors[APP].mirror
    assert mirror.archives_built == 1
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         json_body={"revision": first})
    assert status == 202, body
    event = await daemon.wait_for_event(APP, "deploy.succeeded", count=2)
    assert mirror.archives_built == 1
    for host in world.hosts:
        release = app_dir(host) / "releases" / event["data"]["release"]
        assert (release / "big.bin").read_bytes() == world.origin.read_file(first, "big.bin")
