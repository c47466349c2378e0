"""Tuning advice (exporters/advice.py, advice_rules.py): each rule on generated
series that must trigger it and series that must not.

The series are what the collector merges (``Collector.merged``): the names
of tracer/metrics.py and those agreed for issue 18's measurements (pool
wait, handlers in flight, pool size, saturation peak, timeout budget,
unreceived messages), cumulative, at the start of a baseline minute, at its
end (the window's start) and now.
"""

import bisect
import collections
import json

from commlens.exporters import advice
from commlens.exporters import advice_rules
from commlens.exporters import collector as collector_mod
from commlens.exporters import http
from commlens.tracer import metrics
from commlens.tracer import wire
from support import Clock

MINUTE = 60.0


def _histogram(values, bounds=metrics.LATENCY_BUCKETS):
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    return [counts, float(sum(values)), min(values, default=None), max(values, default=None)]


class Series:
    """Cumulative merged series, grown a phase at a time."""

    def __init__(self):
        self.counters = collections.defaultdict(float)
        self.histograms = {}
        self.gauges = {}

    def count(self, name, labels, value):
        self.counters[(name, tuple(labels))] += value

    def observe(self, name, labels, values, bounds=metrics.LATENCY_BUCKETS):
        key = (name, tuple(labels))
        new = _histogram(values, bounds)
        old = self.histograms.get(key)
        if old is None:
            self.histograms[key] = new
        else:
            self.histograms[key] = [[a + b for a, b in zip(old[0], new[0], strict=True)],
                                    old[1] + new[1], min(old[2], new[2]), max(old[3], new[3])]

    def gauge(self, name, labels, value):
        self.gauges[(name, tuple(labels))] = value

    def calls(self, caller, topic, server, waits, outcome=metrics.OK, processing=None,
              method="m"):
        """``len(waits)`` calls answered by ``server``, each waited for that long."""
        self.count(metrics.RPC_SENT.name, (caller, topic, method, "call"), len(waits))
        self.observe(metrics.RPC_REPLY_WAIT.name, (caller, topic, method, outcome), waits)
        if outcome in (metrics.OK, metrics.REMOTE_ERROR):
            self.count(metrics.RPC_RECEIVED.name, (server, caller, topic, method, "call"),
                       len(waits))
            self.observe(metrics.RPC_PROCESSING.name, (server, topic, method, "ok"),
                         processing or [w * 0.9 for w in waits])
        else:
            self.count(metrics.RPC_CALL_ERRORS.name,
                       (caller, topic, method, outcome, "MessagingTimeout"), len(waits))

    def merged(self):
        return (dict(self.counters), {k: [list(v[0]), *v[1:]] for k, v in self.histograms.items()},
                dict(self.gauges))


def _inputs(baseline, window, queues=None, processes=(), unreceived=None):
    """Inputs of a minute of baseline then a minute of window: ``baseline``
    and ``window`` add to one Series, phase by phase."""
    clock = Clock()
    samples = advice.samples(clock=clock)
    series = Series()
    baseline(series)
    clock.now += MINUTE
    samples.add(advice.reduce(*series.merged()))
    window(series)
    clock.now += MINUTE
    return advice.inputs_from(samples, advice.reduce(*series.merged()), MINUTE, MINUTE,
                              queues, processes, unreceived)


def _nothing(series):
    return None


def _findings(rule, baseline, window, **kwargs):
    return [f.as_dict() for f in rule(_inputs(baseline, window, **kwargs))]


# -- rpc_response_timeout ---------------------------------------------------------

def _with_budget(series, caller, topic, waits, timeout):
    series.observe(advice.TIMEOUT_BUDGET, (caller, topic, "m"), [w / timeout for w in waits],
                   advice.BUDGET_BOUNDS)
    series.count(advice.OVER_HALF_TIMEOUT, (caller, topic, "m"),
                 sum(1 for w in waits if w > timeout / 2))


def test_waits_near_the_timeout_advise_raising_rpc_response_timeout():
    def window(series):
        waits = [3.2] * 100
        series.calls("nova-api", "conductor", "nova-conductor", waits, processing=[3.1] * 100)
        _with_budget(series, "nova-api", "conductor", waits, timeout=5.0)

    [finding] = _findings(advice_rules.rpc_response_timeout, _nothing, window)
    assert finding["option"] == "[DEFAULT] rpc_response_timeout"
    assert finding["set_on"] == ["nova-api"]
    assert finding["subject"] == {"service": "nova-conductor", "caller": "nova-api",
                                  "topic": "conductor", "edge": "nova-api -> nova-conductor"}
    assert finding["severity"] == "warning"
    evidence = finding["evidence"]
    assert abs(evidence["timeout_seconds"] - 5.0) < 1e-9
    assert evidence["timeout_known_from"] == "timeout budget"
    assert 2.5 <= evidence["wait_p999_seconds"] <= 3.2
    assert evidence["calls_over_half_timeout"] == 100
    assert "nova-conductor" in finding["finding"] and "5 s timeout" in finding["finding"]
    assert "to 7 s" in finding["recommendation"]
    assert finding["confidence"] == {"level": "medium", "observations": 100, "seconds": 60.0}
    json.dumps(finding, allow_nan=False)


