"""The collector's state: snapshots from many processes merged into one view.

Each process ships cumulative snapshots; the collector keeps the latest one
per process and sums across processes. When a process stops reporting (its
worker died, it was restarted) its gauges go away after a few of its own
intervals, so a dead worker cannot leave waiting replies stuck, and its
counters are folded into a "retired" total so the sums Prometheus sees never
go backwards.

Every message is checked against the metric schema; anything malformed or
foreign is skipped and counted, never raised.
"""

import collections
import json
import logging
import re
import threading
import time

from commlens.exporters import aggregate
from commlens.exporters import chains
from commlens.exporters import graph
from commlens.exporters import history as history_mod
from commlens.exporters import shipping
from commlens.exporters import traces
from commlens.tracer import hops as hops_mod
from commlens.tracer import metrics
from commlens.tracer import recorder
from commlens.tracer import settings

LOG = logging.getLogger(__name__)

EXPIRE_AFTER_INTERVALS = 3
MIN_EXPIRY_SECONDS = 1.0
MAX_PROCESSES = 20000
MAX_HOPS = 100000
MAX_LABEL_LENGTH = 200
_N_BUCKETS = len(metrics.LATENCY_BUCKETS) + 1

# Outcomes of one received message, as counted on /metrics.
ACCEPTED, MALFORMED, FOREIGN, STALE, REJECTED = (
    "accepted", "malformed", "foreign", "stale", "rejected")


class _Process:
    __slots__ = ("id", "service", "host", "pid", "seq", "interval", "last_seen",
                 "counters", "histograms", "gauges")

    def __init__(self, process_id):
        self.id = process_id
        self.seq = -1
        self.counters = {}
        self.histograms = {}
        self.gauges = {}


# The dashboard's time series and methods tables look back this far at most.
SERIES_SECONDS = 900
METHOD_SAMPLE_SECONDS = 15.0


