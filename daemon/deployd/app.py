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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from deployd import api
from deployd.config import AppConfig, Config
from deployd.fleet import Fleet
from deployd.git import GitHome, Mirror
from deployd.health import HealthMonitor
from deployd.hosts import HostPool
from deployd.metrics import Metrics
from deployd.notify import Notifier
from deployd.rescue import Rescue
from deployd.store import JobStore, Store
from deployd.supervisor import AppSupervisor

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
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def readiness(self) -> dict[str, bool]:
        checks = {"config": True, "store": self.store is not None and self.store.is_open}
        for name, sup in self.supervisors.items():
            checks[f"mirror:{name}"] = sup.fetched
        return checks

    def build_supervisor(self, app: AppConfig) -> AppSupervisor:
        assert self.store is not None and self.session is not None and self.pool is not None
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
        rescue = Rescue(app, store=self.store, jobs=JobStore(self.store), mirror=mirror,
                        metrics=self.metrics)
        sup = AppSupervisor(app, store=self.store, mirror=mirror, fleet=fleet,
                            metrics=self.metrics, health=health, rescue=rescue)
        return sup


DAEMON = web.AppKey("daemon", Daemon)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.store = Store(daemon.config.daemon.state_dir / "deployd.sqlite3")
    await daemon.store.open()
    app[api.CONTEXT].store = daemon.store
    yield
    await daemon.store.close()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=8, ttl_dns_cache=300)
    daemon.session = aiohttp.ClientSession(connector=connector)
    yield
    await daemon.session.close()


async def _hosts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.pool = HostPool(metrics=daemon.metrics)
    yield
    await daemon.pool.close()


async def _apps_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    for name, app_config in daemon.config.apps.items():
        sup = daemon.build_supervisor(app_config)
        daemon.supervisors[name] = sup
        daemon.tasks.append(asyncio.create_task(sup.run(), name=f"supervisor-{name}"))
        if sup.health is not None:
            daemon.tasks.append(asyncio.create_task(sup.health.run(), name=f"health-{name}"))
    log.info("deployd started with %d app(s)", len(daemon.supervisors))
    yield
    grace = daemon.config.daemon.shutdown_grace
    await asyncio.gather(*(sup.stop(grace) for sup in daemon.supervisors.values()))
    for task in daemon.tasks:
        task.cancel()
    for task in daemon.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    daemon.tasks.clear()


def create_application(config: Config, *, metrics: Metrics | None = None) -> web.Application:
    """The whole daemon as an aiohttp application (run it with a runner or a test client)."""
    daemon = Daemon(config=config, metrics=metrics or Metrics())
    context = api.ApiContext(
        store=None,  # type: ignore[arg-type]  # set by _store_ctx before any request
        metrics=daemon.metrics,
        tokens=config.tokens,
        supervisors=daemon.supervisors,
        metrics_auth=config.daemon.metrics_auth,
        ready=daemon.readiness,
    )
    app = api.create_app(context)
    app[DAEMON] = daemon
    app.cleanup_ctx.extend([_store_ctx, _session_ctx, _hosts_ctx, _apps_ctx])
    return app


async def serve(config: Config, stop: asyncio.Event, notifier: Notifier) -> None:
    """Run the daemon on `config.daemon.listen` until `stop` is set."""
    app = create_application(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    notifier.status("opening the store and starting apps")
    await runner.setup()
    watchdog = asyncio.create_task(notifier.watchdog_loop(), name="watchdog")
    try:
        site = web.TCPSite(runner, config.daemon.listen_host, config.daemon.listen_port)
        await site.start()
        log.info("listening on %s:%d", config.daemon.listen_host, config.daemon.listen_port)
        notifier.ready(f"serving {len(config.apps)} app(s) on "
                       f"{config.daemon.listen_host}:{config.daemon.listen_port}")
        await stop.wait()
        log.info("stopping")
        notifier.stopping("finishing in-flight host steps")
    finally:
        await runner.cleanup()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
