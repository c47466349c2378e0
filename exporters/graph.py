"""The communication graph: services as nodes, (caller -> callee, protocol) as edges.

Everything here is derived from the merged metrics, so the JSON graph and the
Prometheus series (the Tempo-compatible service-graph metrics) always agree:

- requests and failures per edge: ``traces_service_graph_request_total`` /
  ``_failed_total`` (servers count what they received, callers what nobody
  answered);
- latency: the server-side histogram of the edge (client side when no server
  reported);
- for RPC edges, the callers' waiting replies and timeouts, and the broker's
  queues of the edge's topics when the collector watches RabbitMQ.

Callers name an RPC target by topic, and an oslo.messaging reply carries no
identity: the services that answered a caller are learnt from
``commlens_rpc_received_total`` (``Consumers``), method by method, so several
services consuming one topic each get the calls they answered. A topic nobody
consumes stays a node under the topic's own name (a conductor that is down
shows as ``conductor``).

A destination that is not instrumented (a glance or neutron that runs
without commlens) reports nothing; its callers' side of a REST edge
(``commlens_http_client_requests_total``, their client histograms) is then
the edge, as Kiali draws unknown destinations, and the node says it is not
instrumented. A caller that is not instrumented is known only by the client
product in its User-Agent (``keystoneauth1``): its node is an unknown caller
of that user agent (tracer/names.py).

Rates need two points in time: ``GraphSamples`` keeps the edge totals every
few seconds for the longest window served.

Percentiles come from bucket counts, so most are estimates: ``percentiles``
interpolates within the bucket that holds the rank, clamped to the smallest
and largest value observed, and says so (``p50_seconds`` with
``p50_range_seconds``, the interval the true value lies in, and
``p50_estimated``, false when that interval is a single value).
"""

import bisect
import collections
import threading
import time

from commlens.tracer import aggregate
from commlens.tracer import metrics
from commlens.tracer import names

RPC, HTTP = "rpc", "http"
MAX_WINDOW_SECONDS = 3600
SAMPLE_INTERVAL_SECONDS = 5.0
_BOUNDS = metrics.LATENCY_BUCKETS
_N_BUCKETS = len(_BOUNDS) + 1


# A caller's outcomes that tell its kind: only a call waits for a reply. A
# transport error can end a cast as well as a call.
_CALL_OUTCOMES = frozenset((metrics.OK, metrics.REMOTE_ERROR, metrics.TIMEOUT))
# A caller's outcomes that no server answered (the caller counts these on the
# service graph itself, middleware/rpc_driver.py).
_UNANSWERED = frozenset((metrics.TIMEOUT, metrics.TRANSPORT_ERROR))
_CALL, _FANOUT = "call", "fanout"


class Consumers:
    """Which services answered what a caller sent to a topic.

    A caller's series (service, topic, method, kind) is paired with the
    services that received exactly that (caller, topic, method, kind). Where
    one service received it, which is the OpenStack norm (one service answers
    a method), the pairing is exact; where several did, the caller's counts
    are split among them in proportion to what each received. A fanout
    reaches every consumer, so each gets all of it. Nobody received it (a
    call that timed out, say): the services that received that method from
    anyone, then the topic's consumers (any method), then the topic itself
    as a node of its own.
    """

    def __init__(self, counters):
        self._received = collections.defaultdict(collections.Counter)
        topics = collections.defaultdict(set)
        for (name, labels), value in counters.items():
            if name == metrics.RPC_RECEIVED.name and value > 0:
                service, caller, topic, method, kind = labels
                for key in ((caller, topic, method, kind), (caller, topic, method),
                            (topic, method), (topic,)):
                    self._received[key][service] += value
                topics[service].add(topic)
        self._topics = {service: sorted(names) for service, names in topics.items()}

    def servers(self, caller, topic, method, kind=None):
        """[(service, share of the caller's counts)] for one caller series;
        ``kind`` None when the caller's series does not tell it."""
        keys = [(caller, topic, method, kind)] if kind else []
        keys += [(caller, topic, method), (topic, method), (topic,)]
        for key in keys:
            received = self._received.get(key)
            if received:
                break
        else:
            return [(topic, 1.0)]
        if kind == _FANOUT:
            return [(service, 1.0) for service in sorted(received)]
        total = sum(received.values())
        return [(service, count / total) for service, count in sorted(received.items())]

    def topics(self, service):
        """The topics ``service`` received from, sorted."""
        return self._topics.get(service, [])