def test_waits_far_from_the_timeout_advise_nothing():
    def window(series):
        waits = [0.4] * 100
        series.calls("nova-api", "conductor", "nova-conductor", waits)
        _with_budget(series, "nova-api", "conductor", waits, timeout=5.0)

    assert _findings(advice_rules.rpc_response_timeout, _nothing, window) == []


def test_without_the_budget_the_timeout_is_read_from_timed_out_calls():
    def window(series):
        series.calls("nova-compute", "conductor", "nova-conductor", [45.0] * 50)
        series.calls("nova-compute", "conductor", "nova-conductor", [60.01] * 3,
                     outcome=metrics.TIMEOUT)

    [finding] = _findings(advice_rules.rpc_response_timeout, _nothing, window)
    assert finding["evidence"]["timeout_known_from"] == "timed-out calls"
    assert 60.0 <= finding["evidence"]["timeout_seconds"] <= 60.02
    assert finding["severity"] == "critical" and finding["evidence"]["timeouts"] == 3
    assert "to 90 s" in finding["recommendation"] or "to 91 s" in finding["recommendation"]


def test_timeouts_of_a_server_that_did_not_answer_are_not_a_timeout_to_raise():
    """A compute that is down: the answered calls are fast, raising the timeout
    would only make callers wait longer for nobody."""
    def window(series):
        series.calls("nova-conductor", "compute", "nova-compute", [0.02] * 100)
        series.calls("nova-conductor", "compute", "nova-compute", [60.0] * 10,
                     outcome=metrics.TIMEOUT)

    assert _findings(advice_rules.rpc_response_timeout, _nothing, window) == []


def test_an_unknown_timeout_advises_nothing():
    def window(series):
        series.calls("nova-api", "conductor", "nova-conductor", [20.0] * 100)

    assert _findings(advice_rules.rpc_response_timeout, _nothing, window) == []


# -- executor_thread_pool_size ----------------------------------------------------

def _pool(series, peak, pool_wait, size=64.0, in_flight=60.0):
    labels = ("nova-conductor", "conductor")
    series.gauge(advice.EXECUTOR_POOL_SIZE, labels, size)
    series.gauge(advice.HANDLERS_IN_FLIGHT, labels, in_flight)
    series.gauge(advice.POOL_SATURATION_PEAK, labels, peak)
    series.observe(advice.POOL_WAIT, labels + ("m",), [pool_wait] * 200)
    series.calls("nova-api", "conductor", "nova-conductor", [0.6] * 200, processing=[0.3] * 200)


def test_a_full_executor_pool_with_calls_waiting_for_it_advises_a_larger_pool():
    [finding] = _findings(advice_rules.executor_thread_pool_size, _nothing,
                          lambda s: _pool(s, peak=1.0, pool_wait=0.3),
                          processes=[{"service": "nova-conductor"}] * 2)
    assert finding["option"] == "[DEFAULT] executor_thread_pool_size"
    assert finding["subject"]["service"] == "nova-conductor"
    assert finding["evidence"]["saturation_peak"] == 1.0
    assert finding["evidence"]["pool_size_per_process"] == 32
    assert "from about 32 to 64" in finding["recommendation"]
    assert "[conductor] workers" in finding["recommendation"]


def test_a_pool_with_room_or_no_wait_for_it_advises_nothing():
    for peak, pool_wait in ((0.5, 0.3), (1.0, 0.001)):
        assert _findings(advice_rules.executor_thread_pool_size, _nothing,
                         lambda s, p=peak, w=pool_wait: _pool(s, peak=p, pool_wait=w)) == []


# -- workers: Little's law ------------------------------------------------------

def _arrivals(series, per_second, processing, server="nova-conductor"):
    n = int(per_second * MINUTE)
    series.calls("nova-compute", "conductor", server, [processing * 1.1] * n,
                 processing=[processing] * n)


