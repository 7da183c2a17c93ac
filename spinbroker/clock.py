"""The server's clock: wall-clock seconds that a step of the system clock does not move.

The core takes time as `now`, in seconds since the epoch, and the records carry it, so that
replay needs no clock (core.py). Those times must mean wall-clock time across restarts:
a package's `package_ttl` and `retention` outlive the process. Within one process,
though, they must not jump: a step of the system clock (an administrator's `date -s`, NTP
correcting a clock that was far off) read directly would expire every lease and package at
once when it goes forward, and hold them past their time when it goes back.

So the server reads the wall clock once, at start, and carries it forward by the time
elapsed since (CLOCK_BOOTTIME, which counts a suspended machine's sleep and is never
stepped; CLOCK_MONOTONIC where there is none). NTP's gradual corrections slew both clocks
alike. A step taken while the broker runs shows only at its next start.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

__all__ = ["SteadyWallClock", "elapsed_seconds"]


def _elapsed_source() -> Callable[[], float]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:  # a kernel without it
        return time.monotonic
    return functools.partial(time.clock_gettime, boottime)


#: Seconds since an arbitrary start that no clock step moves, and that count suspend time.
elapsed_seconds: Callable[[], float] = _elapsed_source()


class SteadyWallClock:
    """Callable: the wall clock as read at construction, plus the elapsed time since.
    `wall` and `elapsed` are injectable for tests."""

    __slots__ = ("_elapsed", "_offset")

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        elapsed: Callable[[], float] | None = None,
    ) -> None:
        self._elapsed = elapsed_seconds if elapsed is None else elapsed
        self._offset = wall() - self._elapsed()

    def __call__(self) -> float:
        return self._offset + self._elapsed()
