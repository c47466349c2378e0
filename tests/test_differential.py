"""The compiled paths and their Python twins, fed the same random inputs.

Each compiled module has a Python twin that is its reference
(tracer/implementation.py). Here both run side by side in one process and
must agree on everything they record, return, accept and refuse: counters,
histograms, hop sampling, trace context fields, the stamping of an outgoing
hop, an RPC send, a received RPC and a WSGI request. Ids and durations are
random or clock-bound, so they are compared by shape (drawn or not, equal
to the parent's or not), never by value.

The tracer's types are compared in any run. The middleware's compiled paths
read the compiled tracer's objects as C structs, so they are compared in
the run over the compiled implementation (`--implementation=compiled`, the
Makefile's full run); the run over the Python twins runs those twins for
real in every other test.
"""

import decimal
import math
import random
import sys
import threading

import pytest

from commlens.tracer import _speedups_py
from commlens.tracer import context
from commlens.tracer import implementation
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from support import mutations

_speedups = pytest.importorskip(
    "commlens.tracer._speedups", reason="the compiled tracer did not build: nothing to compare")

IMPLEMENTATIONS = {"compiled": _speedups, "python": _speedups_py}

needs_compiled = pytest.mark.skipif(
    implementation.IMPLEMENTATION != implementation.COMPILED,
    reason="the compiled middleware runs only over the compiled tracer "
           "(compared in the --implementation=compiled run)")

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def outcome(function, *args, **kwargs):
    """('ok', what function(*args, **kwargs) returned) or ('raised', the
    exception's class): what both implementations must agree on."""
    try:
        return "ok", function(*args, **kwargs)
    except Exception as exc:
        return "raised", type(exc)


# -- counters, histograms, the store ---------------------------------------

_AMOUNTS = [1, 2, 0, -1, 0.5, 10**30, float("inf"), True, "1", None,
            decimal.Decimal(1), 1 + 0j]
_DURATIONS = [0.0, 0.001, 0.0010001, 0.75, 1.0, 120.0, 121.0, -1.0, 5, 10**400,
              float("inf"), float("-inf"), float("nan"), "0.1", None, True, decimal.Decimal("0.1")]


class _Stored:
    """A store whose makers store the series they make, as the recorder's do."""

    def __init__(self, speedups):
        self.store = speedups.Store(self._counter, self._histogram)
        self._speedups = speedups
        self.first_uses = 0

    def _counter(self, name, labels):
        return self.store.counters.setdefault(name, {}).setdefault(
            labels, self._speedups.Counter())

    def _histogram(self, name, labels):
        return self.store.histograms.setdefault(name, {}).setdefault(
            labels, self._speedups.Histogram(metrics.LATENCY_BUCKETS))

    def first_use(self):
        self.first_uses += 1

    def read(self):
        return ({name: {labels: c.value for labels, c in series.items()}
                 for name, series in self.store.counters.items()},
                {name: {labels: h.read() for labels, h in series.items()}
                 for name, series in self.store.histograms.items()})


