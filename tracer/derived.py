"""Metrics a process ships without recording them one by one.

A server records each request it handled once, in the finest series there
is (``metrics.HTTP_SERVER_HOPS``, ``metrics.RPC_SERVER_HOPS``), and a caller
records how long it waited once (``metrics.RPC_REPLY_WAIT``,
``metrics.HTTP_CLIENT_DURATION``), instead of once per metric: a dict update
on the service's thread, between its socket reads, costs several times what
it costs in a loop. The other metrics are sums of those series; ``expand``
adds them at snapshot time, in the shipper's thread, once per series rather
than once per request. The internal series are not shipped.
"""

from commlens.tracer import aggregate
from commlens.tracer import metrics

_HTTP_SERVER_HOPS = metrics.HTTP_SERVER_HOPS.name
_RPC_SERVER_HOPS = metrics.RPC_SERVER_HOPS.name
# A caller's wait histogram -> the connection_type of its service-graph edge.
_CLIENT_WAITS = {metrics.RPC_REPLY_WAIT.name: metrics.MESSAGING_SYSTEM,
                 metrics.HTTP_CLIENT_DURATION.name: ""}


def expand(counters, histograms):
    """Add the sums of the finest series; take the internal ones out.

    ``counters``: {(name, labels): value}; ``histograms``: {(name, labels):
    [bucket counts, sum, min, max]}; both are changed in place. A sum lands
    on values recorded directly under the same name and labels, if any (the
    service graph's metrics get both), so everything stays cumulative.
    """
    for key in [k for k in histograms if k[0] in (_HTTP_SERVER_HOPS, _RPC_SERVER_HOPS)]:
        histogram = histograms.pop(key)
        requests = sum(histogram[0])
        if key[0] == _HTTP_SERVER_HOPS:
            service, caller, method, route, code = key[1]
            outcome = metrics.ERROR if code[:1] == "5" else metrics.OK
            _count(counters, metrics.HTTP_REQUESTS, key[1], requests)
            _sum(histograms, metrics.HTTP_DURATION, (service, method, route, outcome),
                 histogram)
            connection_type = ""
        else:
            service, caller, target, method, outcome = key[1]
            _sum(histograms, metrics.RPC_PROCESSING, (service, target, method, outcome),
                 histogram)
            connection_type = metrics.MESSAGING_SYSTEM
        edge = (caller, service, connection_type)
        _count(counters, metrics.SERVICE_GRAPH_REQUESTS, edge, requests)
        if outcome == metrics.ERROR:
            _count(counters, metrics.SERVICE_GRAPH_FAILED, edge, requests)
        _sum(histograms, metrics.SERVICE_GRAPH_SERVER_SECONDS, edge, histogram)
    for key in [k for k in histograms if k[0] in _CLIENT_WAITS]:
        service, target, _method, _outcome = key[1]
        _sum(histograms, metrics.SERVICE_GRAPH_CLIENT_SECONDS,
             (service, target, _CLIENT_WAITS[key[0]]), histograms[key])


def _count(counters, metric, labels, value):
    key = (metric.name, labels)
    counters[key] = counters.get(key, 0) + value


def _sum(histograms, metric, labels, histogram):
    aggregate.add_histogram(histograms, (metric.name, labels), *histogram)
