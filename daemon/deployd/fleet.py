"""All hosts of one app together: state, deploy and rollback with at most `parallel` hosts
acted on at once.

A deploy prepares the new release on every host before any host switches; if any host fails
to prepare, every host drops the new release and no host switches. If a switch (or a restart
hook after it) fails somewhere, the hosts already switched go back, so the fleet never stays
split. A rollback first checks on every host that the target exists with the same revision and
that nobody holds the lock, and switches nothing otherwise. Every phase waits for every host:
one host's failure never abandons another host's step half way, and once switching began,
cancellation waits for the phase to end.

Deploys, rollbacks and their undoing switch `current` on every host of the operation first and
only then run the hooks (rollback, restart) anywhere: each host's step holds right after its
switch until every host switched (see `hosts.Gate`), so the fleet runs two releases for about
one round trip, not for the slowest host's restart. A held step goes on by itself if deployd
vanishes: a switched host always runs its hooks. A deploy or a rollback may name a subset of the
hosts; the other hosts are not contacted at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NoReturn, TypeVar

from deployd.config import AppConfig
from deployd.errors import (
    ConnectError,
    DeploydError,
    FleetError,
    Invalid,
    ReleaseError,
    RemoteError,
)
from deployd.hosts import MAX_CHANNELS, Gate, HostPool, SSHHost, Stdin
from deployd.metrics import Metrics
from deployd.releases import (
    RELEASE_FORMAT,
    HostLockHeld,
    HostState,
    LockInfo,
    Releases,
    Step,
    is_release_name,
    release_name,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

Timings = dict[str, dict[str, float]]


@dataclass(frozen=True)
class DeployOutcome:
    """A finished deploy: the release now live everywhere, and what each host went through."""

    release: str
    revision: str
    previous: Mapping[str, str | None]  # host -> release live before the deploy
    timings: Mapping[str, Mapping[str, float]]  # host -> phase -> seconds
    pruned: Mapping[str, tuple[str, ...]]  # host -> releases removed after the switch
    warnings: Mapping[str, str]  # host -> what went wrong after the switch (prune, unlock)
    seconds: float
    # host -> hook ("build", "restart") -> the last lines it printed, where it printed any
    output: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def own(self, node: str, epoch: int) -> None:
        """Act as `node`'s ownership `epoch` of the app: on-host locks name it, and a lock
        an earlier ownership left (its node died or was cut off mid-operation, on another
        machine) is taken over at once instead of after `lock_stale_after`."""
        self.owner, self.epoch = f"{node} epoch {epoch}", epoch

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts the release went live on."""
        return tuple(self.previous)


