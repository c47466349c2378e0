"""The tuning rules: each reads ``advice.Inputs`` and returns ``advice.Finding``s.

Every rule says nothing rather than guess: below ``MIN_CALLS`` calls in its
window, or without the measurement it needs (a pool size, a timeout), it
finds nothing. Thresholds are module constants, documented in
docs/operator-guide.md ("Tuning advice").
"""

import math

from commlens.dashboards import formatting
from commlens.exporters.advice import Finding
from commlens.exporters.advice import confidence
from commlens.exporters.advice import mean
from commlens.exporters.advice import quantile
from commlens.exporters.advice import subject

# Fewer calls than this in a window say nothing about a tail.
MIN_CALLS = 20
# rpc_response_timeout: the p99.9 of answered calls' waits uses this much of
# the timeout or more; suggest twice that wait.
TIMEOUT_BUDGET_WARNING = 0.5
TIMEOUT_BUDGET_CRITICAL = 0.9
# executor_thread_pool_size: the pool was this full at its peak, and calls
# waited at least POOL_WAIT_FLOOR for a worker (p99), when that is measured.
POOL_PEAK = 0.9
POOL_WAIT_FLOOR = 0.05
# oslo.messaging's executor_thread_pool_size default, per RPC server process.
DEFAULT_POOL_SIZE = 64
# Little's law: busy handlers (arrival rate x processing time) against the
# pool; keep them under this share of it (queueing grows fast past it).
TARGET_UTILISATION = 0.7
# waits_growing: p99 at least this many times the baseline's, and at least
# MIN_GROWTH_SECONDS longer (tens of milliseconds more on a busy plane are
# not worth a change: the demo's waits go from 50 to 275 ms when a fault
# that held its users back ends).
GROWTH_FACTOR = 2.0
MIN_GROWTH_SECONDS = 0.5
MIN_GROWTH_CALLS = 10
# queue_without_consumer: messages sent to a topic nobody received.
MIN_UNRECEIVED = 5
# retrying_into_failure: most attempts fail, and there are this many times
# more attempts than in the baseline.
RETRY_FAILURE_RATIO = 0.5
RETRY_GROWTH = 1.5

TIMEOUT_OPTION = "[DEFAULT] rpc_response_timeout"
POOL_OPTION = "[DEFAULT] executor_thread_pool_size"
TRANSPORT_OPTION = "[DEFAULT] transport_url"
# The option that sets how many worker processes consume a service's RPC topics.
WORKERS_OPTIONS = {
    "nova-conductor": "[conductor] workers",
    "nova-scheduler": "[scheduler] workers",
    "neutron-server": "[DEFAULT] rpc_workers",
    "heat-engine": "[DEFAULT] num_engine_workers",
}
# The option that sets how many processes serve a service's REST API (under
# uWSGI or mod_wsgi, the server's own processes setting).
API_WORKERS_OPTIONS = {
    "nova-api": "[DEFAULT] osapi_compute_workers",
    "neutron-server": "[DEFAULT] api_workers",
    "cinder-api": "[DEFAULT] osapi_volume_workers",
    "glance-api": "[DEFAULT] workers",
    "heat-api": "[heat_api] workers",
}
# keystoneauth's retries of a REST client, by the section a service configures
# its client of the target in.
REST_CLIENT_SECTIONS = {
    "neutron-server": "[neutron]", "placement": "[placement]", "placement-api": "[placement]",
    "glance-api": "[glance]", "cinder-api": "[cinder]", "ironic-api": "[ironic]",
    "nova-api": "[nova]",
}
# A periodic state report's interval, by the agent's service.
REPORT_INTERVAL_OPTIONS = {
    "nova-compute": "[DEFAULT] report_interval",
    "neutron-openvswitch-agent": "[AGENT] report_interval",
}

_s = formatting.duration
_rate = formatting.rate
_pct = formatting.percent


def workers_option(service):
    return WORKERS_OPTIONS.get(service, f"the number of {service} worker processes")


def _server(inputs, topic):
    servers = inputs.servers_of(topic)
    return servers[0] if servers else topic


def _seconds_up(value):
    """A timeout to suggest: whole seconds, at least one."""
    return max(1, math.ceil(value))


