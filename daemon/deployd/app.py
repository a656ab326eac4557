"""The daemon's lifecycle: build every shared object once, run every app, stop cleanly.

The aiohttp `Application` owns the program. Each subsystem is a `cleanup_ctx` generator
appended in dependency order (store, HTTP session, SSH pool, app supervisors), so start-up
runs top to bottom and shutdown bottom to top: supervisors stop taking work and let
in-flight host steps finish within the grace period before connections and the store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from deployd import api, webhooks
from deployd.config import AppConfig, Config, DaemonConfig, check_files, load
from deployd.context import AppContext
from deployd.errors import ConfigError, DeploydError, StoreError
from deployd.fleet import Fleet
from deployd.git import GitHome, Mirror
from deployd.health import HealthMonitor
from deployd.hosts import HostPool
from deployd.listener import make_runner
from deployd.metrics import Metrics
from deployd.notifications import STOP_GRACE, Notifications
from deployd.notify import Notifier
from deployd.rescue import Rescue
from deployd.store import JobStore, Store, make_private_dir
from deployd.supervisor import AppSupervisor
from deployd.vocabulary import EventKind

if TYPE_CHECKING:
    from deployd.ownership import NodeOwnership

log = logging.getLogger("deployd")

@dataclass
class Daemon:
    """Everything one running deployd shares between its apps."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    store: Store | None = None
    session: aiohttp.ClientSession | None = None
    pool: HostPool | None = None
    git_home: GitHome | None = None
    supervisors: dict[str, AppSupervisor] = field(default_factory=dict)
    tasks: dict[str, list[asyncio.Task[Any]]] = field(default_factory=dict)
    context: api.ApiContext | None = None
    notifications: Notifications | None = None
    notifications_task: asyncio.Task[None] | None = None
    # With several daemons on one PostgreSQL database: which apps this node runs. Every
    # app has a supervisor in `supervisors` (REST reads it); only owned apps' run (`tasks`).
    ownership: NodeOwnership | None = None
    ownership_task: asyncio.Task[None] | None = None
    epochs: dict[str, int] = field(default_factory=dict)
    # Apps another node runs: their mirrors kept fetched here, so a takeover starts warm.
    standby: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    standby_fetches: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def readiness(self) -> dict[str, bool]:
        checks = {"config": True, "store": self.store is not None and self.store.is_open}
        if self.ownership is not None:
            checks["database"] = self.ownership.connected
        for name, sup in self.supervisors.items():
            if name in self.tasks:
                checks[f"mirror:{name}"] = sup.fetched
        return checks

    def owns(self, name: str) -> bool:
        """Whether this node runs the app (always, without several daemons)."""
        return self.ownership is None or self.ownership.owns(name)

    async def owner_elsewhere(self, name: str) -> tuple[str, str | None] | None:
        """None if this node runs the app, else the node that does (name, advertise URL; the
        name is empty while no node owns it)."""
        if self.owns(name):
            return None
        assert self.store is not None
        row = await self.store.backend.fetch_one(
            "SELECT o.node, n.advertise FROM app_owners o LEFT JOIN nodes n ON n.name = o.node "
            "WHERE o.app = ?", (name,))
        if row is None or not row["node"] or row["node"] == self.config.daemon.node:
            return ("", None)
        return (str(row["node"]), row["advertise"])

    def build_supervisor(self, app: AppConfig, store: Store | None = None) -> AppSupervisor:
        """The app's supervisor, writing through `store` (default: the daemon's)."""
        store = store or self.store
        assert store is not None and self.session is not None and self.pool is not None
        if self.git_home is None:
            self.git_home = GitHome(self.config.daemon.state_dir / "git-home")
        mirror = Mirror(
            self.config.daemon.state_dir / "mirrors" / f"{app.name}.git",
            app.repo,
            name=app.name,
            home=self.git_home,
            key=app.repo_key,
            known_hosts=app.repo_known_hosts,
        )
        fleet = Fleet(app, self.pool, self.metrics)
        sup: AppSupervisor
        health = HealthMonitor(app, self.session, self.metrics,
                               on_change=lambda change: sup.on_health_change(change))
        rescue = Rescue(app, store=store, jobs=JobStore(store), mirror=mirror,
                        metrics=self.metrics)
        sup = AppSupervisor(AppContext(app, store=store, mirror=mirror, fleet=fleet,
                                       metrics=self.metrics, health=health, rescue=rescue))
        return sup

    def start_app(self, app: AppConfig) -> None:
        """Build an app's supervisor and run it (and its health monitor) if this node owns
        the app; one not owned only answers REST reads, from the store."""
        if self.ownership is None:
            self.supervisors[app.name] = self.build_supervisor(app)
            self._run(app.name)
        elif app.name in self.epochs:  # owned (a reload restarting it)
            self._run_owned(app, self.epochs[app.name])
        else:
            self.supervisors[app.name] = self.build_supervisor(app)
            self._start_standby(app.name)

    def _run(self, name: str) -> None:
        sup = self.supervisors[name]
        tasks = [asyncio.create_task(sup.run(), name=f"supervisor-{name}")]
        tasks.append(asyncio.create_task(sup.health.run(), name=f"health-{name}"))
        self.tasks[name] = tasks

    async def acquire_app(self, name: str, epoch: int) -> None:
        """This node now owns the app: run it. Its recovery runs first, as after a restart,
        finishing or undoing what the previous owner left half done."""
        self.epochs[name] = epoch
        node = self.config.daemon.node
        app = self.config.apps.get(name)
        assert self.store is not None
        try:  # first: on the timeline, the takeover comes before what its recovery does
            await self.store.add_event(name, EventKind.APP_OWNED,
                                       f"node {node} owns {name} (epoch {epoch})",
                                       data={"node": node, "epoch": epoch})
        except StoreError as exc:  # the supervisor runs anyway: the event is for humans
            log.warning("%s: cannot record its new owner: %s", name, exc)
        if app is not None and name not in self.tasks:
            await self._stop_standby(name)
            self._run_owned(app, epoch)

    def _run_owned(self, app: AppConfig, epoch: int) -> None:
        """Run an app this node owns under `epoch`: every state write it makes checks that
        the epoch still holds (FencedBackend), and its on-host locks name it."""
        from deployd.ownership import FencedBackend

        assert self.store is not None
        node = self.config.daemon.node
        fenced = Store(FencedBackend(self.store.backend, app=app.name, node=node, epoch=epoch),
                       clock=self.store.clock)
        fenced.listeners = self.store.listeners  # the same list: notifications see events
        sup = self.build_supervisor(app, fenced)
        sup.ctx.fleet.own(node, epoch)
        self.supervisors[app.name] = sup
        self._run(app.name)

    async def release_app(self, name: str, *, grace: float | None = None) -> None:
        """This node no longer owns the app: stop running it (a running operation gets
        `grace`, default the shutdown grace) and keep a fresh supervisor for REST reads."""
        self.epochs.pop(name, None)
        if name not in self.tasks:
            return
        await self._halt(name, self.config.daemon.shutdown_grace if grace is None else grace)
        app = self.config.apps.get(name)
        if app is not None:
            self.supervisors[name] = self.build_supervisor(app)
            self._start_standby(name)

    def _start_standby(self, name: str) -> None:
        if name not in self.standby:
            self.standby[name] = asyncio.create_task(self._keep_fetched(name),
                                                     name=f"standby-{name}")

    async def _keep_fetched(self, name: str) -> None:
        """Fetch the mirror of an app another node runs, on the app's poll interval. Only
        the mirror: no event, no metric, no host is touched for an app this node does not
        own (its owner reports fetch failures)."""
        while True:
            sup = self.supervisors.get(name)
            if sup is None:
                return
            fetch = asyncio.ensure_future(sup.mirror.fetch())
            # Its failure is retrieved even when nobody awaits it any more (cancelled).
            fetch.add_done_callback(lambda done: done.cancelled() or done.exception())
            self.standby_fetches[name] = fetch
            try:
                await asyncio.shield(fetch)
                await sup.watcher.follow()
            except Exception as exc:  # the owner reports fetch failures
                log.debug("%s: standby fetch failed: %s", name, exc)
            self.standby_fetches.pop(name, None)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Stopped while a store read turned the cancellation into an error (psycopg
                # cancels the query and raises its own): stop anyway.
                return
            await asyncio.sleep(sup.app.poll_interval)

    async def _stop_standby(self, name: str) -> None:
        """Stop keeping the mirror fetched; let a fetch in flight end first (for a while),
        so the owner's first fetch does not meet it in the same repository."""
        fetch = self.standby_fetches.pop(name, None)
        task = self.standby.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=self.config.daemon.failover / 3)
        if fetch is not None:
            await asyncio.wait([fetch], timeout=self.config.daemon.failover / 3)

    async def release_all(self) -> None:
        """The ownership connection is gone, so may be every lock: stop every app now."""
        await asyncio.gather(*(self.release_app(name, grace=0.0) for name in list(self.tasks)))

    async def _halt(self, name: str, grace: float) -> None:
        sup = self.supervisors[name]
        await sup.stop(grace)
        tasks = self.tasks.pop(name, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def node_list(self) -> list[dict[str, Any]]:
        """GET /api/v1/nodes: from the database; with SQLite, this daemon running every app."""
        settings = self.config.daemon
        if self.ownership is None:
            return [{"name": settings.node, "advertise": settings.advertise_url,
                     "last_seen": time.time(), "live": True, "apps": sorted(self.supervisors)}]
        from deployd.ownership import node_list

        assert self.store is not None
        return await node_list(self.store.backend, settings.failover)

    def idle(self, name: str) -> bool:
        sup = self.supervisors.get(name)
        return sup is None or sup.busy is None

    async def stop_app(self, name: str, *, forget: bool = False) -> None:
        """Stop one app: its running operation finishes within the grace period."""
        await self._stop_standby(name)
        await self._halt(name, self.config.daemon.shutdown_grace)
        del self.supervisors[name]
        if forget:
            self.metrics.forget_app(name)

    def start_notifications(self) -> None:
        """Deliver the config's `[[notify]]` targets (none: nothing runs)."""
        assert self.store is not None and self.session is not None
        if not self.config.notify:
            return
        notifications = Notifications(self.config.notify, store=self.store,
                                      session=self.session, metrics=self.metrics,
                                      base_url=self.config.daemon.base_url)
        self.store.listeners.append(notifications.on_event)
        self.notifications = notifications
        self.notifications_task = asyncio.create_task(notifications.run(),
                                                      name="notifications")

    async def stop_notifications(self) -> None:
        """Stop delivering: a send in flight finishes within a few seconds, or is cancelled
        and left queued (sent again by another node, or at the next start)."""
        notifications, self.notifications = self.notifications, None
        task, self.notifications_task = self.notifications_task, None
        if notifications is not None:
            if self.store is not None:
                self.store.listeners.remove(notifications.on_event)
            notifications.stop()
        if task is not None:
            grace = min(STOP_GRACE, self.config.daemon.shutdown_grace)
            await asyncio.wait([task], timeout=grace)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reload(self, config: Config) -> list[str]:
        """Apply a new, already validated config; return what changed, one line each.

        Apps added start, removed ones stop, changed ones restart with the new settings;
        their jobs, quarantine and history stay in the store. Tokens change at once. The
        daemon section (state_dir, listen) needs a restart and is left as it was.
        """
        changes: list[str] = []
        if config.daemon != self.config.daemon:
            changes.append("daemon settings changed: restart deployd to apply them")
            config = replace(config, daemon=self.config.daemon)
        for name in sorted(set(self.config.apps) - set(config.apps)):
            await self.stop_app(name, forget=True)
            changes.append(f"app {name} removed")
        for name, app in sorted(config.apps.items()):
            old = self.config.apps.get(name)
            if old == app:
                continue
            if old is not None:
                await self.stop_app(name)
            self.config = replace(self.config, apps={**self.config.apps, name: app})
            self.start_app(app)
            changes.append(f"app {name} {'changed' if old is not None else 'added'}")
        if self.context is not None and self.context.tokens != config.tokens:
            self.context.tokens = config.tokens
            changes.append("tokens changed")
        notify_changed = config.notify != self.config.notify
        self.config = config
        if notify_changed:
            await self.stop_notifications()
            self.start_notifications()
            changes.append("notification targets changed")
        return changes


DAEMON = web.AppKey("daemon", Daemon)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    state_dir = daemon.config.daemon.state_dir
    # Holds the mirrors (code not yet public), approvals and known_hosts: the daemon's only.
    try:
        for private in (state_dir, state_dir / "mirrors", state_dir / "git-home"):
            make_private_dir(private)
    except OSError as exc:
        raise StoreError(f"cannot open state store in {state_dir}: {exc.strerror or exc}") from exc
    daemon.store = _make_store(daemon.config.daemon)
    await daemon.store.open()
    log.info("state store open: %s", daemon.store.backend.description)
    app[api.CONTEXT].store = daemon.store
    yield
    await daemon.store.close()


def _make_store(settings: DaemonConfig) -> Store:
    """The SQLite file in state_dir, or the PostgreSQL database `[daemon] database` names."""
    if settings.database is None:
        return Store(settings.state_dir / "deployd.sqlite3")
    from deployd.store_postgres import PostgresBackend, read_password  # only when used

    password = (read_password(settings.database_password_file)
                if settings.database_password_file is not None else None)
    return Store(PostgresBackend(settings.database, password=password))


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=8, ttl_dns_cache=300)
    daemon.session = aiohttp.ClientSession(connector=connector)
    app[api.CONTEXT].session = daemon.session  # forwards actions to the node running an app
    yield
    await daemon.session.close()