class Collector:
    """``window``, ``history`` and ``chain_counter`` assemble hops into
    traces and chains (defaults: a TraceWindow, an in-memory History)."""

    def __init__(self, clock=time.monotonic, max_hops=MAX_HOPS, window=None,
                 history=None, chain_counter=None):
        self._clock = clock
        self._lock = threading.Lock()
        self._processes = {}
        self._retired_counters = collections.defaultdict(float)
        self._retired_histograms = {}
        self.hops = collections.deque(maxlen=max_hops)
        self.messages = collections.Counter()
        self.invalid_series = 0
        self.invalid_hops = 0
        self.window = window if window is not None else traces.TraceWindow()
        self.history = history if history is not None else history_mod.History()
        self.chain_counter = chain_counter or chains.ChainCounter()
        self.graph_samples = graph.GraphSamples()
        # Per-method totals are many more series than edges: sampled less often
        # and kept for the dashboard's 15 minutes only.
        self.method_samples = graph.GraphSamples(interval=METHOD_SAMPLE_SECONDS,
                                                 max_window=SERIES_SECONDS)
        self.queue_watcher = None
        self.history_errors = 0
        self._sweep_lock = threading.Lock()
        self._sweeper = None
        self._stop_sweeper = threading.Event()

    # -- intake ----------------------------------------------------------

    def ingest(self, body):
        """Take one shipped message (bytes or str); returns its outcome."""
        try:
            outcome = self._ingest(body)
        except Exception:
            LOG.debug("collector: message rejected", exc_info=True)
            outcome = REJECTED
        with self._lock:
            self.messages[outcome] += 1
        if outcome not in (ACCEPTED, STALE):
            LOG.debug("collector: skipped a %s message", outcome)
        return outcome

    def _ingest(self, body):
        try:
            data = json.loads(body)
        except (ValueError, TypeError):
            return MALFORMED
        if not isinstance(data, dict):
            return FOREIGN
        if data.get("format") == shipping.HOPS_FORMAT:
            return self._ingest_hops(data.get("hops"))
        if data.get("format") != recorder.SNAPSHOT_FORMAT:
            return FOREIGN
        process = data.get("process")
        if not isinstance(process, dict) or not _short_str(process.get("id"), 64):
            return MALFORMED
        seq = data.get("seq")
        interval = data.get("interval")
        if not isinstance(seq, int) or not isinstance(interval, (int, float)) or interval <= 0:
            return MALFORMED

        counters, histograms, gauges, invalid = _parse_series(data)
        with self._lock:
            self.invalid_series += invalid
            entry = self._processes.get(process["id"])
            if entry is None:
                if len(self._processes) >= MAX_PROCESSES:
                    return REJECTED
                entry = self._processes[process["id"]] = _Process(process["id"])
            elif seq <= entry.seq:
                return STALE
            service = process.get("service")
            entry.service = service if settings.valid_service_name(service) else "invalid"
            entry.host = str(process.get("host"))[:255]
            entry.pid = process.get("pid") if isinstance(process.get("pid"), int) else None
            entry.seq = seq
            entry.interval = float(interval)
            entry.last_seen = self._clock()
            entry.counters = counters
            entry.histograms = histograms
            entry.gauges = gauges
            if data.get("final") is True:
                self._retire(entry)
        # Agents before hops travelled on their own put them in the snapshot.
        return self._ingest_hops(data.get("hops") or [])

    def _ingest_hops(self, hops):
        if not isinstance(hops, list):
            return MALFORMED
        cleaned = [hop for hop in map(_clean_hop, hops) if hop is not None]
        with self._lock:
            self.hops.extend(cleaned)
            self.invalid_hops += len(hops) - len(cleaned)
            add = self.window.add
            for hop in cleaned:
                add(hop)
        return ACCEPTED

    # -- traces and chains -------------------------------------------------

    def sweep(self, force=False):
        """Close quiet traces, derive their chains, store them; returns how many closed.

        Hops of a trace already in the history (they came late, or before a
        restart) are merged with it and its chains derived again; a chain is
        counted on /metrics once per trace, when first seen.
        """
        with self._sweep_lock:
            with self._lock:
                closed = self.window.take_closed(force)
            if not closed:
                return 0
            try:
                stored = self.history.load(t.trace_id for t in closed)
            except Exception:
                LOG.exception("collector: reading the history failed")
                self.history_errors += 1
                stored = {}
            records = []
            for trace in closed:
                hops = list(trace.hops.values())
                earlier = stored.get(trace.trace_id)
                known_keys = set()
                if earlier:
                    spans = {h.get("span_id") for h in hops}
                    hops.extend(h for h in earlier if h.get("span_id") not in spans)
                    known_keys = {c["key"] for c in chains.derive(earlier)}
                found = chains.derive(hops)
                for chain in found:
                    if chain["key"] not in known_keys:
                        self.chain_counter.count(chain)
                records.append((trace.trace_id, hops, found))
            try:
                self.history.save(records)
            except Exception:
                LOG.exception("collector: writing %d traces to the history failed",
                              len(records))
                self.history_errors += 1
            return len(closed)

    def start_sweeper(self, interval=1.0, prune_every=60.0):
        """Sweep, sample the graph and prune the history in a thread."""
        def run():
            last_prune = self._clock()
            while not self._stop_sweeper.wait(interval):
                try:
                    self.sweep()
                    self.sample_graph()
                    if self._clock() - last_prune >= prune_every:
                        last_prune = self._clock()
                        self.history.prune()
                except Exception:
                    LOG.exception("collector: sweeping failed")
        self._sweeper = threading.Thread(target=run, name="commlens-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self):
        """Stop the sweeper and put every open trace in the history."""
        self._stop_sweeper.set()
        if self._sweeper is not None:
            self._sweeper.join(10)
        if self.queue_watcher is not None:
            self.queue_watcher.stop()
        self.sweep(force=True)

    # -- the graph -----------------------------------------------------------

    def sample_graph(self):
        # The sweeper runs every second; a sample is kept every few seconds:
        # merge only when one is due.
        edges_due, methods_due = self.graph_samples.due(), self.method_samples.due()
        if not (edges_due or methods_due):
            return
        merged = self.merged()
        totals, consumers = graph.edge_totals(*merged)
        if edges_due:
            self.graph_samples.add(totals)
        if methods_due:
            self.method_samples.add(graph.method_totals(*merged, consumers))

    def graph(self, window_seconds=300):
        merged = self.merged()
        current, consumers = graph.edge_totals(*merged)
        age, baseline = self.graph_samples.baseline(window_seconds)
        queues = self.queue_watcher.queues() if self.queue_watcher is not None else None
        result = graph.build(current, baseline, age, consumers, queues, self.processes())
        # Successful calls' latency comes from the per-method samples, which
        # look back 15 minutes at most.
        _age, method_baseline = self.method_samples.baseline(min(window_seconds, SERIES_SECONDS))
        graph.add_ok_latency(result["edges"], graph.method_totals(*merged, consumers),
                             method_baseline)
        return result

    def edge_details(self, client, server, protocol, window_seconds=300):
        """The methods table of one edge and its last 15 minutes of waiting
        replies and errors."""
        edge = (client, server, protocol)
        rows = self._method_rows(window_seconds, lambda key: key == edge)
        return {"edge": {"client": client, "server": server, "protocol": protocol},
                "methods": [row for _edge, row in rows],
                "series": self._series(lambda key: key == edge)}

    def node_details(self, service, window_seconds=300):
        """What ``service`` serves, by caller and method or route, and the
        waiting replies and errors of its inbound edges over 15 minutes."""
        rows = self._method_rows(window_seconds, lambda key: key[1] == service)
        return {"node": {"service": service},
                "methods": [dict(row, caller=edge[0], protocol=edge[2]) for edge, row in rows],
                "series": self._series(lambda key: key[1] == service)}

    def _method_rows(self, window_seconds, wanted):
        counters, histograms, gauges = self.merged()
        current = graph.method_totals(counters, histograms, gauges,
                                      graph.topic_consumers(counters))
        age, baseline = self.method_samples.baseline(min(window_seconds, SERIES_SECONDS))
        return [(edge, row) for edge in sorted(current) if wanted(edge)
                for row in graph.method_rows(current[edge], baseline.get(edge, {}), age)]

    def _series(self, wanted):
        points, previous = [], None
        for seconds_ago, totals in self.graph_samples.since(SERIES_SECONDS):
            selected = [t for key, t in totals.items() if wanted(key)]
            failed = sum(t.failed for t in selected)
            if previous is not None:
                elapsed = max(previous[0] - seconds_ago, 1e-3)
                points.append({"seconds_ago": round(seconds_ago, 1),
                               "waiting_replies": sum(t.waiting for t in selected),
                               "errors_per_second": max(0.0, failed - previous[1]) / elapsed})
            previous = (seconds_ago, failed)
        return points

    # -- expiry ----------------------------------------------------------

    def expire(self):
        now = self._clock()
        with self._lock:
            for entry in list(self._processes.values()):
                deadline = max(MIN_EXPIRY_SECONDS,
                               EXPIRE_AFTER_INTERVALS * entry.interval)
                if now - entry.last_seen > deadline:
                    LOG.info("collector: %s (pid %s on %s) stopped reporting; "
                             "its gauges are removed", entry.service, entry.pid,
                             entry.host)
                    self._retire(entry)

    def _retire(self, entry):
        """Called with the lock held."""
        for key, value in entry.counters.items():
            self._retired_counters[key] += value
        for key, (counts, total) in entry.histograms.items():
            aggregate.add_histogram(self._retired_histograms, key, counts, total)
        del self._processes[entry.id]

    # -- views -----------------------------------------------------------

    def merged(self):
        """(counters, histograms, gauges): {(name, labels): value}, summed."""
        self.expire()
        with self._lock:
            counters = collections.defaultdict(float, self._retired_counters)
            histograms = {k: [list(v[0]), v[1]] for k, v in self._retired_histograms.items()}
            gauges = collections.defaultdict(float)
            for entry in self._processes.values():
                for key, value in entry.counters.items():
                    counters[key] += value
                for key, (counts, total) in entry.histograms.items():
                    aggregate.add_histogram(histograms, key, counts, total)
                for key, value in entry.gauges.items():
                    gauges[key] += value
        return counters, histograms, gauges

    def processes(self):
        self.expire()
        now = self._clock()
        with self._lock:
            return [{"id": p.id, "service": p.service, "host": p.host, "pid": p.pid,
                     "interval": p.interval, "seconds_since_report": round(now - p.last_seen, 3)}
                    for p in self._processes.values()]

    def message_counts(self):
        with self._lock:
            return dict(self.messages)


def _short_str(value, limit):
    return isinstance(value, str) and 0 < len(value) <= limit


_HOP_FIELDS = ("trace_id", "span_id", "parent_id", "service", "side", "protocol", "peer",
               "target", "operation", "kind", "outcome", "error", "start", "duration",
               "request_id", "global_request_id")


_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_SIDES = frozenset((hops_mod.CLIENT, hops_mod.SERVER))
_PROTOCOLS = frozenset((hops_mod.RPC, hops_mod.HTTP))
_MAX_DURATION = 86400.0
_MAX_CLOCK_SKEW = 86400.0


_HOP_FIELD_SET = frozenset(_HOP_FIELDS)
_STRING_FIELDS = tuple(f for f in _HOP_FIELDS if f not in ("start", "duration"))


def _clean_hop(hop):
    """The hop's known fields if they can be assembled, else None.

    Ids must be W3C hex; strings are bounded; an absurd timestamp or
    duration (another clock, garbage) becomes None rather than costing the
    hop: its place in the trace comes from its parent link, not its time.
    This runs for every hop the collector receives: kept to plain look-ups.
    """
    if type(hop) is not dict:
        return None
    # What agents send has exactly these keys: then the decoded dict is kept.
    clean = hop if hop.keys() == _HOP_FIELD_SET else {f: hop.get(f) for f in _HOP_FIELDS}
    for field in _STRING_FIELDS:
        value = clean[field]
        if value is not None and (type(value) is not str or len(value) > MAX_LABEL_LENGTH):
            return None
    if (clean["side"] not in _SIDES or clean["protocol"] not in _PROTOCOLS
            or not clean["service"] or clean["trace_id"] is None or clean["span_id"] is None
            or not _HEX32.match(clean["trace_id"]) or not _HEX16.match(clean["span_id"])):
        return None
    parent = clean["parent_id"]
    if parent is not None and not _HEX16.match(parent):
        clean["parent_id"] = None
    start, duration = clean["start"], clean["duration"]
    if (type(start) is not float and type(start) is not int
            or not abs(start - time.time()) <= _MAX_CLOCK_SKEW):
        clean["start"] = None
    if (type(duration) is not float and type(duration) is not int
            or not 0 <= duration <= _MAX_DURATION):
        clean["duration"] = None
    return clean


def _valid_labels(metric, labels):
    return (isinstance(labels, list) and len(labels) == len(metric.labels)
            and all(isinstance(v, str) and len(v) <= MAX_LABEL_LENGTH for v in labels))


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _parse_series(data):
    """The snapshot's series that match the schema; and how many did not."""
    counters, histograms, gauges = {}, {}, {}
    invalid = 0
    for kind, target in (("counter", counters), ("gauge", gauges)):
        for item in data.get(kind + "s") or ():
            try:
                name, labels, value = item
                metric = metrics.SHIPPED[name]
            except (TypeError, ValueError, KeyError):
                invalid += 1
                continue
            if metric.kind != kind or not _valid_labels(metric, labels) or not _number(value):
                invalid += 1
                continue
            target[(name, tuple(labels))] = float(value)
    for item in data.get("histograms") or ():
        try:
            name, labels, counts, total = item
            metric = metrics.SHIPPED[name]
        except (TypeError, ValueError, KeyError):
            invalid += 1
            continue
        if (metric.kind != "histogram" or not _valid_labels(metric, labels)
                or not isinstance(counts, list) or len(counts) != _N_BUCKETS
                or not all(_number(c) for c in counts) or not _number(total)):
            invalid += 1
            continue
        histograms[(name, tuple(labels))] = (counts, float(total))
    return counters, histograms, gauges, invalid
