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
every minute and kept for the longest baseline that can be asked for.

How sure: ``change`` is null while there is no baseline (the collector has
not heard for ``MIN_BASELINE_SECONDS`` before the baseline's end, or has
no sample that old); ``confident`` is true once the baseline covers
``CONFIDENT_SECONDS`` and holds ``CONFIDENT_REQUESTS`` requests of that
edge or method. A figure with nothing to compare (no requests, no latency
in the baseline) is null.
"""

from commlens.exporters import graph

BASELINE_SECONDS = 3600.0
MAX_INCIDENT_LOOKBACK_SECONDS = 3600.0
SAMPLE_INTERVAL_SECONDS = 60.0
MIN_BASELINE_SECONDS = 60.0
CONFIDENT_SECONDS = 900.0
CONFIDENT_REQUESTS = 100
# Why the baseline ends where it does.
WINDOW_START, FIRST_CHAIN = "window_start", "first_chain"


def samples(clock, max_window_seconds):
    """The sample store the baseline reads: (edge totals, method totals) every minute."""
    return graph.GraphSamples(
        clock=clock, interval=SAMPLE_INTERVAL_SECONDS,
        max_window=max_window_seconds + MAX_INCIDENT_LOOKBACK_SECONDS + BASELINE_SECONDS)


def incident_age(chain_groups, window_seconds, now):
    """Seconds since the first chain of an incident still under way: the
    earliest first sighting of the chains seen within the window, or None."""
    firsts = [c["first_seen"] for c in chain_groups
              if c.get("last_seen") is not None and c["last_seen"] >= now - window_seconds
              and c.get("first_seen") is not None]
    return (now - min(firsts)) if firsts else None


def find(store, window_seconds, incident_seconds_ago=None):
    """(description, (edge totals, method totals) at its start, the same at
    its end) of the baseline window, or (None, None, None) when there is none yet."""
    end_age, ends_at = window_seconds, WINDOW_START
    if incident_seconds_ago is not None and incident_seconds_ago > window_seconds:
        end_age = min(incident_seconds_ago, window_seconds + MAX_INCIDENT_LOOKBACK_SECONDS)
        ends_at = FIRST_CHAIN
    end = store.at_or_before(end_age)
    if end is None:
        return None, None, None
    start = store.at_or_before(end[0] + BASELINE_SECONDS) or store.oldest()
    seconds = start[0] - end[0]
    if seconds < MIN_BASELINE_SECONDS:
        return None, None, None
    description = {"from_seconds_ago": round(start[0], 1), "to_seconds_ago": round(end[0], 1),
                   "seconds": round(seconds, 1), "ends_at": ends_at}
    return description, _pair(start[1]), _pair(end[1])


def _pair(totals):
    """(edge totals, method totals) of a sample; the first one is empty."""
    return totals if isinstance(totals, tuple) else ({}, {})


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