def topic_consumers(counters):
    """``Consumers`` learnt from who received what."""
    return Consumers(counters)


def known_topics(counters):
    """Topics anyone sent to or received from."""
    topics = set()
    for (name, labels) in counters:
        if name == metrics.RPC_SENT.name:
            topics.add(labels[1])
        elif name == metrics.RPC_RECEIVED.name:
            topics.add(labels[2])
    return topics


def _kind(outcome):
    return _CALL if outcome in _CALL_OUTCOMES else None


def resolve_rpc_servers(counters, histograms, consumers):
    """The service-graph series with each caller's RPC side on the services
    that answered it.

    A caller records its side of an RPC edge under the topic: its reply wait
    (the client histogram) and the calls nobody answered (requests and
    failures). Those have no method, so they are rebuilt here from the
    caller's own per-method series, each paired by ``consumers``; the
    servers' side already names both services and is left as it is.
    """
    resolved_counters = collections.defaultdict(float)
    unanswered = collections.defaultdict(float)  # {(caller, topic): count}
    for (name, labels), value in counters.items():
        resolved_counters[(name, labels)] += value
        if name == metrics.RPC_CALL_ERRORS.name and labels[3] in _UNANSWERED:
            service, topic, method, outcome, _error = labels
            unanswered[(service, topic)] += value
            for server, share in consumers.servers(service, topic, method, _kind(outcome)):
                for metric in (metrics.SERVICE_GRAPH_REQUESTS, metrics.SERVICE_GRAPH_FAILED):
                    key = (metric.name, (service, server, metrics.MESSAGING_SYSTEM))
                    resolved_counters[key] += value * share
    for (service, topic), value in unanswered.items():
        for metric in (metrics.SERVICE_GRAPH_REQUESTS, metrics.SERVICE_GRAPH_FAILED):
            key = (metric.name, (service, topic, metrics.MESSAGING_SYSTEM))
            left = resolved_counters[key] - value
            # What is left is a service of the topic's name that this caller
            # called, if any (or a series one side could not keep).
            if left > 1e-9:
                resolved_counters[key] = left
            else:
                del resolved_counters[key]

    resolved_histograms = {}
    for (name, labels), (counts, total, low, high) in histograms.items():
        if name == metrics.SERVICE_GRAPH_CLIENT_SECONDS.name \
                and labels[2] == metrics.MESSAGING_SYSTEM:
            continue  # rebuilt below from the reply waits it sums
        aggregate.add_histogram(resolved_histograms, (name, labels), counts, total, low, high)
        if name == metrics.RPC_REPLY_WAIT.name:
            service, topic, method, _outcome = labels
            for server, share in consumers.servers(service, topic, method, _CALL):
                # A share of the calls: within the extremes of them all.
                aggregate.add_histogram(
                    resolved_histograms, (metrics.SERVICE_GRAPH_CLIENT_SECONDS.name,
                                          (service, server, metrics.MESSAGING_SYSTEM)),
                    [count * share for count in counts], total * share, low, high)
    return dict(resolved_counters), resolved_histograms


