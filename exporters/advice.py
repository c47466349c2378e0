"""Tuning advice: what to change, with the evidence, from what the collector sees.

The collector's merged series are reduced, every ``SAMPLE_SECONDS``, to the
few figures the rules read (``Figures``: per caller and topic, per server and
topic; bounded by the edges, never by hosts), and kept for an hour
(``samples``). A rule (exporters/advice_rules.py) compares two moments: the
*window* (the last ``window_seconds``, a minute by default) and, where it
looks for change, the *baseline* before it. What it finds is a ``Finding``:

- ``rule``: which rule (``rpc_response_timeout``, ``executor_thread_pool_size``,
  ``workers``, ``api_workers``, ``queue_without_consumer``, ``waits_growing``,
  ``retrying_into_failure``, and the emulator's ``report_interval``);
- ``severity``: ``critical`` (calls fail now), ``warning`` (they will), ``info``;
- ``subject``: the ``service`` it is about and, where it is an edge or a
  topic, ``caller``, ``topic`` and ``edge`` (``caller -> service``);
- ``finding`` and ``recommendation``: sentences an operator reads;
- ``evidence``: the numbers behind it (rates per second, seconds, counts);
- ``option``: the configuration option to change (``[DEFAULT]
  rpc_response_timeout``) and ``set_on``: the services whose configuration holds it;
- ``confidence``: how much data it rests on (``observations``: calls or
  messages counted; ``seconds``: over how long; ``level``: low, medium, high).

Nothing here changes anything: advice is read by people (``commlens
advise``, ``/api/advice``, the dashboard beside the graph).
"""

import bisect
import collections
import dataclasses
import math
import threading
import time

from commlens.exporters import graph
from commlens.tracer import aggregate
from commlens.tracer import metrics

SAMPLE_SECONDS = 10.0
MAX_WINDOW_SECONDS = 3600.0
# Advice reacts within a minute: the last minute, against the 15 before it.
DEFAULT_WINDOW_SECONDS = 60.0
DEFAULT_BASELINE_SECONDS = 900.0

# The names agreed for issue 18's measurements (docs/metrics.md): shipped by
# agents that measure them; from older agents they are absent and the rules
# that need them say nothing.
POOL_WAIT = "commlens_rpc_pool_wait_seconds"
HANDLERS_IN_FLIGHT = "commlens_rpc_handlers_in_flight"
EXECUTOR_POOL_SIZE = "commlens_rpc_executor_pool_size"
POOL_SATURATION_PEAK = "commlens_rpc_pool_saturation_peak"
TIMEOUT_BUDGET = "commlens_rpc_timeout_budget_used"
OVER_HALF_TIMEOUT = "commlens_rpc_calls_over_half_timeout_total"
# The timeout budget's bucket bounds (a fraction of the call's timeout).
BUDGET_BOUNDS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

_ANSWERED = frozenset((metrics.OK, metrics.REMOTE_ERROR))
SEVERITIES = ("critical", "warning", "info")


@dataclasses.dataclass
class Finding:
    rule: str
    severity: str
    subject: dict
    finding: str
    evidence: dict
    recommendation: str
    option: str | None
    set_on: list
    confidence: dict

    def as_dict(self):
        return dataclasses.asdict(self)


def confidence(observations, seconds):
    """How sure a finding is: what it counted, over how long."""
    if observations >= 1000 and seconds >= 300:
        level = "high"
    elif observations >= 100 and seconds >= 60:
        level = "medium"
    else:
        level = "low"
    return {"level": level, "observations": round(observations), "seconds": round(seconds, 1)}


def subject(service, caller=None, topic=None):
    return {"service": service, "caller": caller, "topic": topic,
            "edge": f"{caller} -> {service}" if caller else None}


# -- figures ------------------------------------------------------------------

