"""The laptop's clock jumping, for the launcher process the fault test starts (PYTHONPATH holds
this folder then): time.time() and time.time_ns() read the wall clock plus the seconds written
in the file QLORA_TEST_CLOCK_OFFSET_FILE names, as after an NTP step or a date fixed by hand.
The steady clocks (monotonic, boottime) do not move, as they do not when the wall clock jumps.
libfaketime would do this below Python, but with its monotonic clock left alone it breaks
Python's time.sleep (clock_nanosleep: EINVAL, libfaketime 0.9.10)."""

import os
import time

_OFFSET_FILE = os.environ.get("QLORA_TEST_CLOCK_OFFSET_FILE")

if _OFFSET_FILE:
    _wall, _wall_ns = time.time, time.time_ns

    def _offset_s() -> float:
        try:
            with open(_OFFSET_FILE) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    time.time = lambda: _wall() + _offset_s()
    time.time_ns = lambda: _wall_ns() + int(_offset_s() * 1e9)