# -- rpc_response_timeout -------------------------------------------------------

def _timeout_of(window, key):
    """(seconds, how it is known) of the calls' timeout, or (None, None).

    With the timeout budget (wait / timeout, per call), the sum of waits over
    the sum of budgets is the timeout exactly when the calls share one, and a
    weighted mean when they do not. Without it, a call that timed out waited
    about its timeout."""
    budget, budget_sum = window.histogram("budget", key)
    waited = window.count("wait_total", key)
    if sum(budget.counts) and budget_sum > 0 and waited > 0:
        return waited / budget_sum, "timeout budget"
    low = window.now.timeout_low.get(key)
    if low:
        return low, "timed-out calls"
    return None, None


def rpc_response_timeout(inputs):
    window = inputs.window
    found = []
    for key in window.keys("calls"):
        caller, topic = key
        waits, _total = window.histogram("waits", key)
        answered = sum(waits.counts)
        if answered < MIN_CALLS:
            continue
        timeout, how = _timeout_of(window, key)
        if not timeout:
            continue
        p999 = quantile(0.999, waits)
        used = p999 / timeout
        if used < TIMEOUT_BUDGET_WARNING:
            continue
        timeouts = window.count("timeouts", key)
        server = _server(inputs, topic)
        processing, _ = window.histogram("processing", (server, topic))
        processing_p999 = quantile(0.999, processing)
        suggested = _seconds_up(2 * p999)
        evidence = {"answered_calls": answered, "timeouts": timeouts,
                    "wait_p999_seconds": p999, "timeout_seconds": timeout,
                    "timeout_known_from": how, "timeout_used_p999": used,
                    "calls_over_half_timeout": window.count("over_half", key),
                    "server_processing_p999_seconds": processing_p999}
        faster = (f"or make {server} answer sooner" + (
            f" (its own processing is {_s(processing_p999)} at p99.9)"
            if processing_p999 is not None else ""))
        found.append(Finding(
            rule="rpc_response_timeout",
            severity=("critical" if used >= TIMEOUT_BUDGET_CRITICAL or timeouts
                      else "warning"),
            subject=subject(server, caller, topic),
            finding=(f"{caller}'s calls to {server} (topic {topic}) wait up to "
                     f"{_s(p999)} (p99.9): {_pct(used)} of their {_s(timeout)} timeout"
                     + (f"; {timeouts:.0f} timed out" if timeouts else "")),
            evidence=evidence,
            recommendation=(f"Raise rpc_response_timeout on {caller} to {suggested} s "
                            f"(twice the p99.9 wait), {faster}."),
            option=TIMEOUT_OPTION, set_on=[caller],
            confidence=confidence(answered, window.seconds)))
    return found


# -- executor_thread_pool_size --------------------------------------------------

def executor_thread_pool_size(inputs):
    window = inputs.window
    found = []
    for key in window.keys("pool_size"):
        service, topic = key
        size = window.now.pool_size.get(key, 0.0)
        peak = window.peak("saturation", key)
        if size <= 0 or peak < POOL_PEAK:
            continue
        pool_wait, _ = window.histogram("pool_wait", key)
        waited = sum(pool_wait.counts)
        wait_p99 = quantile(0.99, pool_wait)
        if waited and (wait_p99 is None or wait_p99 < POOL_WAIT_FLOOR):
            continue
        processing, total = window.histogram("processing", key)
        received = window.count("received", key)
        processes = max(1, inputs.process_count(service))
        per_process = max(1, round(size / processes))
        evidence = {"pool_size": size, "processes": processes,
                    "pool_size_per_process": per_process,
                    "saturation_peak": peak,
                    "handlers_in_flight": window.now.in_flight.get(key, 0.0),
                    "handlers_in_flight_peak": window.peak("in_flight", key),
                    "pool_wait_p99_seconds": wait_p99,
                    "processing_mean_seconds": mean(processing, total),
                    "received_per_second": received / window.seconds}
        found.append(Finding(
            rule="executor_thread_pool_size",
            severity="critical" if wait_p99 is not None and wait_p99 >= 1.0 else "warning",
            subject=subject(service, topic=topic),
            finding=(f"{service}'s RPC executor (topic {topic}) was {_pct(peak)} full at its peak"
                     + (f"; calls waited {_s(wait_p99)} (p99) for a free worker"
                        if wait_p99 is not None else "")),
            evidence=evidence,
            recommendation=(f"Raise executor_thread_pool_size on {service} from about "
                            f"{per_process} to {2 * per_process} if its handlers wait on I/O "
                            f"(a database, other services); if they use CPU, add processes "
                            f"instead ({workers_option(service)})."),
            option=POOL_OPTION, set_on=[service],
            confidence=confidence(max(received, waited), window.seconds)))
    return found


