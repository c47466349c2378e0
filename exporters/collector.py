"""The collector's state: snapshots from many processes merged into one view.

Each process incarnation (one process id) ships cumulative values. The
collector keeps collector-wide totals of counters and histograms and, per
process, the values it last took (its baseline): a snapshot adds only what
grew since that baseline. So a process that resumes after a gap (SIGSTOP, a
broker outage) replaces its own earlier values instead of adding them again;
a restarted process (a new id) adds on top; nothing exported ever goes back.

A restarted collector is not a burst of traffic. A process it first hears
of that was running before it started (not its first snapshot, and an
earlier start time, on the agent's clock) brings running totals of what it
did before: they count in the totals, which stay exact and continue where
the previous collector left them, but they are *carried in*, kept apart and
left out of the collector's own rates (the graph, the methods tables, the
15-minute series), where they would show as the first seconds of traffic.
A process that started after the collector, or whose first snapshot this
is (seq 1), brings nothing carried. /metrics leaves the shipped counters and
histograms out until ``metrics_warm_up`` seconds after the first snapshot,
so Prometheus never scrapes a sum some processes have not reported into
yet: such a sum is lower than the last one, a counter reset, and the next
scrape a jump by the whole total, a rate spike.

When a process stops reporting, its gauges leave the view after a few of its
own intervals (a dead worker cannot leave waiting replies stuck) and come
back if it resumes; its baseline is kept for ``process_retention``. A final
snapshot retires a process at once, and its id is remembered so that what
it sends afterwards is stale.

Every message is checked against the metric schema and the caps (message
size, processes, series per process and in total); whatever is refused is
counted, never raised.
"""

import collections
import json
import logging
import threading
import time

from commlens.exporters import advice as advice_mod
from commlens.exporters import change
from commlens.exporters import chains
from commlens.exporters import exemplars as exemplars_mod
from commlens.exporters import graph
from commlens.exporters import history as history_mod
from commlens.exporters import reporters
from commlens.exporters import lost
from commlens.exporters import silent
from commlens.exporters import timeout_budget
from commlens.exporters import traces
from commlens.exporters import wait_split
from commlens.tracer import aggregate
from commlens.tracer import metrics
from commlens.tracer import settings
from commlens.tracer import wire

LOG = logging.getLogger(__name__)

EXPIRE_AFTER_INTERVALS = 3
MIN_EXPIRY_SECONDS = 1.0
MAX_PROCESSES = 20000
MAX_HOPS = 100000
MAX_LABEL_LENGTH = 200
# Wire caps: what one agent can make the collector hold.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SERIES_PER_PROCESS = 20000
MAX_SERIES = 200000
# A silent process's baseline is kept this long, so a resume within it adds
# only what is new; series no process holds any more are freed after this long.
PROCESS_RETENTION_SECONDS = 3600.0
SERIES_RETENTION_SECONDS = 3600.0
# Ids of retired (final) and forgotten processes remembered, oldest dropped first.
MAX_GONE_PROCESSES = 50000
MAX_INTERVAL_SECONDS = 86400.0
# Beyond 2**53 a float no longer counts by one: no honest counter gets there,
# and sums of values below it stay finite.
_MAX_VALUE = float(2 ** 53)

# Outcomes of one received message, as counted on /metrics. REBASELINED: a
# process resumed after it was forgotten; its values became its baseline
# and added nothing (what it counted while forgotten is lost, and counted here).
ACCEPTED, MALFORMED, FOREIGN, STALE, REJECTED = (
    "accepted", "malformed", "foreign", "stale", "rejected")
TOO_LARGE, TOO_MANY_PROCESSES, REBASELINED = (
    "too_large", "too_many_processes", "rebaselined")

# Why series of an accepted message were refused, as counted on /metrics.
PROCESS_CAP, TOTAL_CAP = "process_cap", "total_cap"
_FINAL, _FORGOTTEN = "final", "forgotten"


class _Process:
    """A process incarnation: the cumulative values last taken from it (its
    baseline) and its current gauges."""

    __slots__ = ("id", "service", "host", "pid", "seq", "interval", "last_seen",
                 "counters", "histograms", "gauges", "logged_silent")

    def __init__(self, process_id):
        self.id = process_id
        self.seq = -1
        self.logged_silent = False
        self.counters = {}
        self.histograms = {}
        self.gauges = {}

    def silent(self, now):
        return now - self.last_seen > max(MIN_EXPIRY_SECONDS,
                                          EXPIRE_AFTER_INTERVALS * self.interval)

    def held(self):
        return len(self.counters) + len(self.histograms) + len(self.gauges)


# The dashboard's time series and methods tables look back this far at most.
SERIES_SECONDS = 900
# Chain shapes read for the graph's origins and the baseline's incident.
MAX_CHAIN_GROUPS = 1000
METHOD_SAMPLE_SECONDS = 15.0


