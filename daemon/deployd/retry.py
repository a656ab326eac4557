"""Retrying with backoff: the one place deployd uses tenacity.

`retry_async` reruns a coroutine while it fails with an error `should_retry` accepts, with
exponential backoff and jitter, bounded by a number of attempts AND a total time, then re-raises
the last error unchanged. Tests call `instant_retries()` so that retries do not sleep.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import tenacity

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry: at most `attempts` tries, none started after `total` seconds."""

    attempts: int = 4
    total: float = 30.0
    first_wait: float = 0.25
    max_wait: float = 4.0


DEFAULT_POLICY = RetryPolicy()

_instant = False


def set_instant(enabled: bool) -> None:
    """Make every retry wait zero seconds (for tests); attempts and bounds still apply."""
    global _instant
    _instant = enabled


@contextlib.contextmanager
def instant_retries() -> Iterator[None]:
    """Within this block, retries happen without sleeping."""
    previous = _instant
    set_instant(True)
    try:
        yield
    finally:
        set_instant(previous)


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    should_retry: Callable[[BaseException], bool],
    policy: RetryPolicy = DEFAULT_POLICY,
    describe: str = "operation",
) -> T:
    """Await `operation()` until it succeeds or the policy gives up; re-raise the last error."""
    wait: tenacity.wait.wait_base = (
        tenacity.wait_none() if _instant
        # wait_exponential_jitter's `initial` is deprecated in tenacity 9 and its replacement
        # `multiplier` missing from 8.2: build the same backoff from parts both versions have.
        else tenacity.wait_exponential(multiplier=policy.first_wait, max=policy.max_wait)
        + tenacity.wait_random(0, policy.first_wait)
    )

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.info("%s failed (attempt %d): %s; retrying", describe, state.attempt_number, error)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts)
        | tenacity.stop_before_delay(policy.total),
        wait=wait,
        retry=tenacity.retry_if_exception(should_retry),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(operation)
