"""Periodic reporters that went silent: which host stopped reporting.

A neutron agent calls ``report_state`` every ``report_interval``; a
nova-compute reports its service state and its compute node on a timer.
When one stops (its host is down, its process hung), it sends nothing, so
no timeout names it (exporters/silent.py has the servers that stopped
answering calls). This module learns, from the snapshots every process
ships, who sends on a timer, and flags one whose sends stopped for
``SILENT_INTERVALS`` of its usual intervals.

A reporter is a sending host, service, target, method and kind. Per
reporter it keeps, from the cumulative ``commlens_rpc_sent_total`` of its
processes, when the count grew and by how much (the last ``_GAPS``
growths), on the collector's clock (no clock sync with the agents):

- its interval is the time those growths spanned over the sends they
  counted;
- it is periodic when there are at least ``MIN_GAPS`` growths, the interval
  is at least ``MIN_SHIP_INTERVALS`` of its process's ship interval (a
  snapshot counts what was sent since the last one, so a faster sender's
  rhythm cannot be seen), and every growth came when the interval said it
  would, within a snapshot (``1.5 x`` the ship interval, an observation is
  late by up to one) or a quarter of the interval, and within ``0.6 x``
  the ship interval plus a tenth of the interval on average, each plus
  ``DELIVERY_JITTER`` for the snapshots' trip: traffic that follows users
  (a Poisson stream) is that regular only by chance;
- it is silent when nothing grew for more than ``SILENT_INTERVALS`` times
  its interval. One that slows a little is not: its gaps grow, but stay
  well under three intervals.

Hosts are unbounded, so they are never a metric label; here they are bounded
by count: at most ``max_reporters``, the one that sent longest ago dropped
first; one silent longer than ``retention_seconds`` is forgotten.
"""

import collections
import math
import threading
import time

from commlens.tracer import labels
from commlens.tracer import metrics

DEFAULT_MAX_REPORTERS = 5000
DEFAULT_RETENTION_SECONDS = 3600.0
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
MIN_GAPS = 6
MIN_SHIP_INTERVALS = 2.0
SILENT_INTERVALS = 3.0
# Snapshots reach the collector through the broker and its intake thread:
# their arrival, which times a growth, wobbles by up to this much (seconds).
DELIVERY_JITTER = 0.25
_GAPS = 8
_PROCESSES = 4  # processes remembered per reporter (restarts)
_SENT = metrics.RPC_SENT.name


class _Reporter:
    __slots__ = ("gaps", "last_sent", "last_wall", "values", "ship_interval", "sends",
                 "ended")

    def __init__(self):
        self.gaps = collections.deque(maxlen=_GAPS)  # (seconds, sends)
        self.last_sent = None   # collector clock: when its count last grew
        self.last_wall = None   # the same, wall clock (what the API shows)
        self.values = {}        # process id -> its last cumulative count
        self.ship_interval = 0.0
        self.sends = 0          # sends seen since the collector first saw it
        self.ended = False      # its process said it was exiting (final snapshot)

    def interval(self):
        """Its usual interval in seconds if it is periodic, else None."""
        if len(self.gaps) < MIN_GAPS:
            return None
        total = sum(g for g, _ in self.gaps)
        sends = sum(n for _, n in self.gaps)
        period = total / sends
        ship = self.ship_interval
        if period < max(1.0, MIN_SHIP_INTERVALS * ship):
            return None
        deviations = [gap - n * period for gap, n in self.gaps]
        if any(abs(d) > max(1.5 * ship, 0.25 * period) + DELIVERY_JITTER for d in deviations):
            return None
        rms = math.sqrt(sum(d * d for d in deviations) / len(deviations))
        if rms > 0.6 * ship + 0.1 * period + DELIVERY_JITTER:
            return None
        return period


class SilentReporters:

    def __init__(self, max_reporters=DEFAULT_MAX_REPORTERS,
                 retention_seconds=DEFAULT_RETENTION_SECONDS, clock=time.monotonic,
                 wall_clock=time.time):
        self.max_reporters = max_reporters
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        # Least recently grown first: the one dropped when full.
        self._reporters = collections.OrderedDict()  # (host, service, target, method, kind)
        self._lock = threading.Lock()

    def observe(self, process_id, host, counters, ship_interval, final=False):
        """Take one accepted snapshot's counters ({(name, labels): value})."""
        host = labels.server(host)
        if host is None:
            return
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            for (name, series), value in counters.items():
                if name != _SENT:
                    continue
                key = (host, *series)
                reporter = self._reporters.get(key)
                if reporter is None:
                    if not value:
                        continue  # a series that never sent is no reporter
                    if len(self._reporters) >= self.max_reporters:
                        self._reporters.popitem(last=False)
                    reporter = self._reporters[key] = _Reporter()
                self._take(reporter, key, process_id, value, ship_interval, final, now, wall)

    def _take(self, reporter, key, process_id, value, ship_interval, final, now, wall):
        reporter.ship_interval = ship_interval
        reporter.ended = final
        previous = reporter.values.pop(process_id, None)
        reporter.values[process_id] = value
        while len(reporter.values) > _PROCESSES:
            del reporter.values[next(iter(reporter.values))]
        if previous is None or value < previous:
            # A process first heard of (a new one, a restart): it is alive,
            # but when its sends happened is not known, so no gap is counted.
            if value > 0:
                self._grew(reporter, key, now, wall)
            return
        if value > previous:
            if reporter.last_sent is not None:
                reporter.gaps.append((now - reporter.last_sent, value - previous))
            reporter.sends += int(value - previous)
            self._grew(reporter, key, now, wall)

    def _grew(self, reporter, key, now, wall):
        reporter.last_sent, reporter.last_wall = now, wall
        self._reporters.move_to_end(key)

    def top(self, limit=DEFAULT_LIMIT):
        """The periodic reporters silent now, longest silent (in intervals) first."""
        now = self._clock()
        rows = []
        with self._lock:
            for key, reporter in list(self._reporters.items()):
                if reporter.last_sent is None:
                    continue
                silent_for = now - reporter.last_sent
                if silent_for > self.retention_seconds:
                    del self._reporters[key]
                    continue
                period = reporter.interval()
                if period is None or silent_for <= SILENT_INTERVALS * period:
                    continue
                host, service, target, method, kind = key
                rows.append({"host": host, "service": service, "target": target,
                             "method": method, "kind": kind,
                             "interval_seconds": round(period, 3),
                             "silent_seconds": round(silent_for, 3),
                             "missed": int(silent_for // period),
                             "reports": reporter.sends, "last_seen": reporter.last_wall,
                             "ended": reporter.ended})
        return _sorted(rows)[:limit]


def merge(groups):
    """Silent reporters of several replicas (exporters/fleet.py) as one list.
    A process's snapshots reach one replica, so a reporter is listed by one;
    if by several (its process restarted and hashed to another replica, which
    then saw it sent and lists nothing), the row seen sending last is kept."""
    merged = {}
    for rows in groups:
        for row in rows:
            key = tuple(row.get(f) for f in ("host", "service", "target", "method", "kind"))
            before = merged.get(key)
            if before is None or (row.get("last_seen") or 0) > (before.get("last_seen") or 0):
                merged[key] = row
    return _sorted(list(merged.values()))


def _sorted(rows):
    rows.sort(key=lambda r: (-r["missed"], r["host"], r["service"], r["target"],
                             r["method"], r["kind"]))
    return rows