class Collector:
    """``window``, ``history`` and ``chain_counter`` assemble hops into
    traces and chains (defaults: a TraceWindow, an in-memory History);
    ``journal`` (exporters/journal.py) keeps the hops of open traces on disk
    (default: none)."""

    def __init__(self, clock=time.monotonic, wall_clock=time.time, max_hops=MAX_HOPS,
                 window=None, history=None, chain_counter=None, max_processes=MAX_PROCESSES,
                 max_message_bytes=MAX_MESSAGE_BYTES, max_series=MAX_SERIES,
                 max_series_per_process=MAX_SERIES_PER_PROCESS,
                 process_retention=PROCESS_RETENTION_SECONDS,
                 series_retention=SERIES_RETENTION_SECONDS, metrics_warm_up=0.0,
                 lost_grace=None, lost_messages=True, journal=None):
        self._clock = clock
        self.wall_clock = wall_clock
        # When this collector started, on the clock agents stamp their
        # processes' start with: what a process older than it brings is carried in.
        self.started_at = wall_clock()
        self.metrics_warm_up = metrics_warm_up
        self._first_snapshot_at = None
        self._lock = threading.Lock()
        self.max_processes = max_processes
        self.max_message_bytes = max_message_bytes
        self.max_series = max_series
        self.max_series_per_process = max_series_per_process
        self.process_retention = process_retention
        self.series_retention = series_retention
        # Least recently heard first: the first one is the first to forget.
        self._processes = {}
        # {process id: (why it is gone, its last seq)}, oldest first.
        self._gone = collections.OrderedDict()
        # Collector-wide totals: {(name, labels): value} and {(name, labels):
        # [counts, sum, min, max]}; and of them, what processes older than
        # this collector brought in their first snapshot: {(name, labels):
        # value} and {(name, labels): counts}.
        self._counters = {}
        self._histograms = {}
        self._carried_counters = {}
        self._carried_histograms = {}
        # Every series held: {(name, labels): how many remembered processes hold it}.
        # Its length is what max_series caps.
        self._holders = {}
        # Totals no process holds any more, oldest first: {(name, labels): since}.
        self._unheld = collections.OrderedDict()
        self.hops = collections.deque(maxlen=max_hops)
        # Hops taken into ``hops`` since the start: the exemplars read only
        # what came after their last look (exemplars.py).
        self.hops_received = 0
        self.exemplars = exemplars_mod.Exemplars()
        self.messages = collections.Counter()
        self.invalid_series = 0
        self.refused_series = collections.Counter()
        self.invalid_hops = 0
        self.window = window if window is not None else traces.TraceWindow()
        self.history = history if history is not None else history_mod.History()
        self.chain_counter = chain_counter or chains.ChainCounter()
        # Calls to a named server (a host) that timed out: hosts are never labels.
        self.silent_servers = silent.SilentServers()
        # Periodic reporters (state reports) that stopped sending, per host.
        self.silent_reporters = reporters.SilentReporters(clock=clock, wall_clock=wall_clock)
        # Casts, fanouts and notifications nobody received (``lost_grace``
        # None: from the processes' ship intervals).
        self.lost = lost.LostMessages(grace=lost_grace, clock=clock)
        # A replica sees the senders and the receivers of a topic only in
        # part (processes are spread over replicas): it counts no lost message.
        self.lost_messages_counted = lost_messages
        self.graph_samples = graph.GraphSamples(clock=clock)
        # Per-method totals are many more series than edges: sampled less often
        # and kept for the dashboard's 15 minutes only.
        self.method_samples = graph.GraphSamples(clock=clock, interval=METHOD_SAMPLE_SECONDS,
                                                 max_window=SERIES_SECONDS)
        # How close calls run to their timeout, per edge (exporters/timeout_budget.py).
        self.budget_samples = graph.GraphSamples(clock=clock)
        # Where RPC edges' waits go (exporters/wait_split.py), sampled with them.
        self.split_samples = graph.GraphSamples(clock=clock, interval=METHOD_SAMPLE_SECONDS,
                                                max_window=SERIES_SECONDS)
        # Edge and method totals on every minute, for the baseline of ``change``.
        self.baseline_samples = change.samples(wall_clock, graph.MAX_WINDOW_SECONDS)
        # What the tuning rules read, every few seconds (exporters/advice.py).
        # On the wall clock's marks, as replicas' must meet (exporters/fleet.py).
        self.advice_samples = advice_mod.samples(clock=wall_clock)
        self.queue_watcher = None
        # Hops exported as spans to a tracing backend (exporters/otlp.py), or None.
        self.span_export = None
        self.history_errors = 0
        # The journal (exporters/journal.py), if any: hop messages are
        # numbered; {number: how many open traces hold hops of it}; {number:
        # body} taken but not yet written; numbers read back that no trace
        # holds, to forget at the next sweep. The journal lock keeps a
        # message from being forgotten while it is being written.
        self.journal = journal
        self._journal = journal is not None
        self._journal_lock = threading.Lock()
        self._next_number = journal.next_number if journal is not None else 0
        self._journal_refs = {}
        self._unwritten = {}
        self._unreferenced = []
        self._journal_failing = False
        self._sweep_lock = threading.Lock()
        self._sweeper = None
        self._stop_sweeper = threading.Event()

    # -- intake ----------------------------------------------------------

    def ingest(self, body, redelivered=False):
        """Take one shipped message (bytes or str); returns its outcome.
        ``redelivered``: the broker delivered it before (to a collector that
        did not acknowledge it); its hops already here are not duplicates.
        Call ``commit`` before acknowledging it."""
        try:
            outcome = self._ingest(body, traces.REDELIVERED if redelivered else None)
        except Exception:
            LOG.debug("collector: message rejected", exc_info=True)
            outcome = REJECTED
        with self._lock:
            self.messages[outcome] += 1
        if outcome not in (ACCEPTED, STALE, REBASELINED):
            LOG.debug("collector: skipped a %s message", outcome)
        return outcome

    def _ingest(self, body, again):
        # Checked before parsing: a huge message costs its parse many times over.
        if not isinstance(body, (bytes, bytearray, str)):
            return MALFORMED
        if len(body) > self.max_message_bytes:
            return TOO_LARGE
        try:
            # NaN and Infinity are not JSON; Python would read them and write
            # them back into the API, which browsers then cannot parse.
            data = json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, TypeError):
            return MALFORMED
        if not isinstance(data, dict):
            return FOREIGN
        if data.get("format") == wire.HOPS_FORMAT:
            return self._ingest_hops(data.get("hops"), body, again)
        if data.get("format") not in wire.SNAPSHOT_FORMATS:
            return FOREIGN
        process = data.get("process")
        if not isinstance(process, dict) or not _short_str(process.get("id"), 64):
            return MALFORMED
        seq = data.get("seq")
        interval = data.get("interval")
        if (type(seq) is not int or type(interval) not in (int, float)
                or not 0 < interval <= MAX_INTERVAL_SECONDS):
            return MALFORMED

        counters, histograms, gauges, invalid = _parse_series(data)
        with self._lock:
            self.invalid_series += invalid
            outcome = self._take(process, seq, float(interval), counters, histograms, gauges,
                                 data.get("final") is True)
        if outcome in (STALE, TOO_MANY_PROCESSES):
            return outcome
        # Agents before hops travelled on their own put them in the snapshot.
        hops_outcome = self._ingest_hops(data.get("hops") or [], None, again)
        return outcome if hops_outcome == ACCEPTED else hops_outcome

    def _take(self, process, seq, interval, counters, histograms, gauges, final):
        """Account one snapshot; called with the lock held."""
        process_id = process["id"]
        now = self._clock()
        entry = self._processes.get(process_id)
        rebaseline = carried = False
        if entry is None:
            gone = self._gone.get(process_id)
            if gone is not None and (gone[0] == _FINAL or seq <= gone[1]):
                return STALE
            if len(self._processes) >= self.max_processes and not self._forget_one(now):
                return TOO_MANY_PROCESSES
            if gone is not None:
                # Forgotten after its retention: what it shipped before was
                # counted, and its baseline is gone. Its values become the
                # new baseline and add nothing: never counted twice.
                del self._gone[process_id]
                rebaseline = True
            else:
                carried = self._predates_me(process, seq)
            entry = _Process(process_id)
        elif seq <= entry.seq:
            return STALE
        else:
            del self._processes[process_id]  # back in at the end: heard last
        self._processes[process_id] = entry
        if entry.logged_silent:
            entry.logged_silent = False
            LOG.info("collector: %s (pid %s on %s) reports again", entry.service,
                     entry.pid, entry.host)
        service = process.get("service")
        service = service if settings.valid_service_name(service) else "invalid"
        if entry.seq >= 0 and service != entry.service and entry.service != "invalid":
            self._rename(entry, entry.service, service, now)
        entry.service = service
        entry.host = str(process.get("host"))[:255]
        entry.pid = process.get("pid") if type(process.get("pid")) is int else None
        entry.seq = seq
        entry.interval = interval
        entry.last_seen = now
        if self._first_snapshot_at is None:
            self._first_snapshot_at = now
        self._add_counters(entry, counters, rebaseline, carried)
        self.silent_reporters.observe(process_id, entry.host, counters, interval, final)
        self._add_histograms(entry, histograms, rebaseline, carried)
        self._set_gauges(entry, gauges)
        if final:
            self._release(entry, now, _FINAL)
        return REBASELINED if rebaseline else ACCEPTED

    def _predates_me(self, process, seq):
        """Whether a process first heard of now was already running when this
        collector started, so its values hold what it did before: this is not
        its first snapshot, and it started earlier. A snapshot that says
        nothing of its start counts whole."""
        started_at = process.get("started_at")
        return (seq > 1 and type(started_at) in (int, float)
                and started_at < self.started_at)

    def _add_counters(self, entry, counters, rebaseline, carried):
        baseline, totals = entry.counters, self._counters
        for key, value in counters.items():
            old = baseline.get(key)
            if old is None:
                if not self._hold(entry, key):
                    continue
                old = value if rebaseline else 0.0
                if carried:
                    self._carried_counters[key] = self._carried_counters.get(key, 0.0) + value
            # Cumulative within one incarnation: only growth is new. A lower
            # value adds nothing and is the baseline from now on.
            totals[key] = totals.get(key, 0.0) + max(0.0, value - old)
            baseline[key] = value

    def _add_histograms(self, entry, histograms, rebaseline, carried):
        baseline = entry.histograms
        for key, (counts, total, low, high) in histograms.items():
            old = baseline.get(key)
            if old is None:
                if not self._hold(entry, key):
                    continue
                old = (counts, total) if rebaseline else None
                if carried:
                    before = self._carried_histograms.get(key)
                    self._carried_histograms[key] = counts if before is None else [
                        a + b for a, b in zip(before, counts, strict=True)]
            # The extremes are the process's since it started: taken whole,
            # they can only widen the collector's, which must hold every
            # value it counted (percentiles are clamped to them).
            if old is None:
                aggregate.add_histogram(self._histograms, key, counts, total, low, high)
            else:
                aggregate.add_histogram(
                    self._histograms, key,
                    [max(0.0, new - was) for new, was in zip(counts, old[0], strict=True)],
                    max(0.0, total - old[1]), low, high)
            baseline[key] = (counts, total)

    def _set_gauges(self, entry, gauges):
        current = entry.gauges
        # A gauge the process no longer ships reads 0 (it keeps its place,
        # held until the process is forgotten).
        for key in current:
            current[key] = 0.0
        for key, value in gauges.items():
            if key in current or self._hold(entry, key):
                current[key] = value

    def _rename(self, entry, old, new, now):
        """A process now ships under another name (it took its WSGI
        application's name, tracer/recorder.py Recorder.adopt): the series
        it shipped under the old one are moved to the new one, its baseline
        and what it added to the totals alike, so the old name leaves the
        graph and /metrics at once instead of staying a node of its own
        until the series retention. Called with the lock held.

        An old series that other processes still hold (gunicorn workers not
        renamed yet) keeps what they added: it goes down by what moved,
        which Prometheus reads as a counter reset; it happens once, at start."""
        for held in (entry.counters, entry.histograms, entry.gauges):
            for key in list(held):
                new_key = (key[0], metrics.renamed_labels(key[0], key[1], {old: new}))
                if new_key == key:
                    continue
                value = held.pop(key)
                self._unhold(key, now)
                if new_key in held or not self._hold(entry, new_key):
                    continue  # counted under the new name already, or refused by a cap
                held[new_key] = value
                if key in self._counters:
                    moved = min(value, self._counters[key])
                    self._counters[key] -= moved
                    self._counters[new_key] = self._counters.get(new_key, 0.0) + moved
                elif key in self._histograms:
                    # The old series' extremes hold every value moved: the
                    # new one's may only widen by them.
                    counts, total, low, high = self._histograms[key]
                    moved = [min(a, b) for a, b in zip(value[0], counts, strict=True)]
                    self._histograms[key] = [[a - b for a, b in zip(counts, moved, strict=True)],
                                             total - min(value[1], total), low, high]
                    aggregate.add_histogram(self._histograms, new_key, moved,
                                            min(value[1], total), low, high)
                else:
                    continue  # a gauge: only its place moves
                self._drop_if_empty(key)

    def _drop_if_empty(self, key):
        """Drop a series nobody holds any more whose total is nothing."""
        if self._holders.get(key):
            return
        if key in self._counters:
            empty = self._counters[key] <= 1e-9
        else:
            empty = sum(self._histograms[key][0]) <= 1e-9
        if empty:
            self._counters.pop(key, None)
            self._histograms.pop(key, None)
            self._unheld.pop(key, None)
            self._holders.pop(key, None)

    def _unhold(self, key, now):
        """One process less holds ``key``."""
        refs = self._holders[key] - 1
        self._holders[key] = refs
        if not refs:
            if key in self._counters or key in self._histograms:
                self._unheld[key] = now
            else:
                del self._holders[key]

    def _hold(self, entry, key):
        """Count ``key`` as held by ``entry``, within the caps; False if refused."""
        if entry.held() >= self.max_series_per_process:
            self.refused_series[PROCESS_CAP] += 1
            return False
        refs = self._holders.get(key)
        if refs is None:
            if len(self._holders) >= self.max_series:
                self.refused_series[TOTAL_CAP] += 1
                return False
            refs = 0
        elif refs == 0:
            self._unheld.pop(key, None)
        self._holders[key] = refs + 1
        return True

    def _release(self, entry, now, why):
        """Forget a process's baseline; its totals stay. Called with the lock held."""
        del self._processes[entry.id]
        self._gone[entry.id] = (why, entry.seq)
        while len(self._gone) > MAX_GONE_PROCESSES:
            self._gone.popitem(last=False)
        for held in (entry.counters, entry.histograms, entry.gauges):
            for key in held:
                self._unhold(key, now)

    def _forget_one(self, now):
        """Make room for a new process by forgetting the one heard from
        longest ago, if it is silent; False if it is not."""
        oldest = next(iter(self._processes.values()), None)
        if oldest is None or not oldest.silent(now):
            return False
        LOG.info("collector: %d processes reached; forgetting %s (pid %s on %s), "
                 "silent for %.0fs", self.max_processes, oldest.service, oldest.pid,
                 oldest.host, now - oldest.last_seen)
        self._release(oldest, now, _FORGOTTEN)
        return True

    def _ingest_hops(self, hops, body=None, again=None, number=None):
        """``body``: the message, journalled if a hop of it is kept (None:
        written from ``hops``); ``number``: its number, if it was read back
        from the journal."""
        if not isinstance(hops, list):
            return MALFORMED
        cleaned = [hop for hop in map(_clean_hop, hops) if hop is not None]
        with self._lock:
            self.hops.extend(cleaned)
            self.invalid_hops += len(hops) - len(cleaned)
            self.hops_received += len(cleaned)
            window = self.window
            # Of a message the broker delivered again, only hops not already
            # here are exported as spans: this process exported the others.
            # Hops read back are exported again: the killed process may have
            # died with them in its export queue, and backends key spans by id.
            exported = (cleaned if again != traces.REDELIVERED
                        else [h for h in cleaned if not window.holds(h)])
            if not self._journal:
                for hop in cleaned:
                    window.add(hop, None, again)
            else:
                written = number is not None
                if not written:
                    number = self._next_number
                    self._next_number += 1
                held = 0
                for hop in cleaned:
                    held += window.add(hop, number, again)
                if held:
                    self._journal_refs[number] = held
                    if not written:
                        self._unwritten[number] = body if body is not None else json.dumps(
                            {"format": wire.HOPS_FORMAT, "hops": hops})
                elif written:
                    self._unreferenced.append(number)
        if self.span_export is not None and exported:
            self.span_export.offer(exported)
        return ACCEPTED

    # -- the journal -------------------------------------------------------

    def commit(self):
        """Write the hop messages taken since the last commit to the journal,
        in one transaction: the intake acknowledges them to the broker only
        after this. Without a durable history, nothing to do. A failed write
        is counted (history errors) and the messages are acknowledged all
        the same: their hops are then only in the window, as without a journal."""
        if not self._journal:
            return
        with self._journal_lock:
            with self._lock:
                if not self._unwritten:
                    return
                unwritten, self._unwritten = self._unwritten, {}
            try:
                self.journal.append(list(unwritten.items()))
                self._journal_failing = False
            except Exception:
                self.history_errors += 1
                if not self._journal_failing:
                    LOG.exception("collector: writing %d hop messages to the journal failed",
                                  len(unwritten))
                self._journal_failing = True

    def reload(self):
        """Take back the journal at start: the hops of traces that were still
        open when the collector before this one on the same history stopped
        without closing them (killed). They reopen their traces, counted as
        reloaded; a trace already stored merges as a late hop does. Returns
        how many messages were read back."""
        if not self._journal:
            return 0
        count = 0
        for number, body in self.journal.read():
            count += 1
            try:
                hops = json.loads(body).get("hops")
            except (ValueError, TypeError, AttributeError):
                hops = None
            self._ingest_hops(hops if isinstance(hops, list) else [], body,
                              traces.RELOADED, number)
        return count

    def _forgettable(self, closed):
        """The journalled messages to forget once ``closed`` is stored: those
        no open trace holds hops of any more. Called with the lock held."""
        forget, self._unreferenced = self._unreferenced, []
        refs = self._journal_refs
        for trace in closed:
            for number in trace.sources:
                left = refs[number] - 1
                if left:
                    refs[number] = left
                    continue
                del refs[number]
                # Taken and closed before it was written: never written at all.
                if self._unwritten.pop(number, None) is None:
                    forget.append(number)
        return forget

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
                if not closed and not self._unreferenced:
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
                    earlier_spans = {h.get("span_id") for h in earlier}
                    hops.extend(h for h in earlier if h.get("span_id") not in spans)
                    known_keys = {c["key"] for c in chains.derive(earlier)}
                # Each hop once, even one replayed after its trace was stored.
                for hop in trace.hops.values():
                    if not earlier or hop.get("span_id") not in earlier_spans:
                        self.silent_servers.add(hop)
                self.lost.add_trace(hops)
                found = chains.derive(hops)
                for chain in found:
                    if chain["key"] not in known_keys:
                        self.chain_counter.count(chain)
                records.append((trace.trace_id, hops, found))
            with self._journal_lock:
                with self._lock:
                    forget = self._forgettable(closed)
                try:
                    self.history.save(records)
                except Exception:
                    LOG.exception("collector: writing %d traces to the history failed",
                                  len(records))
                    self.history_errors += 1
                    # Their messages stay in the journal, read back at the next start.
                    forget = ()
                if self._journal:
                    # After the traces are stored: killed in between, the
                    # messages are read back and merge with them, each hop once.
                    self.journal.forget(forget)
            return len(closed)

    def start_sweeper(self, interval=1.0, prune_every=60.0):
        """Sweep, sample the graph and prune the history in a thread."""
        def run():
            last_prune = self._clock()
            while not self._stop_sweeper.wait(interval):
                try:
                    self.commit()  # what an intake that does not commit took
                    self.sweep()
                    self.sample_graph()
                    self.sample_advice()
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
        if self.span_export is not None:
            self.span_export.stop()
        self.sweep(force=True)
        if self._journal:
            self.journal.close()

    # -- the graph -----------------------------------------------------------

    def sample_graph(self):
        # The sweeper runs every second; a sample is kept every few seconds:
        # merge only when one is due.
        edges_due, methods_due = self.graph_samples.due(), self.method_samples.due()
        lost_due, baseline_due = self.lost.due(), self.baseline_samples.due()
        split_due = self.split_samples.due()
        if not (edges_due or methods_due or lost_due or baseline_due or split_due):
            return
        merged = self.merged(rates=True)
        if lost_due:
            self.lost.add_sample(merged[0], self.lost_grace())
        if not (edges_due or methods_due or baseline_due or split_due):
            return
        totals, consumers = graph.edge_totals(*merged)
        if edges_due:
            self.graph_samples.add(totals)
            self.budget_samples.add(timeout_budget.budget_totals(*merged[:2], consumers))
        if methods_due or baseline_due:
            methods = graph.method_totals(*merged, consumers)
            if methods_due:
                self.method_samples.add(methods)
            if baseline_due:
                self.baseline_samples.add((totals, methods))
        if split_due:
            self.split_samples.add(wait_split.edge_parts(merged[0], merged[1], consumers))

    def graph(self, window_seconds=300, histograms=False):
        """The graph JSON (graph.build); ``histograms``: with each edge's
        latency buckets, for a peer replica to merge (exporters/fleet.py)."""
        merged = self.merged(rates=True)
        current, consumers = graph.edge_totals(*merged)
        age, baseline = self.graph_samples.baseline(window_seconds)
        queues = self.broker_queues()
        processes = self.processes()
        result = graph.build(current, baseline, age, consumers, queues, processes,
                             reporting=graph.reporting_services(merged[0], merged[1], processes),
                             histograms=histograms)
        # Successful calls' latency comes from the per-method samples, which
        # look back 15 minutes at most.
        _age, method_baseline = self.method_samples.baseline(min(window_seconds, SERIES_SECONDS))
        graph.add_ok_latency(result["edges"], graph.method_totals(*merged, consumers),
                             method_baseline, histograms=histograms)
        budget_age, budget_baseline = self.budget_samples.baseline(window_seconds)
        timeout_budget.add_timeout_budget(
            result["edges"], timeout_budget.budget_totals(*merged[:2], consumers),
            budget_baseline, budget_age, histograms)
        self._add_wait_split(result["edges"], merged, consumers, window_seconds, histograms)
        result["silent_servers"] = self.silent_servers.top(window_seconds)
        result["silent_reporters"] = self.silent_reporters.top()
        graph.mark_origins(result["nodes"], self._chain_groups(window_seconds), consumers)
        baseline = self.baseline(window_seconds)
        result["baseline"] = baseline[0]
        change.on_edges(result["edges"], baseline)
        return result

    def _add_wait_split(self, edges, merged, consumers, window_seconds, histograms=False):
        """``wait_split`` on RPC edges, over the window (15 minutes at most,
        as the methods tables); ``histograms``: with the parts' buckets, for
        a peer replica to merge (exporters/fleet.py)."""
        _age, baseline = self.split_samples.baseline(min(window_seconds, SERIES_SECONDS))
        wait_split.add_to_edges(edges, wait_split.edge_parts(merged[0], merged[1], consumers),
                                baseline, wait_split.edge_pools(merged[0], merged[2]),
                                histograms=histograms)

    def _chain_groups(self, since_seconds):
        """The history's chains of the last ``since_seconds``; none if it
        cannot be read (counted)."""
        try:
            return self.history.chains(since_seconds, limit=MAX_CHAIN_GROUPS)
        except Exception:
            LOG.exception("collector: reading the history failed")
            self.history_errors += 1
            return []

    def baseline(self, window_seconds):
        """(description, totals at its start, at its end) of the baseline
        window that ``change`` compares with (exporters/change.py)."""
        return change.find(self.baseline_samples, window_seconds,
                           self.incident_age(window_seconds), self.wall_clock())

    def incident_age(self, window_seconds):
        """Seconds since the first chain of an incident under way, or None."""
        groups = self._chain_groups(window_seconds + change.MAX_INCIDENT_LOOKBACK_SECONDS)
        return change.incident_age(groups, window_seconds, self.history.now())

    def baseline_share(self, start, end):
        """This collector's edge and method totals at the ends of a baseline
        window (change.share), for a replica that answers for its fleet."""
        return change.share(self.baseline_samples, start, end)

    def lost_messages(self, window_seconds=None, limit=lost.DEFAULT_LIMIT):
        """(``/api/lost-messages`` JSON, {(target, method, kind): unreceived})
        of casts, fanouts and notifications nobody received (exporters/lost.py).
        A replica answers this for its fleet (exporters/fleet.py), from every
        replica's ``lost_share``."""
        if not self.lost_messages_counted:
            return {"window_seconds": window_seconds, "grace_seconds": None,
                    "covered_seconds": 0.0, "messages": [],
                    "unavailable": "this collector is a replica with no peers (--peer): it "
                                   "sees the senders and receivers of a topic only in part"}, {}
        return lost.report([self.lost_share(window_seconds)], self.broker_queues(), limit)

    def lost_share(self, window_seconds=None, grace=None):
        """This collector's own sent and received counts of the lost-message
        window (lost.LostMessages.share); ``grace``: the fleet's, else its own."""
        counters = self.merged(rates=True)[0]
        return self.lost.share(counters, self.lost_grace() if grace is None else grace,
                               window_seconds)

    def lost_grace(self):
        """The lost-message grace period, from the processes reporting here."""
        return self.lost.grace_for(self.processes())

    def broker_queues(self):
        """The RPC queues RabbitMQ's management API reported, or None."""
        return self.queue_watcher.queues() if self.queue_watcher is not None else None

    def sample_advice(self):
        if self.advice_samples.due():
            self.advice_samples.add(advice_mod.reduce(*self.merged(rates=True)))

    def advice(self, window_seconds=advice_mod.DEFAULT_WINDOW_SECONDS,
               baseline_seconds=advice_mod.DEFAULT_BASELINE_SECONDS):
        """The tuning findings of the last ``window_seconds`` (``/api/advice``)."""
        inputs = advice_mod.inputs_from(
            self.advice_samples, advice_mod.reduce(*self.merged(rates=True)), window_seconds,
            baseline_seconds, self.broker_queues(), self.processes(), self.lost_messages()[1])
        return advice_mod.report(inputs)

    def advice_share(self, then, before):
        """This collector's own advice inputs for a window starting at the
        wall-clock mark ``then`` after a baseline starting at ``before``
        (advice.share): what a replica answering for its fleet asks."""
        return advice_mod.share(self.advice_samples, advice_mod.reduce(*self.merged(rates=True)),
                                then, before, self.processes())

    def edge_details(self, client, server, protocol, window_seconds=300, histograms=False):
        """The methods table of one edge, its last 15 minutes of waiting
        replies and errors, and (RPC) where its calls' wait goes."""
        edge = (client, server, protocol)
        rows, baseline = self._method_rows(window_seconds, lambda key: key == edge, histograms)
        details = {"edge": {"client": client, "server": server, "protocol": protocol},
                   "methods": [row for _edge, row in rows], "baseline": baseline,
                   "series": self._series(lambda key: key == edge),
                   "timeout_budget": self._edge_timeout_budget(edge, window_seconds,
                                                               histograms)}
        if protocol == graph.RPC:
            merged = self.merged(rates=True)
            shown = [dict(details["edge"])]
            self._add_wait_split(shown, merged, graph.topic_consumers(merged[0]),
                                 window_seconds, histograms)
            details["wait_split"] = shown[0]["wait_split"]
            if histograms:
                details["wait_split_parts"] = shown[0]["wait_split_parts"]
        return details

    def _edge_timeout_budget(self, edge, window_seconds, histograms):
        """An RPC edge's ``timeout_budget`` over the window, as on /api/graph."""
        if edge[2] != graph.RPC:
            return None
        counters, histograms, _gauges = self.merged(rates=True)
        current = timeout_budget.budget_totals(counters, histograms,
                                               graph.topic_consumers(counters))
        age, baseline = self.budget_samples.baseline(window_seconds)
        return timeout_budget.edge_budget(current.get(edge), baseline.get(edge), age, histograms)

    def node_details(self, service, window_seconds=300, histograms=False):
        """What ``service`` serves, by caller and method or route, and the
        waiting replies and errors of its inbound edges over 15 minutes."""
        rows, baseline = self._method_rows(window_seconds, lambda key: key[1] == service,
                                           histograms)
        return {"node": {"service": service},
                "methods": [dict(row, caller=edge[0], protocol=edge[2]) for edge, row in rows],
                "baseline": baseline, "series": self._series(lambda key: key[1] == service)}

    def _method_rows(self, window_seconds, wanted, histograms=False):
        """[(edge, row)] and the baseline's description; ``histograms``: each
        row with its latency buckets, for a peer replica to merge."""
        counters, merged_histograms, gauges = self.merged(rates=True)
        current = graph.method_totals(counters, merged_histograms, gauges,
                                      graph.topic_consumers(counters))
        age, baseline = self.method_samples.baseline(min(window_seconds, SERIES_SECONDS))
        rows = [(edge, row) for edge in sorted(current) if wanted(edge)
                for row in graph.method_rows(current[edge], baseline.get(edge, {}), age,
                                             histograms)]
        baseline = self.baseline(window_seconds)
        change.on_rows(rows, baseline)
        return rows, baseline[0]

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
        """Forget processes silent past the retention; free totals no process
        holds any more after the series retention.

        What an operator sees of the latter: a series that stayed unchanged,
        with no live process behind it, for ``series_retention`` disappears
        from /metrics. If it comes back, Prometheus sees a counter reset, which
        rate() and increase() handle. This is what keeps a churn of
        short-lived processes with labels of their own from growing memory.
        """
        now = self._clock()
        with self._lock:
            for entry in list(self._processes.values()):
                if not entry.logged_silent and entry.silent(now):
                    entry.logged_silent = True
                    LOG.info("collector: %s (pid %s on %s) stopped reporting; its gauges "
                             "are left out until it reports again", entry.service,
                             entry.pid, entry.host)
                if now - entry.last_seen > self.process_retention:
                    LOG.info("collector: %s (pid %s on %s) silent for %.0fs; forgotten",
                             entry.service, entry.pid, entry.host, now - entry.last_seen)
                    self._release(entry, now, _FORGOTTEN)
            unheld = self._unheld
            while unheld:
                key, since = next(iter(unheld.items()))
                if now - since <= self.series_retention:
                    break
                del unheld[key]
                del self._holders[key]
                for store in (self._counters, self._histograms, self._carried_counters,
                              self._carried_histograms):
                    store.pop(key, None)

    # -- views -----------------------------------------------------------

    def merged(self, rates=False):
        """(counters, histograms, gauges): {(name, labels): value}, summed; a
        histogram's value is [counts, sum, min, max] (aggregate.py).

        A silent process's gauges are left out, so a dead worker cannot
        leave waiting replies stuck; they come back if it resumes. Gauges
        are summed over processes, except those whose ``Metric.merge`` is
        "max" (the pool saturation peak: a ratio), which take the largest.
        ``rates``: for rates over time, without what processes older than
        this collector carried in (the counts; a histogram's sum keeps it).
        """
        self.expire()
        now = self._clock()
        with self._lock:
            counters = collections.defaultdict(float, self._counters)
            histograms = {k: [list(v[0]), *v[1:]] for k, v in self._histograms.items()}
            if rates:
                for key, value in self._carried_counters.items():
                    counters[key] = max(0.0, counters[key] - value)
                for key, counts in self._carried_histograms.items():
                    histograms[key][0] = [max(0.0, a - b) for a, b in
                                          zip(histograms[key][0], counts, strict=True)]
            gauges = collections.defaultdict(float)
            for entry in self._processes.values():
                if entry.silent(now):
                    continue
                for key, value in entry.gauges.items():
                    if key[0] in _MAX_GAUGES:
                        gauges[key] = max(gauges[key], value)
                    else:
                        gauges[key] += value
        return counters, histograms, gauges

    def metrics_warmed_up(self):
        """Whether /metrics may show the shipped counters and histograms:
        ``metrics_warm_up`` seconds after the first snapshot, by when every
        live process has reported its totals."""
        with self._lock:
            first = self._first_snapshot_at
        return first is not None and self._clock() - first >= self.metrics_warm_up

    def processes(self):
        """The processes reporting now (a silent one is left out)."""
        self.expire()
        now = self._clock()
        with self._lock:
            return [{"id": p.id, "service": p.service, "host": p.host, "pid": p.pid,
                     "interval": p.interval, "seconds_since_report": round(now - p.last_seen, 3)}
                    for p in self._processes.values() if not p.silent(now)]

    def message_counts(self):
        with self._lock:
            return dict(self.messages)

    def refused_series_counts(self):
        with self._lock:
            return dict(self.refused_series)


