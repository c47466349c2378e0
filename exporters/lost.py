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

    def share(self, counters, grace, window=None):
        """This collector's counts over the window: what each caller sent over
        ``window`` ending ``grace`` ago and what was received of it since the
        window's start, by (caller, target, method, kind), and the sampled
        casts to named servers of the window. Counts add up across replicas
        (each holds its share of the processes and of the traces): a fleet
        adds its replicas' shares and computes ``unreceived`` once (``report``).

        ``counters``: merged counters now (rates=True). JSON: ``counts``
        [[caller, target, method, kind, sent, received]], ``servers``
        [[target, method, server, sampled, not received]].
        """
        window = self.window if window is None else min(window, MAX_WINDOW_SECONDS)
        now = self._clock()
        current = _counts(counters)
        with self._lock:
            times, samples = list(self._times), list(self._samples)
        end = bisect.bisect_right(times, now - grace) - 1
        start = max(0, bisect.bisect_right(times, now - grace - window) - 1)
        covered = max(0.0, times[end] - times[start]) if end >= 0 else 0.0
        counts = []
        if end >= 0:
            before, until = samples[start], samples[end]
            # Keys only received here count too: their senders may report
            # to another replica.
            for key in set(until) | set(current):
                was_sent, was_received = before.get(key, (0.0, 0.0))
                sent = max(0.0, until.get(key, (0.0, 0.0))[0] - was_sent)
                received = max(0.0, current.get(key, (0.0, 0.0))[1] - was_received)
                if sent > 0 or received > 0:
                    counts.append([*key, sent, received])
        wall = self._wall_clock()
        servers = [[target, method, server, sampled, missing] for (target, method, server),
                   (sampled, missing) in self._servers(wall - grace - window, wall - grace).items()]
        return {"window_seconds": window, "grace_seconds": grace,
                "covered_seconds": round(covered, 1), "counts": counts, "servers": servers}

    def unreceived(self, counters, grace, window=None, queues=None, limit=DEFAULT_LIMIT):
        """``report`` of this collector's own ``share``: what was sent over
        ``window`` (ending ``grace`` ago) and not received."""
        return report([self.share(counters, grace, window)], queues, limit)

    def _servers(self, since, until):
        """{(target, method, server): [sampled, not received]} of the sampled
        casts sent between ``since`` and ``until`` (wall clock)."""
        found = collections.defaultdict(lambda: [0, 0])
        with self._lock:
            for cast in self._casts.values():
                if since <= cast.at <= until:
                    counts = found[(cast.target, cast.method, cast.server)]
                    counts[0] += 1
                    counts[1] += 0 if cast.received else 1
        return dict(found)


def report(shares, queues=None, limit=DEFAULT_LIMIT):
    """The JSON of ``/api/lost-messages`` from the ``share`` of one collector,
    or of every replica of a fleet (their counts added first, caller by
    caller, so a cast sent on one replica and received on another is
    received), and {(target, method, kind): unreceived} of everything sent
    in the window, for /metrics.

    ``messages``: by target, method and kind, those with any unreceived
    only, most unreceived first, at most ``limit``. The window and grace are
    the first share's; ``covered_seconds`` the least any share covers.
    """
    counts = collections.defaultdict(lambda: [0.0, 0.0])
    servers = collections.defaultdict(lambda: [0, 0])
    for share in shares:
        for caller, target, method, kind, sent, received in _rows(share, "counts", 4):
            both = counts[(caller, target, method, kind)]
            both[0] += sent
            both[1] += received
        for target, method, server, sampled, missing in _rows(share, "servers", 3):
            both = servers[(target, method, server)]
            both[0] += sampled
            both[1] += missing
    rows = {}
    for (caller, target, method, kind), (sent, received) in counts.items():
        if sent <= 0:
            continue
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
    series = {key: row["unreceived"] for key, row in rows.items()}
    flagged = sorted((r for r in rows.values() if r["unreceived"] > 0),
                     key=lambda r: (-r["unreceived"], r["target"], r["method"], r["kind"]))
    flagged = flagged[:limit]
    by_topic = collections.defaultdict(list)
    for (target, method, server), (sampled, missing) in servers.items():
        if missing:
            by_topic[(target, method)].append(
                {"server": server, "sampled": sampled, "unreceived": missing})
    for row in flagged:
        for field in ("sent", "received", "unreceived"):
            row[field] = round(row[field])
        row["callers"] = sorted(row["callers"])[:_MAX_NAMES]
        named = by_topic.get((row["target"], row["method"]), [])
        row["servers"] = sorted(named, key=lambda r: (-r["unreceived"], r["server"]))[:_MAX_NAMES]
        row["queues"] = _idle_queues(queues, row["target"]) if queues else {}
    first = shares[0] if shares else {}
    return {"window_seconds": first.get("window_seconds"),
            "grace_seconds": first.get("grace_seconds"),
            "covered_seconds": min((s.get("covered_seconds", 0.0) for s in shares), default=0.0),
            "messages": flagged}, series


def _rows(share, field, names):
    """The rows of a share's ``field`` that are ``names`` strings (or None)
    then two counts; a peer's row that does not fit is left out."""
    for row in share.get(field) or ():
        if (isinstance(row, list) and len(row) == names + 2
                and all(isinstance(v, (str, type(None))) for v in row[:names])
                and all(isinstance(v, (int, float)) and v >= 0 for v in row[names:])):
            yield row


def _idle_queues(queues, topic):
    """The topic's queues that hold messages and have no consumer: the
    topic's own and its servers' (``topic.server``), from the broker."""
    return {name: queue for name, queue in sorted(queues.items())
            if (name == topic or name.startswith(topic + "."))
            and queue["consumers"] == 0 and queue["ready"] > 0}