class Figures:
    """What the rules read of the merged series at one moment, cumulative.

    Keys: ``(caller, topic)`` for what callers saw, ``(service, topic)`` for
    what servers did; histograms are [counts, sum, min, max] (aggregate.py).
    """

    __slots__ = ("waits", "method_waits", "method_processing", "method_pool_wait",
                 "calls", "wait_total", "timeouts", "timeout_low", "failures", "sent",
                 "processing", "received", "pool_wait", "budget", "over_half", "waiting",
                 "in_flight", "pool_size", "saturation", "http", "http_served",
                 "http_duration")

    def __init__(self):
        self.waits = {}          # answered calls' reply waits (ok, remote_error)
        # The same, and the servers' processing and pool waits, by method as
        # well ((caller or service, topic, method)): what one caller waits
        # for is the processing of the methods it calls, not of the topic's.
        self.method_waits = {}
        self.method_processing = {}
        self.method_pool_wait = {}
        self.calls = collections.Counter()       # finished calls, any outcome
        self.wait_total = collections.Counter()  # their waits' sum, seconds
        self.timeouts = collections.Counter()
        self.timeout_low = {}    # shortest wait of a timed-out call: about its timeout
        self.failures = collections.Counter()    # calls and sends that failed
        self.sent = collections.Counter()        # every kind
        self.processing = {}
        self.received = collections.Counter()
        self.pool_wait = {}
        self.budget = {}
        self.over_half = collections.Counter()
        self.waiting = collections.Counter()
        self.in_flight = collections.Counter()
        self.pool_size = collections.Counter()
        self.saturation = {}
        # (caller, target): [requests, failed]
        self.http = collections.defaultdict(lambda: [0.0, 0.0])
        # What each REST service served: requests, and their durations.
        self.http_served = collections.Counter()
        self.http_duration = {}


def reduce(counters, histograms, gauges):
    """``Figures`` of merged series (Collector.merged)."""
    figures = Figures()
    for (name, labels), value in counters.items():
        if name == metrics.RPC_SENT.name:
            figures.sent[labels[:2]] += value
        elif name == metrics.RPC_RECEIVED.name:
            service, _caller, topic = labels[:3]
            figures.received[(service, topic)] += value
        elif name == metrics.RPC_CALL_ERRORS.name:
            figures.failures[labels[:2]] += value
            if labels[3] == metrics.TIMEOUT:
                figures.timeouts[labels[:2]] += value
        elif name == OVER_HALF_TIMEOUT:
            figures.over_half[labels[:2]] += value
        elif name == metrics.HTTP_REQUESTS.name:
            figures.http_served[labels[:1]] += value
        elif name == metrics.HTTP_CLIENT_REQUESTS.name:
            service, target, _method, code = labels
            row = figures.http[(service, target)]
            row[0] += value
            if code.startswith("5") or code == metrics.FAILED:
                row[1] += value
    for (name, labels), (counts, total, low, high) in histograms.items():
        if name == metrics.RPC_REPLY_WAIT.name:
            key, outcome = labels[:2], labels[3]
            figures.calls[key] += sum(counts)
            figures.wait_total[key] += total
            if outcome in _ANSWERED:
                aggregate.add_histogram(figures.waits, key, counts, total, low, high)
                aggregate.add_histogram(figures.method_waits, labels[:3], counts, total,
                                        low, high)
            elif outcome == metrics.TIMEOUT and low is not None:
                known = figures.timeout_low.get(key)
                figures.timeout_low[key] = low if known is None else min(known, low)
        elif name == metrics.RPC_PROCESSING.name:
            aggregate.add_histogram(figures.processing, labels[:2], counts, total, low, high)
            aggregate.add_histogram(figures.method_processing, labels[:3], counts, total,
                                    low, high)
        elif name == metrics.HTTP_DURATION.name:
            aggregate.add_histogram(figures.http_duration, labels[:1], counts, total, low, high)
        elif name == POOL_WAIT:
            aggregate.add_histogram(figures.pool_wait, labels[:2], counts, total, low, high)
            aggregate.add_histogram(figures.method_pool_wait, labels[:3], counts, total,
                                    low, high)
        elif name == TIMEOUT_BUDGET:
            aggregate.add_histogram(figures.budget, labels[:2], counts, total, low, high)
    for (name, labels), value in gauges.items():
        if name == metrics.RPC_WAITING_REPLIES.name:
            figures.waiting[labels[:2]] += value
        elif name == HANDLERS_IN_FLIGHT:
            figures.in_flight[labels[:2]] += value
        elif name == EXECUTOR_POOL_SIZE:
            figures.pool_size[labels[:2]] += value
        elif name == POOL_SATURATION_PEAK:
            # A peak is a maximum over processes, never a sum.
            figures.saturation[labels[:2]] = max(value, figures.saturation.get(labels[:2], 0.0))
    return figures


