"""A process's RPC identity follows its WSGI identity (issue 17, item 2).

nova-api under gunicorn makes its oslo.messaging transport before paste loads
the commlens filter, so the transport took the program's name (``gunicorn``).
Once the WSGI application is named (the filter's option, the class's
argument, oslo.config's prog or project), the process's RPC side carries that
name, what was recorded before is shipped under it, and the collector keeps no
node for the provisional name.
"""

import bisect
import json
import sys

import oslo_messaging as om
import pytest
from oslo_config import cfg

from commlens.exporters import collector as collector_mod
from commlens.middleware import wsgi
from commlens.tracer import metrics
from commlens.tracer import names
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import settings as settings_mod
from commlens.tracer import wire

SENT = metrics.RPC_SENT.name


@pytest.fixture
def wsgi_host(monkeypatch, request):
    """This process as a WSGI server would run it: the program's name is
    the server's, no commlens setting names the service, a recorder of its own."""
    monkeypatch.setattr(sys, "argv", [getattr(request, "param", "/usr/bin/gunicorn")])
    monkeypatch.delenv("COMMLENS_SERVICE_NAME", raising=False)
    monkeypatch.setenv("COMMLENS_EXPORT_URL", "memory://")
    monkeypatch.setattr(recorder_mod, "_RECORDER", None)
    yield
    recorder_mod.uninstall()


def _app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


def _series(snapshot, name):
    return {tuple(labels): value for metric, labels, value in snapshot["counters"]
            if metric == name}


def _services_in(snapshot):
    found = {snapshot["process"]["service"]}
    for kind in ("counters", "histograms", "gauges"):
        found |= {name for item in snapshot[kind] for name in item[1][:2]}
    return found | {hop[field] for hop in snapshot["hops"] for field in ("service", "peer")}


class _Echo:
    target = om.Target(namespace=None, version="1.0")

    def echo(self, ctxt, value):
        return value


def _transport_with_server(topic):
    transport = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")
    server = om.get_rpc_server(transport, om.Target(topic=topic, server="s"), [_Echo()],
                               executor="threading")
    server.start()
    client = om.get_rpc_client(transport, om.Target(topic=topic), timeout=10)
    return transport, server, client


def _stop(transport, server):
    server.stop()
    server.wait()
    transport.cleanup()


@pytest.mark.parametrize("wsgi_host", ["/usr/bin/gunicorn", "uwsgi", "mod_wsgi"],
                         indirect=True)
@pytest.mark.parametrize("named_by", ["paste filter", "class argument"])
def test_a_transport_made_before_the_wsgi_app_takes_its_name(conf, wsgi_host, named_by):
    transport, server, client = _transport_with_server("identity-before")
    try:
        client.call({}, "echo", value=1)  # before the application is loaded
        if named_by == "paste filter":
            wsgi.filter_factory({}, service_name="compute-api", http_outbound="false")(_app)
        else:
            wsgi.CommlensMiddleware(_app, service_name="compute-api", http_outbound="false")
        client.call({}, "echo", value=2)
        snapshot = recorder_mod.get_recorder().snapshot(1.0)
    finally:
        _stop(transport, server)
    assert _series(snapshot, SENT) == {("compute-api", "identity-before", "echo", "call"): 2}
    # The second call's caller came over the wire (baggage): the new name; the
    # first one's (the provisional name) was this process's too.
    received = _series(snapshot, metrics.RPC_RECEIVED.name)
    assert received == {("compute-api", "compute-api", "identity-before", "echo", "call"): 2}
    assert snapshot["process"]["service"] == "compute-api"
    program = settings_mod.program_service_name()
    assert program not in _services_in(snapshot)
    assert "commlens-tests-api" not in _services_in(snapshot)  # the provisional one


def test_the_wsgi_app_is_named_by_its_oslo_config_project(wsgi_host):
    """Without a name of its own the application is its project's API service
    (nova: nova-api), and the transport made before it follows."""
    transport, server, client = _transport_with_server("identity-project")
    nova = cfg.ConfigOpts()
    nova([], project="nova")
    try:
        wsgi.CommlensMiddleware(_app, conf=nova, http_outbound="false")
        client.cast({}, "echo", value=1)
        assert recorder_mod.get_recorder().service == "nova-api"
        snapshot = recorder_mod.get_recorder().snapshot(1.0)
    finally:
        _stop(transport, server)
    assert _series(snapshot, SENT) == {("nova-api", "identity-project", "echo", "cast"): 1}


def test_a_named_process_is_not_renamed_by_its_wsgi_app(conf, monkeypatch):
    """[commlens] service_name or COMMLENS_SERVICE_NAME names the process: a
    filter's own name is then that filter's, as before."""
    monkeypatch.setenv("COMMLENS_SERVICE_NAME", "nova-api-named")
    monkeypatch.setenv("COMMLENS_EXPORT_URL", "memory://")
    monkeypatch.setattr(recorder_mod, "_RECORDER", None)
    try:
        recorder_mod.install(settings_mod.load(None))
        middleware = wsgi.CommlensMiddleware(_app, service_name="other-api",
                                             http_outbound="false")
        assert recorder_mod.get_recorder().service == "nova-api-named"
        assert middleware.service == "other-api"
    finally:
        recorder_mod.uninstall()


