"""The Capistrano layout on one host, over real SSH (and once locally)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployd.config import AppConfig, Hooks, HostConfig
from deployd.errors import CommandError, LockHeld, ReleaseError, RemoteError
from deployd.hosts import Gate, Host, HostPool, LocalHost, SSHHost
from deployd.releases import LockInfo, Releases, _check_name, is_release_name
from tests.support.hostfixtures import (
    Lab,
    command_lines_holding,
    make_tarball,
    processes_matching,
    sha,
)
from tests.support.sshd import TEST_USER, shared_dir
from tests.support.waiting import wait_until

R1, R2, R3 = "20240101000001", "20240101000002", "20240101000003"
TARBALL = make_tarball({"index.html": "hello", "log/ignored.txt": "x", "bin/run": "#!/bin/sh\n"},
                       symlinks={"link": "index.html"}, executable=("bin/run",))


@pytest.fixture
def lab(lab_factory: Callable[[int], Lab]) -> Lab:
    return lab_factory(1)


def on_host(lab: Lab, pool: HostPool, **app_settings: object) -> tuple[Releases, Host, Path]:
    """Releases for the lab's one host, the host, and its deploy_to as a local path."""
    app = lab.app(**app_settings)  # type: ignore[arg-type]
    host = pool.host(app, app.hosts[0])
    return Releases(host, app), host, Path(app.hosts[0].deploy_to)


async def deploy(releases: Releases, name: str, revision: str, *, actor: str = "alice",
                 tarball: bytes = TARBALL) -> None:
    """prepare + switch + prune/unlock, as a one-host deploy."""
    lock = LockInfo.new(actor, f"deploy {revision}")
    await releases.prepare(name, revision, tarball, branch="production", lock=lock)
    await releases.switch(name, revision=revision, branch="production", actor=actor, lock=lock)
    await releases.prune(5, unlock=lock)


async def test_prepare_and_switch_lay_out_capistranos_layout(lab: Lab, pool: HostPool) -> None:
    """Releases dir, absolute current, REVISION, REVISION_TIME, revisions.log wording and
    linked dirs/files as absolute symlinks into shared."""
    releases, host, root = on_host(lab, pool, linked_dirs=("log", "tmp/pids"),
                                   linked_files=("config/database.yml",))
    await host.run(f"mkdir -p {root}/shared/config && echo db > {root}/shared/config/database.yml",
                   timeout=10)
    lock = LockInfo.new("alice", "deploy")
    step = await releases.prepare(R1, sha(1), TARBALL, branch="production", lock=lock,
                                  revision_time=1700000000)
    assert step.previous is None
    assert not (root / "current").exists()
    await releases.switch(R1, revision=sha(1), branch="production", actor="alice", lock=lock)
    await releases.prune(5, unlock=lock)

    release = root / "releases" / R1
    assert os.readlink(root / "current") == str(release)
    assert (release / "REVISION").read_text() == sha(1) + "\n"
    assert (release / "REVISION_TIME").read_text() == "1700000000\n"
    assert (release / "index.html").read_text() == "hello"
    assert os.readlink(release / "link") == "index.html"
    assert os.access(release / "bin/run", os.X_OK)
    assert os.readlink(release / "log") == str(root / "shared/log")
    assert (root / "shared/log").is_dir()
    assert os.readlink(release / "tmp/pids") == str(root / "shared/tmp/pids")
    assert os.readlink(release / "config/database.yml") == str(root / "shared/config/database.yml")
    assert (root / "revisions.log").read_text() == (
        f"Branch production (at {sha(1)}) deployed as release {R1} by alice\n")
    assert not (root / ".deployd.lock").exists()