class Samples:
    """``Figures`` on every ``SAMPLE_SECONDS`` mark of the wall clock, kept
    ``keep`` seconds, after an empty one at the start (the collector started
    with nothing).

    On the mark, not every ten seconds since this collector started:
    replicas then sample at the same instants (to within their sweeper's
    second and their clocks' skew), so their figures at a window's ends, and
    their gauges at each mark, add up to the fleet's (``share``,
    ``combine``), as change.py's baseline samples do."""

    def __init__(self, clock=time.time, interval=SAMPLE_SECONDS,
                 keep=MAX_WINDOW_SECONDS + SAMPLE_SECONDS):
        self.clock = clock
        self.interval = interval
        self.keep = keep
        self._lock = threading.Lock()
        self._times = [clock()]
        self._samples = [Figures()]

    def _mark(self):
        return math.floor(self.clock() / self.interval) * self.interval

    def due(self):
        """Whether ``add`` would keep a sample now (a new mark was passed)."""
        with self._lock:
            return self._mark() > self._times[-1]

    def add(self, figures):
        mark = self._mark()
        with self._lock:
            if mark <= self._times[-1]:
                return  # this mark's is taken (or the clock stepped back)
            self._times.append(mark)
            self._samples.append(figures)
            while len(self._times) > 1 and self._times[0] < mark - self.keep:
                self._times.pop(0)
                self._samples.pop(0)

    def at_or_before(self, when):
        """(time, Figures) of the newest sample at or before ``when``; the
        oldest kept for a time older than them all (a collector younger
        than the window: its empty start)."""
        with self._lock:
            index = max(0, bisect.bisect_right(self._times, when) - 1)
            return self._times[index], self._samples[index]

    def since(self, when):
        """[(time, Figures)] of the samples at or after ``when``, oldest first."""
        with self._lock:
            index = bisect.bisect_left(self._times, when)
            return list(zip(self._times[index:], self._samples[index:], strict=True))


def samples(clock=time.time):
    """The sample store advice reads (``clock``: the wall clock)."""
    return Samples(clock=clock)


def ends(window_seconds, baseline_seconds, now):
    """(window's start, baseline's start): the sampling marks, on the wall
    clock, at or before ``window_seconds`` and ``window_seconds +
    baseline_seconds`` ago: the same on every replica asked at that time."""
    def mark(seconds_ago):
        return math.floor((now - seconds_ago) / SAMPLE_SECONDS) * SAMPLE_SECONDS
    return mark(window_seconds), mark(window_seconds + baseline_seconds)


class Span:
    """What grew between two ``Figures`` (``then`` earlier), over ``seconds``.
    Gauges are read from ``now``; ``peak`` is a gauge's largest value in the
    samples taken during the span (``between``) and now."""

    def __init__(self, then, now, seconds, between=()):
        self.then, self.now = then, now
        self.seconds = max(seconds, 1e-3)
        self.between = list(between) + [now]

    def count(self, field, key):
        return max(0.0, getattr(self.now, field).get(key, 0.0)
                   - getattr(self.then, field).get(key, 0.0))

    def histogram(self, field, key):
        """(graph.Latency of what was added, its sum of values)."""
        now = getattr(self.now, field).get(key)
        if now is None:
            return graph.Latency(), 0.0
        then = getattr(self.then, field).get(key)
        latency = graph.Latency(list(now[0]), now[2], now[3])
        if then is None:
            return latency, now[1]
        return latency.since(graph.Latency(then[0], then[2], then[3])), max(0.0, now[1] - then[1])

    def peak(self, field, key):
        return max((getattr(f, field).get(key, 0.0) for f in self.between), default=0.0)

    def keys(self, field):
        """The keys of ``field`` now, sorted (a rule's findings come in a stable order)."""
        return sorted(getattr(self.now, field))


