"""Lost messages: casts, fanouts and notifications sent but never received.

A call that nobody answers times out and says so; a cast, a fanout or a
notification that nobody reads says nothing: the sender's send succeeded,
the message waits in a queue nobody consumes (a conductor that is down, a
compute host that is gone) or was dropped. This module counts them, per
topic (``target``), method (a notification's event type) and kind, from
the counters both ends already ship: what callers sent
(``commlens_rpc_sent_total``, ``commlens_notifications_sent_total``) and
what instrumented servers received (``commlens_rpc_received_total``,
``commlens_notifications_received_total``), matched caller by caller.

The window and the grace period (docs/architecture.md, "Lost messages"):
a message counts when it was sent over the window that ended ``grace``
seconds ago, and what was received counts from the window's start until
now, so a message still in flight (delivered within seconds, reported at
the next ship interval) is never counted as lost:

    unreceived = sent[now - grace - window, now - grace] - received[now - grace - window, now]

per (caller, target, method, kind), never below zero. This is a lower
bound: exact when nothing of that method is received (a queue nobody
reads) and whenever sending stops; while the same method keeps being
received, receipts of messages sent in the last ``grace`` seconds can hide
as many losses. It never counts a message in flight as lost.

Fanouts: one send reaches every consumer (N receipts), and a cast to a
topic with several servers reaches one of them; both count a message as
received when any instrumented server received it (unreceived is never
negative, so N receipts of one fanout hide nothing else's loss of that
caller and method beyond what a lower bound allows).

Which server: metric labels never name a host, so the server comes from
the hops (sampled casts addressed to one server with ``prepare(server=)``
whose trace has no receiving hop: ``servers``) and, when the collector
watches RabbitMQ, from the queues of the topic that hold messages and have
no consumer (``queues``: ``compute.compute-1`` names the host).
"""

import bisect
import collections
import threading
import time

from commlens.tracer import metrics
from commlens.tracer import wire

DEFAULT_WINDOW_SECONDS = 300.0
MAX_WINDOW_SECONDS = 3600.0
# The grace period: at least this, and at least this many of the longest
# ship interval among the processes reporting (a sender's count and a
# receiver's each reach the collector within one interval; delivery takes
# well under a second on rabbit and fake://).
MIN_GRACE_SECONDS = 15.0
GRACE_INTERVALS = 3
SAMPLE_INTERVAL_SECONDS = 5.0
NOTIFICATION = "notification"
KINDS = ("cast", "fanout")
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
# Sampled casts remembered for naming servers, oldest forgotten first.
MAX_TRACKED_CASTS = 20000
_MAX_NAMES = 10


def _counts(counters):
    """{(caller, target, method, kind): [sent, received]} from merged counters."""
    counts = collections.defaultdict(lambda: [0.0, 0.0])
    for (name, labels), value in counters.items():
        if name == metrics.RPC_SENT.name:
            service, target, method, kind = labels
            if kind in KINDS:
                counts[(service, target, method, kind)][0] += value
        elif name == metrics.RPC_RECEIVED.name:
            _service, caller, target, method, kind = labels
            if kind in KINDS:
                counts[(caller, target, method, kind)][1] += value
        elif name == metrics.NOTIFICATIONS_SENT.name:
            service, target, event_type, _priority = labels
            counts[(service, target, event_type, NOTIFICATION)][0] += value
        elif name == metrics.NOTIFICATIONS_RECEIVED.name:
            _service, caller, target, event_type, _priority = labels
            counts[(caller, target, event_type, NOTIFICATION)][1] += value
    return dict(counts)


class _Cast:
    __slots__ = ("target", "server", "method", "at", "received")

    def __init__(self, target, server, method, at):
        self.target, self.server, self.method, self.at = target, server, method, at
        self.received = False


