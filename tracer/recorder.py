"""In-process aggregation: counters, histograms, waiting-reply gauges, hops.

One recorder per process. The hot path (``inc``, ``observe``,
``call_started``/``call_finished``, ``add_hop``) only appends to a queue or
sets a dict item, without a lock: it runs on the service's own thread,
right between its socket reads, where every instruction comes out of cold
caches and costs several times what it costs in a loop. Folding those
updates into the aggregates, copying, encoding and shipping happen in the
shipper's thread from ``snapshot()``, in small chunks that hand the GIL
back in between. Counters and histograms are cumulative for the life of
the process, so a lost snapshot loses nothing but freshness: the next one
carries the same totals.

After ``fork()`` (uwsgi and oslo.service workers) the child starts fresh: new
process id, empty aggregates, and its own shipper started on first use.
"""

import bisect
import collections
import itertools
import logging
import os
import socket
import threading
import time
import uuid

from commlens.tracer import hops
from commlens.tracer import metrics

LOG = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "commlens.snapshot/1"
MAX_SERIES_PER_METRIC = 5000
MAX_PENDING_HOPS = 10000
# Updates not folded yet. A queue this long (seconds of traffic past the
# ship interval) is folded by the thread that finds it full, so nothing is
# lost and memory stays bounded.
MAX_PENDING_UPDATES = 100000
# Updates folded per chunk before the shipper hands the GIL back to the service.
FOLD_CHUNK = 512
OVERFLOW = "other"

_BUCKETS = metrics.LATENCY_BUCKETS