def test_what_was_recorded_under_the_provisional_name_ships_under_the_new_one():
    recorder = recorder_mod.Recorder("gunicorn", provisional=True)
    recorder.inc(SENT, ("gunicorn", "conductor", "m", "call"))
    recorder.inc(SENT, ("nova-api", "conductor", "m", "call"), 2)
    recorder.observe(metrics.RPC_REPLY_WAIT.name, ("gunicorn", "conductor", "m", "ok"), 0.01)
    recorder.observe(metrics.RPC_REPLY_WAIT.name, ("nova-api", "conductor", "m", "ok"), 0.02)
    token = recorder.call_started(("gunicorn", "conductor", "m"))
    assert recorder.adopt("nova-api") == "nova-api"
    assert recorder.adopt("other") == "nova-api"  # named once
    snapshot = recorder.snapshot(1.0)
    assert _series(snapshot, SENT) == {("nova-api", "conductor", "m", "call"): 3}
    waits = [item for item in snapshot["histograms"] if item[0] == metrics.RPC_REPLY_WAIT.name]
    assert [(labels, sum(counts)) for _, labels, counts, *_ in waits] == [
        (["nova-api", "conductor", "m", "ok"], 2)]
    assert [metrics.RPC_WAITING_REPLIES.name, ["nova-api", "conductor", "m"], 1] in \
        snapshot["gauges"]
    assert "gunicorn" not in _services_in(snapshot)
    recorder.call_finished(token)


def _shipped(process_id, seq, service, sent, waits=()):
    """A snapshot of ``sent`` calls; ``waits``: the seconds each answered one waited."""
    counts = [0] * (len(metrics.LATENCY_BUCKETS) + 1)
    for wait in waits:
        counts[bisect.bisect_left(metrics.LATENCY_BUCKETS, wait)] += 1
    histograms = [[metrics.RPC_REPLY_WAIT.name, [service, "conductor", "m", metrics.OK], counts,
                   sum(waits), min(waits), max(waits)]] if waits else []
    return json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": seq, "interval": 1.0, "final": False,
        "process": {"id": process_id, "service": service, "pid": 1},
        "counters": [[SENT, [service, "conductor", "m", "call"], sent],
                     [metrics.SERVICE_GRAPH_REQUESTS.name, [service, "nova-conductor",
                                                            metrics.MESSAGING_SYSTEM], sent]],
        "histograms": histograms, "gauges": []})


def test_the_collector_moves_a_renamed_process_s_series_and_keeps_no_node_for_the_old_name():
    collector = collector_mod.Collector()
    assert collector.ingest(_shipped("p1", 1, "gunicorn", 3)) == "accepted"
    assert collector.ingest(_shipped("p2", 1, "nova-conductor", 1)) == "accepted"
    assert {n["service"] for n in collector.graph()["nodes"]} >= {"gunicorn"}
    # The process took its WSGI application's name; it ships everything under it.
    assert collector.ingest(_shipped("p1", 2, "nova-api", 5)) == "accepted"
    counters = collector.merged()[0]
    assert counters[(SENT, ("nova-api", "conductor", "m", "call"))] == 5
    assert not [key for key in counters if "gunicorn" in key[1]]
    assert "gunicorn" not in {n["service"] for n in collector.graph()["nodes"]}
    assert "gunicorn" not in {p["service"] for p in collector.processes()}


def test_a_renamed_process_s_histograms_move_with_their_extremes():
    collector = collector_mod.Collector()
    assert collector.ingest(_shipped("p1", 1, "gunicorn", 2, waits=(0.02, 0.3))) == "accepted"
    assert collector.ingest(_shipped("p1", 2, "nova-api", 3, waits=(0.02, 0.3, 0.04))) \
        == "accepted"
    histograms = collector.merged()[1]
    wait = metrics.RPC_REPLY_WAIT.name
    assert not [key for key in histograms if "gunicorn" in key[1]]
    counts, total, low, high = histograms[(wait, ("nova-api", "conductor", "m", metrics.OK))]
    assert (sum(counts), round(total, 6), low, high) == (3, 0.36, 0.02, 0.3)


def test_a_provisional_name_shared_with_another_process_keeps_only_that_process_s_counts():
    collector = collector_mod.Collector()
    collector.ingest(_shipped("w1", 1, "gunicorn", 3))
    collector.ingest(_shipped("w2", 1, "gunicorn", 4))
    collector.ingest(_shipped("w1", 2, "nova-api", 3))
    counters = collector.merged()[0]
    assert counters[(SENT, ("gunicorn", "conductor", "m", "call"))] == 4
    assert counters[(SENT, ("nova-api", "conductor", "m", "call"))] == 3
    collector.ingest(_shipped("w2", 2, "nova-api", 4))
    counters = collector.merged()[0]
    assert counters[(SENT, ("nova-api", "conductor", "m", "call"))] == 7
    assert not [key for key in counters if "gunicorn" in key[1]]


@pytest.mark.parametrize("prog, project, name", [
    ("gunicorn", "nova", "nova-api"),
    ("uwsgi", "neutron", "neutron-server"),
    ("mod_wsgi", "placement", "placement-api"),
    ("gunicorn", "watcher", "watcher-api"),
    ("placement-api", "placement", "placement-api"),
    ("my-api", None, "my-api"),
    ("python3", None, None),
    ("gunicorn", None, None),
])
def test_a_wsgi_application_s_name_from_oslo_config(prog, project, name):
    conf = cfg.ConfigOpts()
    conf([], project=project, prog=prog)
    assert names.wsgi_service_name(conf) == name