def quantile(q, latency):
    """The q-quantile's estimate of a duration histogram (graph.quantile), or None."""
    found = graph.quantile(q, latency)
    return None if found is None else found[0]


def mean(latency, total):
    """The mean of what a histogram counted (``total``: their sum), or None."""
    n = sum(latency.counts)
    return total / n if n else None


# -- the advice -----------------------------------------------------------------

class Inputs:
    """Everything the rules read: the window and the baseline before it
    (``Span``s), the broker's queues, the processes reporting, the messages
    nobody received (``{(topic, method, kind): count}``, the collector's
    ``commlens_rpc_unreceived_messages``), and who consumes which topic
    (``{topic: {service: messages received}}``, over all time, so a consumer
    that stopped is still known)."""

    def __init__(self, window, baseline, queues=None, processes=(), unreceived=None,
                 consumers=None):
        self.window = window
        self.baseline = baseline
        self.queues = queues
        self.processes = list(processes)
        self.unreceived = unreceived or {}
        self.consumers = consumers if consumers is not None else _consumers(window.now)

    def servers_of(self, topic):
        """The services that consume ``topic``, most messages first."""
        counts = self.consumers.get(topic, {})
        return sorted(counts, key=lambda s: (-counts[s], s))

    def process_count(self, service):
        return sum(1 for p in self.processes if p.get("service") == service)


def _consumers(figures):
    consumers = collections.defaultdict(collections.Counter)
    for (service, topic), value in figures.received.items():
        if value > 0:
            consumers[topic][service] += value
    return consumers


def inputs_from(samples, current, window_seconds=DEFAULT_WINDOW_SECONDS,
                baseline_seconds=DEFAULT_BASELINE_SECONDS, queues=None, processes=(),
                unreceived=None):
    """``Inputs`` of one collector: ``current`` Figures against its kept
    ``samples``, by the same road as a fleet's (``share``, ``combine``)."""
    now = samples.clock()
    then, before = ends(window_seconds, baseline_seconds, now)
    return combine([share(samples, current, then, before, processes)], now, then, before,
                   queues, unreceived)


# -- a replica's share of the inputs, and a fleet's (exporters/fleet.py) --------

# How each field of Figures adds up across replicas.
_SUMS = frozenset(("calls", "wait_total", "timeouts", "failures", "sent", "received",
                   "over_half", "waiting", "in_flight", "pool_size", "http_served"))
_HISTOGRAMS = frozenset(("waits", "method_waits", "method_processing", "method_pool_wait",
                         "processing", "pool_wait", "budget", "http_duration"))
_LOWEST, _HIGHEST, _PAIRS = "timeout_low", "saturation", "http"
# The gauges whose peaks the rules read (Span.peak), sent at every mark.
GAUGES = ("waiting", "in_flight", "pool_size", "saturation")


def share(samples, current, then, before, processes=()):
    """JSON of what one collector holds of the advice inputs: its
    ``current`` Figures (``now``), its samples at the window's start
    (``then``) and the baseline's (``before``), with the times they were
    taken (``at``), its gauges at every mark since (``gauges``, for peaks),
    and its processes. Every figure is raw, so replicas' shares add up."""
    at_then, at_before = samples.at_or_before(then), samples.at_or_before(before)
    return {"now": figures_json(current),
            "then": {"at": at_then[0], "figures": figures_json(at_then[1])},
            "before": {"at": at_before[0], "figures": figures_json(at_before[1])},
            "gauges": [[t, figures_json(f, GAUGES)]
                       for t, f in samples.since(min(at_before[0], before))],
            "processes": [{"id": p.get("id"), "service": p.get("service")} for p in processes]}