@dataclass(frozen=True)
class RollbackOutcome:
    """A rollback: the target now live on `hosts`, and what was live there before."""

    target: str
    revision: str | None
    previous: Mapping[str, str | None]  # host -> release rolled away from
    timings: Mapping[str, float]  # host -> seconds for its rollback (switch and hooks)
    seconds: float
    # host -> "rollback" -> the last lines the rollback and restart hooks printed
    output: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # host -> phase ("check", "rollback" (the switch), "restart" (the hooks)) -> seconds
    phases: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def own(self, node: str, epoch: int) -> None:
        """Act as `node`'s ownership `epoch` of the app: on-host locks name it, and a lock
        an earlier ownership left (its node died or was cut off mid-operation, on another
        machine) is taken over at once instead of after `lock_stale_after`."""
        self.owner, self.epoch = f"{node} epoch {epoch}", epoch

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts now on the target release."""
        return tuple(self.previous)


def _outputs(steps: Mapping[str, Step], hook: str) -> dict[str, dict[str, str]]:
    """host -> {hook: output} for the steps whose hooks printed something."""
    return {name: {hook: step.output} for name, step in steps.items() if step.output}


def _merge(*outputs: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for output in outputs:
        for name, hooks in output.items():
            merged.setdefault(name, {}).update(hooks)
    return merged


class RollbackIncomplete(FleetError):
    """Some hosts rolled back and some failed; `outcome` lists the ones that did, `failures`
    the others (retry them with `rollback(..., hosts=[...])`)."""

    def __init__(self, failures: Mapping[str, BaseException], outcome: RollbackOutcome) -> None:
        super().__init__("rollback", failures)
        self.outcome = outcome


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Fleet:
    """One app's hosts, acted on together."""

    def __init__(self, app: AppConfig, pool: HostPool, metrics: Metrics | None = None, *,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.app = app
        self.pool = pool
        # SSH errors are counted by the pool's hosts; count here only if the pool does not.
        self._metrics = metrics if pool.metrics is None else None
        self._clock = clock
        self._slots = asyncio.Semaphore(max(1, app.parallel))
        # "node epoch N" while this node owns the app (several daemons), written into the
        # on-host lock of every deploy and rollback (see `own`).
        self.owner = ""
        self.epoch = 0
        # Locks this fleet took but could not release (a host was unreachable): free to take.
        self._abandoned: set[str] = set()
        self._members: dict[str, Releases] = {}
        for label, host in zip(app.host_labels, app.hosts, strict=True):
            self._members[label] = Releases(pool.host(app, host), app)

    def own(self, node: str, epoch: int) -> None:
        """Act as `node`'s ownership `epoch` of the app: on-host locks name it, and a lock
        an earlier ownership left (its node died or was cut off mid-operation, on another
        machine) is taken over at once instead of after `lock_stale_after`."""
        self.owner, self.epoch = f"{node} epoch {epoch}", epoch

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host's label, in config order."""
        return tuple(self._members)

    async def connect(self) -> dict[str, DeploydError]:
        """Open every host's connection now; returns the hosts that could not be reached."""
        return await self.pool.warm(member.host for member in self._members.values())

    async def state(self) -> dict[str, HostState | DeploydError]:
        """Every host's state, or the error that prevented reading it."""
        states, failures = await self._each(self.hosts, "state", lambda m: m.state())
        return {name: states[name] if name in states else failures[name] for name in self.hosts}

    # -- deploy ----------------------------------------------------------------------------

    async def deploy(self, revision: str, tarball: Stdin, *, branch: str, actor: str,
                     protect: Collection[str] = (),
                     revision_time: float | None = None, hosts: Iterable[str] | None = None,
                     release: str | None = None) -> DeployOutcome:
        """Deploy `tarball` (the tree of `revision`: bytes, or an archive every host streams
        from, read once per host) as a new release on every host, or only on `hosts` (the
        others are not contacted), named `release` (default: now, past the newest release on
        those hosts).

        Raises FleetError("prepare", ...) when any host cannot be prepared (no host switched,
        the new release removed everywhere), FleetError("switch", ...) when a switch or the
        restart hook after it failed (the switched hosts went back). Releases beyond
        keep_releases are pruned afterwards on the deployed hosts, never the live one nor any
        in `protect`.
        """
        started = time.monotonic()
        names = self._select(hosts)
        if not names:
            raise Invalid(f"{self.app.name}: a deploy needs at least one host")
        if release is not None and not is_release_name(release):
            raise Invalid(f"{self.app.name}: not a release name (14 digits): {release!r}")
        timings: Timings = {name: {} for name in names}
        states = await self._check_before_deploy(names, timings)
        new = release if release is not None else self.next_release_name(states.values())
        lock = LockInfo.new(actor, f"deploy {revision}", owner=self.owner)
        log.info("%s: deploying %s as release %s on %d hosts", self.app.name, revision[:12],
                 new, len(names))

        async def prepare(name: str, member: Releases) -> Step:
            return await member.prepare(new, revision, tarball, branch=branch, lock=lock,
                                        revision_time=revision_time,
                                        takeover=self._stale_token(states[name]))

        try:
            prepared, failures = await self._each_named(names, "prepare", prepare, timings)
        except asyncio.CancelledError:
            await _complete(self._discard(new, lock, names, timings))
            raise
        if failures:
            await self._abort_prepare(new, lock, names, failures, timings)
        previous = {name: prepared[name].previous for name in names}
        return await _complete(self._switch_all(
            new, revision, branch=branch, actor=actor, lock=lock, previous=previous,
            protect=protect, timings=timings, started=started,
            built=_outputs(prepared, "build")))

    def next_release_name(self, states: Iterable[HostState | DeploydError]) -> str:
        """Now in UTC as YYYYmmddHHMMSS, moved past the newest release on any host."""
        name = release_name(self._clock())
        newest = max((s.newest for s in states if isinstance(s, HostState) and s.newest),
                     default=None)
        if newest is None or name > newest:
            return name
        try:
            moment = datetime.strptime(newest, RELEASE_FORMAT).replace(tzinfo=UTC)
        except ValueError as exc:
            raise ReleaseError(f"{self.app.name}: cannot name a release after {newest}") from exc
        return release_name(moment + timedelta(seconds=1))

    async def _check_before_deploy(self, names: tuple[str, ...],
                                   timings: Timings) -> dict[str, HostState]:
        """Every named host reachable and not locked by someone else, before uploading
        anything."""
        states, failures = await self._each(names, "check", lambda m: m.state(), timings)
        for name, state in states.items():
            if state.lock is not None and self._stale_token(state) is None:
                failures[name] = HostLockHeld(name, state.lock)
        if failures:
            raise FleetError("prepare", failures)
        return states

    async def _abort_prepare(self, release: str, lock: LockInfo, names: tuple[str, ...],
                             failures: dict[str, DeploydError], timings: Timings) -> NoReturn:
        """Remove the new release and the lock on `names`; raise the prepare failures."""
        cleanable = [name for name in names
                     if not isinstance(failures.get(name), HostLockHeld)]
        leftovers = await _complete(self._discard(release, lock, cleanable, timings))
        for name, error in leftovers.items():
            if name not in failures:
                failures[name] = ReleaseError(
                    f"{name}: prepared, but removing release {release} failed: {error}")
        raise FleetError("prepare", failures)

    async def _discard(self, release: str, lock: LockInfo, names: Iterable[str],
                       timings: Timings) -> dict[str, DeploydError]:
        """Remove releases/<release> and our lock on `names`; returns where that failed."""
        _, failures = await self._each(
            names, "discard", lambda m: m.remove_release(release, unlock=lock), timings)
        if failures:
            self._abandoned.add(lock.token)
        for name, error in failures.items():
            log.warning("%s: %s: could not remove release %s: %s", self.app.name, name,
                        release, error)
        return failures

    async def _switch_all(self, release: str, revision: str, *, branch: str, actor: str,
                          lock: LockInfo, previous: dict[str, str | None],
                          protect: Collection[str], timings: Timings, started: float,
                          built: dict[str, dict[str, str]]) -> DeployOutcome:
        names = tuple(previous)

        async def switch(name: str, member: Releases, gate: Gate | None) -> Step:
            return await member.switch(release, revision=revision, branch=branch, actor=actor,
                                       lock=lock, gate=gate)

        switched, failures = await self._each_held(names, ("switch", "restart"), switch,
                                                   timings)
        if failures:
            await self._undo_switch(release, lock, actor, previous, failures, timings)
        pruned, problems = await self._each(
            names, "finish",
            lambda m: m.prune(self.app.keep_releases, protect, unlock=lock), timings)
        if problems:
            self._abandoned.add(lock.token)
        log.info("%s: release %s (%s) live on %d hosts in %.2fs", self.app.name, release,
                 revision[:12], len(names), time.monotonic() - started)
        return DeployOutcome(
            release=release, revision=revision, previous=previous, timings=timings,
            pruned={name: removed for name, removed in pruned.items() if removed},
            warnings={name: f"after the switch: {error}" for name, error in problems.items()},
            seconds=time.monotonic() - started,
            output=_merge(built, _outputs(switched, "restart")))

    async def _undo_switch(self, release: str, lock: LockInfo, actor: str,
                           previous: dict[str, str | None], failures: dict[str, DeploydError],
                           timings: Timings) -> NoReturn:
        """Switch every host of `previous` back to its previous release (then restart), drop
        the new one, raise."""
        log.error("%s: switch to %s failed on %s; switching every host back", self.app.name,
                  release, ", ".join(sorted(failures)))
        names = tuple(previous)

        async def revert(name: str, member: Releases, gate: Gate | None) -> Step:
            return await member.revert(previous[name], actor=actor, lock=lock, gate=gate)

        _, stuck = await self._each_held(names, ("revert", "revert restart"), revert, timings)
        if stuck:
            self._abandoned.add(lock.token)
        reverted = [name for name in names if name not in stuck]
        leftovers = await self._discard(release, lock, reverted, timings)
        for name, error in {**leftovers, **stuck}.items():
            problem = f"{name}: could not switch back to {previous[name] or 'no release'}: {error}"
            failures[name] = ReleaseError(
                f"{failures[name]}; {problem}" if name in failures else problem)
        raise FleetError("switch", failures)

    # -- rollback --------------------------------------------------------------------------

    async def rollback(self, target: str, *, reason: str, actor: str,
                       protect: Collection[str] = (), hosts: Iterable[str] | None = None,
                       revision: str | None = None) -> RollbackOutcome:
        """Point every host (or only `hosts`: the others are not contacted) back at
        releases/<target>.

        First, in one round trip per host, checks that the target exists on every reachable
        host with one revision (`revision` if given) and that no live lock is held; otherwise
        raises FleetError("rollback check", ...) naming the hosts, and switches nothing. Then
        switches every reachable host back, and only then runs the rollback and restart hooks
        on all of them. Hosts that could not be reached or failed are named
        in RollbackIncomplete (its `outcome` lists the hosts that did roll back); retry them
        with `hosts=[...]`. `protect` is accepted for symmetry with deploy: a rollback removes
        nothing.
        """
        del protect
        started = time.monotonic()
        names = self._select(hosts)
        timings: Timings = {name: {} for name in names}
        states, unreachable = await self._check_before_rollback(target, names, revision,
                                                                timings)
        expected = next((s.release(target) for s in states.values()), None)
        expected_revision = expected.revision if expected else revision
        steps, failures = await _complete(self._roll_all(
            target, states, reason=reason, actor=actor, revision=expected_revision,
            timings=timings))
        outcome = RollbackOutcome(
            target=target, revision=expected_revision,
            previous={name: step.previous for name, step in steps.items()},
            timings={name: sum(timings[name].get(phase, 0.0) for phase in ("rollback",
                                                                           "restart"))
                     for name in steps},
            seconds=time.monotonic() - started, output=_outputs(steps, "rollback"),
            phases={name: timings[name] for name in steps})
        failures.update(unreachable)
        if failures:
            log.error("%s: rollback to %s failed on %s", self.app.name, target,
                      ", ".join(sorted(failures)))
            raise RollbackIncomplete(failures, outcome)
        log.info("%s: rolled back to %s on %d hosts in %.2fs", self.app.name, target,
                 len(steps), outcome.seconds)
        return outcome

    async def _roll_all(self, target: str, states: Mapping[str, HostState], *, reason: str,
                        actor: str, revision: str | None, timings: Timings,
                        ) -> tuple[dict[str, Step], dict[str, DeploydError]]:
        async def roll(name: str, member: Releases, gate: Gate | None) -> Step:
            return await member.rollback(target, from_release=states[name].current,
                                         reason=reason, actor=actor, revision=revision,
                                         takeover=self._stale_token(states[name]), gate=gate,
                                         owner=self.owner)

        return await self._each_held(states, ("rollback", "restart"), roll, timings)

    async def _check_before_rollback(
            self, target: str, names: tuple[str, ...], revision: str | None,
            timings: Timings | None = None,
    ) -> tuple[dict[str, HostState], dict[str, DeploydError]]:
        """The states of the reachable hosts if the target is fit on all of them, and the
        hosts that could not be reached; raises when a reachable host is not fit."""
        states, failures = await self._each(names, "check", lambda m: m.state(), timings)
        unreachable: dict[str, DeploydError] = {
            name: error for name, error in failures.items() if isinstance(error, ConnectError)}
        problems = {name: error for name, error in failures.items() if name not in unreachable}
        found: dict[str, str | None] = {}
        for name, state in states.items():
            release = state.release(target)
            if state.lock is not None and self._stale_token(state) is None:
                problems[name] = HostLockHeld(name, state.lock)
            elif release is None:
                problems[name] = ReleaseError(f"{name}: release {target} does not exist")
            else:
                found[name] = release.revision
        problems.update(_disagreements(target, found, revision))
        if problems or not states:
            raise FleetError("rollback check", {**problems, **unreachable})
        return states, unreachable

    def _select(self, hosts: Iterable[str] | None) -> tuple[str, ...]:
        if hosts is None:
            return self.hosts
        chosen = tuple(dict.fromkeys(hosts))
        unknown = [name for name in chosen if name not in self._members]
        if unknown:
            raise Invalid(f"{self.app.name}: no such host(s): {', '.join(unknown)}")
        return chosen

    # -- fan-out ---------------------------------------------------------------------------

    def _stale_token(self, state: HostState) -> str | None:
        """The token of a lock on the host that may be taken over, if the lock is stale."""
        lock = state.lock
        if lock is not None and (lock.token in self._abandoned
                                 or lock.is_stale(self.app.lock_stale_after)
                                 or self._superseded(lock)):
            return lock.token
        return None

    def _superseded(self, lock: LockInfo) -> bool:
        """Taken under an earlier epoch of this app's ownership: that owner was fenced off
        before this one began, so its steps on the host are over or fail their lock check."""
        return self.epoch > 0 and lock.epoch is not None and lock.epoch < self.epoch

    async def _each(self, names: Iterable[str], phase: str,
                    action: Callable[[Releases], Awaitable[T]],
                    timings: Timings | None = None,
                    ) -> tuple[dict[str, T], dict[str, DeploydError]]:
        return await self._each_named(names, phase, lambda _, member: action(member), timings)

    async def _each_named(self, names: Iterable[str], phase: str,
                          action: Callable[[str, Releases], Awaitable[T]],
                          timings: Timings | None = None,
                          ) -> tuple[dict[str, T], dict[str, DeploydError]]:
        """Run `action` on every named host, at most `parallel` at once, until all are done;
        returns the results and the failures by host, in the order of `names`."""

        results: dict[str, T] = {}
        failures: dict[str, DeploydError] = {}

        async def one(name: str) -> None:
            async with self._slots:
                began = time.monotonic()
                try:
                    await self._attempt(name, phase, action(name, self._members[name]),
                                        results, failures)
                finally:
                    if timings is not None:
                        timings.setdefault(name, {})[phase] = time.monotonic() - began
            if name in failures:
                self._count(name, failures[name])

        names = tuple(names)
        await asyncio.gather(*(one(name) for name in names))
        return _in_order(names, results, failures)

    def _can_hold(self, names: Iterable[str]) -> bool:
        """Whether every named host's step can be held at once: a held step keeps its SSH
        channel, so more hosts on one connection than it has channels would wait for each
        other until their time limit."""
        hosts = [self._members[name].host for name in names]
        sharing = Counter(id(host.connection) for host in hosts if isinstance(host, SSHHost))
        return max(sharing.values(), default=0) <= MAX_CHANNELS

    async def _attempt(self, name: str, phase: str, step: Awaitable[T], results: dict[str, T],
                       failures: dict[str, DeploydError]) -> None:
        """Await one host's step into `results`, or its error into `failures`."""
        try:
            results[name] = await step
        except DeploydError as exc:
            failures[name] = exc
        except Exception as exc:
            log.exception("%s: %s on %s failed unexpectedly", self.app.name, phase, name)
            failures[name] = RemoteError(name, f"{phase} failed: {exc!r}")

    async def _each_held(self, names: Iterable[str], phases: tuple[str, str],
                         action: Callable[[str, Releases, Gate | None], Awaitable[T]],
                         timings: Timings) -> tuple[dict[str, T], dict[str, DeploydError]]:
        """Like `_each_named`, for steps that switch `current` then run hooks: every host's
        step runs until it switched and holds there (see `hosts.Gate`), or ended, at most
        `parallel` at once; once every host got that far, the held steps go on to their
        hooks, again at most `parallel` at once. `phases` name the two halves in `timings`.
        Without hooks to hold for, or hosts to hold on, a plain `_each_named`."""
        names = tuple(names)
        if not (self.app.hooks.restart or self.app.hooks.rollback) or not self._can_hold(names):
            return await self._each_named(
                names, phases[0], lambda name, member: action(name, member, None), timings)
        # A held step may wait for every other host's switch and hooks, `parallel` at a time.
        rounds = -(-len(names) // max(1, self.app.parallel))
        budget = rounds * (self.app.ssh.command_timeout + 2 * (self.app.hook_timeout + 10))
        results: dict[str, T] = {}
        failures: dict[str, DeploydError] = {}
        waiting = len(names)
        everyone_switched = asyncio.Event()

        async def one(name: str) -> None:
            nonlocal waiting
            gate = Gate(budget)
            try:
                async with self._slots:
                    began = time.monotonic()
                    step = asyncio.ensure_future(action(name, self._members[name], gate))
                    reached = asyncio.ensure_future(gate.reached.wait())
                    await asyncio.wait([step, reached], return_when=asyncio.FIRST_COMPLETED)
                    reached.cancel()
                    timings.setdefault(name, {})[phases[0]] = time.monotonic() - began
            finally:
                waiting -= 1
                if not waiting:
                    everyone_switched.set()
            await everyone_switched.wait()
            if step.done():
                await self._attempt(name, phases[0], step, results, failures)
                return
            async with self._slots:
                began = time.monotonic()
                gate.release()
                await self._attempt(name, phases[1], step, results, failures)
                timings[name][phases[1]] = time.monotonic() - began

        await asyncio.gather(*(one(name) for name in names))
        for name, error in failures.items():
            self._count(name, error)
        return _in_order(names, results, failures)

    def _count(self, name: str, error: DeploydError) -> None:
        if self._metrics is not None and isinstance(error, RemoteError):
            self._metrics.ssh_errors_total.labels(app=self.app.name, host=name).inc()


def _disagreements(target: str, found: Mapping[str, str | None],
                   revision: str | None) -> dict[str, DeploydError]:
    """Hosts whose releases/<target> does not hold the expected (or a common) revision."""
    if revision is not None:
        return {name: ReleaseError(f"{name}: release {target} holds revision "
                                   f"{held or 'none'}, expected {revision}")
                for name, held in found.items() if held != revision}
    if len(set(found.values())) <= 1:
        return {}
    groups: dict[str | None, list[str]] = {}
    for name, held in sorted(found.items()):
        groups.setdefault(held, []).append(name)
    summary = "; ".join(f"{(held or 'none')[:12]} on {', '.join(hosts)}"
                        for held, hosts in groups.items())
    return {name: ReleaseError(f"{name}: hosts disagree on the revision of release {target} "
                               f"({summary})") for name in found}


def _in_order(names: tuple[str, ...], results: dict[str, T], failures: dict[str, DeploydError],
              ) -> tuple[dict[str, T], dict[str, DeploydError]]:
    """Results and failures in the order asked (config order), not the order hosts answered."""
    return ({name: results[name] for name in names if name in results},
            {name: failures[name] for name in names if name in failures})


async def _complete(awaitable: Awaitable[T]) -> T:
    """Await to the end even if the caller is cancelled meanwhile, then pass the cancel on:
    a switch phase must not stop half way."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result

