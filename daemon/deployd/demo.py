"""`deployd demo`: the whole story on this machine, with nothing but the package installed.

It builds a throwaway origin repository and three "local" hosts (web1..web3: three deploy_to
directories), starts the real daemon (REST server, supervisor, health monitor, SQLite store) on
loopback, and plays: a first deploy rolled out in steps (web1, the canary, then every host), a
second one, a manual rollback over REST, then a bad batch on `production` that reaches the
canary alone, fails its health check there and is rolled back on that host by itself and
quarantined; web2 and web3 never run it. The app is a tiny health endpoint per host that
answers from whatever release its `current` points at. Everything runs in one process and is
gone when it returns (unless --keep).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pygit2
from aiohttp import web

from deployd.app import create_application
from deployd.config import load
from deployd.listener import make_runner

GOOD_HEALTH = "ok\n"
BAD_HEALTH = "broken: cannot reach the database\n"
HOST_NAMES = ("web1", "web2", "web3")  # config order: web1 is the canary
STEPS = ("1", "100%")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoRepo:
    """The team's origin repository: `master` -> `staging` -> `production`, fast-forwards."""

    def __init__(self, path: Path) -> None:
        self.repo = pygit2.init_repository(str(path), bare=True)
        self.path = path

    def commit(self, branch: str, files: dict[str, str], message: str,
               author: tuple[str, str] = ("Dana Developer", "dana@example.com")) -> str:
        ref = f"refs/heads/{branch}"
        parent = self.repo.references[ref].target if ref in self.repo.references else None
        builder = (self.repo.TreeBuilder(self.repo[parent].tree) if parent is not None
                   else self.repo.TreeBuilder())
        for name, content in files.items():
            builder.insert(name, self.repo.create_blob(content.encode()), pygit2.GIT_FILEMODE_BLOB)
        signature = pygit2.Signature(*author)
        oid = self.repo.create_commit(ref, signature, signature, message, builder.write(),
                                      [parent] if parent is not None else [])
        return str(oid)

    def merge_into(self, target: str, source: str) -> str:
        """Move `target` to `source`'s head (a batch promoted to the next branch)."""
        head = self.repo.references[f"refs/heads/{source}"].target
        self.repo.references.create(f"refs/heads/{target}", head, force=True)
        return str(head)


class HealthApp:
    """The demo app's health endpoint: answers from `current/health.txt` on the host."""

    def __init__(self, deploy_to: Path) -> None:
        self.deploy_to = deploy_to
        self.runner: web.AppRunner | None = None
        self.port = 0  # known once started

    async def handle(self, request: web.Request) -> web.Response:
        try:
            text = (self.deploy_to / "current" / "health.txt").read_text()
        except OSError:
            return web.Response(status=503, text="no release live\n")
        return web.Response(status=200 if text.startswith("ok") else 500, text=text)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@dataclass(frozen=True)
class DemoHost:
    """One of the demo's hosts: a deploy_to directory on this machine and its health endpoint."""

    name: str
    deploy_to: Path
    health: HealthApp

    @classmethod
    def under(cls, root: Path, name: str) -> DemoHost:
        deploy_to = root / name / "srv" / "shop"
        return cls(name, deploy_to, HealthApp(deploy_to))

    @property
    def label(self) -> str:
        """How the daemon names it: `local` hosts are told apart by their deploy_to."""
        return f"local:{self.deploy_to}"

    def log(self) -> list[str]:
        """Its revisions.log: one line per deploy and rollback that switched it."""
        try:
            return (self.deploy_to / "revisions.log").read_text().splitlines()
        except OSError:
            return []

    def live_revision(self) -> str:
        try:
            return (self.deploy_to / "current" / "REVISION").read_text().strip()
        except OSError:
            return "nothing"


def _config(root: Path, repo: Path, hosts: list[DemoHost], port: int, token_sha: str) -> str:
    steps = ", ".join(f'"{step}"' for step in STEPS)
    return f"""
[daemon]
state_dir = "{root / 'state'}"
listen = "127.0.0.1:{port}"

[[tokens]]
name = "demo"
token_sha256 = "{token_sha}"
roles = ["read", "deploy", "approve"]

[apps.shop]
repo = "{repo}"
branch = "production"
poll_interval = "300ms"
keep_releases = 5
linked_dirs = ["log"]

[apps.shop.hooks]
build = "echo built $DEPLOYD_REVISION > BUILD"
restart = "echo restarted $DEPLOYD_RELEASE_PATH >> $DEPLOYD_DEPLOY_TO/shared/log/restarts.log"
""" + "".join(f"""
[[apps.shop.hosts]]
address = "local"
deploy_to = "{host.deploy_to}"
# The demo's own throwaway repository: its hooks may run as whoever runs the demo.
allow_local_as_daemon = true
vars = {{ health_port = {host.health.port} }}
""" for host in hosts) + f"""
[[apps.shop.checks]]
name = "http"
url = "http://{{address}}:{{health_port}}/healthz"
body_contains = "ok"
timeout = "1s"
interval = "200ms"
failures = 2
successes = 1

[apps.shop.rollback]
grace = "300ms"
bake = "2s"
unhealthy_hosts = "1"

[apps.shop.rollout]
# web1 first (the canary), judged for step_bake; then every host, judged for rollback.bake.
steps = [{steps}]
step_bake = "1s"
"""