def combine(shares, now, then, before, queues=None, unreceived=None):
    """``Inputs`` of replicas' ``share``s added up, as one collector holding
    all of their processes would have them: figures added (peaks of a
    process's saturation the largest, timeouts' shortest waits the
    shortest), gauges added mark by mark, processes counted once. Each end
    is the latest sample the replicas used for it (the mark, unless one
    missed it or is younger than the window)."""
    current, at_then, at_before = Figures(), Figures(), Figures()
    gauges = collections.defaultdict(Figures)
    processes, seen = [], set()
    then_times, before_times = [], []
    for part in shares:
        if not isinstance(part, dict):
            continue
        add_figures(current, part.get("now"))
        for name, figures, times in (("then", at_then, then_times),
                                     ("before", at_before, before_times)):
            end = part.get(name) if isinstance(part.get(name), dict) else {}
            add_figures(figures, end.get("figures"))
            if _number(end.get("at")):
                times.append(end["at"])
        for row in part.get("gauges") or ():
            if isinstance(row, list) and len(row) == 2 and _number(row[0]):
                add_figures(gauges[row[0]], row[1], GAUGES)
        for process in part.get("processes") or ():
            if not isinstance(process, dict) or not isinstance(process.get("service"), str):
                continue
            if process.get("id") is not None:
                if process["id"] in seen:
                    continue
                seen.add(process["id"])
            processes.append(process)
    then_at = max(then_times, default=then)
    before_at = min(max(before_times, default=before), then_at)
    marks = sorted(gauges)
    window = Span(at_then, current, now - then_at, [gauges[t] for t in marks if t >= then_at])
    baseline = Span(at_before, at_then, then_at - before_at,
                    [gauges[t] for t in marks if before_at <= t <= then_at])
    return Inputs(window, baseline, queues, processes, unreceived)


def figures_json(figures, fields=Figures.__slots__):
    """{field: [[key, value]]} of ``figures``: keys as lists, histograms as
    [counts, sum, min, max]."""
    answer = {}
    for field in fields:
        rows = []
        for key, value in sorted(getattr(figures, field).items()):
            if field in _HISTOGRAMS:
                value = [list(value[0]), value[1], value[2], value[3]]
            elif field == _PAIRS:
                value = list(value)
            rows.append([list(key), value])
        answer[field] = rows
    return answer


def add_figures(figures, data, fields=Figures.__slots__):
    """Add ``figures_json`` JSON into ``figures``; a row that does not fit
    (from a peer of another version) is left out."""
    if not isinstance(data, dict):
        return
    for field in fields:
        store = getattr(figures, field)
        for row in data.get(field) or ():
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], list)
                    and all(isinstance(v, str) for v in row[0])):
                continue
            key, value = tuple(row[0]), row[1]
            if field in _HISTOGRAMS:
                _add_histogram(store, key, value)
            elif field == _PAIRS:
                if isinstance(value, list) and len(value) == 2 and all(map(_number, value)):
                    store[key][0] += value[0]
                    store[key][1] += value[1]
            elif not _number(value):
                continue
            elif field in _SUMS:
                store[key] += value
            elif field == _LOWEST:
                store[key] = min(value, store.get(key, value))
            elif field == _HIGHEST:
                store[key] = max(value, store.get(key, value))


def _add_histogram(store, key, value):
    if not (isinstance(value, list) and len(value) == 4 and isinstance(value[0], list)
            and all(map(_number, value[0])) and _number(value[1])
            and all(v is None or _number(v) for v in value[2:])):
        return
    known = store.get(key)
    if known is not None and len(known[0]) != len(value[0]):
        return  # other buckets: cannot be added
    aggregate.add_histogram(store, key, value[0], value[1], value[2], value[3])


def _number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def advise(inputs, rules=None):
    """Findings of every rule, most severe first, as dicts."""
    from commlens.exporters import advice_rules

    found = []
    for rule in rules or advice_rules.RULES:
        found.extend(rule(inputs))
    found.sort(key=lambda f: (SEVERITIES.index(f.severity), f.rule, f.subject["service"] or "",
                              f.subject["caller"] or "", f.subject["topic"] or ""))
    return [f.as_dict() for f in found]


def report(inputs, rules=None):
    """The ``/api/advice`` answer."""
    return {"window_seconds": round(inputs.window.seconds, 1),
            "baseline_seconds": round(inputs.baseline.seconds, 1),
            "findings": advise(inputs, rules)}
