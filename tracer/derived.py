"""Metrics a process ships without recording them one by one.

A server records each request it handled once, in the finest series there
is (``metrics.HTTP_SERVER_HOPS``, ``metrics.RPC_SERVER_HOPS``), and a caller
records a call's reply wait once (``metrics.RPC_REPLY_WAIT``), instead of
once per metric: a dict update on the service's thread, between its socket
reads, costs several times what it costs in a loop. The other metrics are
sums of those series; ``expand`` adds them at snapshot time, in the
shipper's thread, once per series rather than once per request. The
internal series are not shipped.
"""

from commlens.exporters import aggregate
from commlens.tracer import metrics

_HTTP_SERVER_HOPS = metrics.HTTP_SERVER_HOPS.name
_RPC_SERVER_HOPS = metrics.RPC_SERVER_HOPS.name
_RPC_REPLY_WAIT = metrics.RPC_REPLY_WAIT.name


def expand(counters, histograms):
    """Add the sums of the finest series; take the internal ones out.

    ``counters``: {(name, labels): value}; ``histograms``: {(name, labels):
    [bucket counts, sum]}; both are changed in place. A sum lands on values
    recorded directly under the same name and labels, if any (the service
    graph's metrics get both), so everything stays cumulative.
    """
    for key in [k for k in histograms if k[0] in (_HTTP_SERVER_HOPS, _RPC_SERVER_HOPS)]:
        counts, total = histograms.pop(key)
        if key[0] == _HTTP_SERVER_HOPS:
            service, caller, method, route, code = key[1]
            outcome = metrics.ERROR if code[:1] == "5" else metrics.OK
            _count(counters, metrics.HTTP_REQUESTS, key[1], sum(counts))
            _sum(histograms, metrics.HTTP_DURATION, (service, method, route, outcome),
                 counts, total)
            connection_type = ""
        else:
            service, caller, target, method, outcome = key[1]
            _sum(histograms, metrics.RPC_PROCESSING, (service, target, method, outcome),
                 counts, total)
            connection_type = metrics.MESSAGING_SYSTEM
        edge = (caller, service, connection_type)
        _count(counters, metrics.SERVICE_GRAPH_REQUESTS, edge, sum(counts))
        if outcome == metrics.ERROR:
            _count(counters, metrics.SERVICE_GRAPH_FAILED, edge, sum(counts))
        _sum(histograms, metrics.SERVICE_GRAPH_SERVER_SECONDS, edge, counts, total)
    for key in [k for k in histograms if k[0] == _RPC_REPLY_WAIT]:
        service, target, _method, _outcome = key[1]
        counts, total = histograms[key]
        _sum(histograms, metrics.SERVICE_GRAPH_CLIENT_SECONDS,
             (service, target, metrics.MESSAGING_SYSTEM), counts, total)


def _count(counters, metric, labels, value):
    key = (metric.name, labels)
    counters[key] = counters.get(key, 0) + value


def _sum(histograms, metric, labels, counts, total):
    aggregate.add_histogram(histograms, (metric.name, labels), counts, total)