def _same(a, b):
    """Equal, NaN included (a NaN sum is a NaN in both)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_stores_count_alike_over_random_updates():
    rng = random.Random(16)
    stores = {name: _Stored(module) for name, module in IMPLEMENTATIONS.items()}
    names = [metrics.RPC_SENT, metrics.RPC_REPLY_WAIT.name, "commlens_x", 42]
    label_sets = [("svc", "t", "m", "call"), ("svc", "t2", "m", "cast"), (), ["unhashable"]]
    for step in range(6000):
        op = rng.choice(["inc", "inc", "observe", "observe", "first_use", "reset"])
        metric, labels = rng.choice(names), rng.choice(label_sets)
        value = rng.choice(_AMOUNTS if op == "inc" else _DURATIONS)
        args = (metric, labels) if rng.random() < 0.1 else (metric, labels, value)
        results = {}
        for name, stored in stores.items():
            store = stored.store
            if op == "inc":
                results[name] = outcome(store.inc, *args)
            elif op == "observe":
                results[name] = outcome(store.observe, metric, labels, value)
            elif op == "first_use":
                results[name] = outcome(setattr, store, "on_first_use", stored.first_use)
            elif step % 997 == 0:
                results[name] = outcome(store.reset)
        assert results.get("compiled") == results.get("python"), (step, op, metric, labels, value)
    compiled, python = stores["compiled"], stores["python"]
    assert _same(compiled.read(), python.read())
    assert compiled.first_uses == python.first_uses > 0


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_a_store_refuses_a_series_of_the_wrong_kind(name):
    speedups = IMPLEMENTATIONS[name]
    store = speedups.Store(lambda name, labels: speedups.Histogram((1.0,)),
                           lambda name, labels: speedups.Counter())
    with pytest.raises(TypeError):
        store.inc("m", ("a",))
    with pytest.raises(TypeError):
        store.observe("m", ("a",), 1.0)
    with pytest.raises(TypeError):
        store.on_first_use = 3
    del store.on_first_use
    assert store.on_first_use is None


def test_histograms_bucket_alike_with_prometheus_le():
    rng = random.Random(5)
    bounds = metrics.LATENCY_BUCKETS
    values = list(_DURATIONS)
    for bound in bounds:  # on a bound, and a hair either side of it
        values += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
    values += [rng.uniform(-1, 200) for _ in range(2000)] + [rng.randint(-5, 200)
                                                             for _ in range(200)]
    histograms = {name: m.Histogram(bounds) for name, m in IMPLEMENTATIONS.items()}
    observed = []
    for value in values:
        done = {name: outcome(h.observe, value) for name, h in histograms.items()}
        assert done["compiled"] == done["python"], value
        if done["python"][0] == "ok":
            observed.append(float(value))
            one = _speedups_py.Histogram(bounds)
            one.observe(value)
            counts, _, low, high = one.read()
            # Prometheus's "le": the first bucket whose bound is >= the value.
            expected = next((i for i, b in enumerate(bounds) if value <= b), len(bounds))
            if value == value:  # a NaN compares false to every bound: the first bucket
                assert counts.index(1) == expected, value
                assert low == high == value
            else:  # and is neither the smallest nor the largest
                assert low is None and high is None
        # The smallest and largest so far, alike.
        assert _same(histograms["compiled"].read()[2:], histograms["python"].read()[2:])
    assert _same(histograms["compiled"].read(), histograms["python"].read())
    ordered = [v for v in observed if v == v]
    assert histograms["python"].read()[2:] == [min(ordered), max(ordered)] == [-math.inf,
                                                                                 math.inf]


@pytest.mark.parametrize("bounds", [
    (), (1.0,), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0), (1, 2), (1.0, 2), [1.0, 2.0],
    (float("nan"),), (float("-inf"), 0.0, float("inf")), (True,), "1.0", None,
])
def test_histograms_accept_and_refuse_the_same_bounds(bounds):
    done = {name: outcome(lambda m: m.Histogram(bounds).read(), m)
            for name, m in IMPLEMENTATIONS.items()}
    assert done["compiled"] == done["python"]


def test_counters_accept_refuse_and_add_alike():
    rng = random.Random(3)
    counters = {name: m.Counter() for name, m in IMPLEMENTATIONS.items()}
    for _ in range(3000):
        amount = rng.choice(_AMOUNTS + [rng.randint(-10**20, 10**20), rng.random()])
        done = {name: outcome(c.inc, amount) for name, c in counters.items()}
        assert done["compiled"] == done["python"], amount
    assert outcome(counters["compiled"].inc, 1, 2) == outcome(counters["python"].inc, 1, 2)
    assert outcome(counters["compiled"].inc, amount=1) == outcome(
        counters["python"].inc, amount=1)
    assert _same(counters["compiled"].value, counters["python"].value)
    assert outcome(_speedups.Counter, 1) == outcome(_speedups_py.Counter, 1)


# -- hop sampling ----------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 1.0])
def test_hop_samplers_decide_alike(ratio):
    from commlens.tracer import hops

    rng = random.Random(int(ratio * 100))
    bound = hops.sample_bound(ratio)
    samplers = {name: m.HopSampler(ratio, bound, 1.0).keeps_hop
                for name, m in IMPLEMENTATIONS.items()}
    trace_ids = ["%032x" % rng.getrandbits(128) for _ in range(3000)]
    trace_ids += ["", "abc", "ffffffff", "g" * 32, b"a" * 32, 12345, ["x"],
                  "a" * 24 + bound, bound, "a" * 24 + bound[:-1]]  # on the bound
    durations = [0.0, 0.5, 0.999, 1.0, 3, 1e9, float("nan"), "1.0", None, True]
    flags = [False, True, 0, 1, None, "", "x"]
    for trace_id in trace_ids:
        args = (trace_id, rng.choice(durations), rng.choice(flags))
        decided = {name: outcome(keeps, *args) for name, keeps in samplers.items()}
        assert decided["compiled"] == decided["python"], args
    # A hop with no trace id yet is a draw at the ratio: compared by its rate.
    rates = {name: sum(keeps(None, 0.0, False) for _ in range(20000)) / 20000
             for name, keeps in samplers.items()}
    for rate in rates.values():
        assert abs(rate - ratio) < 0.02, rates


def test_hop_samplers_accept_and_refuse_the_same_settings():
    for args in [(0.1, "19999999", 1.0), (1, "g", 2), ("0.1", "1", 1.0), (0.1, 5, 1.0),
                 (0.1, "1"), (None, "1", 1.0), (0.1, "1", "slow")]:
        made = [outcome(m.HopSampler, *args) for m in (_speedups, _speedups_py)]
        assert [result[0] if result[0] == "ok" else result for result in made] == [
            result[0] if result[0] == "ok" else result for result in made[::-1]], args


# -- trace context ---------------------------------------------------------

class _Text(str):
    pass


_FIELD_VALUES = {
    "trace_id": [None, "a" * 32, "4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32, "A" * 32,
                 "a" * 31, "a" * 33, _Text("a" * 32), b"a" * 32, 12345, "\u00e9" * 32,
                 "a" * 31 + "g"],
    "span_id": [None, "b" * 16, "0" * 16, "B" * 16, "b" * 32, _Text("b" * 16), 1.5, ["b" * 16]],
    "parent_id": [None, "c" * 16, "c" * 15, "x" * 16, "0" * 15 + "1"],
    "sampled": [True, False, None, 1, 0, "yes"],
    "child_failed": [True, False, None, 1, object()],
    "service": [None, "nova-api", "", _Text("nova"), b"nova", 12345, ("nova",)],
}


def _fields(ctx):
    return tuple(getattr(ctx, field) for field in _FIELD_VALUES)


def _made(speedups, args, kwargs):
    return _fields(speedups.TraceContext(*args, **kwargs))


def test_trace_contexts_are_made_alike_from_the_same_arguments():
    rng = random.Random(11)
    names = ("trace_id", "span_id", "parent_id", "sampled")
    for _ in range(4000):
        args = [rng.choice(_FIELD_VALUES[name]) for name in names]
        cut = rng.randint(0, 4)
        keywords = rng.random() < 0.3
        given = ((), dict(zip(names, args, strict=True))) if keywords else (args[:cut], {})
        made = {name: outcome(_made, m, *given) for name, m in IMPLEMENTATIONS.items()}
        assert made["compiled"] == made["python"], (args, cut, keywords)
    assert outcome(_speedups.TraceContext, 1, 2, 3, 4, 5) == outcome(
        _speedups_py.TraceContext, 1, 2, 3, 4, 5)
    assert outcome(_speedups.TraceContext, flag=1) == outcome(_speedups_py.TraceContext, flag=1)


def test_trace_context_fields_take_and_refuse_the_same_values():
    rng = random.Random(12)
    contexts = {name: m.TraceContext() for name, m in IMPLEMENTATIONS.items()}
    for _ in range(4000):
        field = rng.choice(list(_FIELD_VALUES) + ["other"])
        value = rng.choice(_FIELD_VALUES.get(field, [1]))
        delete = rng.random() < 0.1
        done = {}
        for name, ctx in contexts.items():
            changed = outcome(delattr, ctx, field) if delete else outcome(
                setattr, ctx, field, value)
            done[name] = (changed, _fields(ctx))
        assert done["compiled"] == done["python"], (field, value, delete)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_ids_are_hex_not_zero_and_unique(name):
    speedups = IMPLEMENTATIONS[name]
    traces = {speedups.new_trace_id() for _ in range(5000)}
    spans = {speedups.new_span_id() for _ in range(5000)}
    assert len(traces) == len(spans) == 5000
    assert all(len(t) == 32 and _speedups_py._HEX.fullmatch(t) and int(t, 16) for t in traces)
    assert all(len(s) == 16 and _speedups_py._HEX.fullmatch(s) and int(s, 16) for s in spans)
    for ids in (traces, spans):  # usable as a hop's fields in both implementations
        for m in IMPLEMENTATIONS.values():
            m.TraceContext(*((next(iter(ids)),) if ids is traces else (None,)))


# -- stamping an outgoing hop ------------------------------------------------

@pytest.fixture
def python_stamping():
    """The Python twin's stamp_outgoing, bound as context.py binds the one in use."""
    _speedups_py.bind_stamping(current=context.current_var, otel_context=None,
                               trace_context=context.TraceContext,
                               in_python=context._stamp_outgoing_in_python)
    yield _speedups_py.stamp_outgoing
    _speedups_py._stamp_in_python = None


