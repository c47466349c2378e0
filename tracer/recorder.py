"""In-process aggregation: counters, histograms, waiting-reply gauges, hops.

One recorder per process. On the hot path, ``inc``, ``observe`` and
``keeps_hop`` are compiled (tracer/_speedups.c): two dict look-ups and one
update of a series, atomic without a lock; only a new series takes the
lock. ``call_started``, ``call_finished`` and ``add_hop`` are a lock and a
dict update. A request or message gets as few of them as possible: the
metrics that are sums of finer ones are added at snapshot time
(tracer/derived.py).
Everything heavier (copying, encoding, shipping) happens in the shipper's
thread from ``snapshot()``. Counters and histograms are cumulative for the
life of the process, so a lost snapshot loses nothing but freshness: the
next one carries the same totals.

Tried and measured, so not again: queueing the updates on the hot path and
folding them later (in the shipper, or in batches of 256 by the service's
thread) is faster in a loop but made a gunicorn worker 12 % slower
(benchmarks/wsgi_overhead.py). The queued tuples outlive the request, so the
allocator cannot hand the same, cache-hot memory to the next one; a dict
update leaves nothing behind.

After ``fork()`` (uwsgi and oslo.service workers) the child starts fresh: new
process id, empty aggregates, and its own shipper started by its first
update of any kind (an HTTP-only worker observes and never counts).
"""

import atexit
import collections
import itertools
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref

from commlens.tracer import aggregate
from commlens.tracer import derived
from commlens.tracer import hops
from commlens.tracer import implementation
from commlens.tracer import metrics
from commlens.tracer import propagation
from commlens.tracer import wire

# tracer/_speedups.c, or its Python twin tracer/_speedups_py.py
_speedups = implementation.module("speedups")

LOG = logging.getLogger(__name__)

MAX_SERIES_PER_METRIC = 5000
MAX_PENDING_HOPS = 10000
OVERFLOW = "other"


def _new_latency_histogram():
    return _speedups.Histogram(metrics.LATENCY_BUCKETS)