# -- workers, by Little's law ---------------------------------------------------

def workers(inputs):
    """Busy handlers = arrival rate x processing time (Little's law), against
    the handlers there are: the executor pools' sizes, or oslo.messaging's
    default of 64 per process when they are not measured."""
    window = inputs.window
    found = []
    for key in window.keys("received"):
        service, topic = key
        received = window.count("received", key)
        processing, total = window.histogram("processing", key)
        processing_mean = mean(processing, total)
        if received < MIN_CALLS or not processing_mean:
            continue
        arrival = received / window.seconds
        busy = arrival * processing_mean
        size = window.now.pool_size.get(key, 0.0)
        assumed = size <= 0
        processes = max(1, inputs.process_count(service))
        if assumed:
            size = DEFAULT_POOL_SIZE * processes
        utilisation = busy / size
        if utilisation < TARGET_UTILISATION:
            continue
        per_process = size / processes
        needed = math.ceil(busy / TARGET_UTILISATION / per_process)
        evidence = {"arrival_per_second": arrival, "processing_mean_seconds": processing_mean,
                    "busy_handlers": busy, "handlers": size, "pool_size_assumed": assumed,
                    "processes": processes, "utilisation": utilisation,
                    "processes_needed": needed}
        found.append(Finding(
            rule="workers",
            severity="critical" if utilisation >= 1.0 else "warning",
            subject=subject(service, topic=topic),
            finding=(f"{service} (topic {topic}) keeps {formatting.number(busy)} handlers busy "
                     f"on average ({_rate(arrival)} x {_s(processing_mean)}) out of "
                     f"{size:.0f}: {_pct(utilisation)}"
                     + (" (executor_thread_pool_size not measured: 64 per process assumed)"
                        if assumed else "")),
            evidence=evidence,
            recommendation=(f"Run {service} with {needed} processes ({workers_option(service)}; "
                            f"now {processes}) so that busy handlers stay under "
                            f"{_pct(TARGET_UTILISATION)} of them, or make each call shorter."),
            option=workers_option(service), set_on=[service],
            confidence=confidence(received, window.seconds)))
    return found


def api_workers(inputs):
    """Little's law for a REST API: requests in service at once = arrival
    rate x request time, against the processes that report for the service,
    as if each served one request at a time (uWSGI or mod_wsgi without
    threads; said in the finding: threads or eventlet serve more)."""
    window = inputs.window
    found = []
    for (service,) in window.keys("http_served"):
        served = window.count("http_served", (service,))
        durations, total = window.histogram("http_duration", (service,))
        duration = mean(durations, total)
        processes = inputs.process_count(service)
        if served < MIN_CALLS or not duration or not processes:
            continue
        arrival = served / window.seconds
        busy = arrival * duration
        utilisation = busy / processes
        if utilisation < TARGET_UTILISATION:
            continue
        needed = math.ceil(busy / TARGET_UTILISATION)
        option = API_WORKERS_OPTIONS.get(service, "its WSGI server's processes")
        found.append(Finding(
            rule="api_workers", severity="info",
            subject=subject(service),
            finding=(f"{service} has {formatting.number(busy)} requests in service on average "
                     f"({_rate(arrival)} x {_s(duration)}) over {processes} processes: "
                     f"{_pct(utilisation)} if each serves one at a time"),
            evidence={"arrival_per_second": arrival, "request_mean_seconds": duration,
                      "requests_in_service": busy, "processes": processes,
                      "utilisation_one_at_a_time": utilisation, "processes_needed": needed},
            recommendation=(f"If {service}'s processes serve one request at a time (uWSGI or "
                            f"mod_wsgi without threads), run {needed} ({option}); with threads "
                            "or eventlet they serve more, and this is only a bound."),
            option=option, set_on=[service],
            confidence=confidence(served, window.seconds)))
    return found