def test_busy_handlers_near_the_pool_advise_more_workers():
    [finding] = _findings(advice_rules.workers, _nothing, lambda s: _arrivals(s, 50, 1.0),
                          processes=[{"service": "nova-conductor"}])
    assert finding["option"] == "[conductor] workers"
    evidence = finding["evidence"]
    assert abs(evidence["busy_handlers"] - 50) < 1 and evidence["handlers"] == 64
    assert evidence["pool_size_assumed"] is True
    assert evidence["processes_needed"] == 2
    assert "64 per process assumed" in finding["finding"]


def test_busy_handlers_well_under_the_pool_advise_nothing():
    assert _findings(advice_rules.workers, _nothing, lambda s: _arrivals(s, 50, 0.1)) == []

    def measured(series):  # the pools are measured and larger than the default
        _arrivals(series, 50, 1.0)
        series.gauge(advice.EXECUTOR_POOL_SIZE, ("nova-conductor", "conductor"), 256)
    assert _findings(advice_rules.workers, _nothing, measured) == []


def _api_requests(series, n, seconds):
    series.count(metrics.HTTP_REQUESTS.name, ("nova-api", "unknown", "POST", "/v2.1/servers",
                                             "202"), n)
    series.observe(metrics.HTTP_DURATION.name, ("nova-api", "POST", "/v2.1/servers", "ok"),
                   [seconds] * n)


def test_api_requests_in_service_near_the_processes_advise_more_api_workers():
    # 10 requests a second of 0.35 s over 4 processes: 3.5 in service, 88 %.
    [finding] = _findings(advice_rules.api_workers, _nothing,
                          lambda s: _api_requests(s, 600, 0.35),
                          processes=[{"service": "nova-api"}] * 4)
    assert finding["option"] == "[DEFAULT] osapi_compute_workers"
    assert finding["severity"] == "info" and finding["evidence"]["processes_needed"] == 5
    assert "one at a time" in finding["finding"]


def test_api_requests_well_within_the_processes_advise_nothing():
    assert _findings(advice_rules.api_workers, _nothing, lambda s: _api_requests(s, 600, 0.05),
                     processes=[{"service": "nova-api"}] * 4) == []
    # No process reports for it: nothing to count the requests against.
    assert _findings(advice_rules.api_workers, _nothing,
                     lambda s: _api_requests(s, 600, 0.35)) == []


# -- queues with no consumer ------------------------------------------------------

def _consumed(series):
    series.calls("nova-api", "conductor", "nova-conductor", [0.01] * 30)


def test_a_queue_the_broker_says_nobody_consumes_is_found():
    queues = {"conductor": {"ready": 12, "unacked": 0, "consumers": 0}}
    [finding] = _findings(advice_rules.queue_without_consumer, _consumed, _nothing,
                          queues=queues)
    assert finding["severity"] == "critical" and finding["subject"]["topic"] == "conductor"
    assert finding["subject"]["service"] == "nova-conductor"
    assert finding["option"] == "[DEFAULT] transport_url"
    assert "12 messages" in finding["finding"]


def test_a_topic_whose_consumer_stopped_receiving_is_found_from_the_metrics():
    def window(series):
        series.calls("nova-api", "conductor", "nova-conductor", [60.0] * 8,
                     outcome=metrics.TIMEOUT)

    [finding] = _findings(advice_rules.queue_without_consumer, _consumed, window)
    assert finding["evidence"]["sent"] == 8 and finding["evidence"]["timeouts"] == 8
    assert finding["evidence"]["callers"] == ["nova-api"]
    assert "Start nova-conductor" in finding["recommendation"]


def test_a_topic_nobody_ever_consumed_whose_calls_all_time_out_is_found():
    """``conductor-down`` from the start: no consumer to have learnt, and every
    call times out (one without commlens would have answered)."""
    def window(series):
        series.calls("nova-api", "conductor", "nova-conductor", [5.0] * 6,
                     outcome=metrics.TIMEOUT)

    [finding] = _findings(advice_rules.queue_without_consumer, _nothing, window)
    assert finding["subject"] == {"service": "conductor", "caller": None, "topic": "conductor",
                                  "edge": None}
    assert finding["set_on"] == [] and "Start the service that consumes conductor" in \
        finding["recommendation"]


def test_unreceived_messages_are_found():
    [finding] = _findings(advice_rules.queue_without_consumer, _nothing, _nothing,
                          unreceived={("compute", "terminate_instance", "cast"): 6})
    assert finding["evidence"]["unreceived"] == {"terminate_instance (cast)": 6}