async def _hosts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.pool = HostPool(metrics=daemon.metrics)
    yield
    await daemon.pool.close()


async def _apps_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.ownership = _make_ownership(daemon)
    for app_config in daemon.config.apps.values():
        daemon.start_app(app_config)
    ownership = daemon.ownership
    if ownership is not None:
        await ownership.round()
        daemon.ownership_task = asyncio.create_task(ownership.run(), name="ownership")
    log.info("deployd started with %d app(s), running %d", len(daemon.supervisors),
             len(daemon.tasks))
    yield
    if daemon.ownership_task is not None:
        daemon.ownership_task.cancel()
        await asyncio.gather(daemon.ownership_task, return_exceptions=True)
    await asyncio.gather(*(daemon.stop_app(name) for name in list(daemon.supervisors)))
    if ownership is not None:
        await ownership.close()  # only now: the locks outlive every app's last host step


def _make_ownership(daemon: Daemon) -> NodeOwnership | None:
    """On PostgreSQL, this node's share of the apps; on SQLite, None: it runs every app."""
    if daemon.config.daemon.database is None:
        return None
    from deployd.store_postgres import PostgresBackend  # only when used

    assert daemon.store is not None
    backend = daemon.store.backend
    if not isinstance(backend, PostgresBackend):
        return None
    from deployd.ownership import NodeOwnership

    settings = daemon.config.daemon
    return NodeOwnership(
        backend, node=settings.node, advertise=settings.advertise_url,
        failover=settings.failover, metrics=daemon.metrics,
        apps=lambda: daemon.config.apps, on_acquire=daemon.acquire_app,
        on_release=daemon.release_app, on_lost=daemon.release_all, idle=daemon.idle)