async def test_build_hook_runs_in_the_release_with_deployd_variables(
        lab: Lab, pool: HostPool) -> None:
    """The build hook runs inside the new release and sees every DEPLOYD_* variable."""
    app = lab.app(hooks=Hooks(build="pwd > cwd.txt; env | grep '^DEPLOYD_' | sort > env.txt"))
    config = HostConfig(address=app.hosts[0].address, port=app.hosts[0].port,
                        deploy_to=app.hosts[0].deploy_to,
                        vars={"health_port": "8080", "role": "web 1"})
    app = lab.app(hooks=app.hooks, hosts=[config])
    releases = Releases(pool.host(app, config), app)
    await releases.prepare(R1, sha(1), TARBALL, branch="production",
                           lock=LockInfo.new("alice", "deploy"))
    release = Path(config.deploy_to) / "releases" / R1
    assert (release / "cwd.txt").read_text().strip() == str(release)
    env = dict(line.split("=", 1) for line in (release / "env.txt").read_text().splitlines())
    assert env == {
        "DEPLOYD_APP": "shop", "DEPLOYD_REVISION": sha(1), "DEPLOYD_RELEASE_PATH": str(release),
        "DEPLOYD_DEPLOY_TO": config.deploy_to, "DEPLOYD_HOST": config.name,
        "DEPLOYD_VAR_HEALTH_PORT": "8080", "DEPLOYD_VAR_ROLE": "web 1",
    }


