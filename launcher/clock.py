"""The launcher's clock: wall-clock seconds that a jump of the laptop's clock cannot move.

A run's spend is $/h times the time its machines ran. Measured with time.time(), an NTP step or
a user fixing the date mid-run would bill hours that never happened (and the budget would stop
the run) or hide hours that did. Within one launcher process, time here is the wall clock read
once at start plus a steady clock's progress since. The steady clock is one that counts a
laptop's sleep (Linux's CLOCK_BOOTTIME; macOS's CLOCK_MONOTONIC counts it): a rented machine
bills while the lid is closed, so its cost must too."""

from __future__ import annotations

import time

_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
_WALL_AT_START = time.time()
_STEADY_AT_START = time.clock_gettime(_STEADY)


def now() -> float:
    """Seconds since the epoch, as time.time(), but steady within this process."""
    return _WALL_AT_START + (time.clock_gettime(_STEADY) - _STEADY_AT_START)