class Timeline:
    """Prints the daemon's events as they happen."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str,
                 hosts: Iterable[DemoHost]) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self.seen = 0
        self.started = time.monotonic()
        self.kinds: list[str] = []
        self.names = {host.label: host.name for host in hosts}

    def short(self, text: str) -> str:
        """`text` with the daemon's host labels (`local:/tmp/...`) as the demo's host names."""
        for label, name in self.names.items():
            text = text.replace(label, name)
        return text

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.base + path, json=body,
                                        headers=self.headers) as response:
            return await response.json()

    async def pump(self) -> None:
        body = await self.call("GET", f"/api/v1/apps/shop/events?since={self.seen}")
        for event in body["events"]:
            self.seen = event["id"]
            self.kinds.append(event["kind"])
            print(f"  {time.monotonic() - self.started:6.2f}s  {event['kind']:<20} "
                  f"{self.short(event['message'])}")

    async def until(self, kind: str, count: int = 1, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while self.kinds.count(kind) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo: no {kind} event within {within:.0f}s")
            await self.pump()
            await asyncio.sleep(0.1)
        await self.pump()


def say(text: str) -> None:
    print(f"\n== {text}")


@contextlib.asynccontextmanager
async def _daemon(config_path: Path) -> AsyncIterator[None]:
    config = load(config_path)
    app = create_application(config)
    runner = make_runner(app, config.daemon)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.daemon.listen_host, config.daemon.listen_port).start()
        yield
    finally:
        await runner.cleanup()


async def run_demo(*, approve: bool = False, keep: bool = False,
                   pause: Callable[[str], Awaitable[None]] | None = None) -> int:
    """Play the demo; 0 when every step happened as told."""
    root = Path(tempfile.mkdtemp(prefix="deployd-demo-"))
    try:
        return await _play(root, approve)
    finally:
        if keep:
            print(f"\nfiles kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


async def _play(root: Path, approve: bool) -> int:
    # The timeline below tells the story; the daemon's own log would repeat it.
    logging.getLogger().setLevel(logging.CRITICAL)
    repo = DemoRepo(root / "origin.git")
    hosts = [DemoHost.under(root, name) for name in HOST_NAMES]
    try:
        for host in hosts:
            await host.health.start()
        port = _free_port()
        token = secrets.token_urlsafe(24)
        config_path = root / "deployd.toml"
        config_path.write_text(_config(root, repo.path, hosts, port,
                                       hashlib.sha256(token.encode()).hexdigest()))
        repo.commit("master", {"index.html": "<h1>shop v1</h1>\n", "health.txt": GOOD_HEALTH},
                    "Shop v1")
        repo.merge_into("staging", "master")
        first = repo.merge_into("production", "staging")
        print(f"deployd demo: origin {repo.path}")
        for host in hosts:
            print(f"  host {host.name}: local, deploy_to {host.deploy_to}, health on port "
                  f"{host.health.port}")
        print(f"  rollout steps {list(STEPS)}: {hosts[0].name} is the canary")
        async with _daemon(config_path), aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            timeline = Timeline(session, base, token, hosts)
            say(f"production is at {first[:12]}: deployd rolls it out, canary first "
                f"({', '.join(h.name for h in hosts[1:])} run nothing yet: their endpoints "
                "answer 503)")
            await timeline.until("rollout.done")

            repo.commit("master", {"index.html": "<h1>shop v2</h1>\n"},
                        "Shop v2: new front page")
            repo.merge_into("staging", "master")
            second = repo.merge_into("production", "staging")
            say(f"a new commit lands on production ({second[:12]})")
            await timeline.until("rollout.done", 2)

            say("an operator rolls back over REST (every host)")
            await timeline.call("POST", "/api/v1/apps/shop/rollback",
                                {"reason": "demo: checking rollback"})
            await timeline.until("rollback.succeeded")
            await timeline.until("bake.healthy", 3)

            say("a bad batch is merged into production: one commit breaks the health check")
            repo.commit("master", {"index.html": "<h1>shop v3</h1>\n"}, "Shop v3 front page")
            repo.commit("master", {"tax.txt": "rate 0.2\n"},
                        "Fix tax rounding\n\nRescue: yes\n")
            repo.commit("master", {"health.txt": BAD_HEALTH}, "Switch to the new database")
            repo.merge_into("staging", "master")
            logs_before = {host.name: len(host.log()) for host in hosts}
            bad = repo.merge_into("production", "staging")
            await timeline.until("rollout.rolled_back", within=40)
            await timeline.until("rollback.succeeded", 2, within=40)
            await timeline.until("job.opened", within=40)
            _print_blast_radius(hosts, bad, logs_before)
            job_id = await _rescue(timeline, base, token, approve)
            await timeline.until("job.succeeded", within=60)
            await timeline.until("rollout.done", 3)

            summary = await timeline.call("GET", "/api/v1/apps/shop")
            _print_summary(summary, job_id, hosts, timeline)
    finally:
        for host in hosts:
            await host.health.stop()
    return 0


def _print_blast_radius(hosts: list[DemoHost], bad: str, logs_before: dict[str, int]) -> None:
    """Who ran the bad release and who was touched at all, from each host's own revisions.log;
    the demo fails when the bad release reached more than the canary."""
    ran = [host.name for host in hosts if any(bad in line for line in host.log())]
    touched = [host.name for host in hosts if len(host.log()) > logs_before[host.name]]
    spared = [host.name for host in hosts if host.name not in touched]
    say(f"the bad release {bad[:12]} stopped at the canary (from each host's revisions.log)")
    print(f"  {', '.join(ran) or 'no host'}: ran it, judged bad, rolled back on that host alone")
    print(f"  {', '.join(spared) or 'no host'}: never ran it (their revisions.log has no new "
          "line)")
    if ran != [hosts[0].name] or touched != ran:
        raise RuntimeError(f"demo: the bad release reached {ran} (touched {touched}), not the "
                           "canary alone")


async def _rescue(timeline: Timeline, base: str, token: str, approve: bool) -> int:
    """Show the rescue job, approve it (or wait for a human to); return its id."""
    jobs = await timeline.call("GET", "/api/v1/jobs?state=pending&app=shop")
    job = await timeline.call("GET", jobs["jobs"][0]["links"]["self"])
    say(f"rescue job {job['id']} proposes: last good {job['base']['sha'][:12]} + the marked fix")
    for candidate in job["candidates"]:
        mark = "[x]" if candidate["selected"] else "[ ]"
        print(f"  {mark} {candidate['sha'][:12]} {candidate['summary']}  ({candidate['author']})")
    async with timeline.session.get(base + job["links"]["patch"],
                                    headers=timeline.headers) as response:
        patch = await response.text()
    print("\n  the change that would land:")
    print("".join(f"    {line}\n" for line in patch.splitlines()))
    if approve:
        say(f"approving it (--approve): POST {job['links']['approve']} with plan "
            f"{job['plan'][:12]}...")
        await timeline.call("POST", job["links"]["approve"],
                            {"plan": job["plan"], "comment": "demo: ship the fix"})
        return int(job["id"])
    _print_calls(base, token, job)
    say("waiting for your approval (Ctrl-C to stop)")
    sys.stdout.flush()
    await timeline.until("job.approved", within=3600)
    return int(job["id"])


def _print_calls(base: str, token: str, job: dict[str, Any]) -> None:
    """The README's curl calls, for this daemon and job, to paste while the demo waits."""
    links = job["links"]
    print("  in another shell, with the README's variables:")
    for line in (
        f"export DEPLOYD_TOKEN={token}",
        f'H="Authorization: Bearer $DEPLOYD_TOKEN"; D={base}',
        "# the app, its timeline and the metrics",
        'curl -sS -H "$H" $D/api/v1/apps/shop',
        'curl -sS -H "$H" "$D/api/v1/apps/shop/events?since=0"',
        "curl -sS $D/metrics | grep ^deployd_",
        "# the job and its patch; then approve exactly its plan",
        f'curl -sS -H "$H" $D{links["self"]}',
        f'curl -sS -H "$H" $D{links["patch"]}',
        f'curl -sS -H "$H" -X POST -d \'{{"plan":"{job["plan"]}","comment":"ship the fix"}}\' '
        f'$D{links["approve"]}',
    ):
        print(f"    {line}")


def _print_summary(summary: dict[str, Any], job_id: int, hosts: list[DemoHost],
                   timeline: Timeline) -> None:
    say("where things stand")
    live = summary.get("deployed") or {}
    print(f"  branch head   {str(summary.get('head'))[:12]}  (pristine: {summary.get('pristine')})")
    print(f"  live          {str(live.get('revision'))[:12]} as release {live.get('release')}")
    print("  on the hosts  " + ", ".join(f"{host.name} {host.live_revision()[:12]}"
                                         for host in hosts))
    for item in summary.get("quarantined", []):
        print(f"  quarantined   {item['revision'][:12]}  {timeline.short(item['reason'])}")
    print(f"  the old head is kept on the origin as deployd/backup/shop/{job_id}")
    print("\nThe demo's daemon stops with it. A real setup over SSH: config/minimal.toml.")
    sys.stdout.flush()