# -- queues with no consumer ----------------------------------------------------

def queue_without_consumer(inputs):
    window = inputs.window
    found, seen = [], set()
    sent_topics = sorted({topic for _caller, topic in window.keys("sent")} | set(inputs.consumers))

    def finding(topic, what, evidence, observations):
        seen.add(topic)
        server = _server(inputs, topic)
        callers = sorted({c for c, t in window.keys("sent") if t == topic
                          and window.count("sent", (c, t)) > 0})
        consumed = server != topic
        found.append(Finding(
            rule="queue_without_consumer", severity="critical",
            subject=subject(server, topic=topic),
            finding=what,
            evidence=dict(evidence, callers=callers),
            recommendation=(
                (f"Start {server} (it consumed {topic} before); if it runs, check that "
                 f"its transport_url names this broker and virtual host."
                 if consumed else
                 f"Start the service that consumes {topic}, or check its transport_url.")
                + (f" Meanwhile {', '.join(callers)} wait for replies that will not come."
                   if callers else "")),
            option=TRANSPORT_OPTION, set_on=[server] if consumed else [],
            confidence=confidence(observations, window.seconds)))

    for topic in sent_topics:
        queue = (inputs.queues or {}).get(topic)
        if queue and queue["consumers"] == 0 and queue["ready"] > 0:
            finding(topic, f"RabbitMQ queue {topic} holds {queue['ready']} messages and has "
                           "no consumer", {"ready": queue["ready"], "consumers": 0},
                    queue["ready"])
    for topic in sent_topics:
        if topic in seen:
            continue
        sent = sum(window.count("sent", (c, t)) for c, t in window.keys("sent") if t == topic)
        received = sum(window.count("received", (s, t)) for s, t in window.keys("received")
                       if t == topic)
        timeouts = sum(window.count("timeouts", (c, t)) for c, t in window.keys("timeouts")
                       if t == topic)
        answered = sum(sum(window.histogram("waits", (c, t))[0].counts)
                       for c, t in window.keys("waits") if t == topic)
        # A topic consumed before that nobody receives now; or one that no
        # instrumented service ever consumed whose calls all time out (a
        # consumer without commlens would answer them).
        stopped = topic in inputs.consumers and sent >= MIN_UNRECEIVED and received == 0
        never = (topic not in inputs.consumers and timeouts >= MIN_UNRECEIVED
                 and answered == 0)
        if stopped or never:
            finding(topic, f"nothing sent to topic {topic} was received in the last "
                           f"{_s(window.seconds)} ({sent:.0f} sent, {timeouts:.0f} calls "
                           "timed out)", {"sent": sent, "received": 0, "timeouts": timeouts},
                    sent)
    unreceived = {}
    for (topic, method, kind), value in inputs.unreceived.items():
        if value > 0 and topic not in seen:
            unreceived.setdefault(topic, {})[f"{method} ({kind})"] = value
    for topic, methods in sorted(unreceived.items()):
        total = sum(methods.values())
        if total >= MIN_UNRECEIVED:
            finding(topic, f"{total:.0f} messages sent to topic {topic} were never received "
                           f"({', '.join(sorted(methods))})", {"unreceived": methods}, total)
    return found


# -- waits that grow ------------------------------------------------------------

