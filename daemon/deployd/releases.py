"""The Capistrano layout on one host, and deployd's deploy lock there.

    deploy_to/
        releases/<YYYYmmddHHMMSS>/     one per deploy (UTC), with REVISION and REVISION_TIME
        current -> deploy_to/releases/<name>   an ABSOLUTE symlink, as Capistrano writes it
        shared/                        linked dirs and files, symlinked into every release
        revisions.log                  one line per deploy and rollback, Capistrano's wording
        .deployd.lock                  who is changing this host right now, and why

Capistrano and deployd can act on the same hosts in turn: Capistrano's cleanup compares
`readlink current` with absolute release paths and skips everything when `releases/` holds names
that are not 14 digits, so both rules are kept here.

Each operation is one shell script sent in one round trip, over stdin (see `hosts`). Every value
in a script is `shlex.quote`d into a variable at the top; the script bodies only use those
variables, and only with shell builtins or as paths: no host var, hook text, lock token or lock
content ever becomes an argument of a process on the host. A hook reaches its own shell through a
pipe, with the hook variables exported to it alone. Scripts
report on stdout as `key=value` lines and fail with these exit statuses: 3 the layout does not
allow the operation (message on stderr), 4 the lock is held (its content on stdout), 5 a hook
failed. Given a `hosts.Gate`, a switch, rollback or revert holds right after moving `current`
(`held=1`) until deployd, or the end of its connection, lets it go on to its log line, marker and
hooks: the fleet switches every host before any host restarts.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources

from deployd.config import AppConfig
from deployd.errors import CommandError, LockHeld, ReleaseError
from deployd.hosts import Gate, Host, Result, Stdin

log = logging.getLogger(__name__)

RELEASE_NAME = re.compile(r"[0-9]{14}")  # fullmatch: `$` would accept a trailing newline
RELEASE_FORMAT = "%Y%m%d%H%M%S"
LOCK_FILE = ".deployd.lock"
MARKER_FILE = "ROLLED_BACK"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_E_LAYOUT, _E_LOCK, _E_HOOK = 3, 4, 5
# Identifies this daemon process in its locks: a lock from this machine with another instance
# and a dead pid was left by a previous run of the daemon (kill -9, crash) and is stale.
_INSTANCE = secrets.token_hex(6)
_MACHINE = socket.gethostname()


def is_release_name(name: str) -> bool:
    """Whether `name` is a release directory name deployd and Capistrano manage (14 digits)."""
    return bool(RELEASE_NAME.fullmatch(name))


def release_name(moment: datetime) -> str:
    """The release name for a moment: its UTC time as YYYYmmddHHMMSS."""
    return moment.astimezone(UTC).strftime(RELEASE_FORMAT)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str) -> str:
    return " ".join(text.split())


OUTPUT_LINES = 20
OUTPUT_LINE_CHARS = 300


def output_tail(text: str) -> str:
    """The last OUTPUT_LINES non-blank lines of `text`, each cut to OUTPUT_LINE_CHARS."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()][-OUTPUT_LINES:]
    return "\n".join(line if len(line) <= OUTPUT_LINE_CHARS else
                     line[:OUTPUT_LINE_CHARS - 3] + "..." for line in lines)


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """A directory under releases/ and the revision its REVISION file names."""

    name: str
    revision: str | None


