"""The one way the REST API, events and notifications write a moment: UTC, milliseconds.

    1700000000.25 -> "2023-11-14T22:13:20.250Z"
"""

from __future__ import annotations

import time
from typing import overload


@overload
def iso_time(at: float) -> str: ...
@overload
def iso_time(at: None) -> None: ...
@overload
def iso_time(at: float | None) -> str | None: ...


def iso_time(at: float | None) -> str | None:
    """`at` (seconds since the epoch) as ISO 8601 in UTC with milliseconds; None stays None."""
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
