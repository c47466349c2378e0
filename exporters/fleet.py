"""Replicas that answer as one: any replica asks its peers and merges.

Replicas share the load by a consistent hash (exporters/intake.py): each
holds the totals of its share of the processes and the traces of its share
of the trace ids, in its own memory and history. A replica given its peers
(``--peer URL``) answers the JSON API and the dashboard for the whole fleet:
it asks every peer for the peer's own share (``?scope=replica``) at once,
with a deadline, and merges the answers with its own:

- graph: rates, requests, failures, waiting replies and timeouts add up;
  percentiles come from the added bucket counts (each replica gives its
  edges' buckets), never from averaged percentiles; an RPC edge's timeout
  budget the same way (exporters/timeout_budget.py, merge);
- chains: grouped by key, counts added, first seen the earliest, last seen
  the latest;
- a trace or a request: the hops of every replica that holds some, joined
  (a request's traces live where their trace ids hash; a trace can be split
  when replicas join or leave), and its chains derived again from them all;
- silent servers: by topic and server, timeouts added; silent reporters: by
  host, service, target, method and kind (exporters/reporters.py, merge);
- lost messages: each replica's sent and received counts of the window, by
  caller, target, method and kind, added; unreceived is computed once from
  the sums (exporters/lost.py, report), since a cast's sender and its
  receivers usually report to different replicas;
- change against a baseline: each replica's edge and method totals at the
  baseline window's ends (the same wall-clock minutes on every replica)
  added; the change is computed once from the sums (exporters/change.py);
- tuning advice: each replica's raw advice inputs (its current figures, its
  samples at the window's and the baseline's starts, the same wall-clock
  marks on every replica, its gauges at each mark, its processes) added;
  the rules run once on the sums, with the fleet's lost messages
  (exporters/advice.py, share and combine).

A peer that does not answer in time makes the answer partial, and the answer
says so (``replicas``: which answered, which did not and why); it never
waits longer than the deadline. Why asking peers rather than a shared store:
docs/architecture.md ("Replicas that answer as one").
"""

import collections
import concurrent.futures
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from commlens.exporters import advice as advice_mod
from commlens.exporters import chains as chains_mod
from commlens.exporters import change
from commlens.exporters import graph as graph_mod
from commlens.exporters import history
from commlens.exporters import lost
from commlens.exporters import reporters
from commlens.exporters import timeout_budget
from commlens.exporters import wait_split
from commlens.tracer import urls

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0
# What a peer may send back: a graph of a large fleet is a few MB.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# Peers are asked for this many chain groups, so that the merged top is exact
# unless there are more shapes than that.
PEER_CHAINS_LIMIT = 1000
# How long /metrics keeps the fleet's last complete lost-message figure
# while a peer does not answer: as long as CommlensCollectorDown waits
# (dashboards/alerts/commlens.rules.yml) before it pages for that replica.
HOLD_UNRECEIVED_SECONDS = 120.0
# The query parameter that asks a replica for its own share only.
SCOPE, REPLICA_SCOPE = "scope", "replica"
# Points of a 15-minute series fall on the sampling grid (graph.py's 5 s).
_SERIES_STEP = 5.0


