"""Where a call's wait goes: queued and in transit, waiting for a worker, processing.

A caller's reply wait is the sum of three parts (docs/architecture.md,
"Where the wait goes"):

- **pool wait**: the server's own measure (``commlens_rpc_pool_wait_seconds``,
  a server hop's ``pool_wait``): from the listener handing the message over
  to the RPC server until a worker of its executor pool dispatched it;
- **processing**: the server's own measure (``commlens_rpc_processing_seconds``,
  a server hop's ``duration``): from dispatch to the reply;
- **queue and transit**: the rest, ``wait - (pool wait + processing)``: the
  request queued in the broker and on its way both ways, the reply's
  publishing and the caller's reply polling.

Every part is a duration measured on one host's monotonic clock, so no clock
sync between hosts is assumed: the caller's interval contains the server's.

Per traced call (``of_trace``) the split is exact up to that: the client hop
and the server hop that is its child (the server hop's ``parent_id`` is the
client hop's ``span_id``, the relation traces are built from). Per edge
(``edge_parts``, ``add_to_edges``) it is made of percentiles of histograms,
which do not add up: queue and transit at p50 is the wait's p50 less the
pool wait's and the processing's, exact when the three rise and fall
together and an estimate otherwise; ``queue_transit_range`` is the interval
it lies in given the ranges of the three percentiles (exporters/graph.py
``quantile``).
"""

import collections

from commlens.exporters import graph
from commlens.tracer import metrics

QUEUE_TRANSIT, POOL_WAIT, PROCESSING = "queue_transit", "pool_wait", "processing"
PARTS = (QUEUE_TRANSIT, POOL_WAIT, PROCESSING)
# A caller's outcomes a server answered: only those have a server side.
_ANSWERED = frozenset((metrics.OK, metrics.REMOTE_ERROR))
_CALL = "call"


def dominant(split):
    """The largest of the three parts of a split ({part: seconds}), or None
    if none is known: what to look at first (processing: slow; pool wait:
    starved; queue and transit: backed up)."""
    known = [(split.get(part), part) for part in PARTS if split.get(part) is not None]
    if not known:
        return None
    return max(known)[1]


def of_call(client_hop, server_hop):
    """The split of one call: its client hop and the server hop that answered it."""
    wait = client_hop.get("duration")
    processing = server_hop.get("duration")
    pool_wait = server_hop.get("pool_wait")
    split = {"span_id": client_hop.get("span_id"), "caller": client_hop.get("service"),
             "service": server_hop.get("service"), "target": client_hop.get("target"),
             "operation": client_hop.get("operation"), "server": server_hop.get("server"),
             "wait": wait, POOL_WAIT: pool_wait, PROCESSING: processing, QUEUE_TRANSIT: None}
    if wait is not None and processing is not None:
        # Clamped: two clocks' rates and the stamps' own cost can make a
        # call with no queueing come out a few microseconds below zero.
        split[QUEUE_TRANSIT] = max(0.0, wait - processing - (pool_wait or 0.0))
    split["dominant"] = dominant(split)
    return split


def of_trace(hops):
    """The split of every RPC call in ``hops`` whose server hop is there
    too, in the order of the client hops."""
    answered = {}
    for hop in hops:
        if hop.get("side") == "server" and hop.get("protocol") == "rpc" and hop.get("parent_id"):
            answered.setdefault(hop["parent_id"], hop)
    return [of_call(hop, answered[hop["span_id"]]) for hop in hops
            if hop.get("side") == "client" and hop.get("protocol") == "rpc"
            and hop.get("kind") == _CALL and hop.get("span_id") in answered]


class Parts:
    """Cumulative latencies of one RPC edge's answered calls: the caller's
    wait, and the server's pool wait and processing of the methods the
    caller calls (the server records these per method, not per caller)."""

    __slots__ = ("wait", "pool_wait", "processing")

    def __init__(self):
        self.wait = graph.Latency()
        self.pool_wait = graph.Latency()
        self.processing = graph.Latency()

    def since(self, then):
        window = Parts()
        for name in self.__slots__:
            setattr(window, name, getattr(self, name).since(getattr(then, name)))
        return window


def edge_parts(counters, histograms, consumers):
    """{(client, server): Parts} of the RPC edges, cumulative."""
    # The (topic, method) each caller called on each server, from what the
    # servers received: the server-side figures of those belong to the edge.
    called = collections.defaultdict(set)  # (server, topic, method) -> callers
    for (name, labels), value in counters.items():
        if name == metrics.RPC_RECEIVED.name and value > 0 and labels[4] == _CALL:
            service, caller, topic, method, _kind = labels
            called[(service, topic, method)].add(caller)
    parts = collections.defaultdict(Parts)
    for (name, labels), (counts, _total, low, high) in histograms.items():
        if name == metrics.RPC_REPLY_WAIT.name and labels[3] in _ANSWERED:
            service, topic, method, _outcome = labels
            for server, share in consumers.servers(service, topic, method, _CALL):
                parts[(service, server)].wait.add(counts, low, high, share)
        elif name in (metrics.RPC_POOL_WAIT.name, metrics.RPC_PROCESSING.name):
            service, topic, method = labels[:3]
            for caller in called.get((service, topic, method), ()):
                part = parts[(caller, service)]
                latency = part.pool_wait if name == metrics.RPC_POOL_WAIT.name else part.processing
                latency.add(counts, low, high)
    return dict(parts)