def test_consumed_queues_and_topics_nobody_instrumented_consumes_are_not_found():
    queues = {"conductor": {"ready": 3, "unacked": 1, "consumers": 2}}
    assert _findings(advice_rules.queue_without_consumer, _consumed, _consumed,
                     queues=queues) == []

    assert _findings(advice_rules.queue_without_consumer, _nothing, _nothing,
                     unreceived={("compute", "terminate_instance", "cast"): 2}) == []

    def uninstrumented(series):  # never received by an instrumented service
        series.count(metrics.RPC_SENT.name, ("nova-api", "glance", "m", "cast"), 50)
        # ... whose calls are answered, though some time out.
        series.observe(metrics.RPC_REPLY_WAIT.name, ("nova-api", "glance", "m", "ok"),
                       [0.05] * 40)
        series.calls("nova-api", "glance", "glance", [5.0] * 6, outcome=metrics.TIMEOUT)
    assert _findings(advice_rules.queue_without_consumer, uninstrumented, uninstrumented) == []


# -- waits that grow -------------------------------------------------------------

def test_waits_that_grow_with_the_server_s_processing_name_the_server():
    def baseline(series):
        series.calls("nova-api", "conductor", "nova-conductor", [0.02] * 100,
                     processing=[0.01] * 100)

    def window(series):
        series.calls("nova-api", "conductor", "nova-conductor", [3.05] * 100,
                     processing=[3.0] * 100)

    [finding] = _findings(advice_rules.waits_growing, baseline, window)
    assert finding["subject"]["edge"] == "nova-api -> nova-conductor"
    assert finding["option"] == "[conductor] workers"
    growth = finding["evidence"]["growth_seconds"]
    assert max(growth, key=growth.get) == "processing"
    assert "processing" in finding["finding"]


def test_waits_that_grow_waiting_for_a_worker_advise_the_pool():
    def baseline(series):
        series.calls("nova-api", "conductor", "nova-conductor", [0.02] * 100,
                     processing=[0.01] * 100)
        series.observe(advice.POOL_WAIT, ("nova-conductor", "conductor", "m"), [0.001] * 100)

    def window(series):
        series.calls("nova-api", "conductor", "nova-conductor", [2.0] * 100,
                     processing=[0.01] * 100)
        series.observe(advice.POOL_WAIT, ("nova-conductor", "conductor", "m"), [1.9] * 100)

    [finding] = _findings(advice_rules.waits_growing, baseline, window)
    assert finding["option"] == "[DEFAULT] executor_thread_pool_size"


def test_flat_waits_and_too_few_calls_advise_nothing():
    def steady(series):
        series.calls("nova-api", "conductor", "nova-conductor", [0.02] * 100)
    assert _findings(advice_rules.waits_growing, steady, steady) == []

    def few(series):
        series.calls("nova-api", "conductor", "nova-conductor", [3.0] * 5)
    assert _findings(advice_rules.waits_growing, steady, few) == []

    # Fifteen times longer, but by a quarter of a second: a busy plane, not a change to make.
    def busier(series):
        series.calls("nova-api", "conductor", "nova-conductor", [0.3] * 100)
    assert _findings(advice_rules.waits_growing, steady, busier) == []


# -- callers retrying into a failing service ------------------------------------------

def test_a_caller_retrying_into_a_failing_service_is_found():
    def baseline(series):
        series.calls("neutron-openvswitch-agent", "q-plugin", "neutron-server", [0.01] * 60)

    def window(series):
        series.calls("neutron-openvswitch-agent", "q-plugin", "neutron-server", [0.01] * 50)
        series.calls("neutron-openvswitch-agent", "q-plugin", "neutron-server",
                     [0.01] * 250, outcome=metrics.TRANSPORT_ERROR)

    [finding] = _findings(advice_rules.retrying_into_failure, baseline, window)
    assert finding["subject"]["service"] == "neutron-server"
    assert finding["subject"]["caller"] == "neutron-openvswitch-agent"
    assert finding["evidence"]["attempts_per_second"] == 5.0
    assert finding["evidence"]["baseline_attempts_per_second"] == 1.0


def test_a_caller_retrying_a_failing_rest_service_is_told_its_keystoneauth_options():
    def requests(n, failed):
        def add(series):
            series.count(metrics.HTTP_CLIENT_REQUESTS.name,
                         ("nova-compute", "placement", "PUT", "200"), n - failed)
            series.count(metrics.HTTP_CLIENT_REQUESTS.name,
                         ("nova-compute", "placement", "PUT", "503"), failed)
        return add

    [finding] = _findings(advice_rules.retrying_into_failure, requests(60, 0),
                          requests(240, 200))
    assert finding["option"] == "[placement] status_code_retries, connect_retries"


