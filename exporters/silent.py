"""Servers that stopped answering: RPC calls addressed to one server that timed out.

A call prepared with ``server=`` (oslo.messaging's ``Target.server``: nova's
calls to one compute host, say) that times out names a host that did not
answer. Its hop says so (``server``); this module keeps, per topic and
server, how many such timeouts there were and when, so that the API
(``/api/silent-servers``, and ``silent_servers`` in ``/api/graph``), the
dashboard and ``commlens graph`` can answer "which host?" at once.

Hosts are unbounded, so they are never a metric label; here they are
bounded by count: at most ``max_servers`` pairs are kept, the one seen
longest ago dropped first. Timeouts are counted per minute, and kept for
``retention_seconds``: a window's count is exact to the minute.
"""

import collections
import threading
import time

from commlens.tracer import wire

DEFAULT_MAX_SERVERS = 1000
DEFAULT_RETENTION_SECONDS = 3600.0
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
# Bounds on what one server's entry lists.
_MAX_NAMES = 10
TIMEOUT = "timeout"  # metrics.TIMEOUT: a hop's outcome


class _Server:
    __slots__ = ("first_seen", "last_seen", "minutes", "callers", "operations")

    def __init__(self, seen):
        self.first_seen = self.last_seen = seen
        self.minutes = collections.Counter()  # minute -> timeouts
        self.callers = set()     # caller services (at most _MAX_NAMES)
        self.operations = set()  # methods (at most _MAX_NAMES)


class SilentServers:

    def __init__(self, max_servers=DEFAULT_MAX_SERVERS,
                 retention_seconds=DEFAULT_RETENTION_SECONDS, clock=time.time):
        self.max_servers = max_servers
        self.retention_seconds = retention_seconds
        self._clock = clock
        # Least recently seen first: the one dropped when full.
        self._servers = collections.OrderedDict()  # (topic, server) -> _Server
        self._lock = threading.Lock()

    def add(self, hop):
        """Count a clean hop if it is a call to a named server that timed out."""
        server = hop.get("server")
        if (server is None or hop.get("side") != wire.CLIENT
                or hop.get("protocol") != wire.RPC or hop.get("outcome") != TIMEOUT):
            return
        # When the caller gave up: the hop's own time, else the arrival.
        start, duration = hop.get("start"), hop.get("duration")
        seen = start + (duration or 0.0) if start is not None else self._clock()
        key = (hop.get("target"), server)
        with self._lock:
            entry = self._servers.get(key)
            if entry is None:
                if len(self._servers) >= self.max_servers:
                    self._servers.popitem(last=False)
                entry = self._servers[key] = _Server(seen)
            else:
                self._servers.move_to_end(key)
            entry.first_seen = min(entry.first_seen, seen)
            entry.last_seen = max(entry.last_seen, seen)
            entry.minutes[int(seen // 60)] += 1
            _add_name(entry.callers, hop.get("service"))
            _add_name(entry.operations, hop.get("operation"))

    def top(self, since_seconds=900, limit=DEFAULT_LIMIT):
        """The servers with timeouts in the last ``since_seconds``, most first."""
        now = self._clock()
        since_minute = int((now - since_seconds) // 60)
        expired_minute = int((now - self.retention_seconds) // 60)
        rows = []
        with self._lock:
            for (topic, server), entry in list(self._servers.items()):
                for minute in [m for m in entry.minutes if m < expired_minute]:
                    del entry.minutes[minute]
                if not entry.minutes:
                    del self._servers[(topic, server)]
                    continue
                timeouts = sum(n for m, n in entry.minutes.items() if m >= since_minute)
                if timeouts:
                    rows.append({"target": topic, "server": server, "timeouts": timeouts,
                                 "first_seen": entry.first_seen, "last_seen": entry.last_seen,
                                 "callers": sorted(entry.callers),
                                 "operations": sorted(entry.operations)})
        rows.sort(key=lambda r: (-r["timeouts"], -r["last_seen"], r["target"] or "",
                                 r["server"]))
        return rows[:limit]


def _add_name(names, name):
    if name is not None and len(names) < _MAX_NAMES:
        names.add(name)