class Fleet:
    """This replica (``collector``, named ``replica``) and its ``peers``
    (base URLs). A peer URL that turns out to be this replica (a list of
    every replica, the same on each) is asked no more."""

    def __init__(self, collector, replica, peers, timeout=DEFAULT_TIMEOUT, token=None,
                 clock=time.monotonic):
        self.collector = collector
        self._clock = clock
        # The last complete lost-message figures for /metrics: (when, series).
        self._complete_unreceived = None
        self.replica = replica
        self.peers = [p.rstrip("/") for p in peers]
        self.timeout = timeout
        self._token = token
        self._myself = set()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(32, 4 * len(self.peers))), thread_name_prefix="commlens-peer")

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- asking --------------------------------------------------------------

    def ask(self, path, **query):
        """([peer answers], status): every peer's own answer to ``path``, asked
        at once and awaited ``timeout`` seconds at most. An answer is the
        decoded JSON, or None when the peer answered 404 (it holds nothing of
        it). ``status`` is what the merged answer says of the replicas."""
        query[SCOPE] = REPLICA_SCOPE
        with self._lock:
            peers = [p for p in self.peers if p not in self._myself]
        futures = {self._pool.submit(self._get, peer, path, query): peer for peer in peers}
        done, _late = concurrent.futures.wait(futures, timeout=self.timeout + 0.5)
        answered, missing, answers = [self.replica], [], []
        for future, peer in futures.items():
            shown = urls.redact(peer)
            if future not in done:
                missing.append({"peer": shown, "error": "timeout"})
                continue
            try:
                replica, answer = future.result()
            except Exception as exc:
                missing.append({"peer": shown, "error": _reason(exc)})
                continue
            if replica == self.replica:
                with self._lock:
                    self._myself.add(peer)
                continue
            answered.append(replica)
            answers.append(answer)
        missing.sort(key=lambda m: m["peer"])
        status = {"answered": sorted(answered, key=str), "missing": missing,
                  "partial": bool(missing)}
        if missing:
            LOG.debug("collector: peers did not answer %s: %s", path, missing)
        return answers, status

    def _get(self, peer, path, query):
        url = peer + path + "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                replica = response.headers.get(REPLICA_HEADER)
                return replica, json.loads(response.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return exc.headers.get(REPLICA_HEADER), None
            raise

    # -- the fleet's answers -------------------------------------------------

    def graph(self, window_seconds=300):
        mine = self.collector.graph(window_seconds, histograms=True)
        answers, status = self.ask("/api/graph", window=f"{window_seconds:g}s")
        merged = merge_graphs([mine] + [a for a in answers if a is not None])
        merged["window_seconds"] = mine["window_seconds"]
        silent = self.silent_servers(window_seconds)
        merged["silent_servers"] = silent["servers"]
        merged["silent_reporters"] = silent["reporters"]
        merged["replicas"] = status
        # Where the fleet's chains start (who consumes a topic as this
        # replica saw it).
        consumers = graph_mod.topic_consumers(self.collector.merged(rates=True)[0])
        graph_mod.mark_origins(merged["nodes"], self.chains(
            window_seconds, PEER_CHAINS_LIMIT)["chains"], consumers)
        baseline = self.baseline(window_seconds)
        merged["baseline"] = baseline[0]
        change.on_edges(merged["edges"], baseline)
        return merged

    def baseline(self, window_seconds):
        """(description, (edge totals, method totals) at its start, the same
        at its end) of the fleet's baseline window, or (None, None, None):
        the window one collector would take (ending before the fleet's
        incident), every replica's totals at its ends added. Asked again,
        once, when replicas hold different ends (one younger than the
        window, a minute one missed sampling): the latest start and the
        earliest end, which all of them hold."""
        chains = self.chains(window_seconds + change.MAX_INCIDENT_LOOKBACK_SECONDS,
                             PEER_CHAINS_LIMIT)["chains"]
        incident = change.incident_age(chains, window_seconds, self.collector.history.now())
        now = self.collector.wall_clock()
        start, end, ends_at = change.window(window_seconds, incident, now)
        found = None
        for _ in range(2):
            answers, _status = self.ask("/api/baseline-totals", start=repr(start), end=repr(end))
            shares = [self.collector.baseline_share(start, end)]
            shares += [a for a in answers if isinstance(a, dict)]
            found, agreed = change.combine(shares)
            if found is None or agreed:
                break
            start, end = found[0], found[1]
        description = change.describe(found[0], found[1], ends_at, now) if found else None
        if description is None:
            return None, None, None
        return description, found[2], found[3]

    def advice(self, window_seconds, baseline_seconds):
        """``/api/advice`` of the fleet: every replica's advice inputs at the
        same sampling marks, added, and the rules run once on them, as one
        collector holding every process would."""
        now = self.collector.wall_clock()
        then, before = advice_mod.ends(window_seconds, baseline_seconds, now)
        answers, status = self.ask("/api/advice", then=repr(then), before=repr(before))
        shares = [self.collector.advice_share(then, before)]
        shares += [a for a in answers if isinstance(a, dict)]
        inputs = advice_mod.combine(shares, now, then, before, self.collector.broker_queues(),
                                    self.lost_messages()[1])
        return dict(advice_mod.report(inputs), replicas=status)

    def chains(self, since_seconds, limit, absorbed=None):
        mine = self.collector.history.chains(since_seconds, PEER_CHAINS_LIMIT, absorbed)
        query = {"since": f"{since_seconds:g}s", "limit": PEER_CHAINS_LIMIT}
        if absorbed is not None:
            query["absorbed"] = "true" if absorbed else "false"
        answers, status = self.ask("/api/chains", **query)
        groups = [mine] + [a.get("chains", []) for a in answers if a is not None]
        return {"since_seconds": since_seconds, "chains": merge_chains(groups)[:limit],
                "replicas": status}

    def trace(self, trace_or_request_id):
        """The joined trace or request, or None if no replica holds it."""
        mine = self.collector.history.trace(trace_or_request_id)
        answers, status = self.ask("/api/traces/" + urllib.parse.quote(trace_or_request_id,
                                                                        safe=""))
        found = merge_traces([mine] + answers)
        return found, status

    def silent_servers(self, since_seconds, limit=None):
        from commlens.exporters import silent

        limit = limit or silent.DEFAULT_LIMIT
        mine = self.collector.silent_servers.top(since_seconds, silent.MAX_LIMIT)
        answers, status = self.ask("/api/silent-servers", since=f"{since_seconds:g}s",
                                   limit=silent.MAX_LIMIT)
        rows = merge_silent_servers([mine] + [a.get("servers", []) for a in answers
                                              if a is not None])
        silent_reporters = reporters.merge(
            [self.collector.silent_reporters.top(reporters.MAX_LIMIT)]
            + [a.get("reporters", []) for a in answers if a is not None])
        return {"since_seconds": since_seconds, "servers": rows[:limit],
                "reporters": silent_reporters[:limit], "replicas": status}

    def lost_messages(self, window_seconds=None, limit=lost.DEFAULT_LIMIT):
        """(``/api/lost-messages`` JSON, {(target, method, kind): unreceived})
        of the fleet: every replica's sent and received counts of the window
        added caller by caller, then unreceived computed once (lost.report),
        as one collector does. The grace period is the longest any replica
        needs (the slowest process of the fleet): asked again with it when
        a peer needs longer than this replica."""
        window = window_seconds or lost.DEFAULT_WINDOW_SECONDS
        grace = self.collector.lost_grace()
        for _ in range(2):
            answers, status = self.ask("/api/lost-messages", window=f"{window:g}s",
                                       grace=f"{grace:g}s")
            shares = [a for a in answers if isinstance(a, dict)]
            needed = max([grace] + [_num(s.get("grace_needed_seconds")) for s in shares])
            if needed <= grace:
                break
            grace = needed
        mine = self.collector.lost_share(window, grace)
        body, series = lost.report([mine] + shares, self.collector.broker_queues(), limit)
        return dict(body, replicas=status), series

    def unreceived_series(self):
        """{(target, method, kind): unreceived} for /metrics: the fleet's
        figure (every replica exports the same; the alert takes the max).
        While a peer does not answer, the last complete figure, for up to
        ``HOLD_UNRECEIVED_SECONDS`` (a replica restarted by a rollout), then
        none: counted without a replica, the receipts of the processes that
        report to it would read as losses and page (docs/architecture.md)."""
        body, series = self.lost_messages()
        now = self._clock()
        with self._lock:
            if not body["replicas"]["partial"]:
                self._complete_unreceived = (now, series)
                return series
            held = self._complete_unreceived
        if held is not None and now - held[0] <= HOLD_UNRECEIVED_SECONDS:
            return held[1]
        return {}

    def node_details(self, service, window_seconds=300):
        mine = self.collector.node_details(service, window_seconds, histograms=True)
        answers, status = self.ask("/api/graph/node/" + urllib.parse.quote(service, safe=""),
                                   window=f"{window_seconds:g}s")
        merged = merge_details([mine] + [a for a in answers if a is not None],
                               ("caller", "protocol", "operation"))
        baseline = self._row_changes(
            window_seconds, [((row["caller"], service, row["protocol"]), row)
                             for row in merged["methods"]])
        return dict(merged, node=mine["node"], baseline=baseline, replicas=status)

    def edge_details(self, client, server, protocol, window_seconds=300):
        mine = self.collector.edge_details(client, server, protocol, window_seconds,
                                           histograms=True)
        answers, status = self.ask("/api/graph/edge", client=client, server=server,
                                   protocol=protocol, window=f"{window_seconds:g}s")
        answered = [mine] + [a for a in answers if a is not None]
        merged = merge_details(answered, ("operation",))
        if protocol == graph_mod.RPC:
            merged["wait_split"] = wait_split.merge(answered)
        baseline = self._row_changes(window_seconds, [((client, server, protocol), row)
                                                      for row in merged["methods"]])
        return dict(merged, edge=mine["edge"], baseline=baseline, replicas=status,
                    timeout_budget=timeout_budget.merge(
                        [a.get("timeout_budget") for a in answered]))

    def _row_changes(self, window_seconds, rows):
        """Set ``change`` on merged methods-table rows [(edge, row)] from the
        fleet's baseline; its description."""
        baseline = self.baseline(window_seconds)
        change.on_rows(rows, baseline)
        return baseline[0]


# The response header naming the replica that answered.
REPLICA_HEADER = "X-Commlens-Replica"


def _reason(exc):
    """Why a peer did not answer, without its URL (which may hold a secret)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, (TimeoutError,)) or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return type(reason or exc).__name__


# -- merging (pure functions: tests feed them replicas' answers) ---------------

_EDGE_SUMS = ("rate", "requests", "failed", "waiting_replies", "timeouts")
_NODE_SUMS = ("rate_in", "rate_out", "failed_in", "processes")


def merge_graphs(graphs):
    """One graph from replicas' graphs (each with its edges' ``latency`` and
    ``ok_latency`` buckets): counts and rates added, percentiles from the
    added buckets, error ratios from the added counts."""
    edges, latencies, nodes, budgets = {}, {}, {}, collections.defaultdict(list)
    splits = {}  # RPC edges' replicas' wait splits, merged below
    for answer in graphs:
        for edge in answer.get("edges", []):
            key = (edge["client"], edge["server"], edge["protocol"])
            if "wait_split" in edge:
                splits.setdefault(key, []).append(edge)
            merged = edges.get(key)
            if merged is None:
                merged = edges[key] = {k: edge[k] for k in ("client", "server", "protocol")}
                merged["measured_by"] = edge.get("measured_by")
                latencies[key] = (graph_mod.Latency(), graph_mod.Latency())
            for field in _EDGE_SUMS:
                if field in edge:
                    merged[field] = merged.get(field, 0.0) + (edge[field] or 0.0)
            if edge.get("measured_by") == "server":
                merged["measured_by"] = "server"
            if edge.get("queues"):
                merged.setdefault("queues", {}).update(edge["queues"])
            if "timeout_budget" in edge:
                budgets[key].append(edge["timeout_budget"])
            for latency, field in zip(latencies[key], ("latency", "ok_latency"), strict=True):
                part = graph_mod.latency_from_json(edge.get(field))
                latency.add(part.counts, part.low, part.high)
        for node in answer.get("nodes", []):
            merged = nodes.setdefault(node["service"], {"service": node["service"],
                                                        "instrumented": False})
            for field in _NODE_SUMS:
                merged[field] = merged.get(field, 0) + (node.get(field) or 0)
            merged["instrumented"] = merged["instrumented"] or bool(node.get("instrumented"))
            merged["user_agent"] = merged.get("user_agent") or node.get("user_agent")
    result_edges = []
    for key in sorted(edges):
        edge = edges[key]
        requests = edge.get("requests", 0.0)
        edge["error_ratio"] = (edge.get("failed", 0.0) / requests) if requests else 0.0
        latency, ok_latency = latencies[key]
        edge.update(graph_mod.percentiles(latency))
        edge.update(graph_mod.percentiles(ok_latency, prefix="ok_"))
        if key[2] == graph_mod.RPC:
            edge["timeout_budget"] = timeout_budget.merge(budgets[key])
        if key in splits:
            edge["wait_split"] = wait_split.merge(splits[key])
        result_edges.append(edge)
    for node in nodes.values():
        node["error_ratio"] = (node["failed_in"] / node["rate_in"]) if node["rate_in"] else 0.0
        if node["instrumented"]:
            node["user_agent"] = None
    return {"nodes": [nodes[s] for s in sorted(nodes)], "edges": result_edges}


def merge_chains(groups):
    """Chain groups of several replicas (lists of ``History.chains`` rows)
    as one list: by key, counts added, first seen the earliest, last seen
    the latest; most frequent first. The shape shown is the one seen first
    (as one history keeps its first example), and the examples the latest
    replica's first, whoever answered: the same answer from every replica."""
    by_key = {}
    for rows in groups:
        for row in rows:
            by_key.setdefault(row["key"], []).append(row)
    merged = []
    for rows in by_key.values():
        first = min(rows, key=lambda r: (_num(r["first_seen"]), _canonical(r)))
        row = dict(first, count=sum(r["count"] for r in rows),
                   first_seen=min((r["first_seen"] for r in rows), key=_num),
                   last_seen=max((r["last_seen"] for r in rows), key=_num))
        examples = []
        for source in sorted(rows, key=lambda r: (-_num(r["last_seen"]), _canonical(r))):
            for example in source.get("examples", []):
                if example not in examples:
                    examples.append(example)
        row["examples"] = examples[:history.EXAMPLES_PER_CHAIN]
        merged.append(row)
    return sorted(merged, key=lambda r: (-r["count"], -_num(r["last_seen"]), r["key"]))