class Latency:
    """Cumulative bucket counts of durations, with the smallest and largest
    value observed (None while unknown; aggregate.merge_extremes)."""

    __slots__ = ("counts", "low", "high")

    def __init__(self, counts=None, low=None, high=None):
        self.counts = [0] * _N_BUCKETS if counts is None else counts
        self.low = low
        self.high = high

    def add(self, counts, low, high, share=1.0):
        self.low, self.high = aggregate.merge_extremes(self.counts, self.low, self.high,
                                                       counts, low, high)
        for i, count in enumerate(counts):
            self.counts[i] += count * share

    def since(self, then):
        """What was added since ``then``, an earlier sample of the same
        series: the counts' growth, never negative, within the extremes of
        now (which hold every value then and since)."""
        return Latency([max(0, a - b) for a, b in zip(self.counts, then.counts, strict=True)],
                       self.low, self.high)


class EdgeTotals:
    """Cumulative figures of one edge at one moment. ``client_requests`` and
    ``client_failed``: what the caller of a REST edge counted itself (all its
    requests; 5xx and no response), the edge when no server reports it."""

    __slots__ = ("requests", "failed", "timeouts", "server", "client", "waiting",
                 "client_requests", "client_failed")

    def __init__(self):
        self.requests = 0.0
        self.failed = 0.0
        self.timeouts = 0.0
        self.server = Latency()
        self.client = Latency()
        self.waiting = 0.0
        self.client_requests = 0.0
        self.client_failed = 0.0


def edge_totals(counters, histograms, gauges):
    """{(client, server, protocol): EdgeTotals} and the ``Consumers`` that paired them."""
    consumers = topic_consumers(counters)
    counters, histograms = resolve_rpc_servers(counters, histograms, consumers)
    edges = collections.defaultdict(EdgeTotals)

    def edge(client, server, connection_type):
        return edges[(client, server, RPC if connection_type == metrics.MESSAGING_SYSTEM
                      else HTTP)]

    for (name, labels), value in counters.items():
        if name == metrics.SERVICE_GRAPH_REQUESTS.name:
            edge(*labels).requests += value
        elif name == metrics.SERVICE_GRAPH_FAILED.name:
            edge(*labels).failed += value
        elif name == metrics.RPC_CALL_ERRORS.name and labels[3] == metrics.TIMEOUT:
            service, topic, method = labels[:3]
            for server, share in consumers.servers(service, topic, method, _CALL):
                edges[(service, server, RPC)].timeouts += value * share
    for (name, labels), (counts, _total, low, high) in histograms.items():
        if name == metrics.HTTP_CLIENT_DURATION.name:
            service, target, _method, outcome = labels
            totals = edges[(service, target, HTTP)]
            totals.client_requests += sum(counts)
            if outcome != metrics.OK:
                totals.client_failed += sum(counts)
            continue
        if name == metrics.SERVICE_GRAPH_SERVER_SECONDS.name:
            edge(*labels).server.add(counts, low, high)
        elif name == metrics.SERVICE_GRAPH_CLIENT_SECONDS.name:
            edge(*labels).client.add(counts, low, high)
    for (name, labels), value in gauges.items():
        if name == metrics.RPC_WAITING_REPLIES.name:
            service, topic, method = labels
            for server, share in consumers.servers(service, topic, method, _CALL):
                edges[(service, server, RPC)].waiting += value * share
    return dict(edges), consumers


class MethodTotals:
    """Cumulative figures of one RPC method or REST route on one edge.

    ``ok_latency`` holds successful calls only (a caller's reply waits for RPC,
    the route's request time for REST), so a burst of fast failures does not
    make an edge look quick.
    """

    __slots__ = ("requests", "errors", "timeouts", "waiting", "ok_latency")

    def __init__(self):
        self.requests = 0.0
        self.errors = 0.0
        self.timeouts = 0.0
        self.waiting = 0.0
        self.ok_latency = Latency()