def edge_pools(counters, gauges):
    """{(client, server): [{target, handlers_in_flight, pool_size,
    saturation_peak}]}: the executor pools of the topics each caller called
    on each server, now."""
    topics = collections.defaultdict(set)  # (server, topic) -> callers
    for (name, labels), value in counters.items():
        if name == metrics.RPC_RECEIVED.name and value > 0:
            service, caller, topic = labels[:3]
            topics[(service, topic)].add(caller)
    pools = collections.defaultdict(dict)  # (server, topic) -> figures
    fields = {metrics.RPC_HANDLERS_IN_FLIGHT.name: "handlers_in_flight",
              metrics.RPC_EXECUTOR_POOL_SIZE.name: "pool_size",
              metrics.RPC_POOL_SATURATION_PEAK.name: "saturation_peak"}
    for (name, labels), value in gauges.items():
        if name in fields:
            pools[tuple(labels)][fields[name]] = value
    found = collections.defaultdict(list)
    for (service, topic), figures in sorted(pools.items()):
        for caller in topics.get((service, topic), ()):
            found[(caller, service)].append({
                "target": topic, "handlers_in_flight": figures.get("handlers_in_flight", 0.0),
                "pool_size": figures.get("pool_size", 0.0),
                "saturation_peak": figures.get("saturation_peak", 0.0)})
    return dict(found)


def _percentile_split(q, parts):
    """{wait, pool_wait, processing, queue_transit, queue_transit_range} at
    quantile ``q`` of a window's Parts; None for what holds no calls."""
    found = {name: graph.quantile(q, getattr(parts, name)) for name in Parts.__slots__}
    split = {name: (None if value is None else value[0]) for name, value in found.items()}
    split[QUEUE_TRANSIT] = split["queue_transit_range"] = None
    wait = found["wait"]
    if wait is not None and found["processing"] is not None:
        # No pool wait recorded (an agent before it): none counted.
        pool = found["pool_wait"] or (0.0, 0.0, 0.0)
        processing = found["processing"]
        split[QUEUE_TRANSIT] = max(0.0, wait[0] - pool[0] - processing[0])
        # Each percentile lies in (estimate, low, high); a high of None is
        # unbounded (the +Inf bucket).
        low = (0.0 if pool[2] is None or processing[2] is None
               else max(0.0, wait[1] - pool[2] - processing[2]))
        high = None if wait[2] is None else max(0.0, wait[2] - pool[1] - processing[1])
        split["queue_transit_range"] = [low, high]
    return split


def split_of(parts, pools=()):
    """An edge's ``wait_split`` from its window's Parts and its pools, or
    None if it has neither calls nor pools."""
    if not any(parts.wait.counts) and not pools:
        return None
    result = {name: _percentile_split(q, parts) for name, q in graph.PERCENTILES}
    result["calls"] = sum(parts.wait.counts)
    # Named from the answered calls' p99: with none, the server's parts alone
    # say nothing of where callers waited.
    result["dominant"] = dominant(result["p99"]) if result["p99"]["wait"] is not None else None
    result["pools"] = list(pools)
    result["saturation_peak"] = max((p["saturation_peak"] for p in pools), default=None)
    return result


def add_to_edges(edges, current, baseline, pools, histograms=False):
    """Set ``wait_split`` on the RPC edges of a graph: ``current`` and
    ``baseline`` from two ``edge_parts``, ``pools`` from ``edge_pools``.
    ``histograms``: the parts' buckets too (``wait_split_parts``), for a peer
    replica to merge (exporters/fleet.py ``merge_wait_splits``)."""
    for edge in edges:
        if edge["protocol"] != graph.RPC:
            continue
        key = (edge["client"], edge["server"])
        now = current.get(key)
        window = now.since(baseline.get(key) or Parts()) if now is not None else Parts()
        edge["wait_split"] = split_of(window, pools.get(key, ()))
        if histograms:
            edge["wait_split_parts"] = {name: graph.latency_json(getattr(window, name))
                                        for name in Parts.__slots__}


def merge(answers):
    """One ``wait_split`` from several replicas' edges (each with its
    ``wait_split_parts``, and its share of the processes' pools): the
    parts' buckets added, the pools' handlers and sizes added, their peaks
    the largest. None if none of them has one."""
    parts, pools, seen = Parts(), {}, False
    for edge in answers:
        if not edge or not (edge.get("wait_split") or edge.get("wait_split_parts")):
            continue
        seen = True
        for name, data in (edge.get("wait_split_parts") or {}).items():
            if name in Parts.__slots__:
                part = graph.latency_from_json(data)
                getattr(parts, name).add(part.counts, part.low, part.high)
        for pool in (edge.get("wait_split") or {}).get("pools", []):
            merged = pools.setdefault(pool["target"], dict(
                target=pool["target"], handlers_in_flight=0.0, pool_size=0.0,
                saturation_peak=0.0))
            merged["handlers_in_flight"] += pool.get("handlers_in_flight") or 0.0
            merged["pool_size"] += pool.get("pool_size") or 0.0
            merged["saturation_peak"] = max(merged["saturation_peak"],
                                            pool.get("saturation_peak") or 0.0)
    if not seen:
        return None
    return split_of(parts, [pools[t] for t in sorted(pools)])