def _shape(carrier, ctx, parent):
    """What a stamp did, with the random ids replaced by who they are."""
    names = {}
    if parent is not None:
        names.update({parent.trace_id: "PARENT_TRACE", parent.span_id: "PARENT_SPAN"})
    names.setdefault(ctx.trace_id, "TRACE")
    names.setdefault(ctx.span_id, "SPAN")
    names[VALID[3:35]], names[VALID[36:52]] = "VALID_TRACE", "VALID_SPAN"

    def named(value):
        if not isinstance(value, str):
            return value
        for real, name in names.items():
            if real:
                value = value.replace(real, name)
        return value

    return ({key: named(value) for key, value in carrier.items()},
            tuple(named(value) for value in _fields(ctx)),
            None if parent is None else tuple(named(v) for v in _fields(parent)))


@needs_compiled
def test_stamping_gives_the_same_shape_for_the_same_parent_hops(python_stamping):
    rng = random.Random(21)
    parents = [None, ("a" * 32, "b" * 16, True), ("a" * 32, None, False),
               (None, None, True), (None, "b" * 16, True)]
    carriers = [{}, {"request_id": "req-1"}, {"baggage": "vendor=x"},
                {"baggage": "commlens.service=old;kind=call;span=" + "d" * 16},
                {"traceparent": VALID}, {"traceparent": "garbage"}, {"baggage": None},
                {"traceparent": None}, {"baggage": 12}]
    for _ in range(1500):
        served, carrier = rng.choice(parents), rng.choice(carriers)
        service = rng.choice(["nova-api", _Text("nova-api")])
        kind = rng.choice(["call", "cast", "notification"])
        shapes = {}
        for name, stamp in (("compiled", context.stamp_outgoing), ("python", python_stamping)):
            parent = None
            if served is not None:
                parent = context.TraceContext()
                parent.trace_id, parent.span_id, parent.sampled = served
            token = context.set_current(parent)
            try:
                out = dict(carrier)
                ctx = stamp(out, service, kind)
            finally:
                context.reset_current(token)
            assert out["traceparent"] == ctx.traceparent()
            shapes[name] = _shape(out, ctx, parent)
        assert shapes["compiled"] == shapes["python"], (served, carrier, service, kind)