def method_totals(counters, histograms, gauges, consumers):
    """{(client, server, protocol): {operation: MethodTotals}}.

    RPC rows come from the callers (topic.method: what they sent, their errors
    by outcome, their waits and waiting replies); REST rows from the servers
    (method and route by caller, 5xx as errors; the route's latency is over all
    its callers, as the server does not record it per caller), or, for a
    destination no server reports, from the callers (by method: a caller
    records no route; 5xx and no response as errors).
    """
    edges = collections.defaultdict(lambda: collections.defaultdict(MethodTotals))
    client_side = collections.defaultdict(lambda: collections.defaultdict(MethodTotals))
    route_latency = collections.defaultdict(Latency)

    def rpc_rows(service, topic, method, kind):
        """[(row, share)]: the caller's row on each edge ``consumers`` pairs it with."""
        return [(edges[(service, server, RPC)][f"{topic}.{method}"], share)
                for server, share in consumers.servers(service, topic, method, kind)]

    for (name, labels), value in counters.items():
        if name == metrics.RPC_SENT.name:
            service, topic, method, kind = labels
            for row, share in rpc_rows(service, topic, method, kind):
                row.requests += value * share
        elif name == metrics.RPC_CALL_ERRORS.name:
            service, topic, method, outcome, _error = labels
            for row, share in rpc_rows(service, topic, method, _kind(outcome)):
                row.errors += value * share
                if outcome == metrics.TIMEOUT:
                    row.timeouts += value * share
        elif name == metrics.HTTP_REQUESTS.name:
            service, caller, method, route, code = labels
            row = edges[(caller, service, HTTP)][f"{method} {route}"]
            row.requests += value
            if code.startswith("5"):
                row.errors += value
        elif name == metrics.HTTP_CLIENT_REQUESTS.name:
            service, target, method, code = labels
            row = client_side[(service, target, HTTP)][method]
            row.requests += value
            if code.startswith("5") or code == metrics.FAILED:
                row.errors += value
    for (name, labels), value in gauges.items():
        if name == metrics.RPC_WAITING_REPLIES.name:
            for row, share in rpc_rows(*labels, _CALL):
                row.waiting += value * share
    for (name, labels), (counts, _total, low, high) in histograms.items():
        if labels[-1] != metrics.OK:
            continue
        if name == metrics.RPC_REPLY_WAIT.name:
            targets = [(row.ok_latency, share) for row, share in rpc_rows(*labels[:3], _CALL)]
        elif name == metrics.HTTP_DURATION.name:
            service, method, route, _outcome = labels
            targets = [(route_latency[(service, f"{method} {route}")], 1.0)]
        elif name == metrics.HTTP_CLIENT_DURATION.name:
            service, target, method, _outcome = labels
            targets = [(client_side[(service, target, HTTP)][method].ok_latency, 1.0)]
        else:
            continue
        for target, share in targets:
            target.add(counts, low, high, share)
    for (_client, server, protocol), rows in edges.items():
        if protocol == HTTP:
            for operation, row in rows.items():
                latency = route_latency.get((server, operation))
                if latency is not None:
                    row.ok_latency = Latency(list(latency.counts), latency.low, latency.high)
    for edge, rows in client_side.items():
        if edge not in edges:
            edges[edge] = rows
    return {edge: dict(rows) for edge, rows in edges.items()}


def method_rows(current, baseline, seconds, histograms=False):
    """Rows of a methods table: rates over ``seconds`` from two MethodTotals maps.
    ``histograms``: each row carries its latency's buckets too, so that
    replicas' rows can be merged (exporters/fleet.py)."""
    seconds = max(seconds, 1e-3)
    rows = []
    for operation, now in sorted(current.items()):
        then = baseline.get(operation) or MethodTotals()
        requests = max(0.0, now.requests - then.requests)
        errors = max(0.0, now.errors - then.errors)
        latency = now.ok_latency.since(then.ok_latency)
        if requests == 0 and now.waiting == 0 and now.requests == 0:
            continue
        rows.append({
            "operation": operation, "rate": requests / seconds,
            "errors": errors, "error_ratio": (errors / requests) if requests else 0.0,
            "timeouts": max(0.0, now.timeouts - then.timeouts), "waiting_replies": now.waiting,
            **percentiles(latency),
            **({"requests": requests, "ok_latency": latency_json(latency)}
               if histograms else {}),
        })
    return rows