class Recorder:

    def __init__(self, service, max_pending_hops=MAX_PENDING_HOPS,
                 hop_sample_ratio=0.01, slow_hop_seconds=1.0, provisional=False, host=None):
        self.service = service
        # The host its snapshots name (the sender's host, never a label):
        # None for the machine's name; set for a host a transport speaks
        # for (install_for_host).
        self.host = host
        # The process's name is the program's (gunicorn, uwsgi) until a WSGI
        # application names it (adopt): see _identity below.
        self.provisional = provisional
        # {name the process had: the name it took}: series and hops recorded
        # under the first are shipped under the second.
        self._renamed = {}
        self._identity_followers = []
        self._max_pending_hops = max_pending_hops
        # keeps_hop(trace_id, duration, failed): ship this hop? Failed and
        # slow ones always; others by trace sample (hops.sample_bound), so
        # sampled traces arrive whole. A hop without a trace id is a new
        # trace's first hop that made no call (TraceContext draws ids when
        # first needed): its trace is that hop alone, so a draw at the same
        # ratio decides, with no id to draw.
        self.keeps_hop = _speedups.HopSampler(
            hop_sample_ratio, hops.sample_bound(hop_sample_ratio), slow_hop_seconds).keeps_hop
        self.shipper = None
        # {metric name: {labels: series}}: the hot path looks up the labels
        # tuple it has, instead of building a (name, labels) key per update.
        # inc(metric, labels, amount=1) and observe(metric, labels, seconds)
        # are the store's own methods: no Python frame on the hot path. The
        # store lives as long as the recorder (reset in place after fork), so
        # a compiled caller may hold these methods.
        self._store = _speedups.Store(self._new_counter, self._new_histogram)
        self.inc = self._store.inc
        self.observe = self._store.observe
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()
        self._store.reset()
        self._counters = self._store.counters
        self._histograms = self._store.histograms
        self._waiting = {}
        self._waiting_calls = {}
        self._call_tokens = itertools.count(1)
        self._series = collections.Counter()
        self._hops = collections.deque()
        self._seq = 0
        self.process_id = uuid.uuid4().hex
        self.pid = os.getpid()
        self.started_at = time.time()

    # -- hot path --------------------------------------------------------

    def _new_counter(self, name, labels):
        return self._new_series(self._counters, name, labels, _speedups.Counter)

    def _new_histogram(self, name, labels):
        return self._new_series(self._histograms, name, labels, _new_latency_histogram)

    def _new_series(self, store, name, labels, make):
        """The series of ``labels`` (or the overflow's, past the cap), made
        with ``make()`` if it is new."""
        with self._lock:
            series = store.setdefault(name, {})
            entry = series.get(labels)
            if entry is None:
                labels = self._admit(name, labels)
                entry = series.get(labels)
                if entry is None:
                    entry = series[labels] = make()
            return entry

    def call_started(self, labels):
        """A call is waiting for its reply; returns the token to finish it."""
        token = next(self._call_tokens)
        with self._lock:
            if labels not in self._waiting:
                labels = self._admit(metrics.RPC_WAITING_REPLIES.name, labels)
            self._waiting[labels] = self._waiting.get(labels, 0) + 1
            self._waiting_calls[token] = labels
        return token

    def call_finished(self, token):
        """The reply arrived or will never arrive. Safe to call twice."""
        with self._lock:
            labels = self._waiting_calls.pop(token, None)
            if labels is not None:
                self._waiting[labels] -= 1

    def add_hop(self, hop):
        with self._lock:
            if len(self._hops) >= self._max_pending_hops:
                self._hops.popleft()
                dropped = True
            else:
                dropped = False
            self._hops.append(hop)
        if dropped:
            self.dropped("hop_buffer_full")

    def dropped(self, reason, amount=1):
        """Count what commlens itself could not record or ship."""
        self._add_own(metrics.AGENT_DROPPED, (self.service, reason), amount)

    def inc_ship_failure(self):
        self._add_own(metrics.AGENT_SHIP_FAILURES, (self.service,), 1)

    def _add_own(self, metric, labels, amount):
        """A counter about commlens itself: a few fixed series, no cap."""
        with self._lock:
            self._add_own_locked(metric, labels, amount)

    def _add_own_locked(self, metric, labels, amount):
        series = self._counters.setdefault(metric.name, {})
        entry = series.get(labels)
        if entry is None:
            entry = series[labels] = _speedups.Counter()
        entry.inc(amount)

    def _admit(self, name, labels):
        """Labels for a new series of metric ``name``; past the per-metric
        cap, an overflow series.

        Called with the lock held.
        """
        if self._series[name] < MAX_SERIES_PER_METRIC:
            self._series[name] += 1
            return labels
        self._add_own_locked(metrics.AGENT_DROPPED, (self.service, "series_limit"), 1)
        return (labels[0],) + (OVERFLOW,) * (len(labels) - 1)

    # -- identity --------------------------------------------------------
    #
    # A transport made before the WSGI application was loaded (nova-api under
    # gunicorn: oslo.messaging's transport exists before paste loads our
    # filter) took the program's name. When the application names the
    # process, everything follows: components that use the process's name
    # are told (follow_identity) and make their per-message paths again;
    # what was recorded under the old name is shipped under the new one from
    # the next snapshot on (_renamed), so the old name never stays a node.

    def follow_identity(self, method):
        """Call ``method(new_name)`` when the process is renamed (held weakly:
        a transport that is gone is not kept alive)."""
        with self._lock:
            self._identity_followers.append(weakref.WeakMethod(method))

    def adopt(self, service):
        """Take ``service`` as the process's name if its name is still the
        program's; returns the process's name. Never raises."""
        with self._lock:
            if not self.provisional or service == self.service:
                self.provisional = False
                return self.service
            old, self.service, self.provisional = self.service, service, False
            for was, became in list(self._renamed.items()):
                if became == old:
                    self._renamed[was] = service
            self._renamed[old] = service
            followers = [ref() for ref in self._identity_followers]
        LOG.info("commlens: this process is %s (was %s, the program's name)", service, old)
        for follow in followers:
            if follow is None:
                continue
            try:
                follow(service)
            except Exception:  # never into the service
                LOG.debug("commlens: renaming a component failed", exc_info=True)
        return service

    # -- shipper side ----------------------------------------------------

    def release_calls(self, tokens):
        """Finish calls a driver will never see the end of (its cleanup)."""
        for token in tokens:
            self.call_finished(token)

    def snapshot(self, interval, final=False, max_hops=None):
        """A JSON-ready dict of everything so far, taking the pending hops."""
        with self._lock:
            counters = {(name, labels): counter.value
                        for name, series in self._counters.items()
                        for labels, counter in series.items()}
            histograms = {(name, labels): histogram.read()
                          for name, series in self._histograms.items()
                          for labels, histogram in series.items()}
            waiting = list(self._waiting.items())
            take = len(self._hops) if max_hops is None else min(max_hops, len(self._hops))
            hops = [self._hops.popleft() for _ in range(take)]
            pending = len(self._hops)
            self._seq += 1
            seq = self._seq
            renamed = dict(self._renamed)
        if renamed:
            counters, histograms, waiting, hops = _renamed(
                renamed, counters, histograms, waiting, hops)
        derived.expand(counters, histograms)
        gauges = [[metrics.RPC_WAITING_REPLIES.name, list(labels), value]
                  for labels, value in waiting]
        gauges.append([metrics.AGENT_QUEUE_DEPTH.name, [self.service], pending])
        return {
            "format": wire.SNAPSHOT_FORMAT,
            "process": {
                "id": self.process_id,
                "service": self.service,
                "host": self.host or socket.gethostname(),
                "pid": self.pid,
                "started_at": self.started_at,
            },
            "seq": seq,
            "sent_at": time.time(),
            "interval": interval,
            "final": final,
            "counters": [[name, list(labels), value]
                         for (name, labels), value in counters.items()],
            # wire.HISTOGRAM_FIELDS
            "histograms": [[name, list(labels), counts, total, low, high]
                           for (name, labels), (counts, total, low, high)
                           in histograms.items()],
            "gauges": gauges,
            "hops": hops,
        }

    def return_hops(self, hops):
        """Put back hops whose shipping failed, oldest first, within the bound."""
        with self._lock:
            room = self._max_pending_hops - len(self._hops)
            keep = hops[-room:] if room > 0 else []
            self._hops.extendleft(reversed(keep))
        lost = len(hops) - len(keep)
        if lost:
            self.dropped("ship_failed", lost)

    def attach_shipper(self, shipper):
        self.shipper = shipper
        shipper.start()

    def ship_now(self):
        """Ship what there is now, a second at most: the process's end may be
        near (an RPC server stopping). Never raises into the service."""
        if self.shipper is not None:
            try:
                self.shipper.flush()
            except Exception:
                LOG.debug("commlens: shipping now failed", exc_info=True)

    def _start_shipper(self):
        if self.shipper is not None:
            try:
                self.shipper.start()
            except Exception:  # never into the service
                LOG.debug("commlens: could not restart the shipper", exc_info=True)

    def after_fork_in_child(self):
        if self.pid == os.getpid():
            return  # told twice about one fork (uwsgi with --py-call-osafterfork)
        self._reset()
        if self.shipper is not None:
            self.shipper.after_fork_in_child()
            # Started by the first update in this process, not here: a
            # child that only execs or exits should not start a thread.
            self._store.on_first_use = self._start_shipper