class Recorder:

    def __init__(self, service, max_pending_hops=MAX_PENDING_HOPS,
                 hop_sample_ratio=0.01, slow_hop_seconds=1.0):
        self.service = service
        self._max_pending_hops = max_pending_hops
        self._hop_sample_threshold = hops.sample_threshold(hop_sample_ratio)
        self._slow_hop_seconds = slow_hop_seconds
        self._reset()
        self.shipper = None
        self._start_shipper_on_use = False

    def _reset(self):
        self._lock = threading.Lock()
        self._counters = {}
        self._histograms = {}
        # (metric name, labels, amount) and (metric name, labels, seconds)
        # waiting to be folded into the aggregates.
        self._pending_counts = collections.deque()
        self._pending_observations = collections.deque()
        # Calls whose reply has not arrived: token -> labels. Counted per
        # labels at snapshot time; every series seen stays reported, at 0
        # once its calls are done.
        self._waiting_calls = {}
        self._waiting_series = set()
        self._call_tokens = itertools.count(1)
        self._series = collections.Counter()
        self._hops = collections.deque()
        self._seq = 0
        self.process_id = uuid.uuid4().hex
        self.pid = os.getpid()
        self.started_at = time.time()

    # -- hot path --------------------------------------------------------

    def inc(self, metric, labels, amount=1):
        if self._start_shipper_on_use:
            self._start_shipper()
        pending = self._pending_counts
        if len(pending) >= MAX_PENDING_UPDATES:
            self._fold_all()
        pending.append((metric.name, labels, amount))

    def observe(self, metric, labels, seconds):
        pending = self._pending_observations
        if len(pending) >= MAX_PENDING_UPDATES:
            self._fold_all()
        pending.append((metric.name, labels, seconds))

    def call_started(self, labels):
        """A call is waiting for its reply; returns the token to finish it."""
        # next() on a count and a dict item set are atomic: no lock needed
        # but for a series' first call.
        token = next(self._call_tokens)
        if labels not in self._waiting_series:
            with self._lock:
                labels = self._admit(metrics.RPC_WAITING_REPLIES.name, labels)[1]
                self._waiting_series.add(labels)
        self._waiting_calls[token] = labels
        return token

    def call_finished(self, token):
        """The reply arrived or will never arrive. Safe to call twice."""
        self._waiting_calls.pop(token, None)

    def keeps_hop(self, trace_id, duration, failed):
        """Ship this hop? Failed and slow ones always; others by trace sample."""
        return (failed or duration >= self._slow_hop_seconds
                or int(trace_id[-8:], 16) < self._hop_sample_threshold)

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
        key = (metrics.AGENT_DROPPED.name, (self.service, reason))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def inc_ship_failure(self):
        key = (metrics.AGENT_SHIP_FAILURES.name, (self.service,))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + 1

    def _admit(self, name, labels):
        """Key for a new series; past the per-metric cap, an overflow series.

        Called with the lock held.
        """
        if self._series[name] < MAX_SERIES_PER_METRIC:
            self._series[name] += 1
            return (name, labels)
        overflow = (labels[0],) + (OVERFLOW,) * (len(labels) - 1)
        drop_key = (metrics.AGENT_DROPPED.name, (self.service, "series_limit"))
        self._counters[drop_key] = self._counters.get(drop_key, 0) + 1
        return (name, overflow)

    # -- folding (shipper side, or whoever finds the queue full) ---------

    def _fold(self, limit):
        """Fold up to ``limit`` pending updates of each kind; True if some remain."""
        counts, observations = self._pending_counts, self._pending_observations
        with self._lock:
            counters, histograms = self._counters, self._histograms
            for _ in range(min(limit, len(counts))):
                name, labels, amount = counts.popleft()
                key = (name, labels)
                if key not in counters:
                    key = self._admit(name, labels)
                counters[key] = counters.get(key, 0) + amount
            for _ in range(min(limit, len(observations))):
                name, labels, seconds = observations.popleft()
                key = (name, labels)
                entry = histograms.get(key)
                if entry is None:
                    key = self._admit(name, labels)
                    entry = histograms.get(key)
                    if entry is None:
                        entry = histograms[key] = [[0] * (len(_BUCKETS) + 1), 0.0]
                entry[0][bisect.bisect_left(_BUCKETS, seconds)] += 1
                entry[1] += seconds
        return bool(counts or observations)

    def _fold_all(self):
        self._fold(MAX_PENDING_UPDATES * 2)

    def _waiting_gauges(self):
        """[labels, open calls] for every waiting-replies series seen. Lock held."""
        while True:
            try:
                open_calls = collections.Counter(self._waiting_calls.values())
                break
            except RuntimeError:  # resized by another thread while counted
                continue
        return [[list(labels), open_calls.get(labels, 0)] for labels in self._waiting_series]

    # -- shipper side ----------------------------------------------------

    def release_calls(self, tokens):
        """Finish calls a driver will never see the end of (its cleanup)."""
        for token in tokens:
            self.call_finished(token)

    def snapshot(self, interval, final=False, max_hops=None):
        """A JSON-ready dict of everything so far, taking the pending hops."""
        while self._fold(FOLD_CHUNK):
            time.sleep(0)  # let the service's threads (or greenthreads) run
        with self._lock:
            counters = list(self._counters.items())
            histograms = [(k, (list(v[0]), v[1])) for k, v in self._histograms.items()]
            waiting = self._waiting_gauges()
            take = len(self._hops) if max_hops is None else min(max_hops, len(self._hops))
            hops = [self._hops.popleft() for _ in range(take)]
            pending = len(self._hops)
            self._seq += 1
            seq = self._seq
        gauges = [[metrics.RPC_WAITING_REPLIES.name, labels, value]
                  for labels, value in waiting]
        gauges.append([metrics.AGENT_QUEUE_DEPTH.name, [self.service], pending])
        return {
            "format": SNAPSHOT_FORMAT,
            "process": {
                "id": self.process_id,
                "service": self.service,
                "host": socket.gethostname(),
                "pid": self.pid,
                "started_at": self.started_at,
            },
            "seq": seq,
            "sent_at": time.time(),
            "interval": interval,
            "final": final,
            "counters": [[name, list(labels), value]
                         for (name, labels), value in counters],
            "histograms": [[name, list(labels), counts, total]
                           for (name, labels), (counts, total) in histograms],
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

    def _start_shipper(self):
        self._start_shipper_on_use = False
        if self.shipper is not None:
            try:
                self.shipper.start()
            except Exception:  # never into the service
                LOG.debug("commlens: could not restart the shipper", exc_info=True)

    def after_fork_in_child(self):
        self._reset()
        if self.shipper is not None:
            self.shipper.after_fork_in_child()
            self._start_shipper_on_use = True


_RECORDER = None
_RECORDER_LOCK = threading.Lock()


def get_recorder():
    """The process's recorder, or None while commlens is not configured."""
    return _RECORDER


def install(settings, shipper_factory=None, service=None):
    """Create the process's recorder once; later calls return the same one.

    ``shipper_factory(recorder)`` builds the shipper; it runs only for the
    first call, so the first instrumented component of a process decides its
    service name, where it ships to and which hops it keeps (README).
    """
    global _RECORDER
    with _RECORDER_LOCK:
        if _RECORDER is None:
            recorder = Recorder(service or settings.service_name,
                                hop_sample_ratio=settings.hop_sample_ratio,
                                slow_hop_seconds=settings.slow_hop_seconds)
            if shipper_factory is not None:
                recorder.attach_shipper(shipper_factory(recorder))
            _RECORDER = recorder
        return _RECORDER


def uninstall():
    """Stop shipping (with a last snapshot) and forget the recorder."""
    global _RECORDER
    with _RECORDER_LOCK:
        recorder, _RECORDER = _RECORDER, None
    if recorder is not None and recorder.shipper is not None:
        recorder.shipper.stop()


def _after_fork_in_child():
    if _RECORDER is not None:
        _RECORDER.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
