"""A world for rescue-job tests: an origin served over SSH, sshd hosts, health that follows
the live release, the real daemon (in-process or as a killable subprocess).

`RescueLab` holds an origin repository in a directory the sshd test user owns, served by its
own sshd as `ssh://deployd-test@127.0.0.1:<port>/...` (a lease only means something against a
remote served over SSH), N sshd hosts, and one `HealthServer` per host following the release
live on that host (healthservers.py): a commit that writes `ok` in `health.txt` is healthy, any
other text is a 500. Tests therefore break or heal an app only by what they commit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pygit2
import pytest

from tests.support import waiting
from tests.support.daemonfixtures import (
    AppSpec,
    DaemonProcess,
    DaemonSpec,
    RunningDaemon,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import BAD, GOOD, HealthServer, start_servers
from tests.support.judging import http_check
from tests.support.sshd import ClientKey, SshdHost, chown_tree, shared_dir, write_known_hosts
from tests.support.waiting import eventually, matching, timeline

APP = "shop"
FIX_AUTHOR = ("Pat Fixer", "pat@example.com")



def new_file_patch(path: str, lines: list[str], mode: str = "100644") -> str:
    """A git patch that adds the file `path` holding `lines`."""
    count = "" if len(lines) == 1 else f",{len(lines)}"
    return (f"diff --git a/{path} b/{path}\nnew file mode {mode}\n--- /dev/null\n"
            f"+++ b/{path}\n@@ -0,0 +1{count} @@\n" + "".join(f"+{line}\n" for line in lines))


def backdoor_patch(command: str) -> str:
    """A patch adding an executable backdoor.sh that runs `command`."""
    return new_file_patch("backdoor.sh", ["#!/bin/sh", command], mode="100755")


# A commit P edits config.txt after A changed it: P conflicts on the base; this is the
# hand-resolved patch for it (and for the file P adds).
CONFLICT_CONFIG = "# shop\nsetting = 1\ncurrency = EUR\n"
RESOLVED = """\
diff --git a/config.txt b/config.txt
--- a/config.txt
+++ b/config.txt
@@ -1,3 +1,3 @@
 # shop
-setting = 1
+setting = 3
 currency = EUR
""" + new_file_patch("tax.txt", ["rate 0.2"])


# -- a daemon as a subprocess ------------------------------------------------------------------


Daemonish = RunningDaemon | DaemonProcess


async def events(daemon: Daemonish, kind: str | None = None,
                 revision: str | None = None) -> list[dict[str, Any]]:
    """The app's timeline, optionally only `kind` (about `revision`)."""
    return matching(await daemon.events(APP), kind, revision)


async def wait_event(daemon: Daemonish, kind: str, revision: str | None = None, *,
                     count: int = 1, within: float = 30.0) -> dict[str, Any]:
    """The `count`-th event of `kind` (about `revision`), waiting for it."""
    return await waiting.wait_event(daemon, APP, kind, revision, count=count, within=within)


async def wait_job(daemon: Daemonish, job_id: int, *states: str,
                   within: float = 30.0) -> dict[str, Any]:
    """GET the job until its state is one of `states`."""
    last: dict[str, Any] = {}

    async def settled() -> dict[str, Any] | None:
        last.update(await daemon.api.get(f"/api/v1/jobs/{job_id}"))
        return dict(last) if last["state"] in states else None

    async def story() -> str:
        return f"it is {last.get('state')}; timeline: {timeline(await events(daemon))}"

    job = await eventually(settled, within=within, what=f"job {job_id} {'/'.join(states)}",
                           explain=story)
    assert job is not None
    return job


def in_order(timeline: list[dict[str, Any]], expected: list[tuple[str, str | None]]) -> None:
    """Assert `expected` (kind, revision or None) is a subsequence of the timeline."""
    position = 0
    for kind, revision in expected:
        while position < len(timeline):
            event = timeline[position]
            position += 1
            if event["kind"] == kind and (revision is None or event["revision"] == revision):
                break
        else:
            story = [f"{e['kind']} {str(e['revision'])[:8]}" for e in timeline]
            raise AssertionError(f"{kind} ({revision}) missing or out of order in {story}")


# -- the world ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """The bad batch: A (harmless), P (the fix to rescue), B (breaks health)."""

    a: str
    p: str
    b: str


