"""The tracer's per-hop types in Python: the reference for tracer/_speedups.c.

The same names and behaviour as the compiled module (tracer/implementation.py
picks one of the two; tests/test_differential.py holds them to each other):

- Counter, Histogram: one series of the recorder (tracer/recorder.py).
- Store: the recorder's counters and histograms, {metric name: {labels:
  series}}, with inc() and observe(); a new series comes from the
  recorder's Python (the series cap, under its lock).
- HopSampler: Recorder.keeps_hop.
- TraceContext: the fields of context.TraceContext, each type-checked.
- new_trace_id, new_span_id, stamp_outgoing: ids and the stamping of an
  outgoing hop (context.py says what they do).

recorder.py and context.py say what these are for and why.
"""

import bisect
import math
import os
import random
import re
import threading

# -- Counter, Histogram --------------------------------------------------

# One lock for every series update and read: in C each is a single call
# under the GIL, so no other thread sees a series half-updated; this lock
# gives Python the same. Made again in a forked child, where a thread of
# the parent may have held it.
_series_lock = threading.Lock()


def _renew_series_lock():
    global _series_lock
    _series_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_series_lock)


def _counter_amount(amount):
    """An int or a float (not a subclass: its __add__ would be code run
    between the read and the write of the count)."""
    if type(amount) is not int and type(amount) is not float:
        raise TypeError("a counter adds an int or a float, not %.100s" % type(amount).__name__)
    return amount


def _histogram_value(value):
    """A float or an int, as a float: a str is not a duration, even if
    float() would take it."""
    if type(value) is float:
        return value
    if type(value) is not int:
        raise TypeError("a histogram observes a float or an int, not %.100s"
                        % type(value).__name__)
    return float(value)


class Counter:
    """Counter(): a count that only grows."""

    __slots__ = ("_value",)

    def __init__(self, /):
        self._value = 0

    @property
    def value(self):
        """The count so far."""
        return self._value

    def inc(self, amount=1, /):
        """inc(amount=1): add to the count."""
        _counter_amount(amount)
        with _series_lock:
            self._value += amount


class Histogram:
    """Histogram(bounds): counts per bucket (the upper bounds, then +Inf),
    a sum, the smallest and the largest value."""

    __slots__ = ("_bounds", "_counts", "_sum", "_min", "_max")

    def __init__(self, bounds, /):
        if not isinstance(bounds, tuple):
            raise TypeError("Histogram() argument must be tuple, not %.100s"
                            % type(bounds).__name__)
        for i, bound in enumerate(bounds):
            if type(bound) is not float or (i > 0 and bound <= bounds[i - 1]):
                raise ValueError("Histogram bounds: a tuple of increasing floats")
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        # The smallest and largest value observed: the collector clamps its
        # percentile estimates to them.
        self._min = math.inf
        self._max = -math.inf

    def observe(self, value, /):
        """observe(value): count a value in its bucket and add it to the sum."""
        self._add(_histogram_value(value))

    def _add(self, value):
        # The first bucket whose upper bound is >= value (a value on a bound
        # is in that bucket, Prometheus's "le"); past the last, +Inf.
        index = bisect.bisect_left(self._bounds, value)
        with _series_lock:
            self._counts[index] += 1
            self._sum += value
            # A NaN compares false both ways and changes neither.
            if value < self._min:
                self._min = value
            if value > self._max:
                self._max = value

    def read(self):
        """read() -> [counts per bucket, the last one +Inf; sum; smallest and
        largest value observed, None before any], as of one instant."""
        with _series_lock:
            if self._min > self._max:
                return [list(self._counts), self._sum, None, None]
            return [list(self._counts), self._sum, self._min, self._max]


# -- Store ---------------------------------------------------------------

class Store:
    """Store(new_counter, new_histogram): a recorder's counters and
    histograms (tracer/recorder.py).

    ``new_counter(name, labels)`` and ``new_histogram(name, labels)`` make
    and store a new series (the recorder's, under its lock).
    ``on_first_use``: a callable or None, called once before the next
    update (the recorder's shipper after fork).
    """

    __slots__ = ("_counters", "_histograms", "_new_counter", "_new_histogram",
                 "_on_first_use")

    def __init__(self, new_counter, new_histogram):
        self._on_first_use = None
        self.reset()
        self._new_counter = new_counter
        self._new_histogram = new_histogram

    @property
    def counters(self):
        return self._counters

    @property
    def histograms(self):
        return self._histograms

    @property
    def on_first_use(self):
        return self._on_first_use

    @on_first_use.setter
    def on_first_use(self, value):
        if value is not None and not callable(value):
            raise TypeError("on_first_use: a callable or None, not %.100s"
                            % type(value).__name__)
        self._on_first_use = value

    @on_first_use.deleter
    def on_first_use(self):
        self._on_first_use = None

    def reset(self):
        """Start again from no series (after fork); the store itself stays."""
        self._counters = {}
        self._histograms = {}

    def inc(self, metric, labels, amount=1, /):
        """inc(metric, labels, amount=1): add to a counter."""
        _counter_amount(amount)  # checked first: bad input makes no series
        self._series(False, metric, labels).inc(amount)

    def observe(self, metric, labels, seconds, /):
        """observe(metric, labels, seconds): count a duration in a histogram."""
        value = _histogram_value(seconds)  # checked first: bad input makes no series
        self._series(True, metric, labels)._add(value)

    def _series(self, histogram, metric, labels):
        """The series of (metric, labels), made by the recorder if it is new."""
        callback = self._on_first_use
        if callback is not None:
            self._on_first_use = None
            callback()
        # Read after the callback, which may have reset the store.
        store = self._histograms if histogram else self._counters
        # A Metric, or its name from a caller that has it at hand.
        name = metric if type(metric) is str else metric.name
        series = store.get(name)
        entry = series.get(labels) if type(series) is dict else None
        if entry is None:
            make = self._new_histogram if histogram else self._new_counter
            entry = make(name, labels)
        kind = Histogram if histogram else Counter
        if type(entry) is not kind:
            raise TypeError("a %.100s where a %.100s series belongs"
                            % (type(entry).__name__, kind.__name__))
        return entry