def _canonical(value):
    return json.dumps(value, sort_keys=True)


def _num(value):
    return value if isinstance(value, (int, float)) else 0.0


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


def _max(a, b):
    return b if a is None else a if b is None else max(a, b)


def merge_traces(answers):
    """One trace (or request) from replicas' answers to /api/traces/<id>
    (None where a replica holds nothing): the hops of them all, each span
    once, in the order one history gives them, and the chains derived from
    the joined hops. None when nobody holds it."""
    found = [a for a in answers if a]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    hops, spans = [], set()
    for answer in found:
        for hop in answer.get("hops", []):
            span = (hop.get("trace_id"), hop.get("span_id"))
            if span not in spans:
                spans.add(span)
                hops.append(hop)
    seen = max(_num(a.get("seen")) for a in found)
    joined = history.join(hops, seen, [])
    by_trace = {}
    for hop in joined["hops"]:
        by_trace.setdefault(hop.get("trace_id"), []).append(hop)
    # The chains of the joined hops; where a history stored one of them,
    # its stored shape (a history shows a chain's first example).
    stored = {}
    for answer in found:
        for chain in answer.get("chains", []):
            before = stored.get(chain["key"])
            if before is None or _canonical(chain) < _canonical(before):
                stored[chain["key"]] = chain
    shapes = {}
    for trace_id in joined["trace_ids"]:
        for chain in sorted(chains_mod.derive(by_trace.get(trace_id, [])),
                            key=lambda c: c["key"]):
            shapes.setdefault(chain["key"], stored.get(chain["key"]) or history.shape(chain))
    joined["chains"] = list(shapes.values())
    request_ids = {a["request_id"] for a in found if a.get("request_id")}
    if request_ids:
        joined["request_id"] = min(request_ids)
    return joined