class LostMessages:
    """Samples of what was sent and received, and sampled casts to named servers.

    ``grace``: None picks it from the processes' ship intervals (``grace_for``).
    """

    def __init__(self, window=DEFAULT_WINDOW_SECONDS, grace=None, clock=time.monotonic,
                 wall_clock=time.time, interval=SAMPLE_INTERVAL_SECONDS):
        self.window = window
        self.grace = grace
        self._clock = clock
        self._wall_clock = wall_clock
        self.interval = interval
        self._lock = threading.Lock()
        # The collector started with nothing sent or received.
        self._times = [clock()]
        self._samples = [{}]
        self._casts = collections.OrderedDict()  # span id -> _Cast

    def grace_for(self, processes):
        """The grace period: the fixed one, or from the longest ship interval."""
        if self.grace is not None:
            return self.grace
        longest = max((p["interval"] for p in processes), default=0.0)
        return max(MIN_GRACE_SECONDS, GRACE_INTERVALS * longest)

    # -- taking samples (the collector's sweeper) ---------------------------

    def due(self):
        return self._clock() - self._times[-1] >= self.interval

    def add_sample(self, counters, grace):
        """Keep the sent and received counts of merged counters (rates=True)."""
        now = self._clock()
        sample = _counts(counters)
        with self._lock:
            if now - self._times[-1] < self.interval:
                return
            self._times.append(now)
            self._samples.append(sample)
            keep = MAX_WINDOW_SECONDS + grace + 2 * self.interval
            # Always keep one sample at or before the oldest window's start.
            while len(self._times) > 1 and now - self._times[1] > keep:
                self._times.pop(0)
                self._samples.pop(0)

    def add_trace(self, hops):
        """Note the sampled casts and fanouts to a named server in one
        trace's hops, and whether a server received each."""
        received = {h.get("parent_id") for h in hops
                    if h.get("side") == wire.SERVER and h.get("protocol") == wire.RPC}
        now = self._wall_clock()
        with self._lock:
            for hop in hops:
                if (hop.get("side") != wire.CLIENT or hop.get("protocol") != wire.RPC
                        or hop.get("kind") not in KINDS or hop.get("server") is None
                        or hop.get("outcome") not in (metrics.OK, None)):
                    continue
                span_id = hop["span_id"]
                cast = self._casts.get(span_id)
                if cast is None:
                    start = hop.get("start")
                    cast = self._casts[span_id] = _Cast(
                        hop.get("target"), hop["server"], hop.get("operation"),
                        start if start is not None else now)
                    while len(self._casts) > MAX_TRACKED_CASTS:
                        self._casts.popitem(last=False)
                # A receipt that came late (its trace reopened) counts.
                cast.received = cast.received or span_id in received

    # -- the view --------------------------------------------------------

    def unreceived(self, counters, grace, window=None, queues=None, limit=DEFAULT_LIMIT):
        """What was sent over ``window`` (ending ``grace`` ago) and not received.

        ``counters``: merged counters now (rates=True). Returns the JSON of
        ``/api/lost-messages``: ``messages`` (by target, method and kind,
        most unreceived first, those with any unreceived only, at most
        ``limit``), and ``series`` {(target, method, kind): unreceived} of
        everything sent in the window, for /metrics.
        """
        window = self.window if window is None else min(window, MAX_WINDOW_SECONDS)
        now = self._clock()
        current = _counts(counters)
        with self._lock:
            times, samples = list(self._times), list(self._samples)
        end = bisect.bisect_right(times, now - grace) - 1
        start = max(0, bisect.bisect_right(times, now - grace - window) - 1)
        covered = max(0.0, times[end] - times[start]) if end >= 0 else 0.0
        rows, series = {}, {}
        if end >= 0:
            before, until = samples[start], samples[end]
            for key, (sent_then, _received) in until.items():
                caller, target, method, kind = key
                was_sent, was_received = before.get(key, (0.0, 0.0))
                sent = max(0.0, sent_then - was_sent)
                if sent <= 0:
                    continue
                received = max(0.0, current.get(key, (0.0, 0.0))[1] - was_received)
                missing = max(0.0, sent - received)
                row = rows.get((target, method, kind))
                if row is None:
                    row = rows[(target, method, kind)] = {
                        "target": target, "method": method, "kind": kind, "sent": 0.0,
                        "received": 0.0, "unreceived": 0.0, "callers": []}
                row["sent"] += sent
                row["received"] += received
                row["unreceived"] += missing
                if missing > 0:
                    row["callers"].append(caller)
        for key, row in rows.items():
            series[key] = row["unreceived"]
        flagged = sorted((r for r in rows.values() if r["unreceived"] > 0),
                         key=lambda r: (-r["unreceived"], r["target"], r["method"], r["kind"]))
        flagged = flagged[:limit]
        servers = self._servers(self._wall_clock() - grace - window, self._wall_clock() - grace)
        for row in flagged:
            for field in ("sent", "received", "unreceived"):
                row[field] = round(row[field])
            row["callers"] = sorted(row["callers"])[:_MAX_NAMES]
            row["servers"] = servers.get((row["target"], row["method"]), [])
            row["queues"] = _idle_queues(queues, row["target"]) if queues else {}
        return {"window_seconds": window, "grace_seconds": grace,
                "covered_seconds": round(covered, 1), "messages": flagged}, series

    def _servers(self, since, until):
        """{(target, method): [{server, sampled, unreceived}]} of the sampled
        casts sent between ``since`` and ``until`` (wall clock) that no server
        received, most first."""
        found = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
        with self._lock:
            for cast in self._casts.values():
                if since <= cast.at <= until:
                    counts = found[(cast.target, cast.method)][cast.server]
                    counts[0] += 1
                    counts[1] += 0 if cast.received else 1
        result = {}
        for key, by_server in found.items():
            rows = [{"server": server, "sampled": sampled, "unreceived": missing}
                    for server, (sampled, missing) in by_server.items() if missing]
            rows.sort(key=lambda r: (-r["unreceived"], r["server"]))
            if rows:
                result[key] = rows[:_MAX_NAMES]
        return result


def _idle_queues(queues, topic):
    """The topic's queues that hold messages and have no consumer: the
    topic's own and its servers' (``topic.server``), from the broker."""
    return {name: queue for name, queue in sorted(queues.items())
            if (name == topic or name.startswith(topic + "."))
            and queue["consumers"] == 0 and queue["ready"] > 0}
