"""Durations as people type them: ``90``, ``30s``, ``15m``, ``2h``, ``1d``."""

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SECONDS = 366 * 86400


def parse(text):
    """Seconds in ``text``; ValueError with a readable message otherwise."""
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 90, 30s, 15m, 2h, 1d)")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"{text!r}: a duration between 1s and 366d, please")
    return seconds
