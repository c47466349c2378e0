"""Trace-id exemplars on the latency histograms: from a bucket on /metrics
to a trace that landed in it.

Histograms are counted in the services and shipped as sums; the traces
behind them reach the collector only as hops, and only some: a hop is
shipped when its trace is in the sample, when it failed and when it was
slow (tracer/hops.py). So the slow buckets and the failed series, the ones
an operator clicks, always have hops, and a fast successful bucket has
one as soon as a sampled trace lands there. The exemplar of a series'
bucket is the latest hop received whose own series and duration fall in it.

Exemplars cost nothing unless asked for: they are read from the hops the
collector keeps for /api/hops (the most recent ``collector.MAX_HOPS``),
only when an OpenMetrics scrape comes, and only the hops received since
the previous one. Hops pushed out of that window between two scrapes (more
than MAX_HOPS in one scrape interval) are not read; a bucket keeps its
exemplar until a newer hop lands in it. Why this design is written down in
docs/architecture.md ("Exemplars").
"""

import bisect
import itertools
import threading

from commlens.tracer import metrics
from commlens.tracer import wire

# The label an exemplar carries: Grafana's Prometheus data source links it
# to the tracing data source (docs/operator-guide.md).
TRACE_ID_LABEL = "trace_id"
_BOUNDS = metrics.LATENCY_BUCKETS
_RPC_CLIENT = metrics.RPC_REPLY_WAIT.name
_RPC_SERVER = metrics.RPC_PROCESSING.name
_HTTP_SERVER = metrics.HTTP_DURATION.name
_HTTP_CLIENT = metrics.HTTP_CLIENT_DURATION.name


def series_of(hop):
    """The latency histogram series (name, labels) a hop was counted in by
    its service, or None (a cast's send is counted in no histogram)."""
    protocol, side = hop["protocol"], hop["side"]
    outcome = hop["outcome"]
    if protocol == wire.RPC:
        if side == wire.CLIENT:
            if hop["kind"] != "call":
                return None
            return _RPC_CLIENT, (hop["service"], hop["target"], hop["operation"], outcome)
        return _RPC_SERVER, (hop["service"], hop["target"], hop["operation"], outcome)
    if side == wire.SERVER:
        return _HTTP_SERVER, (hop["service"], hop["kind"], hop["target"], outcome)
    return _HTTP_CLIENT, (hop["service"], hop["target"], hop["operation"], outcome)


class Exemplars:
    """{series: {bucket index: (trace id, duration, end time)}}, the latest
    hop per bucket, kept for the series /metrics shows."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen = 0
        self._by_series = {}

    def update(self, collector):
        """Read the hops received since the last update."""
        with self._lock:
            with collector._lock:
                new = min(collector.hops_received - self._seen, len(collector.hops))
                self._seen = collector.hops_received
                recent = list(itertools.islice(reversed(collector.hops), new))
            store = self._by_series
            for hop in reversed(recent):  # oldest first: the latest stays
                duration = hop["duration"]
                trace_id = hop["trace_id"]
                if duration is None:
                    continue
                series = series_of(hop)
                if series is None:
                    continue
                start = hop["start"]
                buckets = store.get(series)
                if buckets is None:
                    buckets = store[series] = {}
                buckets[bisect.bisect_left(_BOUNDS, duration)] = (
                    trace_id, duration, None if start is None else start + duration)

    def for_series(self, histograms):
        """{series: {bucket index: (trace id, value, timestamp)}} of the series
        in ``histograms``; series no longer there are forgotten, so memory
        follows the histograms' own caps."""
        with self._lock:
            store = self._by_series
            if len(store) > len(histograms):
                for series in [s for s in store if s not in histograms]:
                    del store[series]
            return {series: dict(buckets) for series, buckets in store.items()}