@dataclass(frozen=True)
class LockInfo:
    """A host's deploy lock: who took it (from which deployd), when, why, and its token."""

    token: str
    actor: str
    reason: str
    since: float | None
    machine: str = ""
    pid: int = 0
    instance: str = ""
    # With several daemons on one database: the node that owned the app and the ownership's
    # epoch ("node-b epoch 3"), so a later owner's lock can be told from an earlier one's.
    owner: str = ""

    @classmethod
    def new(cls, actor: str, reason: str, *, now: float | None = None,
            owner: str = "") -> LockInfo:
        """A lock for this daemon process to take."""
        return cls(token=secrets.token_hex(12), actor=_one_line(actor) or "deployd",
                   reason=_one_line(reason), since=time.time() if now is None else now,
                   machine=_MACHINE, pid=os.getpid(), instance=_INSTANCE,
                   owner=_one_line(owner))

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> LockInfo:
        """Read a lock file's `key=value` lines (unknown or missing keys tolerated)."""
        since: float | None
        try:
            since = float(fields["since"])
        except (KeyError, ValueError):
            since = None
        try:
            pid = int(fields.get("pid", "0"))
        except ValueError:
            pid = 0
        return cls(token=fields.get("token", ""), actor=fields.get("actor", "unknown"),
                   reason=fields.get("reason", "unknown"), since=since,
                   machine=fields.get("machine", ""), pid=pid,
                   instance=fields.get("instance", ""), owner=fields.get("owner", ""))

    @property
    def holder(self) -> str:
        """`actor via deployd@machine` (or just the actor for a lock from elsewhere)."""
        return f"{self.actor} via deployd@{self.machine}" if self.machine else self.actor

    def content(self) -> str:
        """The lock file's text."""
        since = self.since if self.since is not None else time.time()
        return "".join(f"{key}={value}\n" for key, value in (
            ("token", self.token), ("holder", self.holder), ("actor", self.actor),
            ("machine", self.machine), ("pid", self.pid), ("instance", self.instance),
            ("since", int(since)), ("at", _iso(since)), ("reason", self.reason),
            *((("owner", self.owner),) if self.owner else ())))

    @property
    def epoch(self) -> int | None:
        """The ownership epoch the lock was taken under ("node-b epoch 3": 3), if any."""
        _, sep, number = self.owner.rpartition(" epoch ")
        return int(number) if sep and number.isdigit() else None

    def describe(self) -> str:
        """A sentence naming the holder, since when and why."""
        when = f" since {_iso(self.since)}" if self.since is not None else ""
        return f"{self.holder}{when} ({self.reason})"

    def is_stale(self, stale_after: float, now: float | None = None) -> bool:
        """Older than `stale_after`, or left by an earlier run of a deployd on this machine."""
        if self.since is None:
            return False  # unreadable: only a human may break it
        if (time.time() if now is None else now) - self.since > stale_after:
            return True
        return self.machine == _MACHINE and self.instance != _INSTANCE and (
            self.pid == os.getpid() or not _alive(self.pid))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostLockHeld(LockHeld):
    """LockHeld carrying the lock as read from the host, so callers can judge its age."""

    def __init__(self, host: str, lock: LockInfo) -> None:
        super().__init__(host, lock.describe())
        self.lock = lock


@dataclass(frozen=True)
class HostState:
    """What is on one host: the live release, every release, and the lock if held."""

    current: str | None
    current_revision: str | None
    releases: tuple[Release, ...]
    lock: LockInfo | None

    def release(self, name: str) -> Release | None:
        """The release called `name`, if present."""
        return next((item for item in self.releases if item.name == name), None)

    @property
    def newest(self) -> str | None:
        """The newest 14-digit release name."""
        names = [item.name for item in self.releases if is_release_name(item.name)]
        return max(names, default=None)


@dataclass(frozen=True)
class Step:
    """What one change on one host did."""

    release: str | None
    previous: str | None
    took_over: LockInfo | None = None
    output: str = ""  # the last lines its hooks printed (stdout and stderr, in order)
    removed: tuple[str, ...] = field(default=())


# -- shell ----------------------------------------------------------------------------------
#
# The scripts live in sh/*.sh beside this module (shellcheck and `sh -n` run on them in the
# tests). Each command is a title comment, the values as quoted shell assignments, lib.sh,
# then one step's script: values never become part of the script text itself.


def _shell(name: str) -> str:
    return (resources.files("deployd") / "sh" / f"{name}.sh").read_text()


_LIB = _shell("lib")
_STATE = _shell("state")
_PREPARE = _shell("prepare")
_SWITCH = _shell("switch")
_REVERT = _shell("revert")
_ROLLBACK = _shell("rollback")
_PRUNE = _shell("prune")
_REMOVE = _shell("remove")
SCRIPTS = ("lib", "state", "prepare", "switch", "revert", "rollback", "prune", "remove")


