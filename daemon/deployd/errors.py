"""deployd's exceptions.

Every library's errors are translated into these at the module that owns the library
(`git` for pygit2, `hosts` for asyncssh, `store` for sqlite3), so callers only ever catch
deployd's own types::

    DeploydError
    ├── ConfigError          the config file is missing or invalid (all problems at once)
    ├── StoreError           the SQLite state store failed or holds an unexpected schema
    ├── GitError             a git operation on a mirror failed
    │   ├── HostKeyError     a git remote's SSH host key is unknown or changed
    │   ├── PushRejected     the remote refused a push (lease lost, hook, permissions)
    │   └── ReleaseRefused   a commit's tree cannot become a release (unsafe entry, too large)
    ├── RemoteError          something failed on a host
    │   ├── ConnectError     could not reach or log in to a host
    │   └── CommandError     a command ran on a host and failed (exit status, stderr)
    ├── ReleaseError         the on-host layout is not what an operation needs
    │   └── LockHeld         another deploy (deployd or not) holds the host's deploy lock
    ├── FleetError           an operation failed on some hosts (per-host errors attached)
    ├── NotFound             an app, job, release or revision that does not exist
    ├── Conflict             the request conflicts with the current state (REST 409)
    ├── Invalid              a request is well-formed but not acceptable (REST 422)
    └── Forbidden            a rule forbids this actor the action (REST 403)
"""

from __future__ import annotations

from collections.abc import Mapping


class DeploydError(Exception):
    """Root of every error deployd raises on purpose."""


class ConfigError(DeploydError):
    """Raised when the config file is missing or invalid; lists every problem found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def describe(self) -> str:
        """One problem per line, each prefixed with the file, for a terminal."""
        return "\n".join(f"{self.path}: {problem}" for problem in self.problems)


class StoreError(DeploydError):
    """Raised when the state store cannot be opened, migrated or written."""


class GitError(DeploydError):
    """Raised when a git operation on an app's mirror fails."""


class HostKeyError(GitError):
    """Raised when a git remote's SSH host key is not in the configured known_hosts."""


class PushRejected(GitError):
    """Raised when the remote refuses a ref update, or the lease no longer holds."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"push of {ref} rejected: {reason}")


class ReleaseRefused(GitError):
    """Raised when a commit's tree cannot become a release: an entry git fsck refuses
    (`path` names it) or more entries or bytes than the app allows (`path` is None)."""

    def __init__(self, revision: str, path: str | None, reason: str) -> None:
        self.revision = revision
        self.path = path
        self.reason = reason
        where = f" at path '{path}'" if path is not None else ""
        super().__init__(f"commit {revision[:12]} refused as a release{where}: {reason}")


class RemoteError(DeploydError):
    """Raised when something fails on one host."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class ConnectError(RemoteError):
    """Raised when a host cannot be reached or refuses the login (after retries)."""


class CommandError(RemoteError):
    """Raised when a command ran on a host and exited non-zero, or timed out."""

    def __init__(self, host: str, command: str, exit_status: int | None, stderr: str, *,
                 failure: str | None = None) -> None:
        """`failure` words what failed and how ("the build hook failed (exit 3)"); by default
        the command's first line and its exit status."""
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr
        if failure is None:
            status = "timed out" if exit_status is None else f"exit {exit_status}"
            failure = f"{command.split(chr(10))[0][:80]!r} failed ({status})"
        super().__init__(host, f"{failure}: {_tail(stderr)}")


def _tail(stderr: str, lines: int = 4, limit: int = 600) -> str:
    """The last few lines of a command's stderr on one line, in the order printed."""
    kept = [line.strip() for line in stderr.strip().splitlines() if line.strip()][-lines:]
    if not kept:
        return "no output"
    text = " | ".join(kept)
    return text if len(text) <= limit else "..." + text[3 - limit:]


class ReleaseError(DeploydError):
    """Raised when a host's release layout does not allow the requested operation."""


class LockHeld(ReleaseError):
    """Raised when a host's deploy lock is held by someone else; names the holder."""

    def __init__(self, host: str, holder: str) -> None:
        self.host = host
        self.holder = holder
        super().__init__(f"{host}: deploy lock held by {holder}")


class FleetError(DeploydError):
    """Raised when an operation failed on one or more hosts; `failures` maps host to error."""

    def __init__(self, action: str, failures: Mapping[str, BaseException]) -> None:
        self.action = action
        self.failures = dict(failures)
        detail = "; ".join(_per_host(host, error)
                           for host, error in sorted(self.failures.items()))
        super().__init__(f"{action} failed on {len(self.failures)} host(s): {detail}")


def _per_host(label: str, error: BaseException) -> str:
    """`label: message`, without the host's name the message may already start with."""
    text = str(error)
    # A label is the host's name, or `name:deploy_to` when hosts share a name.
    names = (label, getattr(error, "host", None), label.split(":/", 1)[0])
    for name in names:
        if name and text.startswith(f"{name}: "):
            text = text[len(name) + 2:]
            break
    return f"{label}: {text}"


class NotFound(DeploydError):
    """Raised when a named app, job, release or revision does not exist."""


class Conflict(DeploydError):
    """Raised when a request conflicts with current state (lock held, stale plan, paused)."""


class Invalid(DeploydError):
    """Raised when a request is well-formed but its content is not acceptable."""


class Forbidden(DeploydError):
    """Raised when a rule forbids this actor the action (e.g. approving their own job)."""