# -- ids -----------------------------------------------------------------

# Trace and span ids are random bits (W3C: random, not all zero; they need
# not be unpredictable). The random module seeds itself again in a forked
# child, so workers never repeat their master's ids.
_getrandbits = random.getrandbits
_random = random.random


def new_trace_id():
    """32 random lowercase hex digits, not all 0."""
    return "%032x" % (_getrandbits(128) or 1)


def new_span_id():
    """16 random lowercase hex digits, not all 0."""
    return "%016x" % (_getrandbits(64) or 1)


# -- HopSampler ----------------------------------------------------------

def _as_double(value):
    """A number as a float, as C reads one: a str is not a number here."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError("must be real number, not %.100s" % type(value).__name__)
    return float(value)


class HopSampler:
    """HopSampler(ratio, bound, slow_seconds): which hops a recorder ships
    (tracer/recorder.py)."""

    __slots__ = ("_ratio", "_bound", "_slow_seconds")

    def __init__(self, ratio, bound, slow_seconds):
        if not isinstance(bound, str):
            raise TypeError("HopSampler() argument 'bound' must be str, not %.100s"
                            % type(bound).__name__)
        self._ratio = _as_double(ratio)
        self._bound = bound
        self._slow_seconds = _as_double(slow_seconds)

    def keeps_hop(self, trace_id, duration, failed, /):
        """keeps_hop(trace_id, duration, failed): ship this hop? (Recorder.keeps_hop)"""
        duration = _as_double(duration)
        if failed or duration >= self._slow_seconds:
            return True
        if trace_id is None:
            return _random() < self._ratio
        if not isinstance(trace_id, str):
            raise TypeError("a trace id is a str")
        return trace_id[-8:] < self._bound


# -- TraceContext --------------------------------------------------------

# A service's code reaches a hop (context.current()), so each field takes
# only what the tracer itself writes: an id is None or lowercase hex of its
# W3C length, not all zero; a flag is a bool; the service is None or a str.
# Anything else is the caller's bug, refused at the assignment; no field
# can be deleted. Reading a field is a plain slot.

_HEX = re.compile(r"[0-9a-f]*")
_ID_DIGITS = {"trace_id": 32, "span_id": 16, "parent_id": 16}


def _check_id(value, field):
    if value is None:
        return
    if type(value) is not str:
        raise TypeError("TraceContext.%s: a str or None, not %.100s"
                        % (field, type(value).__name__))
    digits = _ID_DIGITS[field]
    if len(value) != digits or not _HEX.fullmatch(value) or value == "0" * digits:
        raise ValueError("TraceContext.%s: %d lowercase hex digits, not all zero"
                         % (field, digits))


def _check_flag(value, field):
    if type(value) is not bool:
        raise TypeError("TraceContext.%s: a bool, not %.100s" % (field, type(value).__name__))


def _check_service(value, field):
    if value is not None and type(value) is not str:
        raise TypeError("TraceContext.service: a str or None, not %.100s"
                        % type(value).__name__)


_CHECKS = {"trace_id": _check_id, "span_id": _check_id, "parent_id": _check_id,
           "sampled": _check_flag, "child_failed": _check_flag, "service": _check_service}

_set_field = object.__setattr__


class TraceContext:
    """The fields of context.TraceContext (tracer/context.py)."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "child_failed", "service")

    def __init__(self, trace_id=None, span_id=None, parent_id=None, sampled=True):
        if trace_id is not None or span_id is not None or parent_id is not None:
            # All checked before any is set: a refused value changes nothing.
            _check_id(trace_id, "trace_id")
            _check_id(span_id, "span_id")
            _check_id(parent_id, "parent_id")
        if sampled is not True:
            _check_flag(sampled, "sampled")
        _set_field(self, "trace_id", trace_id)
        _set_field(self, "span_id", span_id)
        _set_field(self, "parent_id", parent_id)
        _set_field(self, "sampled", sampled)
        _set_field(self, "child_failed", False)
        _set_field(self, "service", None)

    def __setattr__(self, name, value):
        check = _CHECKS.get(name)
        if check is not None:
            check(value, name)
        _set_field(self, name, value)

    def __delattr__(self, name):
        if name in _CHECKS:
            raise AttributeError("TraceContext.%s cannot be deleted" % name)
        object.__delattr__(self, name)


# -- stamp_outgoing ------------------------------------------------------

# In C, stamp_outgoing does the common case itself (a dict carrier with no
# traceparent nor baggage, no OpenTelemetry span) and calls back Python
# for the rest. Here there is only that Python, which context.py binds.
_stamp_in_python = None


def bind_stamping(*, current, otel_context, trace_context, in_python):
    """Give stamp_outgoing what it reads (context.py, once)."""
    global _stamp_in_python
    _stamp_in_python = in_python


def stamp_outgoing(carrier, service, kind):
    """context.stamp_outgoing (see there)."""
    if _stamp_in_python is None:
        raise RuntimeError("stamp_outgoing: not bound")
    return _stamp_in_python(carrier, service, kind)