@dataclass
class RescueLab:
    """Origin over SSH, sshd hosts with health servers, and the daemon config for one app."""

    root: Path
    origin: OriginRepo
    git_host: SshdHost
    hosts: list[SshdHost]
    servers: list[HealthServer]
    known_hosts: Path
    client_key: ClientKey
    spec: DaemonSpec
    app: AppSpec
    config: Path
    daemons: list[RunningDaemon] = field(default_factory=list)
    processes: list[DaemonProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ssh://{self.git_host.user}@127.0.0.1:{self.git_host.port}{self.origin.path}"

    @property
    def deploy_dirs(self) -> list[Path]:
        return [host.home / "app" for host in self.hosts]

    def write_config(self) -> Path:
        return self.spec.write(self.config)

    async def start(self) -> RunningDaemon:
        """The real daemon in this process, serving REST on 127.0.0.1."""
        self.write_config()
        daemon = await start_daemon(self.config)
        self.daemons.append(daemon)
        return daemon

    async def start_process(self) -> DaemonProcess:
        """The real daemon as a subprocess (`deployd run`)."""
        self.write_config()
        process = DaemonProcess(self.config, self.root / "deployd.log")
        self.processes.append(process)
        await process.start()
        return process

    # the repository ---------------------------------------------------------------------------

    def commit_good(self, message: str = "Shop v1", **files: str) -> str:
        return self.origin.commit({"health.txt": GOOD, **files}, message)

    def land_batch(self, commits: Iterable[tuple[dict[str, str | bytes | None], str,
                                                 tuple[str, str]]]) -> list[str]:
        """Commit on a side branch, then move production to its tip at once (one merge)."""
        made: list[str] = []
        parent = self.origin.head()
        for files, message, author in commits:
            parent = self.origin.commit(files, message, branch="master", parents=[parent],
                                        author=author)
            made.append(parent)
        self.origin.set_branch("production", made[-1])
        return made

    def land_bad_batch(self, *, p_files: dict[str, str | bytes | None] | None = None,
                       a_files: dict[str, str | bytes | None] | None = None,
                       b_files: dict[str, str | bytes | None] | None = None) -> Batch:
        a, p, b = self.land_batch([
            (a_files or {"index.html": "<h1>shop v2</h1>\n"}, "Front page v2",
             ("Ann Author", "ann@example.com")),
            (p_files or {"tax.txt": "rate 0.2\n"},
             "Fix tax rounding\n\nThe rate was rounded twice.\n\nRescue: yes\n", FIX_AUTHOR),
            (b_files or {"health.txt": BAD}, "Switch to the new database",
             ("Bo Breaker", "bo@example.com")),
        ])
        return Batch(a, p, b)

    def remote_head(self, branch: str = "production") -> str | None:
        ref = self.origin.repo.references.get(f"refs/heads/{branch}")
        return None if ref is None else str(ref.resolve().target)

    def remote_commit(self, sha: str) -> pygit2.Commit:
        commit = self.origin.repo[sha]
        assert isinstance(commit, pygit2.Commit)
        return commit

    def install_hook(self, name: str, script: str) -> Path:
        hook = self.origin.path / "hooks" / name
        hook.parent.mkdir(exist_ok=True)
        hook.write_text(script)
        hook.chmod(0o755)
        chown_tree(self.origin.path)
        return hook

    async def push_as_someone_else(self, files: dict[str, str], message: str) -> str:
        """A real `git push` over SSH to production from another clone; the new sha."""
        work = self.root / f"clone-{time.monotonic_ns()}"
        ssh = (f"ssh -i {self.client_key.private} -o IdentitiesOnly=yes -o BatchMode=yes "
               f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes")
        env = {**os.environ, "GIT_SSH_COMMAND": ssh}
        await _run(["git", "clone", "-q", "--branch", "production", self.url, str(work)], env)
        for name, content in files.items():
            (work / name).write_text(content)
        ident = ["-c", "user.name=Sam Someone", "-c", "user.email=sam@example.com"]
        await _run(["git", "-C", str(work), "add", "-A"], env)
        await _run(["git", *ident, "-C", str(work), "commit", "-q", "-m", message], env)
        await _run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:production"], env)
        return (await _run(["git", "-C", str(work), "rev-parse", "HEAD"], env)).strip()

    # the hosts --------------------------------------------------------------------------------

    def live_revisions(self) -> list[str | None]:
        found: list[str | None] = []
        for deploy_to in self.deploy_dirs:
            try:
                found.append((deploy_to / "current" / "REVISION").read_text().strip())
            except OSError:
                found.append(None)
        return found

    async def cleanup(self) -> None:
        for daemon in self.daemons:
            await daemon.stop()
        for process in self.processes:
            await process.close()
        for server in self.servers:
            await server.stop()


async def _run(argv: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, (argv, out.decode(), err.decode())
    return out.decode()


MakeLab = Callable[..., Any]


@pytest.fixture(name="rescue_lab")
async def rescue_lab_fixture(tmp_path: Path, client_key: ClientKey,
                     sshd_factory: Callable[[], SshdHost]) -> AsyncIterator[MakeLab]:
    """make(hosts=2, rescue={...}, rollback={...}) -> RescueLab with production at nothing."""
    labs: list[RescueLab] = []
    shared: list[Path] = []

    async def make(hosts: int = 2, *, rescue: dict[str, Any] | None = None,
                   rollback: dict[str, Any] | None = None,
                   settings: dict[str, Any] | None = None) -> RescueLab:
        root = tmp_path / f"lab{len(labs)}"
        root.mkdir()
        directory = shared_dir("deployd-rescue-")
        shared.append(directory)
        origin = OriginRepo(directory / "origin.git", on_change=chown_tree)
        git_host = sshd_factory()
        sshd_hosts = [sshd_factory() for _ in range(hosts)]
        known = write_known_hosts(root / "known_hosts", [git_host, *sshd_hosts])
        servers = await start_servers(len(sshd_hosts))
        for server, host in zip(servers, sshd_hosts, strict=True):
            server.follow(host.home / "app")
        app = AppSpec(
            name=APP, repo="", sshd_hosts=sshd_hosts,
            settings={"repo_key": str(client_key.private), "repo_known_hosts": str(known),
                      **(settings or {})},
            checks=[http_check()],
            rollback={"grace": "300ms", "bake": "1500ms", "unhealthy_hosts": "1",
                      **(rollback or {})},
            rescue=dict(rescue or {}),
            host_vars=[{"health_port": server.port} for server in servers],
        )
        spec = DaemonSpec(state_dir=root / "state", client_key=client_key.private,
                          known_hosts=known, apps=[app])
        lab = RescueLab(root=root, origin=origin, git_host=git_host, hosts=sshd_hosts,
                        servers=servers, known_hosts=known, client_key=client_key, spec=spec,
                        app=app, config=root / "deployd.toml")
        app.repo = lab.url
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        await lab.cleanup()
    for directory in shared:
        shutil.rmtree(directory, ignore_errors=True)