# -- the RPC paths -----------------------------------------------------------

def _snapshot(recorder):
    """What a recorder holds, with durations reduced to counts."""
    snapshot = recorder.snapshot(1)
    counters = sorted(snapshot["counters"], key=repr)
    histograms = sorted(([name, labels, sum(counts)]
                         for name, labels, counts, *_ in snapshot["histograms"]), key=repr)
    gauges = sorted(snapshot["gauges"], key=repr)
    hops = sorted(({key: value for key, value in hop.items()
                    if key not in ("trace_id", "span_id", "parent_id", "start", "duration")}
                   for hop in snapshot["hops"]), key=repr)
    return counters, histograms, gauges, hops


def _recorder(hop_sample_ratio):
    """Every hop kept (1.0: each one built), or only those keeps_hop must
    keep (0.0: failed, slow, or a call of theirs failed)."""
    return recorder_mod.Recorder("diff-svc", hop_sample_ratio=hop_sample_ratio)


sample_ratios = pytest.mark.parametrize("hop_sample_ratio", [0.0, 1.0])


def _driver(recorder):
    """A CommlensDriver's recording half (its callbacks are the real ones)."""
    from commlens.middleware import rpc_driver

    driver = rpc_driver.CommlensDriver.__new__(rpc_driver.CommlensDriver)
    driver._recorder = recorder
    driver._service = recorder.service
    return driver


def _sender(module, recorder, inner_send=None):
    """``module``'s Sender over a driver of ``recorder`` (its callbacks the
    real ones), sending with ``inner_send`` (by default one that does nothing)."""
    from commlens.middleware import rpc_driver
    from commlens.tracer import labels

    driver = _driver(recorder)
    return module.Sender(
        service=driver._service, recorder=driver._recorder,
        sent_metric=metrics.RPC_SENT.name, reply_wait_metric=metrics.RPC_REPLY_WAIT.name,
        method_label=labels.method, context_copy=rpc_driver._context_copy,
        stamp=context.stamp_outgoing, failed=driver._send_failed,
        add_hop=driver._add_send_hop, recording_failed=driver._send_recording_failed,
        inner_send=inner_send or (lambda *args, **kwargs: None))


class _RequestContext:
    def __init__(self, values):
        self._values = values

    def to_dict(self):
        return dict(self._values)


@needs_compiled
@sample_ratios
def test_sends_are_recorded_alike(hop_sample_ratio):
    import oslo_messaging as om


    rng = random.Random(31)
    targets = [om.Target(topic="conductor"), om.Target(topic="compute", fanout=True),
               om.Target(topic="scheduler", server="host-1")]
    contexts = [{}, {"request_id": "req-" + "a" * 8, "global_request_id": "greq-1"},
                {"traceparent": VALID, "baggage": "vendor=1"},
                _RequestContext({"request_id": "req-2"}), object(), None]
    messages = [{"method": "build_instances"}, {"method": "not valid!"}, {"method": 12},
                {}, {"args": {}}]
    endings = [None, None, None, om.MessagingTimeout("late"), ValueError("remote"),
               OSError("broker gone"), om.MessagingException("transport")]
    recorders = {"compiled": _recorder(hop_sample_ratio),
                 "python": _recorder(hop_sample_ratio)}
    senders = _senders(recorders, lambda name: lambda *args, **kwargs: None)
    for step in range(3000):
        target, ctxt = rng.choice(targets), rng.choice(contexts)
        message, wait = rng.choice(messages), rng.choice([True, False, None, 1, 0])
        ending, served = rng.choice(endings), rng.choice([None, (None, None), ("a" * 32, None)])
        open_calls_taken = step % 500 == 499
        seen = {}
        for name, sender in senders.items():
            # The hop being served, if any: the send is its child, and a
            # failed send marks it (child_failed).
            parent = None if served is None else context.TraceContext(served[0])
            token = context.set_current(parent)
            try:
                begun = outcome(sender.begin, target, ctxt, message, wait)
                shape = begun
                if begun[0] == "ok" and begun[1] is not None:
                    call = begun[1]
                    shape = ("ok", _shape(call.ctxt, call.ctx, None)[0].keys(), call.kind,
                             call.topic, call.method, call.token is not None,
                             call.target is target)
                    if not open_calls_taken:
                        assert call.end(ending) is None
                        assert call.end(ending) is None  # recorded once
                taken = len(sender.take_open_calls()) if open_calls_taken else None
            finally:
                context.reset_current(token)
            seen[name] = (shape, taken, parent and (parent.trace_id == served[0],
                                                    parent.child_failed))
        assert seen["compiled"] == seen["python"], (step, target, ctxt, message, wait, ending)
    compiled = _snapshot(recorders["compiled"])
    assert compiled == _snapshot(recorders["python"])
    # The server a call was addressed to is on its hop, in both (issue 18).
    assert {hop["server"] for hop in compiled[3]} == {None, "host-1"}