def add_ok_latency(edges, current, baseline, histograms=False):
    """Set ``ok_p50_seconds``/``ok_p99_seconds`` (and their ranges, see
    ``percentiles``) on graph edges: percentiles of successful calls only,
    from two ``method_totals`` maps; ``histograms``: the buckets too (``ok_latency``)."""
    for edge in edges:
        key = (edge["client"], edge["server"], edge["protocol"])
        latency = Latency()
        then_rows = baseline.get(key, {})
        for operation, now in current.get(key, {}).items():
            then = then_rows.get(operation) or MethodTotals()
            window = now.ok_latency.since(then.ok_latency)
            latency.add(window.counts, window.low, window.high)
        edge.update(percentiles(latency, prefix="ok_"))
        if histograms:
            edge["ok_latency"] = latency_json(latency)


def latency_json(latency):
    """A Latency as JSON: what a replica gives its peers to merge percentiles
    from (bucket counts add up; percentiles do not)."""
    return {"counts": list(latency.counts), "low": latency.low, "high": latency.high}


def latency_from_json(data, n_buckets=_N_BUCKETS):
    """The Latency of ``latency_json`` (of ``n_buckets`` buckets, +Inf
    included); an empty one for anything else."""
    if (not isinstance(data, dict) or not isinstance(data.get("counts"), list)
            or len(data["counts"]) != n_buckets
            or not all(isinstance(c, (int, float)) and c >= 0 for c in data["counts"])):
        return Latency([0] * n_buckets)
    low, high = data.get("low"), data.get("high")
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float))):
        low = high = None
    return Latency(list(data["counts"]), low, high)


# The percentiles the API gives, by the name of their fields.
PERCENTILES = (("p50", 0.5), ("p99", 0.99))


def percentiles(latency, prefix=""):
    """{``p50_seconds``, ``p50_range_seconds``, ``p50_estimated``, the same
    for p99} of a Latency, each name behind ``prefix``; None for each while
    the latency holds no calls."""
    fields = {}
    for name, q in PERCENTILES:
        found = quantile(q, latency)
        value, low, high = found if found is not None else (None, None, None)
        fields[f"{prefix}{name}_seconds"] = value
        fields[f"{prefix}{name}_range_seconds"] = None if found is None else [low, high]
        fields[f"{prefix}{name}_estimated"] = None if found is None else low != high
    return fields


def quantile(q, latency, bounds=_BOUNDS):
    """(estimate, low, high) of the q-quantile of a Latency in buckets of
    ``bounds`` (then +Inf), or None if it is empty.

    The rank falls in one bucket; the true value lies in that bucket's
    bounds, narrowed to the smallest and largest value observed: [low,
    high]. The estimate interpolates linearly within [low, high]; it is
    exact when low == high (a single value, a bucket holding only the
    smallest or largest). In the +Inf bucket with no largest value known,
    high is None and the estimate is the last bound.
    """
    counts = latency.counts
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    i, running = _bucket_of(counts, rank)
    count = counts[i]
    low = bounds[i - 1] if i > 0 else 0.0
    high = bounds[i] if i < len(bounds) else None
    if latency.low is not None:
        low = max(low, latency.low)
        high = latency.high if high is None else min(high, latency.high)
        high = max(high, low)  # extremes that disagree with the buckets
    if high is None:
        return low, low, None
    return low + (high - low) * (rank - running) / count, low, high


def _bucket_of(counts, rank):
    """(index of the bucket holding ``rank``, the count below it)."""
    running = 0
    for i, count in enumerate(counts):
        if running + count >= rank and count > 0:
            return i, running
        running += count
    # Shares' rounding left the rank past the end: the last bucket with calls.
    last = max(i for i, count in enumerate(counts) if count > 0)
    return last, rank - counts[last]


