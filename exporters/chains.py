"""Error propagation chains, derived from the hops of one trace.

A chain is the path an error travelled, from its origin to the entry point:

- the origin is a failing hop none of whose own calls failed; when that hop
  is a call no server answered (a timeout, a refused connection, or a server
  commlens does not see), the origin is the callee that never answered;
- from there the chain climbs parent links while the hops keep failing. If
  it reaches a hop that succeeded, a caller caught the error (retry,
  fallback): the chain is *absorbed* there. Otherwise its top is the entry
  the user (or a periodic task) saw.

Two chains have the same shape when their hops have the same service, side,
protocol, operation and error, and their origins the same server (the RPC
server, a host, that failed or did not answer); they are grouped under one key.

A request an API simply refused (a 4xx at the entry with nothing failing
below it) is not a chain: nothing propagated.

Bad input never raises: unknown parents end the climb, cycles are cut,
hops without a span id are ignored.
"""

import hashlib

from commlens.tracer import wire

MAX_CHAIN_LENGTH = 64
OTHER = "other"


def failed(hop):
    return hop.get("error") is not None


def derive(trace_hops):
    """The distinct chains of one trace (a list of hops), as JSON-ready dicts."""
    by_span = {}
    for hop in trace_hops:
        span_id = hop.get("span_id")
        if span_id:
            by_span.setdefault(span_id, hop)
    children = {}
    for hop in by_span.values():
        parent = hop.get("parent_id")
        if parent and parent != hop["span_id"]:
            children.setdefault(parent, []).append(hop)

    chains = {}
    for hop in by_span.values():
        if not failed(hop) or any(failed(c) for c in children.get(hop["span_id"], ())):
            continue
        chain = _climb(hop, by_span, children)
        if chain is not None:
            chains.setdefault(chain["key"], chain)
    return list(chains.values())


def _climb(origin_hop, by_span, children):
    path, seen = [origin_hop], {origin_hop["span_id"]}
    absorbed_by = None
    hop = origin_hop
    while len(path) < MAX_CHAIN_LENGTH:
        parent = by_span.get(hop.get("parent_id"))
        if parent is None or parent["span_id"] in seen:
            break
        if not failed(parent):
            absorbed_by = parent
            break
        path.append(parent)
        seen.add(parent["span_id"])
        hop = parent

    entry = path[-1]
    if (absorbed_by is None and len(path) == 1 and entry["protocol"] == wire.HTTP
            and entry["side"] == wire.SERVER and str(entry["error"])[:1] == "4"):
        return None

    origin = _step(origin_hop)
    if origin_hop["side"] == wire.CLIENT:
        # Nobody answered (or nobody we see did): the callee is the origin,
        # on the server the call was addressed to if it named one.
        answered = [c for c in children.get(origin_hop["span_id"], ())
                    if c["side"] == wire.SERVER]
        origin["service"] = answered[0]["service"] if answered else origin_hop.get("target")
        if answered and answered[0].get("server"):
            origin["server"] = answered[0]["server"]
        origin["unanswered"] = True
    steps = [_step(h) for h in path]
    top = absorbed_by if absorbed_by is not None else entry
    chain = {
        "origin": {k: origin[k] for k in ("service", "server", "protocol", "operation", "error")},
        "entry": {"service": top["service"], "protocol": top["protocol"],
                  "operation": top["operation"],
                  "error": None if absorbed_by is not None else top["error"]},
        "absorbed": absorbed_by is not None,
        "hops": steps + ([_step(absorbed_by)] if absorbed_by is not None else []),
    }
    chain["key"] = shape_key(chain)
    return chain


def _step(hop):
    return {field: hop.get(field) for field in (
        "service", "side", "protocol", "peer", "target", "operation", "kind", "outcome",
        "error", "start", "duration", "span_id", "parent_id", "request_id",
        "global_request_id", "server", "timeout")}


def shape_key(chain):
    """The same for chains of the same shape, whatever their timing and ids.

    The origin's server is part of the shape: a compute host that stopped
    answering is a chain of its own, beside the same failure on another
    host. Chains without one keep the keys they had before servers were
    recorded."""
    head = [chain["absorbed"], chain["origin"]["service"]]
    server = chain["origin"].get("server")
    if server is not None:
        head.append(server)
    shape = repr(head + [
        (s["service"], s["side"], s["protocol"], s["operation"], s["error"])
        for s in chain["hops"]])
    return hashlib.sha1(shape.encode()).hexdigest()[:16]


def metric_labels(chain):
    """(origin_service, origin_operation, origin_error, entry_service, entry_operation)."""
    origin, entry = chain["origin"], chain["entry"]
    return tuple(str(v) for v in (origin["service"], origin["operation"], origin["error"],
                                  entry["service"], entry["operation"]))


class ChainCounter:
    """``commlens_error_chain_total`` and its absorbed twin, cardinality capped.

    The first ``max_series`` label sets are kept (a counter cannot vanish
    once exported); the rest are summed under ``other``.
    """

    def __init__(self, max_series=200):
        self.max_series = max_series
        self.entry_errors = {}
        self.absorbed = {}

    def count(self, chain):
        target = self.absorbed if chain["absorbed"] else self.entry_errors
        labels = metric_labels(chain)
        if labels not in target and len(target) >= self.max_series:
            labels = (OTHER,) * 5
        target[labels] = target.get(labels, 0) + 1