def _renamed(renamed, counters, histograms, waiting, hops):
    """A snapshot's series and hops with the process's old names replaced
    (series that become one are added up)."""
    new_counters, new_histograms, new_waiting = {}, {}, {}
    for (name, labels), value in counters.items():
        key = (name, metrics.renamed_labels(name, labels, renamed))
        new_counters[key] = new_counters.get(key, 0) + value
    for (name, labels), (counts, total, low, high) in histograms.items():
        key = (name, metrics.renamed_labels(name, labels, renamed))
        if key in new_histograms:
            was_counts, was_total, was_low, was_high = new_histograms[key]
            low, high = aggregate.merge_extremes(was_counts, was_low, was_high,
                                                 counts, low, high)
            counts = [a + b for a, b in zip(was_counts, counts, strict=True)]
            total += was_total
        new_histograms[key] = (list(counts), total, low, high)
    for labels, value in waiting:
        key = metrics.renamed_labels(metrics.RPC_WAITING_REPLIES.name, labels, renamed)
        new_waiting[key] = new_waiting.get(key, 0) + value
    for hop in hops:
        for field in ("service", "peer"):
            if hop.get(field) in renamed:
                hop[field] = renamed[hop[field]]
    return new_counters, new_histograms, list(new_waiting.items()), hops


_RECORDER = None
_RECORDER_LOCK = threading.Lock()


def get_recorder():
    """The process's recorder, or None while commlens is not configured."""
    return _RECORDER


