"""Numbers as people read them on the graph, in tooltips and in the CLI.

Three significant digits, never an exponent (``100%``, not ``1e+02%``;
``1,250/s``, not ``1.25e+03/s``), trailing zeros dropped. The page's script
(static/dashboard.js, ``number``) follows the same rules.
"""

import math

# Below this a figure is shown as "<0.001": it is not zero, and more digits
# say nothing during an incident.
SMALLEST = 0.001


def number(value):
    """``value`` with three significant digits, thousands grouped from 1000."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < SMALLEST:
        return ("-" if value < 0 else "") + "<" + str(SMALLEST)
    if magnitude >= 1000:
        # Halves round up, as the page's script rounds them.
        return ("-" if value < 0 else "") + f"{math.floor(magnitude + 0.5):,}"
    decimals = max(0, 2 - math.floor(math.log10(magnitude)))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def percent(ratio):
    """A ratio (0..1) as a percentage: ``0.5`` -> ``50%``, ``1.0`` -> ``100%``."""
    return number(ratio * 100.0) + "%"


def rate(per_second):
    return number(per_second) + "/s"


def duration(seconds, estimated=False):
    """Seconds in s or ms; ``-`` for None; ``~`` in front of an estimate."""
    if seconds is None:
        return "-"
    text = number(seconds) + " s" if seconds >= 1 else number(seconds * 1000) + " ms"
    return ("~" if estimated else "") + text


def change(found):
    """An edge's or method's ``change`` (exporters/change.py) in a few words:
    ``rate x3, err +10%, p99 x12``; ``-`` while there is no baseline. The
    page's script (``changeText``) says the same."""
    if found is None:
        return "-"
    parts = []
    if found["rate"]["ratio"] is not None:
        parts.append(f"rate x{number(found['rate']['ratio'])}")
    elif not found["rate"]["baseline"]:
        parts.append("new")
    if found["error_ratio"]["difference"]:
        difference = found["error_ratio"]["difference"]
        parts.append(f"err {'+' if difference > 0 else ''}{percent(difference)}")
    if found["p99_seconds"]["ratio"] is not None:
        parts.append(f"p99 x{number(found['p99_seconds']['ratio'])}")
    return (", ".join(parts) or "same") + ("" if found["confident"] else " (short baseline)")