@needs_compiled
def test_sends_pass_on_the_same_arguments_and_exceptions_alike():
    # Sender.send: the compiled one reads the arguments the way oslo.messaging
    # passes them (or any other way Python allows) and calls the inner driver
    # with the stamped context; what the inner driver gets, returns or raises
    # is the same over both.
    import oslo_messaging as om


    rng = random.Random(37)
    target = om.Target(topic="conductor")
    endings = [None, om.MessagingTimeout("late"), ValueError("remote"), OSError("gone")]
    calls = [
        lambda send, ctxt: send(target, ctxt, {"method": "build"}, wait_for_reply=True,
                                timeout=30, call_monitor_timeout=None, retry=None,
                                transport_options=None),
        lambda send, ctxt: send(target, ctxt, {"method": "build"}, None, 5, None, 0, None),
        lambda send, ctxt: send(target=target, message={"method": "x"}, ctxt=ctxt),
        lambda send, ctxt: send(target, ctxt, 12),  # the recording fails: sent unrecorded
        lambda send, ctxt: send(target, ctxt),  # not a send: the inner driver says so
        lambda send, ctxt: send(target, ctxt, {}, True, 1, 2, 3, 4, 5),  # one too many
    ]
    recorders = {"compiled": _recorder(1.0), "python": _recorder(1.0)}
    received = {}
    senders = _senders(recorders, lambda name: _inner_send(name, received, lambda: ending))
    for step in range(300):
        ending, call = rng.choice(endings), rng.choice(calls)
        ctxt = rng.choice([{"request_id": "req-1"}, {"traceparent": VALID}, object()])
        seen = {}
        for name, sender in senders.items():
            received.pop(name, None)
            seen[name] = (outcome(call, sender.send, ctxt), received.get(name))
        assert seen["compiled"] == seen["python"], (step, ending)
    assert _snapshot(recorders["compiled"]) == _snapshot(recorders["python"])


def _senders(recorders, inner_send):
    """{implementation: its Sender}, each recording into recorders[implementation]
    and sending with inner_send(implementation)."""
    from commlens.middleware import _rpc_send
    from commlens.middleware import _rpc_send_py

    return {name: _sender(module, recorders[name], inner_send(name))
            for name, module in (("compiled", _rpc_send), ("python", _rpc_send_py))}