async def test_missing_linked_file_is_an_error_naming_it(lab: Lab, pool: HostPool) -> None:
    """A linked file absent from shared/ fails the prepare by name; nothing is left behind."""
    releases, _, root = on_host(lab, pool, linked_files=("config/secrets.yml",))
    with pytest.raises(ReleaseError, match=r"linked file .*shared/config/secrets.yml"):
        await releases.prepare(R1, sha(1), TARBALL, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert list((root / "releases").iterdir()) == []
    assert not (root / ".deployd.lock").exists()


def listing(top: Path) -> dict[str, str]:
    """Every entry under `top` (not following symlinks): file content, "dir" or "-> target"."""
    found: dict[str, str] = {}
    for path in sorted(top.rglob("*")):
        name = str(path.relative_to(top))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = path.read_text()
    return found


@pytest.mark.parametrize(("linked", "path"), [
    ({"linked_dirs": ("public/uploads",)}, "public/uploads"),
    ({"linked_files": ("public/config/database.yml",)}, "public/config/database.yml"),
    ({"linked_dirs": ("public/a/b",)}, "public/a/b"),
], ids=["dir", "file", "deeper-dir"])
async def test_symlink_in_the_release_along_a_linked_path_is_refused(
        lab: Lab, pool: HostPool, linked: dict[str, tuple[str, ...]], path: str) -> None:
    """A commit holding `public -> /elsewhere` cannot make the prepare delete, replace or
    create anything there: the prepare fails naming the path; nothing outside is touched."""
    releases, host, root = on_host(lab, pool, **linked)
    outside = root.parent / "outside"
    await host.run(
        f"mkdir -p {root}/shared/public/config {outside}/uploads {outside}/config"
        f" && echo keep > {outside}/uploads/keep.txt && echo prod > {outside}/config/database.yml"
        f" && echo db > {root}/shared/public/config/database.yml", timeout=10)
    before = listing(outside)
    tarball = make_tarball({"index.html": "hello"}, symlinks={"public": str(outside)})
    with pytest.raises(ReleaseError, match=rf"linked path {path}: .*public .*symlink"):
        await releases.prepare(R1, sha(1), tarball, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert listing(outside) == before
    assert list((root / "releases").iterdir()) == []
    assert not (root / ".deployd.lock").exists()


async def test_symlink_into_the_release_along_a_linked_path_is_refused_too(
        lab: Lab, pool: HostPool) -> None:
    """Any symlinked directory on a linked path is refused, even one staying inside."""
    releases, _, root = on_host(lab, pool, linked_dirs=("public/uploads",))
    tarball = make_tarball({"assets/uploads/a.txt": "a"}, symlinks={"public": "assets"})
    with pytest.raises(ReleaseError, match=r"linked path public/uploads: .*symlink"):
        await releases.prepare(R1, sha(1), tarball, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert list((root / "releases").iterdir()) == []


async def test_nested_linked_dirs_replace_what_the_release_holds(
        lab: Lab, pool: HostPool) -> None:
    """A nested linked dir replaces the release's own directory (or symlink, which is removed,
    not followed) at that path, keeps its siblings and makes missing parents."""
    releases, host, root = on_host(lab, pool, linked_dirs=(
        "public/uploads", "public/cache", "vendor/bundle/gems"),
        linked_files=("config/app/settings.yml",))
    outside = root.parent / "outside"
    await host.run(f"mkdir -p {outside}/cache {root}/shared/config/app && echo kept >"
                   f" {outside}/cache/c.txt && echo s > {root}/shared/config/app/settings.yml",
                   timeout=10)
    tarball = make_tarball({"public/index.html": "hi", "public/uploads/old.txt": "old"},
                           symlinks={"public/cache": str(outside / "cache")})
    await deploy(releases, R1, sha(1), tarball=tarball)
    release = root / "releases" / R1
    assert (release / "public/index.html").read_text() == "hi"
    for path in ("public/uploads", "public/cache", "vendor/bundle/gems",
                 "config/app/settings.yml"):
        assert os.readlink(release / path) == str(root / "shared" / path)
    assert (root / "shared/public/uploads").is_dir()
    assert not (root / "shared/public/uploads/old.txt").exists()
    assert (root / "shared/vendor/bundle/gems").is_dir()
    assert listing(outside) == {"cache": "dir", "cache/c.txt": "kept\n"}


async def test_linked_dirs_in_shared_are_not_made_outside_it(lab: Lab, pool: HostPool) -> None:
    """An operator's symlink in shared/ is used as it is when the linked dir exists behind
    it; a missing one is not made through it, and nothing outside shared/ changes."""
    releases, host, root = on_host(lab, pool, linked_dirs=("public/uploads",))
    outside = root.parent / "nfs"
    await host.run(f"mkdir -p {root}/shared {outside}/uploads && echo kept > "
                   f"{outside}/uploads/u.txt && ln -s {outside} {root}/shared/public", timeout=10)
    await deploy(releases, R1, sha(1))
    release = root / "releases" / R1
    assert os.readlink(release / "public/uploads") == str(root / "shared/public/uploads")
    assert (release / "public/uploads/u.txt").read_text() == "kept\n"

    await host.run(f"rm -rf {outside}/uploads", timeout=10)
    with pytest.raises(ReleaseError, match=r"linked dir public/uploads: .*shared/public "
                                           r"resolves outside"):
        await releases.prepare(R2, sha(2), TARBALL, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert list(outside.iterdir()) == []
    assert not (root / "releases" / R2).exists()
    assert not (root / ".deployd.lock").exists()


async def test_failing_build_hook_removes_the_release_and_the_lock(
        lab: Lab, pool: HostPool) -> None:
    """A build hook exiting non-zero is a CommandError; the half release and lock are gone."""
    releases, _, root = on_host(lab, pool, hooks=Hooks(build="echo compiling; exit 3"))
    with pytest.raises(CommandError) as caught:
        await releases.prepare(R1, sha(1), TARBALL, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert caught.value.exit_status == 3 and "build hook" in str(caught.value)
    assert "compiling" in caught.value.stderr
    assert not (root / "releases" / R1).exists()
    assert not (root / ".deployd.lock").exists()


async def test_build_hook_timeout_stops_it(lab: Lab, pool: HostPool) -> None:
    """A build hook past hook_timeout is stopped; CommandError(None), nothing left behind."""
    releases, _, root = on_host(lab, pool, hooks=Hooks(build="sleep 30"), hook_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(CommandError) as caught:
        await releases.prepare(R1, sha(1), TARBALL, branch="production",
                               lock=LockInfo.new("alice", "deploy"))
    assert caught.value.exit_status is None and time.monotonic() - began < 5
    assert not (root / "releases" / R1).exists()


async def test_rollback_keeps_the_release_rolled_away_from_with_a_marker(
        lab: Lab, pool: HostPool) -> None:
    """Rollback switches current, marks (not deletes) the left release, logs Capistrano's
    line and runs the rollback hook, then restart, in current."""
    hooks = Hooks(rollback="echo \"rollback $DEPLOYD_REVISION $(pwd -P)\" >> ../../hooks.log",
                  restart="echo \"restart $DEPLOYD_RELEASE_PATH\" >> ../../hooks.log")
    releases, _, root = on_host(lab, pool, hooks=hooks)
    await deploy(releases, R1, sha(1))
    await deploy(releases, R2, sha(2))
    (root / "hooks.log").unlink()
    step = await releases.rollback(R1, reason="health checks failed", actor="bob",
                                   revision=sha(1))
    assert step.previous == R2
    assert os.readlink(root / "current") == str(root / "releases" / R1)
    assert (root / "releases" / R2 / "index.html").exists()
    marker = dict(line.split("=", 1) for line in
                  (root / "releases" / R2 / "ROLLED_BACK").read_text().splitlines())
    assert marker["by"] == "bob" and marker["reason"] == "health checks failed"
    assert marker["to_release"] == R1 and marker["to_revision"] == sha(1)
    assert marker["rolled_back_at"].endswith("Z") and int(marker["rolled_back_epoch"]) > 0
    left = root / "releases" / R2
    assert left.stat().st_mtime == (left / "REVISION").stat().st_mtime  # Capistrano's ls -xt
    assert (root / "revisions.log").read_text().splitlines()[-1] == (
        "bob rolled back to release " + R1)
    assert (root / "hooks.log").read_text().splitlines() == [
        f"rollback {sha(1)} {root / 'releases' / R1}", f"restart {root / 'releases' / R1}"]
    assert not (root / ".deployd.lock").exists()


async def test_rollback_to_a_missing_release_changes_nothing(lab: Lab, pool: HostPool) -> None:
    """Rolling back to a release that is not there fails before touching current."""
    releases, _, root = on_host(lab, pool)
    await deploy(releases, R1, sha(1))
    with pytest.raises(ReleaseError, match=f"release {R2} does not exist"):
        await releases.rollback(R2, reason="test", actor="bob")
    assert os.readlink(root / "current") == str(root / "releases" / R1)
    assert not (root / ".deployd.lock").exists()


async def test_switch_replaces_current_without_a_gap(lab: Lab, pool: HostPool) -> None:
    """current is renamed over, never removed then relinked: a reader always finds it."""
    releases, _, root = on_host(lab, pool)
    await deploy(releases, R1, sha(1))
    await deploy(releases, R2, sha(2))
    missing: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not os.path.lexists(root / "current"):
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for target in (R1, R2) * 5:
            await releases.rollback(target, reason="flip", actor="bob")
    finally:
        stop.set()
        watcher.join()
    assert missing == []


async def test_prune_rules(lab: Lab, pool: HostPool) -> None:
    """Prune keeps the newest keep_releases, never current, never a protected release,
    never a name that is not 14 digits."""
    releases, host, root = on_host(lab, pool)
    names = [f"2024010100000{i}" for i in range(1, 8)]
    await host.run(
        f"mkdir -p {root} && cd {root} && mkdir -p releases/hotfix "
        + " ".join(f"releases/{name}" for name in names)
        + f" && ln -s {root}/releases/{names[1]} current", timeout=10)
    removed = await releases.prune(2, protect={names[0]})
    assert sorted(removed) == names[2:5]
    left = sorted(p.name for p in (root / "releases").iterdir())
    assert left == sorted([names[0], names[1], names[5], names[6], "hotfix"])


async def test_lock_held_by_someone_else_names_the_holder(lab: Lab, pool: HostPool) -> None:
    """A second deploy while the first holds the lock raises LockHeld naming the holder."""
    releases, _, root = on_host(lab, pool)
    first = LockInfo.new("alice", f"deploy {sha(1)}")
    await releases.prepare(R1, sha(1), TARBALL, branch="production", lock=first)
    with pytest.raises(LockHeld, match="alice") as caught:
        await releases.prepare(R2, sha(2), TARBALL, branch="production",
                               lock=LockInfo.new("bob", f"deploy {sha(2)}"))
    assert f"deploy {sha(1)}" in caught.value.holder
    with pytest.raises(LockHeld, match="alice"):
        await releases.rollback(R1, reason="test", actor="bob")
    state = await releases.state()
    assert state.lock is not None and state.lock.actor == "alice"
    assert state.lock.token == first.token
    assert not (root / "releases" / R2).exists()
    await releases.unlock(first)
    assert (await releases.state()).lock is None


async def test_stale_lock_is_taken_over(lab: Lab, pool: HostPool,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A lock older than lock_stale_after is taken over, and the takeover is reported."""
    releases, host, root = on_host(lab, pool, lock_stale_after=60.0)
    old = LockInfo(token="oldtoken", actor="carol", reason="deploy abc", since=time.time() - 120,
                   machine="elsewhere", pid=1)
    await host.run(f"mkdir -p {root} && printf '%s' '{old.content()}' > {root}/.deployd.lock",
                   timeout=10)
    lock = LockInfo.new("alice", "deploy")
    step = await releases.prepare(R1, sha(1), TARBALL, branch="production", lock=lock)
    assert step.took_over is not None and step.took_over.actor == "carol"
    assert "carol" in caplog.text and "stale" in caplog.text
    state = await releases.state()
    assert state.lock is not None and state.lock.token == lock.token


async def test_unreadable_lock_is_never_taken_over(lab: Lab, pool: HostPool) -> None:
    """A lock file deployd cannot read (another tool's) blocks deploys until removed."""
    releases, host, root = on_host(lab, pool, lock_stale_after=1.0)
    await host.run(f"mkdir -p {root} && echo 'held by ops' > {root}/.deployd.lock", timeout=10)
    with pytest.raises(LockHeld):
        await releases.prepare(R1, sha(1), TARBALL, branch="production",
                               lock=LockInfo.new("alice", "deploy"))


async def test_state_reads_a_release_laid_out_by_capistrano(lab: Lab, pool: HostPool) -> None:
    """A layout made the way Capistrano makes it (absolute current, 14-digit names,
    REVISION with a newline, a release without REVISION) reads correctly."""
    releases, host, root = on_host(lab, pool)
    script = f"""
        set -e
        mkdir -p {root}/releases/20230101120000 {root}/releases/20230102120000 {root}/shared
        echo {sha(7)} > {root}/releases/20230101120000/REVISION
        echo {sha(8)} > {root}/releases/20230102120000/REVISION
        mkdir -p {root}/releases/20230103120000
        ln -s {root}/releases/20230102120000 {root}/releases/current
        mv {root}/releases/current {root}
        echo 'Branch main (at {sha(8)}) deployed as release 20230102120000 by deploy' \
            >> {root}/revisions.log
    """
    await host.run(script, timeout=10)
    state = await releases.state()
    assert state.current == "20230102120000"
    assert state.current_revision == sha(8)
    assert [(r.name, r.revision) for r in state.releases] == [
        ("20230101120000", sha(7)), ("20230102120000", sha(8)), ("20230103120000", None)]
    assert state.lock is None and state.newest == "20230103120000"


async def test_state_of_an_empty_host(lab: Lab, pool: HostPool) -> None:
    """A host without deploy_to has no current, no releases and no lock."""
    releases, _, _ = on_host(lab, pool)
    state = await releases.state()
    assert (state.current, state.current_revision, state.releases, state.lock) == (
        None, None, (), None)


async def test_revert_undoes_a_switch_and_remove_spares_current(
        lab: Lab, pool: HostPool) -> None:
    """revert() points current back at the previous release; remove_release refuses the
    live release and removes a dropped one."""
    releases, _, root = on_host(lab, pool)
    await deploy(releases, R1, sha(1))
    lock = LockInfo.new("alice", "deploy")
    await releases.prepare(R2, sha(2), TARBALL, branch="production", lock=lock)
    await releases.switch(R2, revision=sha(2), branch="production", actor="alice", lock=lock)
    step = await releases.revert(R1, actor="deployd", lock=lock)
    assert step.previous == R2
    assert os.readlink(root / "current") == str(root / "releases" / R1)
    with pytest.raises(ReleaseError, match="live"):
        await releases.remove_release(R1)
    assert await releases.remove_release(R2, unlock=lock)
    assert sorted(p.name for p in (root / "releases").iterdir()) == [R1]
    assert not (root / ".deployd.lock").exists()


async def test_local_host_lays_out_the_same_release(tmp_path: Path) -> None:
    """The local transport runs the same scripts: deploy, rollback, state."""
    config = HostConfig(address="local", deploy_to=str(tmp_path / "app"))
    app = AppConfig(name="shop", repo="/nonexistent", branch="main", deploy_to=config.deploy_to,
                    hosts=(config,), linked_dirs=("log",))
    releases = Releases(LocalHost(config), app)
    await deploy(releases, R1, sha(1))
    await deploy(releases, R2, sha(2))
    await releases.rollback(R1, reason="test", actor="bob")
    state = await releases.state()
    assert (state.current, state.current_revision) == (R1, sha(1))
    assert os.readlink(tmp_path / "app/current") == str(tmp_path / "app/releases" / R1)
    assert (tmp_path / "app/releases" / R2 / "ROLLED_BACK").exists()


async def test_files_deployd_writes_are_never_written_through_a_commits_symlinks(
        lab: Lab, pool: HostPool) -> None:
    """A commit holding REVISION or ROLLED_BACK as symlinks cannot make deployd write there."""
    releases, host, root = on_host(lab, pool)
    outside = root.parent / "outside"
    await host.run(f"mkdir -p {outside} && echo precious > {outside}/file", timeout=10)
    tarball = make_tarball({"index.html": "hi"}, symlinks={
        "REVISION": str(outside / "file"), "REVISION_TIME": str(outside / "file"),
        "ROLLED_BACK": str(outside / "file")})
    await deploy(releases, R1, sha(1), tarball=tarball)
    await deploy(releases, R2, sha(2))
    await releases.rollback(R2, from_release=R1, reason="test", actor="alice")
    assert (outside / "file").read_text() == "precious\n"
    release = root / "releases" / R1
    assert not (release / "REVISION").is_symlink()
    assert (release / "REVISION").read_text() == sha(1) + "\n"
    assert not (release / "ROLLED_BACK").is_symlink()


def test_names_with_a_trailing_newline_are_refused() -> None:
    """Release and path names are matched whole: `$` alone would let "NAME\\n" through."""
    assert is_release_name("20240101120000")
    assert not is_release_name("20240101120000\n")
    with pytest.raises(ReleaseError):
        _check_name("shared\n")


async def test_no_secret_reaches_a_command_line_on_the_host(lab: Lab, pool: HostPool) -> None:
    """While a hook runs, no process on the host shows a host var, the hook's text, the lock
    token or the lock's content (actor, reason) in its command line (/proc/*/cmdline is
    readable by every user on the host)."""
    password = f"pw-{os.urandom(8).hex()}"
    hook_mark = f"hook-{os.urandom(8).hex()}"
    actor = f"actor-{os.urandom(8).hex()}"
    build = (f": {hook_mark}; touch started; "
             "while [ ! -e go ]; do sleep 0.05; done; "
             'printf %s "$DEPLOYD_VAR_DB_PASSWORD" > seen.txt')
    base = lab.host_config(lab.hosts[0])
    config = HostConfig(address=base.address, port=base.port, deploy_to=base.deploy_to,
                        vars={"db_password": password})
    app = lab.app(hooks=Hooks(build=build), hosts=[config])
    releases = Releases(pool.host(app, config), app)
    lock = LockInfo.new(actor, "deploy")
    release = Path(config.deploy_to) / "releases" / R1
    preparing = asyncio.create_task(
        releases.prepare(R1, sha(1), TARBALL, branch="production", lock=lock))
    try:
        await wait_until((release / "started").exists, every=0.02, what="the hook started")
        assert command_lines_holding(password, hook_mark, lock.token, actor) == []
    finally:
        (release / "go").touch()
        await preparing
    assert (release / "seen.txt").read_text() == password


async def test_large_host_var_and_hook_reach_the_host(lab: Lab, pool: HostPool) -> None:
    """A host var near the kernel's limit for one environment string and a hook far beyond
    the limit for one argument (E2BIG for a script on a command line) both work."""
    big_value = "v" * 100_000
    filler = "".join(f": filler line {n}\n" for n in range(20_000))
    build = filler + 'printf %s "$DEPLOYD_VAR_BIG" | wc -c > size.txt\n'
    assert len(build) > 300_000
    base = lab.host_config(lab.hosts[0])
    config = HostConfig(address=base.address, port=base.port, deploy_to=base.deploy_to,
                        vars={"big": big_value})
    app = lab.app(hooks=Hooks(build=build), hosts=[config])
    releases = Releases(pool.host(app, config), app)
    await releases.prepare(R1, sha(1), TARBALL, branch="production",
                           lock=LockInfo.new("alice", "deploy"))
    release = Path(config.deploy_to) / "releases" / R1
    assert (release / "size.txt").read_text().strip() == "100000"
    assert (release / "index.html").read_text() == "hello"


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory the test user owns, readable by all (not under root's private tmp)."""
    path = shared_dir("deployd-local-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


STEAL = ('cat "$DEPLOYD_VAR_CONFIG" > stolen.txt 2> denied.txt; '
         'echo forged 2>> denied.txt >> "$DEPLOYD_VAR_STATE"; id -un > who.txt; true')


def daemon_files(top: Path) -> tuple[Path, Path]:
    """A config and a state file as deployd keeps them: owned by it, 0600, in a directory
    anyone may enter."""
    private = top / "daemon"
    private.mkdir()
    private.chmod(0o755)
    config, state = private / "deployd.toml", private / "deployd.sqlite3"
    for path, text in ((config, "token_sha256 = 'secret'\n"), (state, "state\n")):
        path.write_text(text)
        path.chmod(0o600)
    return config, state


def local_app(deploy_to: Path, config: Path, state: Path, **identity: object) -> AppConfig:
    host = HostConfig(address="local", deploy_to=str(deploy_to),
                      vars={"config": str(config), "state": str(state)},
                      **identity)  # type: ignore[arg-type]
    return AppConfig(name="shop", repo="/nonexistent", branch="main", deploy_to=str(deploy_to),
                     hosts=(host,), hooks=Hooks(build=STEAL))


async def test_local_host_runs_hooks_as_run_as_who_cannot_touch_deployds_files(
        user_dir: Path) -> None:
    """On a `local` host with run_as, a build hook runs as that user: reading deployd's config
    or writing its state is refused by the OS. As deployd itself (the explicit opt-in) the
    same hook reads and writes both."""
    config, state = daemon_files(user_dir)
    app = local_app(user_dir / "app", config, state, run_as=TEST_USER)
    releases = Releases(LocalHost(app.hosts[0]), app)
    await deploy(releases, R1, sha(1))
    release = user_dir / "app" / "releases" / R1
    assert (release / "who.txt").read_text().strip() == TEST_USER
    assert (release / "stolen.txt").read_text() == ""
    assert (release / "denied.txt").read_text().count("Permission denied") == 2
    assert state.read_text() == "state\n"
    assert (await releases.state()).current == R1

    exposed = local_app(user_dir / "exposed", config, state, allow_local_as_daemon=True)
    await deploy(Releases(LocalHost(exposed.hosts[0]), exposed), R1, sha(1))
    release = user_dir / "exposed" / "releases" / R1
    assert (release / "who.txt").read_text().strip() == "root"
    assert (release / "stolen.txt").read_text() == config.read_text()
    assert state.read_text() == "state\nforged\n"


async def test_local_run_as_timeout_stops_the_users_processes(user_dir: Path) -> None:
    """A command run as run_as past its limit is stopped, with everything it started."""
    host = LocalHost(HostConfig(address="local", deploy_to=str(user_dir), run_as=TEST_USER))
    assert (await host.run("id -un", timeout=10)).stdout.strip() == TEST_USER
    with pytest.raises(CommandError) as caught:
        await host.run("sleep 765.25 & sleep 765.25; wait", timeout=0.5)
    assert caught.value.exit_status is None
    await wait_until(lambda: not processes_matching("sleep 765.25"), within=10,
                     what="the user's processes gone")


async def test_hook_output_is_kept_in_order_and_logged_at_debug(
        lab: Lab, pool: HostPool, caplog: pytest.LogCaptureFixture) -> None:
    """A hook that succeeds still leaves its last lines (stdout and stderr interleaved as
    printed) in the step, and in the log at debug level."""
    releases, _, _ = on_host(lab, pool, hooks=Hooks(build="echo one; echo two >&2; echo three"))
    caplog.set_level(logging.DEBUG, logger="deployd.releases")
    step = await releases.prepare(R1, sha(1), TARBALL, branch="production",
                                  lock=LockInfo.new("alice", "deploy"))
    assert step.output == "one\ntwo\nthree"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        f"{releases.name}: output of the build hook(s): one | two | three"]



async def test_a_gated_switch_holds_after_switching_until_released(
        lab: Lab, pool: HostPool) -> None:
    """With a gate, switch() points current at the release and waits right there until the
    gate is released; then it logs the deploy and runs the restart hook, in the same step."""
    trace = lab.workdir / "restarted"
    releases, _, root = on_host(lab, pool, hooks=Hooks(restart=f"echo restarted; touch {trace}"))
    await deploy(releases, R1, sha(1))
    trace.unlink()
    lock = LockInfo.new("alice", "deploy")
    await releases.prepare(R2, sha(2), TARBALL, branch="production", lock=lock)
    gate = Gate(budget=30)
    switching = asyncio.create_task(releases.switch(
        R2, revision=sha(2), branch="production", actor="alice", lock=lock, gate=gate))
    await asyncio.wait_for(gate.reached.wait(), 10)
    assert os.readlink(root / "current") == str(root / "releases" / R2)
    assert not trace.exists() and not switching.done()
    assert len((root / "revisions.log").read_text().splitlines()) == 1  # R1's line only
    gate.release()
    step = await asyncio.wait_for(switching, 10)
    assert trace.exists() and step.output == "restarted" and step.previous == R1
    assert (root / "revisions.log").read_text().splitlines()[-1].endswith(f"release {R2} by alice")
    await releases.unlock(lock)


async def test_a_held_rollback_runs_its_hooks_when_deployd_vanishes(
        lab: Lab, pool: HostPool) -> None:
    """A rollback held after its switch whose connection drops (deployd killed) still runs
    its rollback and restart hooks on the host and releases its lock: a switched host never
    stays without them."""
    hooks = Hooks(rollback=f"echo rollback >> {lab.workdir / 'hooks'}",
                  restart=f"echo restart >> {lab.workdir / 'hooks'}")
    releases, host, root = on_host(lab, pool, hooks=hooks)
    await deploy(releases, R1, sha(1))
    await deploy(releases, R2, sha(2))
    (lab.workdir / "hooks").unlink()
    gate = Gate(budget=30)
    rolling = asyncio.create_task(releases.rollback(R1, reason="bad", actor="bob", gate=gate))
    await asyncio.wait_for(gate.reached.wait(), 10)
    assert os.readlink(root / "current") == str(root / "releases" / R1)
    assert not (lab.workdir / "hooks").exists()
    assert isinstance(host, SSHHost) and host.connection.is_open
    host.connection.discard(await host.connection.get())
    with pytest.raises(RemoteError):
        await asyncio.wait_for(rolling, 10)
    hooks_file = lab.workdir / "hooks"
    await wait_until(lambda: hooks_file.exists()
                     and hooks_file.read_text().split() == ["rollback", "restart"]
                     and not (root / ".deployd.lock").exists())


async def test_a_gated_step_that_fails_before_switching_ends_without_holding(
        lab: Lab, pool: HostPool) -> None:
    """A gated step that fails before its switch (the release is missing) ends at once,
    without holding."""
    releases, _, _ = on_host(lab, pool, hooks=Hooks(restart="true"))
    await deploy(releases, R1, sha(1))
    gate = Gate(budget=30)
    with pytest.raises(ReleaseError, match="does not exist"):
        await asyncio.wait_for(releases.rollback(R2, reason="bad", actor="bob", gate=gate), 10)
    assert not gate.reached.is_set()


async def test_a_held_rollback_taking_over_a_stale_lock_holds_once_it_switched(
        lab: Lab, pool: HostPool) -> None:
    """A gated rollback that first meets a stale lock (refused, then taken over in a second
    round trip) reaches its gate only when the second attempt switched."""
    trace = lab.workdir / "restarted"
    releases, _, root = on_host(lab, pool, hooks=Hooks(restart=f"touch {trace}"),
                                lock_stale_after=60.0)
    await deploy(releases, R1, sha(1))
    await deploy(releases, R2, sha(2))
    stale = LockInfo.new("carol", "crashed deploy", now=time.time() - 3600)
    (root / ".deployd.lock").write_text(stale.content())
    trace.unlink()
    gate = Gate(budget=30)
    rolling = asyncio.create_task(releases.rollback(R1, reason="bad", actor="bob", gate=gate))
    await asyncio.wait_for(gate.reached.wait(), 10)
    assert os.readlink(root / "current") == str(root / "releases" / R1)
    assert not trace.exists() and not rolling.done()
    gate.release()
    step = await asyncio.wait_for(rolling, 10)
    assert step.took_over is not None and step.took_over.actor == "carol"
    assert trace.exists() and not (root / ".deployd.lock").exists()