def test_failing_at_the_same_rate_or_healthy_growth_is_not_retrying():
    def baseline(series):
        series.calls("nova-api", "conductor", "nova-conductor", [0.01] * 60)

    def failing(series):  # as many calls as before, most of them failing
        series.calls("nova-api", "conductor", "nova-conductor", [60.0] * 55,
                     outcome=metrics.TIMEOUT)
        series.calls("nova-api", "conductor", "nova-conductor", [0.01] * 5)

    def busier(series):  # three times the calls, all answered
        series.calls("nova-api", "conductor", "nova-conductor", [0.01] * 180)

    for window in (failing, busier):
        assert _findings(advice_rules.retrying_into_failure, baseline, window) == []


# -- the emulator's runs -------------------------------------------------------------

def _run(**figures):
    run = {"agents": 1000, "interval": 10.0, "window_seconds": 30.0, "reports_ok": 3000,
           "report_timeouts": 0, "report_errors": 0, "reports_skipped": 0,
           "control_plane_rpc_per_second": 100.0,
           "conductor_pool": {"size": 64, "peak_in_flight": 10}}
    run.update(figures)
    return run


def test_an_emulated_run_whose_reports_time_out_advises_report_interval_or_workers():
    findings = advice_rules.emulated_run(_run(report_timeouts=200, reports_skipped=100,
                                              control_plane_rpc_per_second=80.0))
    [finding] = [f for f in findings if f["rule"] == "report_interval"]
    assert finding["option"] == "[DEFAULT] report_interval"
    assert "13 s" in finding["recommendation"]  # 1000 agents / 80 answered per second
    pool = advice_rules.emulated_run(_run(conductor_pool={"size": 64, "peak_in_flight": 64}))
    assert [f["option"] for f in pool] == ["[DEFAULT] executor_thread_pool_size"]


def test_a_clean_emulated_run_advises_nothing():
    assert advice_rules.emulated_run(_run()) == []


# -- through the collector ------------------------------------------------------------

def _snapshot(seq, series, service):
    counters, histograms, gauges = series.merged()
    return json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": seq, "interval": 1.0, "final": False,
        "process": {"id": f"{service}-1", "service": service, "pid": 1},
        "counters": [[n, list(labels), v] for (n, labels), v in counters.items()
                     if labels[0] == service],
        "histograms": [[n, list(labels), *h] for (n, labels), h in histograms.items()
                       if labels[0] == service],
        "gauges": [[n, list(labels), v] for (n, labels), v in gauges.items()
                   if labels[0] == service]})


def test_the_collector_serves_advice_on_what_its_processes_shipped():
    """Snapshots in, ``/api/advice`` out: a conductor that got slow is named,
    with the option; the JSON is strict."""
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, wall_clock=clock)
    series = Series()
    seq = 0

    def ship(waits, processing):
        nonlocal seq
        series.calls("nova-api", "conductor", "nova-conductor", waits, processing=processing)
        seq += 1
        for service in ("nova-api", "nova-conductor"):
            assert collector.ingest(_snapshot(seq, series, service)) == "accepted"

    for _ in range(6):  # a minute of fast calls, sampled every 10 s
        ship([0.02] * 20, [0.01] * 20)
        clock.now += 10
        collector.sample_advice()
    for _ in range(6):  # then a minute of slow ones
        ship([3.05] * 20, [3.0] * 20)
        clock.now += 10
        collector.sample_advice()
    client = http.create_app(collector).test_client()
    answer = client.get("/api/advice?window=1m&baseline=1m")
    assert answer.status_code == 200
    body = json.loads(answer.data)
    assert body["window_seconds"] == 60.0
    [finding] = [f for f in body["findings"] if f["rule"] == "waits_growing"]
    assert finding["subject"]["service"] == "nova-conductor"
    assert finding["option"] == "[conductor] workers"
    assert client.get("/api/advice?window=soon").status_code == 400


def test_the_advise_table_shows_options_as_written_in_a_configuration_file():
    from rich.console import Console

    from commlens.cli import advise as advise_cli

    def window(series):
        _arrivals(series, 50, 1.0)
    findings = [f.as_dict() for f in advice_rules.workers(_inputs(_nothing, window))]
    console = Console(record=True, width=300)
    advise_cli.show_findings(console, findings, "Tuning advice")
    text = console.export_text()
    assert "[conductor] workers" in text and "nova-conductor (topic conductor)" in text
    assert "medium: 3,000 over 60s" in text
    console = Console(record=True, width=100)
    advise_cli.show_findings(console, [], "Tuning advice")
    assert "nothing to change" in console.export_text()