def _inner_send(name, received, ending):
    """An inner driver's send, BaseDriver.send's signature exactly: keeps
    what it was given in received[name], raises ending() if any."""
    def send(target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        received[name] = (sorted(ctxt) if isinstance(ctxt, dict) else ctxt, message,
                          wait_for_reply, timeout, call_monitor_timeout, retry,
                          transport_options)
        if ending() is not None:
            raise ending()
        return "reply"
    return send


class _Message:
    """A driver's incoming RPC message, as the RPC server sees it."""

    def __init__(self, ctxt, method="build_instances", orig_msg_id=None):
        self.ctxt = ctxt
        self.message = {"method": method, "args": {}}
        self.msg_id = "m-1"
        self.orig_msg_id = orig_msg_id
        self.replies = []

    def acknowledge(self):
        return "acknowledged"

    def reply(self, reply=None, failure=None):
        self.replies.append((reply, failure))

    def requeue(self):
        self.replies.append("requeued")

    def heartbeat(self):
        return "beat"


class _Listener:
    batch_size, batch_timeout, prefetch_size = 1, None, -1


def _listeners(hop_sample_ratio, recorders=None):
    """A compiled and a Python RPC listener, each with its own recorder
    (``recorders[name]`` if given)."""
    from oslo_messaging._drivers import base

    from commlens.middleware import _rpc_receive
    from commlens.middleware import _rpc_receive_py
    from commlens.middleware import rpc_driver
    from commlens.tracer import labels

    class PythonIncoming(_rpc_receive_py.Incoming, base.RpcIncomingMessage):
        __getattr__ = rpc_driver._InstrumentedIncoming.__getattr__

    listeners = {}
    for name, module, incoming_type in (
            ("compiled", _rpc_receive, rpc_driver._InstrumentedIncoming),
            ("python", _rpc_receive_py, PythonIncoming)):
        driver = _driver(recorders[name] if recorders else _recorder(hop_sample_ratio))
        listener = rpc_driver._InstrumentedListener.__new__(rpc_driver._InstrumentedListener)
        listener._inner, listener._driver = _Listener(), driver
        listener._topic, listener._notifications = "conductor", False
        listener._receiver = module.Receiver(
            service=driver._service, topic="conductor", recorder=driver._recorder,
            received_metric=metrics.RPC_RECEIVED.name,
            hops_metric=metrics.RPC_SERVER_HOPS.name, method_label=labels.method,
            incoming_type=incoming_type, trace_context=context.TraceContext,
            current=context.current_var, in_python=listener._wrap_in_python,
            failed=driver._processing_failed, add_hop=driver._add_receive_hop,
            recording_failed=driver._receive_recording_failed)
        listeners[name] = listener
    return listeners


@needs_compiled
@sample_ratios
def test_received_messages_are_read_and_recorded_alike(hop_sample_ratio):
    listeners = _listeners(hop_sample_ratio)
    member = "commlens.service=nova-api;kind=call;span=" + VALID[36:52]
    contexts = [{}, {"traceparent": VALID}, {"traceparent": VALID, "baggage": member},
                {"baggage": member}, {"traceparent": VALID, "baggage": "vendor=1," + member},
                {"traceparent": VALID, "baggage": member.replace("call", "poke")},
                {"msg_id": "x"}, {"traceparent": None, "baggage": None},
                {"traceparent": 55, "baggage": b"x"}, "not a dict", None]
    contexts += [{"traceparent": t} for t in mutations(VALID, 1500, 41)]
    contexts += [{"traceparent": VALID, "baggage": b} for b in mutations(member, 1500, 42)]
    rng = random.Random(43)
    for ctxt in contexts:
        method = rng.choice(["build_instances", "select_destinations", "bad method", None])
        orig_msg_id = rng.choice([None, "reply-to-me"])
        ending = rng.choice(["ok", "ok", "failure", "exc_info", "requeue", "never",
                             "another thread"])
        child_failed = rng.random() < 0.2
        seen = {}
        for name, listener in listeners.items():
            inner = _Message(dict(ctxt) if isinstance(ctxt, dict) else ctxt, method,
                             orig_msg_id)
            incoming = listener._wrap(inner)
            if incoming is inner:
                seen[name] = "passed on"
                continue
            read = (incoming.ctx.trace_id, incoming.ctx.parent_id, incoming.ctx.sampled,
                    incoming.ctx.span_id, incoming.ctx.service, incoming.caller,
                    incoming.method, incoming.kind, incoming.topic, incoming.msg_id,
                    incoming.client_timeout, incoming.orig_msg_id, incoming.heartbeat())
            acknowledged = None
            if ending != "never":
                acknowledged = incoming.acknowledge()
                assert context.current() is incoming.ctx
                if child_failed:  # a call the endpoint made failed
                    context.mark_child_failed()
            if ending == "ok":
                incoming.reply({"done": 1})
            elif ending == "failure":
                incoming.reply(failure=ValueError("endpoint failed"))
            elif ending == "exc_info":
                try:
                    raise KeyError("missing")
                except KeyError:
                    incoming.reply(failure=sys.exc_info())
            elif ending == "requeue":
                incoming.requeue()
            elif ending == "another thread":
                # A reply from another context: the hop is no longer served
                # there; here it stays until this context moves on.
                replier = threading.Thread(target=incoming.reply, args=({"done": 1},))
                replier.start()
                replier.join()
                assert context.current() is incoming.ctx
                context.set_current(None)
            incoming.reply({"again": 1})  # passed on, recorded once
            assert context.current() is None
            seen[name] = (read, acknowledged, [r if isinstance(r, str) else (r[0], type(r[1]))
                                               for r in inner.replies])
        assert seen["compiled"] == seen["python"], (ctxt, method, orig_msg_id, ending)
    assert _snapshot(listeners["compiled"]._driver._recorder) == _snapshot(
        listeners["python"]._driver._recorder)


# -- the WSGI path -------------------------------------------------------------

@pytest.fixture(params=[0.0, 1.0], ids=["hop_sample_ratio=0", "hop_sample_ratio=1"])
def middlewares(request):
    """A compiled and a Python middleware base, each with its own recorder."""
    from commlens.middleware import _wsgi_request
    from commlens.middleware import _wsgi_request_py
    from commlens.middleware import wsgi
    from commlens.tracer import routes

    _wsgi_request_py.bind(**wsgi._CALLBACKS)

    def make(app, recorders=None):
        return {name: module.Middleware(
                    app, "diff-api", recorders[name] if recorders else _recorder(request.param),
                    routes.RouteTemplates(50))
                for name, module in (("compiled", _wsgi_request), ("python", _wsgi_request_py))}

    return make


class _Fault(Exception):
    pass


class _Str(str):
    """A str subclass whose + lies: neither implementation may call it (a
    SCRIPT_NAME or PATH_INFO that is not exactly a str is not joined)."""

    def __add__(self, other):
        raise AssertionError("called")


_ABSENT = object()


def _server_start_response(started):
    def start_response(status, headers, exc_info=None):
        started.append(status)
    return start_response


@needs_compiled
def test_wsgi_requests_are_recorded_alike(middlewares):
    import json

    rng = random.Random(51)
    fault = json.dumps({"NeutronError": {"type": "PortBindingFailed", "message": "x"}}).encode()
    # Fault bodies read by the shared callbacks (middleware/faults.py): a
    # placement body in chunks of a list, a keystone body as an iterator
    # (Flask's), a webob plain-text page, and one past the bound.
    placement = json.dumps({"errors": [{"status": 409, "title": "Conflict", "detail": "d",
                                        "code": "placement.concurrent_update"}]}).encode()
    keystone = json.dumps({"error": {"code": 404, "title": "Not Found",
                                     "message": "m"}}).encode()

    def app(environ, start_response):
        behaviour = environ["test.behaviour"]
        if environ["test.child_failed"]:  # a call the application made failed
            context.mark_child_failed()
        if behaviour == "raise":
            raise _Fault("before the response")
        status = environ["test.status"]
        if behaviour != "no start_response":
            if behaviour == "exc_info":
                start_response(status, [("X-OpenStack-Request-ID", "req-1")], None)
            else:
                start_response(status, [("X-OpenStack-Request-ID", "req-1")])
        if behaviour == "iterator":
            return iter([b"a", b"b"])
        if behaviour == "raising iterator":
            def body():
                yield b"a"
                raise _Fault("in the body")
            return body()
        if behaviour == "fault":
            return [fault]
        if behaviour == "chunked fault":
            return [placement[:10], placement[10:]]
        if behaviour == "iterator fault":
            return iter([b"", keystone[:7], keystone[7:]])
        if behaviour == "text fault":
            return iter([b"409 Conflict\n\nThere was a conflict.\n"])
        if behaviour == "huge fault":
            return iter([b'{"NeutronError": {"type": "X", "message": "', b"x" * 9000, b'"}}'])
        return [b"hello"]

    made = middlewares(app)
    member = "commlens.service=nova-api;kind=call;span=" + VALID[36:52]
    traceparents = [None, None, VALID, "garbage", 12] + list(mutations(VALID, 20, 52))
    user_agents = [None, "python-novaclient keystoneauth1/5.1", "curl/8", "x" * 600, 12,
                   ["unhashable"]]
    # Where a URL map or a mount point put a prefix (nova's /v2.1), and garbage.
    script_names = [_ABSENT, _ABSENT, "", "/v2.1", "/placement", "/compute/v2.1", None, 12,
                    ["x"], _Str("/v2")]
    for step in range(3000):
        environ = {
            "REQUEST_METHOD": rng.choice(["GET", "POST", "DELETE", "BREW", None, ["x"]]),
            "PATH_INFO": rng.choice(["/v2.1/servers", "/v2.1/servers/" + "1" * 32,
                                     "/v2.0/ports/abc", "/", "", None, ["x"],
                                     _Str("/servers")]),
            "test.status": rng.choice(["200 OK", "404 Not Found", "409 Conflict",
                                       "500 Internal Server Error", "abc", 200, None]),
            "test.behaviour": rng.choice(["list", "list", "iterator", "raising iterator",
                                          "fault", "chunked fault", "iterator fault",
                                          "text fault", "huge fault", "raise",
                                          "no start_response", "exc_info"]),
            "openstack.request_id": "req-env",
            "test.child_failed": rng.random() < 0.2,
        }
        script_name = rng.choice(script_names)
        if script_name is not _ABSENT:
            environ["SCRIPT_NAME"] = script_name
        traceparent = rng.choice(traceparents)
        if traceparent is not None:
            environ["HTTP_TRACEPARENT"] = traceparent
            if rng.random() < 0.5:
                environ["HTTP_BAGGAGE"] = rng.choice([member, "vendor=1", None])
        user_agent = rng.choice(user_agents)
        if user_agent is not None:
            environ["HTTP_USER_AGENT"] = user_agent
        server = rng.choice(["read and close", "close early", "never close"])
        seen = {}
        for name, middleware in made.items():
            started = []
            response = outcome(middleware, dict(environ), _server_start_response(started))
            written = None
            if response[0] == "ok":
                body = response[1]
                iterator = iter(body)
                written = []
                if server != "close early":
                    written = [outcome(list, iterator)]
                if server != "never close":
                    body.close()
                del body, iterator
                response = ("ok", type(response[1]) is list)
            seen[name] = (response, written, started, context.current())
        assert seen["compiled"] == seen["python"], (step, environ, server)
    compiled = _snapshot(made["compiled"].recorder)
    assert compiled == _snapshot(made["python"].recorder)
    # The fault bodies were read, whole, chunked and streamed, and named.
    errors = {hop["error"] for hop in compiled[3]}
    assert {"409 PortBindingFailed", "409 placement.concurrent_update", "404 NotFound",
            "409 Conflict"} <= errors
    assert not [e for e in errors if e and e.endswith(" X")]  # past the bound: unread


# -- a signal while recording ------------------------------------------------
#
# A KeyboardInterrupt or SystemExit that arrives while commlens records (a
# signal handler runs inside whatever Python the recording calls) is the
# service's, not a recording failure: both implementations let it go on
# unchanged and do not count it. An ordinary exception there is commlens's
# own: swallowed, counted as dropped "recording_error" (_speedups.h,
# commlens_hand_over_error).

_RAISED_WHILE_RECORDING = [KeyboardInterrupt, SystemExit, ValueError]


class _Interrupting:
    """A recorder's observe that raises ``error`` while it is set, else
    observes."""

    def __init__(self, recorder):
        self._observe = recorder.observe
        self.error = None
        recorder.observe = self  # before a path holds recorder.observe

    def __call__(self, *args):
        if self.error is not None:
            raise self.error("while recording")
        return self._observe(*args)


def _ending(function, *args):
    """What ``function(*args)`` did, a BaseException included: ('ok',
    result) or ('raised', its class, its context's class)."""
    try:
        return "ok", function(*args)
    except BaseException as exc:  # what is compared, a signal included
        return "raised", type(exc), type(exc.__context__)


def _recording_errors(recorder):
    return sum(value for name, labels, value in recorder.snapshot(1)["counters"]
               if name == metrics.AGENT_DROPPED.name and labels[-1] == "recording_error")


def _expected(error):
    """What the service sees and the recording errors counted: the signal
    itself and none, or nothing and one (dropped)."""
    if issubclass(error, Exception):
        return ("ok", None), 1
    return ("raised", error, type(None)), 0


raised_while_recording = pytest.mark.parametrize(
    "error", _RAISED_WHILE_RECORDING, ids=lambda error: error.__name__)


@needs_compiled
@raised_while_recording
def test_a_signal_while_a_send_is_recorded_goes_on_unchanged_alike(error):
    import oslo_messaging as om

    from commlens.middleware import _rpc_send
    from commlens.middleware import _rpc_send_py

    seen = {}
    for name, module in (("compiled", _rpc_send), ("python", _rpc_send_py)):
        recorder = _recorder(0.0)
        interrupting = _Interrupting(recorder)
        call = _sender(module, recorder).begin(
            om.Target(topic="conductor"), {}, {"method": "build_instances"}, True)
        interrupting.error = error
        ended = _ending(call.end, None)
        interrupting.error = None
        seen[name] = (ended, _ending(call.end, None), _recording_errors(recorder),
                      _snapshot(recorder)[2])
    assert seen["compiled"] == seen["python"]
    ended, again, recording_errors, waiting = seen["compiled"]
    assert (ended, recording_errors) == _expected(error)
    assert again == ("ok", None)  # recorded once: the end is done
    assert all(value == 0 for _, _, value in waiting)  # the call no longer waits


@needs_compiled
@raised_while_recording
@pytest.mark.parametrize("inner_raises", [None, ValueError], ids=["answered", "inner-raised"])
def test_a_signal_while_the_driver_s_send_ends_goes_on_alike(error, inner_raises):
    """Sender.send (the driver's send itself): a signal while its end is
    recorded goes on, over the inner driver's exception if there was one."""
    import oslo_messaging as om

    from commlens.middleware import _rpc_send
    from commlens.middleware import _rpc_send_py

    def inner_send(*args, **kwargs):
        if inner_raises is not None:
            raise inner_raises("from the inner driver")
        return "reply"

    seen = {}
    for name, module in (("compiled", _rpc_send), ("python", _rpc_send_py)):
        recorder = _recorder(0.0)
        interrupting = _Interrupting(recorder)
        sender = _sender(module, recorder, inner_send)
        interrupting.error = error
        seen[name] = _ending(sender.send, om.Target(topic="conductor"), {},
                             {"method": "build_instances"}, True)
        interrupting.error = None
    assert seen["compiled"] == seen["python"]
    if issubclass(error, Exception):  # commlens's own failure: the send's own ending
        assert seen["compiled"] == (("ok", "reply") if inner_raises is None
                                    else ("raised", inner_raises, type(None)))
    else:
        assert seen["compiled"] == ("raised", error,
                                    type(None) if inner_raises is None else inner_raises)


@needs_compiled
@raised_while_recording
def test_a_signal_while_a_received_message_is_recorded_goes_on_unchanged_alike(error):
    recorders = {"compiled": _recorder(0.0), "python": _recorder(0.0)}
    interrupting = {name: _Interrupting(recorder) for name, recorder in recorders.items()}
    seen = {}
    for name, listener in _listeners(0.0, recorders).items():
        inner = _Message({"traceparent": VALID})
        incoming = listener._wrap(inner)
        incoming.acknowledge()
        interrupting[name].error = error
        replied = _ending(incoming.reply, {"done": 1})
        interrupting[name].error = None
        seen[name] = (replied, inner.replies, context.current(),
                      _recording_errors(recorders[name]))
    assert seen["compiled"] == seen["python"]
    replied, replies, current, recording_errors = seen["compiled"]
    assert (replied, recording_errors) == _expected(error)
    assert replies == [({"done": 1}, None)]  # the reply went out first
    assert current is None  # the hop is no longer served


@needs_compiled
@raised_while_recording
@pytest.mark.parametrize("ending", ["close", "application raises", "never closed"])
def test_a_signal_while_a_request_is_recorded_goes_on_unchanged_alike(middlewares, error,
                                                                      ending):
    def app(environ, start_response):
        if ending == "application raises":
            raise _Fault("before the response")
        start_response("200 OK", [])
        return [b"ok"]

    recorders = {"compiled": _recorder(0.0), "python": _recorder(0.0)}
    interrupting = {name: _Interrupting(recorder) for name, recorder in recorders.items()}
    seen = {}
    for name, middleware in middlewares(app, recorders).items():
        started, unraisable = [], []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v2.1/servers"}
        if ending == "application raises":
            interrupting[name].error = error
            ended = _ending(middleware, environ, _server_start_response(started))
        else:
            body = middleware(environ, _server_start_response(started))
            interrupting[name].error = error
            if ending == "close":
                ended = _ending(body.close)
            else:
                # Let go of without close(): the request ends in the body's
                # finaliser, where a signal can only be reported.
                hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
                try:
                    del body
                finally:
                    sys.unraisablehook = hook
                ended = ("ok", None)
        interrupting[name].error = None
        seen[name] = (ended, [u.exc_type for u in unraisable], started, context.current(),
                      _recording_errors(recorders[name]))
    assert seen["compiled"] == seen["python"]
    ended, unraisable, _, current, recording_errors = seen["compiled"]
    signal = not issubclass(error, Exception)
    if ending == "application raises":
        # The application's exception goes on as it is; a signal while the
        # request is recorded goes on instead, the application's as its context.
        assert (ended, recording_errors) == (
            (("raised", error, _Fault), 0) if signal else (("raised", _Fault, type(None)), 1))
    elif ending == "close":
        assert (ended, recording_errors) == _expected(error)
    else:
        assert (unraisable, recording_errors) == (([error], 0) if signal else ([], 1))
    assert current is None
