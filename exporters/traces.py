"""Assembling hops into traces: a bounded window of open traces.

Hops of one trace arrive from many processes, in any order and late (each
process ships on its own interval). A trace stays open while hops keep
arriving and closes after a quiet period; then its chains are derived and it
goes to the history. Hops of a trace that has already closed reopen it from
the history (``History.load``), so late hops still join.

Memory is bounded by configuration, not by traffic: at most
``max_open_traces`` open traces of at most ``max_hops_per_trace`` hops each.
Past the first bound the oldest trace closes early; past the second, hops
are dropped. Both are counted.

With a durable history each trace also knows the journalled messages its
hops came from (``sources``, numbers the collector gives them), so the
collector can forget a message once every trace it fed is stored.
"""

import collections
import time

DEFAULT_QUIET_SECONDS = 5.0
DEFAULT_MAX_OPEN_TRACES = 50000
DEFAULT_MAX_HOPS_PER_TRACE = 256

# What happened to hops and traces in the window, as counted on /metrics.
# REDELIVERED: a hop already in its trace that came again because the broker
# delivered its message again (a collector killed before it acknowledged
# it); RELOADED: a hop read back from the journal at start, received and
# counted before a restart.
ASSEMBLED, DUPLICATE, TRACE_FULL = "assembled", "duplicate", "trace_full"
REDELIVERED, RELOADED = "redelivered", "reloaded"
CLOSED_QUIET, CLOSED_EARLY = "quiet", "window_full"


class Trace:
    __slots__ = ("trace_id", "hops", "last_seen", "sources")

    def __init__(self, trace_id, last_seen):
        self.trace_id = trace_id
        self.hops = {}  # span id -> hop
        self.last_seen = last_seen
        # Journalled messages whose hops it holds, in the order they came.
        self.sources = []


class TraceWindow:

    def __init__(self, quiet_seconds=DEFAULT_QUIET_SECONDS,
                 max_open_traces=DEFAULT_MAX_OPEN_TRACES,
                 max_hops_per_trace=DEFAULT_MAX_HOPS_PER_TRACE, clock=time.monotonic):
        self.quiet_seconds = quiet_seconds
        self.max_open_traces = max_open_traces
        self.max_hops_per_trace = max_hops_per_trace
        self._clock = clock
        # Least recently active first: closing walks from the front.
        self._open = collections.OrderedDict()
        self._closed_early = []
        self.hop_outcomes = collections.Counter()
        self.closed = collections.Counter()

    def __len__(self):
        return len(self._open)

    def add(self, hop, source=None, again=None):
        """Add a clean hop (``collector._clean_hop``); True if it added a
        ``source`` (a journalled message's number) to its trace. ``again``:
        REDELIVERED if its message came again from the broker, RELOADED if it
        was read back from the journal. Not thread-safe: the collector holds
        its lock."""
        trace_id = hop["trace_id"]
        now = self._clock()
        trace = self._open.get(trace_id)
        if trace is None:
            if len(self._open) >= self.max_open_traces:
                _, oldest = self._open.popitem(last=False)
                self._closed_early.append(oldest)
                self.closed[CLOSED_EARLY] += 1
            trace = self._open[trace_id] = Trace(trace_id, now)
        else:
            trace.last_seen = now
            self._open.move_to_end(trace_id)
        span_id = hop.get("span_id") or ""
        reloaded = again == RELOADED
        if span_id in trace.hops:
            self.hop_outcomes[again or DUPLICATE] += 1
        elif len(trace.hops) >= self.max_hops_per_trace:
            self.hop_outcomes[RELOADED if reloaded else TRACE_FULL] += 1
        else:
            trace.hops[span_id] = hop
            self.hop_outcomes[RELOADED if reloaded else ASSEMBLED] += 1
            # Only hops kept hold their message: one message per hop at most,
            # however long the trace stays open. A message's hops come one
            # after another, so it is the last source if already there.
            if source is not None and (not trace.sources or trace.sources[-1] != source):
                trace.sources.append(source)
                return True
        return False

    def holds(self, hop):
        """Whether ``hop``'s span is already in its open trace."""
        trace = self._open.get(hop["trace_id"])
        return trace is not None and (hop.get("span_id") or "") in trace.hops

    def take_closed(self, force=False):
        """The traces that closed since the last call (all of them if ``force``)."""
        closed, self._closed_early = self._closed_early, []
        deadline = self._clock() - self.quiet_seconds
        while self._open:
            trace_id, trace = next(iter(self._open.items()))
            if not force and trace.last_seen > deadline:
                break
            del self._open[trace_id]
            closed.append(trace)
            self.closed[CLOSED_QUIET] += 1
        return closed