def waits_growing(inputs):
    """Reply waits of the window against the baseline before it, and where
    the growth went: the server's processing, its pool wait, or the rest
    (the queue and the broker: time before a worker took the message)."""
    window, baseline = inputs.window, inputs.baseline
    found = []
    for key in window.keys("waits"):
        caller, topic = key
        now, now_total = window.histogram("waits", key)
        then, then_total = baseline.histogram("waits", key)
        if sum(now.counts) < MIN_GROWTH_CALLS or sum(then.counts) < MIN_GROWTH_CALLS:
            continue
        p99_now, p99_then = quantile(0.99, now), quantile(0.99, then)
        if p99_now < GROWTH_FACTOR * p99_then or p99_now - p99_then < MIN_GROWTH_SECONDS:
            continue
        server = _server(inputs, topic)
        parts = {part: _method_growth(window, baseline, key, server, field)
                 for part, field in (("processing", "method_processing"),
                                     ("pool_wait", "method_pool_wait"))}
        growth = mean(now, now_total) - mean(then, then_total)
        parts["queue"] = max(0.0, growth - parts["processing"] - parts["pool_wait"])
        where = max(parts, key=lambda p: parts[p])
        option, advice = {
            "processing": (workers_option(server),
                           f"each call got slower on {server} itself: look at what it waits "
                           f"for (its database, a lock, another service); until then, "
                           f"enough {server} processes ({workers_option(server)}) keep the "
                           "queue from growing behind the slow calls"),
            "pool_wait": (POOL_OPTION, f"calls wait for a free worker on {server}: raise "
                                       "executor_thread_pool_size if its handlers wait on I/O"),
            "queue": (workers_option(server), f"calls wait in the queue before {server} takes "
                                              f"them: add {server} processes "
                                              f"({workers_option(server)})"),
        }[where]
        found.append(Finding(
            rule="waits_growing", severity="warning",
            subject=subject(server, caller, topic),
            finding=(f"{caller}'s reply waits on topic {topic} grew from {_s(p99_then)} to "
                     f"{_s(p99_now)} (p99, last {_s(window.seconds)} against the "
                     f"{_s(baseline.seconds)} before); most of the growth is {server}'s "
                     + {"processing": "processing", "pool_wait": "wait for a free worker",
                        "queue": "queue"}[where]),
            evidence={"wait_p99_seconds": p99_now, "baseline_wait_p99_seconds": p99_then,
                      "wait_mean_growth_seconds": growth,
                      "growth_seconds": {p: round(v, 6) for p, v in parts.items()},
                      "waiting_replies": window.now.waiting.get(key, 0.0),
                      "calls": sum(now.counts), "baseline_calls": sum(then.counts)},
            recommendation=advice[0].upper() + advice[1:] + ".",
            option=option, set_on=[server],
            confidence=confidence(sum(now.counts) + sum(then.counts),
                                  window.seconds + baseline.seconds)))
    return found


def _method_growth(window, baseline, key, server, field):
    """How much longer, on average, ``server``'s part ``field`` (processing,
    pool wait) of the calls of ``key`` (caller, topic) got: each method's
    growth, weighted by the caller's calls of it in the window."""
    caller, topic = key
    weighted = calls = 0.0
    for _caller, _topic, method in (k for k in window.keys("method_waits") if k[:2] == key):
        n = sum(window.histogram("method_waits", (caller, topic, method))[0].counts)
        now, then = (mean(*span.histogram(field, (server, topic, method)))
                     for span in (window, baseline))
        if n and now is not None:
            weighted += n * (now - (then or 0.0))
            calls += n
    return weighted / calls if calls else 0.0


# -- callers retrying into a failing service ------------------------------------