def _refuse_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def _short_str(value, limit):
    return isinstance(value, str) and 0 < len(value) <= limit


_MAX_DURATION = 86400.0
_MAX_CLOCK_SKEW = 86400.0


_MAX_GAUGES = frozenset(m.name for m in metrics.SHIPPED.values() if m.merge == "max")
_HOP_FIELD_SET = frozenset(wire.HOP_FIELDS)
_STRING_FIELDS = tuple(f for f in wire.HOP_FIELDS if f not in wire.HOP_NUMBER_FIELDS)


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
    clean = hop if hop.keys() == _HOP_FIELD_SET else {f: hop.get(f) for f in wire.HOP_FIELDS}
    for field in _STRING_FIELDS:
        value = clean[field]
        if value is not None and (type(value) is not str or len(value) > MAX_LABEL_LENGTH):
            return None
    if (clean["side"] not in wire.SIDES or clean["protocol"] not in wire.PROTOCOLS
            or not clean["service"] or clean["trace_id"] is None or clean["span_id"] is None
            or not wire.match_trace_id(clean["trace_id"])
            or not wire.match_span_id(clean["span_id"])):
        return None
    parent = clean["parent_id"]
    if parent is not None and not wire.match_span_id(parent):
        clean["parent_id"] = None
    start, duration = clean["start"], clean["duration"]
    # Compared before any arithmetic: an int beyond a float's range would raise.
    if (type(start) is not float and type(start) is not int
            or not -_MAX_VALUE <= start <= _MAX_VALUE
            or not abs(start - time.time()) <= _MAX_CLOCK_SKEW):
        clean["start"] = None
    if (type(duration) is not float and type(duration) is not int
            or not 0 <= duration <= _MAX_DURATION):
        clean["duration"] = None
    timeout = clean["timeout"]
    if timeout is not None and (type(timeout) is not float and type(timeout) is not int
                                or not 0 < timeout <= _MAX_DURATION):
        clean["timeout"] = None
    pool_wait = clean["pool_wait"]
    if pool_wait is not None and (type(pool_wait) is not float and type(pool_wait) is not int
                                  or not 0 <= pool_wait <= _MAX_DURATION):
        clean["pool_wait"] = None
    return clean