class GraphSamples:
    """Totals every few seconds, for rates over a window and short series."""

    def __init__(self, clock=time.monotonic, interval=SAMPLE_INTERVAL_SECONDS,
                 max_window=MAX_WINDOW_SECONDS, empty=dict):
        self._clock = clock
        self.interval = interval
        self.max_window = max_window
        self._lock = threading.Lock()
        self._times = [clock()]
        self._samples = [empty()]  # the collector started with nothing

    def due(self):
        """Whether ``add`` would keep a sample now."""
        return self._clock() - self._times[-1] >= self.interval

    def add(self, totals):
        now = self._clock()
        with self._lock:
            if now - self._times[-1] < self.interval:
                return
            self._times.append(now)
            self._samples.append(totals)
            while self._times and now - self._times[0] > self.max_window + self.interval:
                self._times.pop(0)
                self._samples.pop(0)

    def baseline(self, window_seconds):
        """(age in seconds, totals) of the sample closest to ``window_seconds`` ago."""
        now = self._clock()
        with self._lock:
            index = max(0, bisect.bisect_left(self._times, now - window_seconds))
            index = min(index, len(self._times) - 1)
            return now - self._times[index], self._samples[index]

    def at_or_before(self, seconds_ago):
        """(age in seconds, totals) of the newest sample at least
        ``seconds_ago`` old; None if every sample kept is younger."""
        now = self._clock()
        with self._lock:
            index = bisect.bisect_right(self._times, now - seconds_ago) - 1
            if index < 0:
                return None
            return now - self._times[index], self._samples[index]

    def oldest(self):
        """(age in seconds, totals) of the oldest sample kept."""
        now = self._clock()
        with self._lock:
            return now - self._times[0], self._samples[0]

    def since(self, seconds):
        """[(seconds ago, totals)] of the samples kept in the last ``seconds``, oldest first."""
        now = self._clock()
        with self._lock:
            return [(now - t, sample) for t, sample in zip(self._times, self._samples, strict=True)
                    if now - t <= seconds]


def reporting_services(counters, histograms, processes=()):
    """The services that report themselves: the ``service`` of any series
    (what a process records is under its own name) or of a process."""
    reporting = {process["service"] for process in processes}
    for series in (counters, histograms):
        for name, labels in series:
            metric = metrics.SHIPPED.get(name)
            if metric is not None and metric.labels[:1] == ("service",) and labels:
                reporting.add(labels[0])
    return reporting


def build(current, baseline, seconds, consumers, queues=None, processes=(), reporting=None,
          histograms=False):
    """The graph JSON: nodes and edges with rates over ``seconds``.

    ``histograms``: each edge carries its latency's buckets (``latency``),
    for a peer replica to merge percentiles from.

    ``reporting``: the services that report (``reporting_services``); the
    others are drawn as not instrumented. None: every node counts as
    instrumented."""
    seconds = max(seconds, 1e-3)
    edges, nodes = [], {}
    for (client, server, protocol), now in sorted(current.items()):
        then = baseline.get((client, server, protocol)) or EdgeTotals()
        requests, failed, latency, from_client = edge_window(now, then, protocol)
        ever = now.client_requests if from_client else now.requests
        if requests == 0 and now.waiting == 0 and ever == 0:
            continue
        edge = {
            "client": client, "server": server, "protocol": protocol,
            "rate": requests / seconds,
            "error_ratio": (failed / requests) if requests else 0.0,
            "requests": requests, "failed": failed,
            **percentiles(latency),
            # Who counted it: the server (as for every instrumented
            # destination) or only the caller.
            "measured_by": "client" if from_client else "server",
        }
        if histograms:
            edge["latency"] = latency_json(latency)
        if protocol == RPC:
            edge["waiting_replies"] = now.waiting
            edge["timeouts"] = max(0.0, now.timeouts - then.timeouts)
            topics = consumers.topics(server) or [server]
            if queues:
                edge["queues"] = {t: queues[t] for t in topics if t in queues}
        edges.append(edge)
        _node(nodes, client)["rate_out"] += edge["rate"]
        callee = _node(nodes, server)
        callee["rate_in"] += edge["rate"]
        callee["failed_in"] += failed / seconds
    for process in processes:
        _node(nodes, process["service"])["processes"] += 1
    for node in nodes.values():
        node["error_ratio"] = (node["failed_in"] / node["rate_in"]) if node["rate_in"] else 0.0
        node["instrumented"] = reporting is None or node["service"] in reporting
        # An uninstrumented caller known only by its client's User-Agent.
        node["user_agent"] = (node["service"] if not node["instrumented"]
                              and node["service"] in names.CLIENT_CALLERS else None)
    return {"window_seconds": seconds, "nodes": sorted(nodes.values(), key=lambda n: n["service"]),
            "edges": edges}