def install(settings, shipper_factory=None, service=None, provisional=False):
    """Create the process's recorder once; later calls return the same one.

    ``shipper_factory(recorder)`` builds the shipper; it runs only for the
    first call, so the first instrumented component of a process decides its
    service name, where it ships to and which hops it keeps
    (docs/architecture.md, "Who ships where"); a name that is only the
    program's, or ``provisional``, is replaced by the first WSGI
    application's (Recorder.adopt).
    """
    global _RECORDER
    with _RECORDER_LOCK:
        if _RECORDER is None:
            recorder = Recorder(service or settings.service_name,
                                hop_sample_ratio=settings.hop_sample_ratio,
                                slow_hop_seconds=settings.slow_hop_seconds,
                                provisional=provisional or (
                                    not service and settings.named_by_program))
            if shipper_factory is not None:
                recorder.attach_shipper(shipper_factory(recorder))
            _RECORDER = recorder
            _instrument_propagation()
        return _RECORDER


_HOST_RECORDERS = {}  # (service, host) -> Recorder
MAX_HOST_RECORDERS = 64


def install_for_host(settings, host, service, shipper_factory=None):
    """The recorder of a transport that speaks for ``host``
    (``?commlens_host=`` in its URL): one process running the services of
    several hosts, as the demo's emulated compute hosts do, ships each host
    as a process of its own, so what the collector learns per sending host
    (its periodic reports, exporters/reporters.py) names that host. The
    process's own recorder is installed too (propagation, outbound REST).
    At most MAX_HOST_RECORDERS; past that, the process's recorder. Not
    reset after fork: a forking server names no host this way."""
    process = install(settings, shipper_factory, service=service)
    with _RECORDER_LOCK:
        recorder = _HOST_RECORDERS.get((service, host))
        if recorder is None:
            if len(_HOST_RECORDERS) >= MAX_HOST_RECORDERS:
                return process
            recorder = Recorder(service, hop_sample_ratio=settings.hop_sample_ratio,
                                slow_hop_seconds=settings.slow_hop_seconds, host=host)
            if shipper_factory is not None:
                recorder.attach_shipper(shipper_factory(recorder))
            _HOST_RECORDERS[(service, host)] = recorder
        return recorder


def _instrument_propagation():
    """Spawned work continues the trace of the request that spawned it."""
    try:
        propagation.instrument()
    except Exception as exc:  # never into the service
        propagation.uninstrument()
        LOG.error("commlens: traces will not follow spawned work: %s", exc)


def uninstall():
    """Stop shipping (with a last snapshot) and forget the recorder.

    Also the process's exit hook: a short-lived process (a CLI tool, a
    recycled uwsgi or gunicorn worker, oslo.messaging's simulator) would
    otherwise lose its last interval. It waits a second at most
    (shipping.EXIT_SECONDS). Exits that skip atexit (os._exit, as
    oslo.service's workers do, or a signal without a handler) are covered
    where we can see them coming: an RPC listener's cleanup flushes.
    """
    global _RECORDER
    with _RECORDER_LOCK:
        recorder, _RECORDER = _RECORDER, None
        for_hosts = list(_HOST_RECORDERS.values())
        _HOST_RECORDERS.clear()
    propagation.uninstrument()
    for stopping in [recorder, *for_hosts]:
        if stopping is not None and stopping.shipper is not None:
            stopping.shipper.stop()


def _after_fork_in_child():
    if _RECORDER is not None:
        _RECORDER.after_fork_in_child()


def _register_uwsgi_post_fork():
    """uwsgi forks its workers in C and runs Python's at-fork hooks only with
    --py-call-osafterfork: without this, every worker forked from a master
    that loaded the app (no lazy-apps) would ship as the master, one process
    id for all, and count nothing at exit. Its own post-fork hook always runs."""
    try:
        import uwsgi
    except ImportError:
        return  # not inside uwsgi
    decorators = sys.modules.get("uwsgidecorators")
    if decorators is not None:
        decorators.postfork(_after_fork_in_child)  # its chain owns uwsgi's hook
        return
    previous = getattr(uwsgi, "post_fork_hook", None)

    def post_fork_hook():
        _after_fork_in_child()
        if previous is not None:
            previous()
    uwsgi.post_fork_hook = post_fork_hook


os.register_at_fork(after_in_child=_after_fork_in_child)
_register_uwsgi_post_fork()
atexit.register(uninstall)