def _valid_labels(metric, labels):
    return (isinstance(labels, list) and len(labels) == len(metric.labels)
            and all(isinstance(v, str) and len(v) <= MAX_LABEL_LENGTH for v in labels))


def _number(value):
    """A count or a sum of seconds: not negative, finite, exact as a float."""
    return (type(value) is int or type(value) is float) and 0 <= value <= _MAX_VALUE


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
    previous = data.get("format") == wire.SNAPSHOT_FORMAT_1
    n_fields = len(wire.SNAPSHOT_1_HISTOGRAM_FIELDS if previous else wire.HISTOGRAM_FIELDS)
    for item in data.get("histograms") or ():
        try:
            if len(item) != n_fields:
                raise ValueError
            name, labels, counts, total, low, high = (list(item) + [None, None])[:6]
            metric = metrics.SHIPPED[name]
        except (TypeError, ValueError, KeyError):
            invalid += 1
            continue
        # The previous format had only duration histograms, in its own buckets.
        n_buckets = (len(wire.SNAPSHOT_1_LATENCY_BUCKETS) + 1 if previous
                     else len(metric.buckets or ()) + 1)
        if (metric.kind != "histogram" or not _valid_labels(metric, labels)
                or (previous and metric.buckets != metrics.LATENCY_BUCKETS)
                or not isinstance(counts, list) or len(counts) != n_buckets
                or not all(_number(c) for c in counts) or not _number(total)
                or not _extremes(low, high)):
            invalid += 1
            continue
        counts = [float(c) for c in counts]
        if previous:
            counts = aggregate.rebucket(counts, wire.SNAPSHOT_1_LATENCY_BUCKETS,
                                        metrics.LATENCY_BUCKETS)
        histograms[(name, tuple(labels))] = (
            counts, float(total), None if low is None else float(low),
            None if high is None else float(high))
    return counters, histograms, gauges, invalid


def _extremes(low, high):
    """Both None (nothing observed, or an agent that does not say), or two
    durations in order."""
    if low is None and high is None:
        return True
    return _number(low) and _number(high) and low <= high