def retrying_into_failure(inputs):
    """Most attempts fail and there are many more of them than before: a
    caller retrying into a service that cannot answer adds to its load."""
    window, baseline = inputs.window, inputs.baseline
    found = []
    edges = [("rpc", key, "sent", "failures") for key in window.keys("sent")]
    edges += [("http", key, None, None) for key in sorted(window.now.http)]
    for protocol, key, attempts_field, failures_field in edges:
        caller, target = key
        if protocol == "rpc":
            attempts, failures = (window.count(attempts_field, key),
                                  window.count(failures_field, key))
            before = baseline.count(attempts_field, key)
            server = _server(inputs, target)
        else:
            now, then, earlier = (window.now.http.get(key, [0, 0]),
                                  window.then.http.get(key, [0, 0]),
                                  baseline.then.http.get(key, [0, 0]))
            attempts, failures = now[0] - then[0], now[1] - then[1]
            before = then[0] - earlier[0]
            server = target
        if (attempts <= 0 or failures < MIN_CALLS or failures / attempts < RETRY_FAILURE_RATIO
                or before <= 0):
            continue
        rate_now, rate_before = attempts / window.seconds, before / baseline.seconds
        if rate_now < RETRY_GROWTH * rate_before:
            continue
        if protocol == "http":
            section = REST_CLIENT_SECTIONS.get(target, f"[{target}]")
            option = f"{section} status_code_retries, connect_retries"
            advice = (f"Lower {caller}'s retries of {target} ({option}, keystoneauth) or give "
                      "them a back-off (status_code_retry_delay), and fix what makes "
                      f"{target} fail.")
        else:
            option = None
            advice = (f"{caller} retries in its own code (oslo.messaging does not retry "
                      f"calls): give it a back-off, and fix what makes {server} fail.")
        found.append(Finding(
            rule="retrying_into_failure", severity="critical",
            subject=subject(server, caller, target if protocol == "rpc" else None),
            finding=(f"{caller} sends {formatting.number(rate_now / rate_before)} times as "
                     f"many {'calls' if protocol == 'rpc' else 'requests'} to {server} as "
                     f"before ({_rate(rate_now)} against {_rate(rate_before)}) and "
                     f"{_pct(failures / attempts)} of them fail"),
            evidence={"protocol": protocol, "attempts_per_second": rate_now,
                      "baseline_attempts_per_second": rate_before, "failures": failures,
                      "failure_ratio": failures / attempts},
            recommendation=advice, option=option, set_on=[caller],
            confidence=confidence(attempts + before, window.seconds + baseline.seconds)))
    return found


RULES = (rpc_response_timeout, executor_thread_pool_size, workers, api_workers,
         queue_without_consumer, waits_growing, retrying_into_failure)


# -- the emulator's runs ----------------------------------------------------------

def emulated_run(run):
    """Findings from one ``commlens emulate`` run's own figures: the emulated
    agents' state reports that timed out or were skipped because the control
    plane was behind (emulator/scale.py), and its conductor pool."""
    found = []
    agents, interval = run["agents"], run["interval"]
    reports = run["reports_ok"] + run["report_timeouts"] + run["report_errors"]
    late = run["report_timeouts"] + run["reports_skipped"]
    window = run["window_seconds"]
    if late and reports + run["reports_skipped"]:
        handled = run["control_plane_rpc_per_second"]
        offered = agents / interval
        suggested = _seconds_up(agents / handled) if handled else None
        found.append(Finding(
            rule="report_interval", severity="critical",
            subject=subject("nova-conductor"),
            finding=(f"{late} of {reports + run['reports_skipped']} state reports of {agents} "
                     f"agents every {_s(interval)} timed out or were skipped: the control "
                     f"plane answered {_rate(handled)} of the {_rate(offered)} offered"),
            evidence={"agents": agents, "interval_seconds": interval,
                      "offered_per_second": offered, "answered_per_second": handled,
                      "report_timeouts": run["report_timeouts"],
                      "reports_skipped": run["reports_skipped"]},
            recommendation=(f"Add conductor processes ({workers_option('nova-conductor')})"
                            + (f", or raise report_interval to {suggested} s or more"
                               if suggested else "") + "."),
            option=REPORT_INTERVAL_OPTIONS["nova-compute"],
            set_on=sorted(REPORT_INTERVAL_OPTIONS),
            confidence=confidence(reports, window)))
    pool = run.get("conductor_pool") or {}
    if pool.get("size") and pool.get("peak_in_flight", 0) / pool["size"] >= POOL_PEAK:
        found.append(Finding(
            rule="executor_thread_pool_size", severity="warning",
            subject=subject("nova-conductor", topic="conductor"),
            finding=(f"the emulated conductor's executor had {pool['peak_in_flight']} of its "
                     f"{pool['size']} workers busy at its peak"),
            evidence=dict(pool), recommendation=(
                f"Raise executor_thread_pool_size on nova-conductor from {pool['size']} to "
                f"{2 * pool['size']}, or add conductor processes."),
            option=POOL_OPTION, set_on=["nova-conductor"],
            confidence=confidence(reports, window)))
    return [f.as_dict() for f in found]
