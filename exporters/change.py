"""Change against a baseline: is this normal?

Each edge of ``/api/graph`` and each method or route of
``/api/graph/node/...`` and ``/api/graph/edge`` carries ``change``: its
rate, error ratio and p99 over the window asked for, beside the same
figures over a baseline window (docs/architecture.md, "Change against a
baseline").

The baseline is the hour before the current window; if an incident is
under way (error chains seen in the window that first appeared earlier than
it), the hour before that incident's first chain, looked back at most
``MAX_INCIDENT_LOOKBACK_SECONDS``, so a fault that started twenty minutes
ago is compared with a time before it, not with itself. Totals are sampled
on every wall-clock minute and kept for the longest baseline that can be
asked for; a fleet of replicas adds its replicas' totals at the same
minutes (``share``, ``combine``) and compares once, as one collector does.

How sure: ``change`` is null while there is no baseline (the collector has
not heard for ``MIN_BASELINE_SECONDS`` before the baseline's end, or has
no sample that old); ``confident`` is true once the baseline covers
``CONFIDENT_SECONDS`` and holds ``CONFIDENT_REQUESTS`` requests of that
edge or method. A figure with nothing to compare (no requests, no latency
in the baseline) is null.
"""

import bisect
import math
import threading

from commlens.exporters import graph

BASELINE_SECONDS = 3600.0
MAX_INCIDENT_LOOKBACK_SECONDS = 3600.0
SAMPLE_INTERVAL_SECONDS = 60.0
MIN_BASELINE_SECONDS = 60.0
CONFIDENT_SECONDS = 900.0
CONFIDENT_REQUESTS = 100
# Why the baseline ends where it does.
WINDOW_START, FIRST_CHAIN = "window_start", "first_chain"


class Samples:
    """(edge totals, method totals) on every wall-clock minute.

    On the minute, not every minute since this collector started: replicas
    then sample at the same instants (to within their sweeper's second and
    their clocks' skew), so the totals of a baseline window on each replica
    add up to the fleet's over that very window (exporters/fleet.py).
    Kept ``keep`` seconds."""

    def __init__(self, wall_clock, keep, interval=SAMPLE_INTERVAL_SECONDS):
        self._wall_clock = wall_clock
        self.keep = keep
        self.interval = interval
        self._lock = threading.Lock()
        self._marks = []
        self._samples = []

    def _mark(self):
        return math.floor(self._wall_clock() / self.interval) * self.interval

    def due(self):
        """Whether ``add`` would keep a sample now (a new minute began)."""
        with self._lock:
            return not self._marks or self._mark() > self._marks[-1]

    def add(self, totals):
        mark = self._mark()
        with self._lock:
            if self._marks and mark <= self._marks[-1]:
                return  # this minute's is taken (or the clock stepped back)
            self._marks.append(mark)
            self._samples.append(totals)
            while self._marks[0] < mark - self.keep:
                self._marks.pop(0)
                self._samples.pop(0)

    def ends(self, start, end):
        """(start mark, its totals, end mark, its totals) of a baseline
        window from ``start`` to ``end`` (wall clock): the newest sample at
        or before each end, the oldest kept for a start older than them all;
        None when no sample is as old as ``end``."""
        with self._lock:
            marks, samples = list(self._marks), list(self._samples)
        last = bisect.bisect_right(marks, end) - 1
        if last < 0:
            return None
        first = max(0, bisect.bisect_right(marks, start) - 1)
        return marks[first], samples[first], marks[last], samples[last]


def samples(wall_clock, max_window_seconds):
    """The sample store the baseline reads, kept for the longest baseline."""
    return Samples(wall_clock, keep=max_window_seconds + MAX_INCIDENT_LOOKBACK_SECONDS
                   + BASELINE_SECONDS + SAMPLE_INTERVAL_SECONDS)


def incident_age(chain_groups, window_seconds, now):
    """Seconds since the first chain of an incident still under way: the
    earliest first sighting of the chains seen within the window, or None."""
    firsts = [c["first_seen"] for c in chain_groups
              if c.get("last_seen") is not None and c["last_seen"] >= now - window_seconds
              and c.get("first_seen") is not None]
    return (now - min(firsts)) if firsts else None