def merge_silent_servers(groups):
    """Silent servers of several replicas as one list: by topic and server,
    timeouts added, first seen the earliest, last seen the latest."""
    merged = {}
    for rows in groups:
        for row in rows:
            key = (row.get("target"), row.get("server"))
            before = merged.get(key)
            if before is None:
                merged[key] = dict(row, callers=list(row.get("callers", [])),
                                   operations=list(row.get("operations", [])))
                continue
            before["timeouts"] += row["timeouts"]
            before["first_seen"] = _min(before["first_seen"], row["first_seen"])
            before["last_seen"] = _max(before["last_seen"], row["last_seen"])
            for field in ("callers", "operations"):
                before[field] = sorted(set(before[field]) | set(row.get(field, [])))
    return sorted(merged.values(), key=lambda r: (-r["timeouts"], -_num(r["last_seen"]),
                                                  r["target"] or "", r["server"] or ""))


_ROW_SUMS = ("rate", "errors", "timeouts", "waiting_replies")


def merge_details(answers, key_fields):
    """The methods tables and series of a node or edge from several replicas."""
    rows, latencies, requests = {}, {}, {}
    for answer in answers:
        for row in answer.get("methods", []):
            key = tuple(row.get(f) for f in key_fields)
            merged = rows.get(key)
            if merged is None:
                merged = rows[key] = {f: row.get(f) for f in key_fields}
                latencies[key] = graph_mod.Latency()
                requests[key] = 0.0
            requests[key] += row.get("requests") or 0.0
            for field in _ROW_SUMS:
                merged[field] = merged.get(field, 0.0) + (row.get(field) or 0.0)
            part = graph_mod.latency_from_json(row.get("ok_latency"))
            latencies[key].add(part.counts, part.low, part.high)
    methods = []
    for key in sorted(rows, key=lambda k: tuple(str(v) for v in k)):
        row = rows[key]
        row["error_ratio"] = (row["errors"] / requests[key]) if requests[key] else 0.0
        row.update(graph_mod.percentiles(latencies[key]))
        methods.append(row)
    points = {}
    for answer in answers:
        for point in answer.get("series", []):
            slot = round(point["seconds_ago"] / _SERIES_STEP) * _SERIES_STEP
            merged = points.setdefault(slot, {"seconds_ago": slot, "waiting_replies": 0.0,
                                              "errors_per_second": 0.0})
            merged["waiting_replies"] += point.get("waiting_replies") or 0.0
            merged["errors_per_second"] += point.get("errors_per_second") or 0.0
    return {"methods": methods, "series": [points[s] for s in sorted(points, reverse=True)]}