def edge_window(now, then, protocol):
    """(requests, failed, latency, counted by the caller only) of one edge
    between two of its EdgeTotals."""
    # A REST edge no server reports: the caller's own counts are the edge.
    from_client = protocol == HTTP and not any(now.server.counts) and now.client_requests > 0
    if from_client:
        requests = max(0.0, now.client_requests - then.client_requests)
        failed = max(0.0, now.client_failed - then.client_failed)
    else:
        requests = max(0.0, now.requests - then.requests)
        failed = max(0.0, now.failed - then.failed)
    latency = now.server.since(then.server)
    if not any(latency.counts):
        latency = now.client.since(then.client)
    return requests, failed, latency, from_client


def mark_origins(nodes, chain_groups, consumers):
    """Set ``origin`` on graph nodes where error chains started, apart from
    the nodes they only passed through.

    ``chain_groups``: ``History.chains`` of the window. A chain's origin is
    a service, or a topic nobody answered (``conductor``); such a topic is
    its own node when nobody consumes it, else the origin is marked on the
    services that consume it, with the server the calls were addressed to
    (``compute`` on nova-compute, server compute-1). ``origin``: {chains,
    absorbed, errors, servers, topics} or None; ``passes_errors_on``: the
    node failed requests but no chain started there."""
    by_name = {node["service"]: node for node in nodes}
    serving = collections.defaultdict(list)  # topic -> services that consume it
    for name in by_name:
        for topic in consumers.topics(name):
            serving[topic].append(name)
    marks = {}
    for group in chain_groups:
        origin = group["origin"]
        name = origin.get("service")
        if name in by_name:
            targets, topic = [name], None
        elif serving.get(name):
            targets, topic = serving[name], name
        else:
            continue
        for target in targets:
            mark = marks.setdefault(target, {"chains": 0, "absorbed": 0, "errors": set(),
                                             "servers": set(), "topics": set()})
            mark["chains"] += group.get("count", 1)
            mark["absorbed"] += group.get("count", 1) if group.get("absorbed") else 0
            if origin.get("error"):
                mark["errors"].add(str(origin["error"]))
            if origin.get("server"):
                mark["servers"].add(origin["server"])
            if topic:
                mark["topics"].add(topic)
    for name, node in by_name.items():
        mark = marks.get(name)
        node["origin"] = None if mark is None else {
            key: sorted(value)[:_MAX_ORIGIN_NAMES] if isinstance(value, set) else value
            for key, value in mark.items()}
        node["passes_errors_on"] = mark is None and node["failed_in"] > 0


_MAX_ORIGIN_NAMES = 5


def _node(nodes, service):
    node = nodes.get(service)
    if node is None:
        node = nodes[service] = {"service": service, "rate_in": 0.0, "rate_out": 0.0,
                                 "failed_in": 0.0, "processes": 0}
    return node