async def _notifications_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.start_notifications()
    yield
    await daemon.stop_notifications()


def create_application(config: Config, *, metrics: Metrics | None = None) -> web.Application:
    """The whole daemon as an aiohttp application (run it with a runner or a test client)."""
    daemon = Daemon(config=config, metrics=metrics or Metrics())
    context = api.ApiContext(
        store=None,  # type: ignore[arg-type]  # set by _store_ctx before any request
        metrics=daemon.metrics,
        tokens=config.tokens,
        supervisors=daemon.supervisors,
        metrics_auth=config.daemon.metrics_auth,
        client_timeout=config.daemon.client_timeout,
        ready=daemon.readiness,
        listen=(config.daemon.listen_host, config.daemon.listen_port),
        public_url=config.daemon.public_url,
        owner_elsewhere=daemon.owner_elsewhere,
        nodes=daemon.node_list,
        node=config.daemon.node,
    )
    daemon.context = context
    app = api.create_app(context)
    webhooks.add_routes(app, daemon.supervisors, daemon.metrics)
    app[DAEMON] = daemon
    app.cleanup_ctx.extend([_store_ctx, _session_ctx, _hosts_ctx, _apps_ctx,
                            _notifications_ctx])
    return app


async def serve(config: Config, stop: asyncio.Event, notifier: Notifier,
                reload: asyncio.Event | None = None) -> None:
    """Run the daemon on `config.daemon.listen` until `stop` is set.

    Setting `reload` re-reads the config file: a valid one is applied, one with errors is
    refused (logged, one line per problem) and the running config stays.
    """
    app = create_application(config)
    runner = make_runner(app, config.daemon)
    notifier.status("opening the store and starting apps")
    await runner.setup()
    watchdog = asyncio.create_task(notifier.watchdog_loop(), name="watchdog")
    status = StatusHandler(notifier)
    logging.getLogger("deployd.events").addHandler(status)
    try:
        site = web.TCPSite(runner, config.daemon.listen_host, config.daemon.listen_port)
        try:
            await site.start()
        except OSError as exc:  # port taken, address not local: one line, not a traceback
            raise DeploydError(f"cannot listen on {config.daemon.listen_host}:"
                               f"{config.daemon.listen_port}: {exc.strerror or exc}") from exc
        log.info("listening on %s:%d", config.daemon.listen_host, config.daemon.listen_port)
        notifier.ready(f"serving {len(config.apps)} app(s) on "
                       f"{config.daemon.listen_host}:{config.daemon.listen_port}")
        await _wait_and_reload(app[DAEMON], stop, reload or asyncio.Event(), notifier)
        log.info("stopping")
        notifier.stopping("finishing in-flight host steps")
    finally:
        await runner.cleanup()
        logging.getLogger("deployd.events").removeHandler(status)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


class StatusHandler(logging.Handler):
    """Shows the latest event as the unit's status line (`systemctl status deployd`)."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__(logging.INFO)
        self.notifier = notifier

    def emit(self, record: logging.LogRecord) -> None:
        self.notifier.status(record.getMessage()[:200])


async def _wait_and_reload(daemon: Daemon, stop: asyncio.Event, reload: asyncio.Event,
                           notifier: Notifier) -> None:
    while not stop.is_set():
        stopped = asyncio.create_task(stop.wait())
        reloaded = asyncio.create_task(reload.wait())
        await asyncio.wait({stopped, reloaded}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        reloaded.cancel()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            notifier.reloading()
            await reload_config(daemon)
            notifier.ready(f"serving {len(daemon.supervisors)} app(s)")


async def reload_config(daemon: Daemon) -> bool:
    """Re-read the daemon's config file and apply it; False (old config kept) on errors."""
    path = daemon.config.path
    try:
        config = await asyncio.to_thread(load, path)
        await asyncio.to_thread(check_files, config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, keeping the running config: %s: %s", path, problem)
        return False
    changes = await daemon.reload(config)
    log.info("config reloaded from %s: %s", path, "; ".join(changes) or "no changes")
    return True