def _script(title: str, body: str, **values: str) -> str:
    """A script: a title comment (it names the command in errors), values, library, body."""
    assignments = "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    return f"# deployd: {title}\n{assignments}{_LIB}{body}"


def _fields(stdout: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    return fields


def _prefixed(fields: Mapping[str, list[str]], prefix: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, values in fields.items():
        if key.startswith(prefix):
            found[key[len(prefix):]] = values[-1]
    return found


def _last(fields: Mapping[str, list[str]], key: str) -> str | None:
    values = fields.get(key)
    return values[-1] if values else None


def _message(stderr: str) -> str:
    lines = [line[len("deployd: "):] for line in stderr.splitlines()
             if line.startswith("deployd: ")]
    return lines[-1] if lines else (stderr.strip().splitlines() or ["no output"])[-1]


def _check_name(name: str) -> str:
    if not _SAFE_NAME.fullmatch(name):
        raise ReleaseError(f"not a release name: {name!r}")
    return name


def _check_paths(paths: Collection[str]) -> str:
    for path in paths:
        if not path or path.startswith("/") or ".." in path.split("/") or any(
                char.isspace() for char in path):
            raise ReleaseError(f"linked path {path!r} must be inside the release, without spaces")
    return " ".join(paths)


# -- one host -------------------------------------------------------------------------------


class Releases:
    """The release layout of one app on one host."""

    def __init__(self, host: Host, app: AppConfig) -> None:
        self.host = host
        self.app = app
        self.deploy_to = host.config.deploy_to or app.deploy_to

    @property
    def name(self) -> str:
        return self.host.name

    async def state(self) -> HostState:
        """The live release and its revision, every release, and the lock if held."""
        result = await self._run("state", _STATE, {}, limit=self._timeout(0))
        fields = _fields(result.stdout)
        current_path = (_last(fields, "current") or "").rstrip("/")
        releases = []
        for entry in fields.get("release", []):
            name, _, revision = entry.partition("\t")
            releases.append(Release(name, revision.strip() or None))
        lock_fields = _prefixed(fields, "lock.")
        return HostState(
            current=current_path.rsplit("/", 1)[-1] or None,
            current_revision=(_last(fields, "current_revision") or "").strip() or None,
            releases=tuple(sorted(releases, key=lambda item: item.name)),
            lock=LockInfo.parse(lock_fields) if lock_fields else None,
        )

    async def prepare(self, release: str, revision: str, tarball: Stdin, *, branch: str,
                      lock: LockInfo, revision_time: float | None = None,
                      takeover: str | None = None) -> Step:
        """Take the lock, unpack `tarball` as releases/<release>, write REVISION and
        REVISION_TIME, link shared dirs and files, run the build hook inside it.

        The lock stays held on success (switch, then prune or remove_release, release it).
        On failure the script removes the half-made release and the lock it took.
        """
        del branch  # recorded by switch, in revisions.log
        values = {
            "release": _check_name(release), "revision": revision,
            "revision_time": str(int(time.time() if revision_time is None else revision_time)),
            "linked_dirs": _check_paths(self.app.linked_dirs),
            "linked_files": _check_paths(self.app.linked_files),
            "build_hook": self.app.hooks.build or "",
            **self._lock_values(lock, takeover), **self._env(revision),
        }
        hooks = 1 if self.app.hooks.build else 0
        return await self._locked_step(f"prepare release {release} ({revision[:12]})",
                                       _PREPARE, values, hooks, tarball,
                                       "build" if hooks else None)

    async def switch(self, release: str, *, revision: str, branch: str, actor: str,
                     lock: LockInfo, gate: Gate | None = None) -> Step:
        """Point current at releases/<release> atomically, log the deploy, run restart
        (once `gate`, if given, is released: see `hosts.Gate`).

        The lock must be held by `lock`; it stays held (prune or unlock release it).
        """
        line = (f"Branch {_one_line(branch)} (at {revision}) deployed as release "
                f"{release} by {_one_line(actor)}")
        values = {"release": _check_name(release), "log_line": line,
                  "restart_hook": self.app.hooks.restart or "",
                  **self._lock_values(lock, None), **self._env(revision)}
        hooks = 1 if self.app.hooks.restart else 0
        result = await self._run(f"switch to release {release}", _SWITCH, values,
                                 limit=self._timeout(hooks), gate=gate if hooks else None)
        return self._step(result, release, "restart" if hooks else None)

    async def revert(self, previous: str | None, *, actor: str, lock: LockInfo,
                     gate: Gate | None = None) -> Step:
        """Undo a switch: point current back at `previous` (or remove it when there was none)
        and run restart (once `gate` is released), unless current already is `previous`.
        Refuses if someone else took the lock; logs a rollback line."""
        line = f"{_one_line(actor)} rolled back to release {previous}"
        values = {"release": _check_name(previous) if previous else "", "log_line": line,
                  "restart_hook": self.app.hooks.restart or "",
                  **self._lock_values(lock, None), **self._env("")}
        hooks = 1 if self.app.hooks.restart else 0
        result = await self._run(f"revert to release {previous or '(none)'}", _REVERT, values,
                                 limit=self._timeout(hooks), gate=gate if hooks else None)
        return self._step(result, previous, "restart" if hooks else None)

    async def rollback(self, target: str, *, from_release: str | None = None, reason: str,
                       actor: str, revision: str | None = None,
                       takeover: str | None = None, gate: Gate | None = None,
                       owner: str = "") -> Step:
        """Take the lock, switch current to releases/<target> (which must exist, holding
        `revision` if given), mark the release rolled away from with ROLLED_BACK (kept, not
        deleted), log it, run the rollback then restart hooks (once `gate` is released),
        release the lock."""
        now = time.time()
        lock = LockInfo.new(actor, f"rollback to {target}", now=now, owner=owner)
        marker = "".join(f"{key}={_one_line(value)}\n" for key, value in (
            ("rolled_back_at", _iso(now)), ("rolled_back_epoch", str(int(now))),
            ("by", actor), ("reason", reason), ("to_release", target)))
        values = {"release": _check_name(target), "from_release": from_release or "",
                  "expect_revision": revision or "", "marker": marker,
                  "log_line": f"{_one_line(actor)} rolled back to release {target}",
                  "rollback_hook": self.app.hooks.rollback or "",
                  "restart_hook": self.app.hooks.restart or "",
                  **self._lock_values(lock, takeover), **self._env("")}
        hooks = sum(1 for hook in (self.app.hooks.rollback, self.app.hooks.restart) if hook)
        return await self._locked_step(f"roll back to release {target}", _ROLLBACK, values,
                                       hooks, None, "rollback and restart" if hooks else None,
                                       gate=gate if hooks else None)

    async def prune(self, keep: int, protect: Collection[str] = (), *,
                    unlock: LockInfo | None = None) -> tuple[str, ...]:
        """Remove the oldest 14-digit releases beyond the newest `keep`, never current nor
        a name in `protect`; then release `unlock` if given. Returns the removed names."""
        values = {"keep": str(max(keep, 1)),
                  "protect": " ".join(name for name in protect if _SAFE_NAME.fullmatch(name)),
                  "token": unlock.token if unlock else ""}
        result = await self._run(f"prune releases (keep {keep})", _PRUNE, values,
                                 limit=self._timeout(0))
        return tuple(_fields(result.stdout).get("removed", []))

    async def remove_release(self, name: str, *, unlock: LockInfo | None = None) -> bool:
        """Remove releases/<name> (never the live one), then release `unlock` if given."""
        values = {"release": _check_name(name), "token": unlock.token if unlock else ""}
        result = await self._run(f"remove release {name}", _REMOVE, values,
                                 limit=self._timeout(0))
        return bool(_fields(result.stdout).get("removed"))

    async def unlock(self, lock: LockInfo) -> None:
        """Release the deploy lock if `lock` holds it."""
        await self._run("unlock", "drop_lock\n", {"token": lock.token},
                        limit=self._timeout(0))

    # -- helpers ---------------------------------------------------------------------------

    async def _locked_step(self, title: str, body: str, values: dict[str, str], hooks: int,
                           tarball: Stdin | None, hook_names: str | None, *,
                           gate: Gate | None = None) -> Step:
        """Run a script that takes the lock; take a stale lock over (one more round trip)."""
        try:
            result = await self._run(title, body, values, input=tarball,
                                     limit=self._timeout(hooks), gate=gate)
        except HostLockHeld as exc:
            stale = exc.lock
            if values["takeover"] or not stale.is_stale(self.app.lock_stale_after):
                raise
            log.warning("%s: taking over the stale deploy lock of %s", self.name,
                        stale.describe())
            values = {**values, "takeover": stale.token}
            result = await self._run(title, body, values, input=tarball,
                                     limit=self._timeout(hooks), gate=gate)
        return self._step(result, values["release"], hook_names)

    def _step(self, result: Result, release: str | None, hook_names: str | None) -> Step:
        """What a step did; `hook_names` names the hooks it ran (None: it ran none)."""
        fields = _fields(result.stdout)
        took = _prefixed(fields, "took_over.")
        if took:
            log.warning("%s: took over a stale deploy lock: %s", self.name,
                        LockInfo.parse(took).describe())
        output = output_tail(result.stderr) if hook_names else ""
        if output:
            log.debug("%s: output of the %s hook(s): %s", self.name, hook_names,
                      " | ".join(output.splitlines()))
        return Step(release=release, previous=_last(fields, "previous") or None,
                    took_over=LockInfo.parse(took) if took else None, output=output)

    def _lock_values(self, lock: LockInfo, takeover: str | None) -> dict[str, str]:
        return {"token": lock.token, "lock_content": lock.content(), "takeover": takeover or ""}

    def _env(self, revision: str) -> dict[str, str]:
        """Hook variables; the script exports them to hooks alone (sshd drops client-sent
        environment)."""
        return {"host": self.name, "hook_timeout": f"{self.app.hook_timeout:g}",
                "DEPLOYD_APP": self.app.name, "DEPLOYD_REVISION": revision,
                "DEPLOYD_DEPLOY_TO": self.deploy_to, "DEPLOYD_HOST": self.name,
                **{f"DEPLOYD_VAR_{key.upper()}": str(value)
                   for key, value in self.host.config.vars.items()}}

    def _timeout(self, hooks: int) -> float:
        return self.app.ssh.command_timeout + hooks * (self.app.hook_timeout + 10)

    async def _run(self, title: str, body: str, values: Mapping[str, str], *,
                   limit: float, input: Stdin | None = None, gate: Gate | None = None) -> Result:
        """Run a step; with `gate`, the script holds (`hold_here`) until it is released, for
        at most `gate.budget` seconds more."""
        hook_env = " ".join(name for name in values if name.startswith("DEPLOYD_"))
        script = _script(title, body, dt=self.deploy_to, hook_env=hook_env, **values,
                         hold="1" if gate is not None else "")
        if gate is not None:
            limit += gate.budget
        result = await self.host.run(script, input=input, timeout=limit, check=False,
                                     gate=gate)
        if result.exit_status != 0:
            raise self._error(script, result)
        return result

    def _error(self, script: str, result: Result) -> Exception:
        fields = _fields(result.stdout)
        status = result.exit_status
        if status == _E_LOCK:
            return HostLockHeld(self.name, LockInfo.parse(_prefixed(fields, "lock.")))
        if status == _E_LAYOUT:
            return ReleaseError(f"{self.name}: {_message(result.stderr)}")
        failed = _last(fields, "hook_failed")
        if status == _E_HOOK and failed:
            hook, _, code = failed.partition(" ")
            timed_out = code in ("124", "137")
            failure = (f"the {hook} hook timed out after {self.app.hook_timeout:g}s" if timed_out
                       else f"the {hook} hook failed (exit {code})")
            # The script's own last line says what `failure` says: keep only the hook's output.
            output = "".join(line for line in result.stderr.splitlines(keepends=True)
                             if not line.startswith(f"deployd: the {hook} hook "))
            return CommandError(self.name, f"{hook} hook",
                                None if timed_out else int(code or -1), output, failure=failure)
        return CommandError(self.name, script, status, result.stderr)