def window(window_seconds, incident_seconds_ago, now):
    """(start, end, ends_at): the wall-clock minutes the baseline window
    should span, and why it ends there (the window's start, or before an
    incident's first chain)."""
    end_age, ends_at = window_seconds, WINDOW_START
    if incident_seconds_ago is not None and incident_seconds_ago > window_seconds:
        end_age = min(incident_seconds_ago, window_seconds + MAX_INCIDENT_LOOKBACK_SECONDS)
        ends_at = FIRST_CHAIN
    end = math.floor((now - end_age) / SAMPLE_INTERVAL_SECONDS) * SAMPLE_INTERVAL_SECONDS
    return end - BASELINE_SECONDS, end, ends_at


def describe(start, end, ends_at, now):
    """The ``baseline`` of the API, or None when it is too short to compare with."""
    seconds = end - start
    if seconds < MIN_BASELINE_SECONDS:
        return None
    return {"from_seconds_ago": round(now - start, 1), "to_seconds_ago": round(now - end, 1),
            "seconds": round(seconds, 1), "ends_at": ends_at, "from": start, "to": end}


def find(store, window_seconds, incident_seconds_ago, now):
    """(description, (edge totals, method totals) at its start, the same at
    its end) of one collector's baseline window, or (None, None, None) when
    there is none yet."""
    start, end, ends_at = window(window_seconds, incident_seconds_ago, now)
    found = store.ends(start, end)
    if found is None:
        return None, None, None
    start, at_start, end, at_end = found
    description = describe(start, end, ends_at, now)
    if description is None:
        return None, None, None
    return description, at_start, at_end


# -- a replica's share of a baseline, and a fleet's (exporters/fleet.py) --------

def share(store, start, end):
    """JSON of what this collector holds of the baseline window from
    ``start`` to ``end``: the marks it has (``from``, ``to``) and its edge
    and method totals at each, which add up across replicas; ``from`` None
    when it holds none."""
    found = store.ends(start, end)
    if found is None:
        return {"from": None, "to": None, "edges": [], "methods": []}
    start, (start_edges, start_methods), end, (end_edges, end_methods) = found
    edges = [[*key, _edge_json(start_edges.get(key)), _edge_json(end_edges.get(key))]
             for key in sorted(set(start_edges) | set(end_edges))]
    methods = []
    for key in sorted(set(start_methods) | set(end_methods)):
        before, after = start_methods.get(key, {}), end_methods.get(key, {})
        for operation in sorted(set(before) | set(after)):
            methods.append([*key, operation, _method_json(before.get(operation)),
                            _method_json(after.get(operation))])
    return {"from": start, "to": end, "edges": edges, "methods": methods}


def combine(shares):
    """(start, end, (edge totals, method totals) at the start, the same at
    the end) of the fleet from replicas' ``share``, added; ``agreed``
    False when they hold different marks (a replica younger than the
    window, a minute a replica missed): ask again with the latest start and
    the earliest end. None when a replica holds no sample old enough."""
    if not shares or any(s.get("from") is None or s.get("to") is None for s in shares):
        return None, False
    start = max(s["from"] for s in shares)
    end = min(s["to"] for s in shares)
    agreed = all(s["from"] == start and s["to"] == end for s in shares)
    at_start, at_end = ({}, {}), ({}, {})
    for part in shares:
        for row in _rows(part, "edges", 3):
            _add_edge(at_start[0], tuple(row[:3]), row[3])
            _add_edge(at_end[0], tuple(row[:3]), row[4])
        for row in _rows(part, "methods", 4):
            _add_method(at_start[1], tuple(row[:3]), row[3], row[4])
            _add_method(at_end[1], tuple(row[:3]), row[3], row[5])
    return (start, end, at_start, at_end), agreed


def _rows(share, field, names):
    """A share's rows of ``names`` strings then two dicts; a peer's row
    that does not fit is left out."""
    for row in share.get(field) or ():
        if (isinstance(row, list) and len(row) == names + 2
                and all(isinstance(v, str) for v in row[:names])
                and all(isinstance(v, dict) for v in row[names:])):
            yield row


def _edge_json(totals):
    totals = totals or graph.EdgeTotals()
    return {"requests": totals.requests, "failed": totals.failed,
            "client_requests": totals.client_requests, "client_failed": totals.client_failed,
            "server": graph.latency_json(totals.server),
            "client": graph.latency_json(totals.client)}


def _method_json(totals):
    totals = totals or graph.MethodTotals()
    return {"requests": totals.requests, "errors": totals.errors,
            "ok_latency": graph.latency_json(totals.ok_latency)}


def _add_edge(edges, key, data):
    totals = edges.get(key)
    if totals is None:
        totals = edges[key] = graph.EdgeTotals()
    for field in ("requests", "failed", "client_requests", "client_failed"):
        setattr(totals, field, getattr(totals, field) + _count(data.get(field)))
    for field in ("server", "client"):
        part = graph.latency_from_json(data.get(field))
        getattr(totals, field).add(part.counts, part.low, part.high)


def _add_method(methods, key, operation, data):
    totals = methods.setdefault(key, {}).get(operation)
    if totals is None:
        totals = methods[key][operation] = graph.MethodTotals()
    totals.requests += _count(data.get("requests"))
    totals.errors += _count(data.get("errors"))
    part = graph.latency_from_json(data.get("ok_latency"))
    totals.ok_latency.add(part.counts, part.low, part.high)


def _count(value):
    return value if isinstance(value, (int, float)) and value >= 0 else 0.0


def figures(requests, failed, latency, seconds):
    """{rate, error_ratio, p99_seconds} of a window."""
    p99 = graph.quantile(0.99, latency)
    return {"rate": requests / max(seconds, 1e-3),
            "error_ratio": (failed / requests) if requests else None,
            "p99_seconds": p99[0] if p99 is not None else None,
            "requests": requests}


def compare(now, then, seconds):
    """``change``: the current figures ``now`` beside the baseline's ``then``
    (both from ``figures``), over a baseline of ``seconds``."""
    def ratio(a, b):
        return (a / b) if a is not None and b else None

    return {
        "rate": {"baseline": then["rate"], "ratio": ratio(now["rate"], then["rate"])},
        "error_ratio": {"baseline": then["error_ratio"],
                        "difference": (now["error_ratio"] - then["error_ratio"])
                        if now["error_ratio"] is not None and then["error_ratio"] is not None
                        else None},
        "p99_seconds": {"baseline": then["p99_seconds"],
                        "ratio": ratio(now["p99_seconds"], then["p99_seconds"])},
        "baseline_requests": round(then["requests"]),
        "confident": seconds >= CONFIDENT_SECONDS and then["requests"] >= CONFIDENT_REQUESTS,
    }


def on_edges(edges, baseline):
    """Set ``change`` on graph edges from a baseline (description, totals at
    its start, at its end), as ``find`` gives it: null without one."""
    description, start, end = baseline
    if description is None:
        for edge in edges:
            edge["change"] = None
    else:
        edge_changes(edges, start[0], end[0], description["seconds"])


def on_rows(rows, baseline):
    """Set ``change`` on methods-table rows [(edge, row)] from a baseline as
    ``find`` gives it: null without one."""
    description, start, end = baseline
    for edge, row in rows:
        if description is None:
            row["change"] = None
        else:
            row_changes(edge, [row], start[1], end[1], description["seconds"])


def edge_changes(edges, start, end, seconds):
    """Set ``change`` on graph edges from the baseline's edge totals."""
    for edge in edges:
        key = (edge["client"], edge["server"], edge["protocol"])
        then_end, then_start = end.get(key), start.get(key) or graph.EdgeTotals()
        if then_end is None:
            then_end = graph.EdgeTotals()
        requests, failed, latency, _ = graph.edge_window(then_end, then_start, edge["protocol"])
        now = {"rate": edge["rate"],
               "error_ratio": edge["error_ratio"] if edge["requests"] else None,
               "p99_seconds": edge.get("p99_seconds")}
        edge["change"] = compare(now, figures(requests, failed, latency, seconds), seconds)


def row_changes(edge, rows, start, end, seconds):
    """Set ``change`` on methods-table rows of one edge from the baseline's
    method totals (the rows' p99 is of successful calls, so is the baseline's)."""
    then_end, then_start = end.get(edge, {}), start.get(edge, {})
    for row in rows:
        final = then_end.get(row["operation"]) or graph.MethodTotals()
        first = then_start.get(row["operation"]) or graph.MethodTotals()
        requests = max(0.0, final.requests - first.requests)
        errors = max(0.0, final.errors - first.errors)
        then = figures(requests, errors, final.ok_latency.since(first.ok_latency), seconds)
        now = {"rate": row["rate"], "p99_seconds": row.get("p99_seconds"),
               "error_ratio": row["error_ratio"] if row["rate"] else None}
        row["change"] = compare(now, then, seconds)
