"""Writes dashboards/alerts/tests/noise.test.yml: the alert rules against
generated noise (issue 18, item 7).

Hand-written promtool cases (rpc.test.yml, chains_rest.test.yml) say what
fires on clean series; these say what a production Prometheus sees: hours
of series that wobble, with the one-off events every control plane has (a
single MessagingTimeout, a burst of them when the broker blips, an error
chain that happens once), on which no alert may fire at any minute; and
real faults inside the same noise, which must fire.

The series are drawn from a seeded generator, so the file is the same on
every run: ``python dashboards/alerts/tests/noise.py`` writes it, ``--check``
says whether the committed one is current (tests/test_alert_rules.py runs
that). Samples are 30 s apart, a ServiceMonitor's scrape interval; rules
are evaluated every 30 s.
"""

import argparse
import pathlib
import random
import sys

OUTPUT = pathlib.Path(__file__).parent / "noise.test.yml"
RUNBOOKS = "https://github.com/commlens/commlens/blob/main/docs/runbooks.md#"
STEP = 30  # seconds between samples, and between evaluations
MINUTES = 350
PER_MINUTE = 60 // STEP
SAMPLES = MINUTES * PER_MINUTE + 1


# -- series -------------------------------------------------------------------

def wobble(rng, level, samples=SAMPLES, keep=0.5):
    """In-flight calls around ``level``: as wide as a Poisson count's
    (standard deviation the square root of the level), never below 0, each
    sample keeping ``keep`` of the last one's offset (calls of tens of
    seconds overlap two scrapes), with a batch of slow calls now and then
    (about once an hour, up to 2 minutes, up to twice the level)."""
    values, offset, burst = [], 0.0, 0
    spread = max(1.0, level ** 0.5) * (1 - keep ** 2) ** 0.5
    for _ in range(samples):
        offset = keep * offset + rng.gauss(0, spread)
        if burst == 0 and rng.random() < 1 / 120:  # about once an hour
            burst = rng.randint(1, 2 * PER_MINUTE)
            extra = rng.randint(2, max(3, int(level)))
        value = level + offset + (extra if burst else 0)
        burst = max(0, burst - 1)
        values.append(max(0, round(value)))
    return values


def counter(increments):
    """Cumulative values of per-sample increments."""
    total, values = 0, []
    for increment in increments:
        total += increment
        values.append(total)
    return values


def sporadic(rng, samples, every_minutes):
    """Per-sample increments of single events, one every ``every_minutes``
    on average."""
    chance = 1 / (every_minutes * PER_MINUTE)
    return [1 if rng.random() < chance else 0 for _ in range(samples)]


def at(minute):
    return minute * PER_MINUTE


# -- the test groups -----------------------------------------------------------

def flat_waits(rng):
    """Waiting replies at three levels, flat for 350 minutes: never growing."""
    series = [(f'commlens_rpc_waiting_replies{{service="{service}",target="{target}",'
               f'method="{method}"}}', wobble(rng, level))
              for service, target, method, level in (
                  ("nova-compute", "conductor", "object_action", 3),
                  ("nova-api", "conductor", "build_instances", 15),
                  ("neutron-openvswitch-agent", "q-plugin", "get_devices_details_list", 40))]
    return ("Waiting replies that wobble around 3, 15 and 40, with batches of slow "
            "calls, for 350 minutes: never growing.",
            series, quiet("CommlensRpcReplyWaitsGrowing", range(1, MINUTES + 1)))


def growing_waits(rng):
    """Noise around 4, then 3 more calls waiting a minute for 25 minutes (a
    conductor answering 1 call a second 0.05 a second slower than they come,
    under long timeouts), then answered."""
    noise = wobble(rng, 4)
    growth = [0.0] * SAMPLES
    for i in range(at(100), at(125)):
        growth[i] = (i - at(100)) * 3 / PER_MINUTE
    values = [round(n + g) for n, g in zip(noise, growth, strict=True)]
    name = ('commlens_rpc_waiting_replies{service="nova-api",target="conductor",'
            'method="build_instances"}')
    firing = values[at(122)]
    cases = quiet("CommlensRpcReplyWaitsGrowing", (95, 100, 200, 300))
    cases.append(fires(
        122, "CommlensRpcReplyWaitsGrowing", {"severity": "warning", "target": "conductor"},
        {"summary": "RPC calls waiting for a reply from conductor keep growing",
         "description": f"{firing} RPC calls to topic conductor are waiting for a reply and "
                        "the number has been rising for 10 minutes. Its consumers are "
                        "stopped, stuck or too slow.",
         "runbook_url": RUNBOOKS + "commlensrpcreplywaitsgrowing"}))
    return ("Noise around 4, then waits growing by 3 a minute from minute 100 to 125: "
            "firing by minute 122, quiet before and after.", [(name, values)], cases)


def _calls(service, target, method, per_second):
    labels = f'service="{service}",target="{target}",method="{method}"'
    step = per_second * STEP
    return labels, [
        (f'commlens_rpc_sent_total{{{labels},kind="call"}}', counter([step] * SAMPLES)),
        (f"commlens_rpc_timeout_budget_used_count{{{labels}}}", counter([step] * SAMPLES)),
    ]


def _errors_and_over_half(labels, timeouts):
    """A call's timeout counts on both counters (a timed-out call used all of it)."""
    return [
        (f'commlens_rpc_call_errors_total{{{labels},outcome="timeout",error="MessagingTimeout"}}',
         counter(timeouts)),
        (f"commlens_rpc_calls_over_half_timeout_total{{{labels}}}", counter(timeouts)),
    ]


def sporadic_timeouts(rng):
    """Single timeouts (one every 20 minutes on a busy method, one in all on
    a quiet one) and one burst of 8 when the broker blips: never a page."""
    labels, series = _calls("nova-conductor", "compute", "build_and_run_instance", 1)
    timeouts = sporadic(rng, SAMPLES, 20)
    timeouts[at(200)] += 8
    series += _errors_and_over_half(labels, timeouts)
    quiet_labels, quiet_series = _calls("nova-compute", "conductor", "object_action", 0.05)
    single = [0] * SAMPLES
    single[at(150)] = 1
    series += quiet_series + _errors_and_over_half(quiet_labels, single)
    minutes = range(1, MINUTES + 1)
    return ("Single MessagingTimeouts (one every 20 minutes at 1 call/s, one in all at "
            "0.05 calls/s) and a burst of 8 at minute 200: no page, no warning.",
            series, quiet("CommlensRpcTimeouts", minutes)
            + quiet("CommlensRpcCallsNearTimeout", minutes))


def creeping_to_timeouts(rng):
    """Calls creep past half their timeout (10 % of them from minute 100),
    then time out (0.2/s from minute 130): the warning first, the page later."""
    labels, series = _calls("nova-conductor", "compute", "build_and_run_instance", 1)
    noise = sporadic(rng, SAMPLES, 20)
    over_half, timeouts = list(noise), list(noise)
    for i in range(at(100), SAMPLES):
        over_half[i] = 0.1 * STEP
    for i in range(at(130), SAMPLES):
        timeouts[i] = 0.2 * STEP
        over_half[i] = 0.3 * STEP  # the timed-out calls, and as many near it
    series += [
        (f'commlens_rpc_call_errors_total{{{labels},outcome="timeout",error="MessagingTimeout"}}',
         counter(timeouts)),
        (f"commlens_rpc_calls_over_half_timeout_total{{{labels}}}", counter(over_half)),
    ]
    which = {"service": "nova-conductor", "target": "compute",
             "method": "build_and_run_instance"}
    cases = quiet("CommlensRpcCallsNearTimeout", (95, 100))
    cases += quiet("CommlensRpcTimeouts", (95, 100, 120, 130, 135))
    cases.append(fires(
        120, "CommlensRpcCallsNearTimeout", dict(which, severity="warning"),
        {"summary": "nova-conductor calls to compute.build_and_run_instance run close to "
                    "their timeout",
         "description": "30 calls from nova-conductor to compute.build_and_run_instance used "
                        "more than half of their timeout in the last 5 minutes. Timeouts "
                        "come next.",
         "runbook_url": RUNBOOKS + "commlensrpccallsneartimeout"}))
    cases.append(fires(
        145, "CommlensRpcTimeouts", dict(which, severity="critical"),
        {"summary": "nova-conductor times out calling compute.build_and_run_instance",
         "description": "nova-conductor got 60 MessagingTimeouts on "
                        "compute.build_and_run_instance in the last 5 minutes, over 2 % of "
                        "its calls.",
         "runbook_url": RUNBOOKS + "commlensrpctimeouts"}))
    return ("Noise, then 10 % of the calls past half their timeout from minute 100 and "
            "timeouts at 0.2/s from minute 130: the warning by minute 120, the page by 145.",
            series, cases)


_CHAIN_LABELS = ("origin_service", "origin_operation", "origin_error", "entry_service",
                 "entry_operation")


def _chain(origin, operation, error, entry, entry_operation):
    values = (origin, operation, error, entry, entry_operation)
    return "commlens_error_chain_total{" + ",".join(
        f'{k}="{v}"' for k, v in zip(_CHAIN_LABELS, values, strict=True)) + "}"


def _chain_values(occurrences):
    """A chain counter's samples: absent until its first occurrence, then
    its count (the collector exposes a chain once it has happened)."""
    values, count = [], 0
    for i in range(SAMPLES):
        count += occurrences.get(i, 0)
        values.append(count if count else None)
    return values


def one_off_chains(rng):
    """A chain that has always been there, and new ones that happen once or
    twice, hours apart: none is a new way of failing."""
    # The old one grows only after minute 60: before, there is no hour
    # before for ``offset 1h`` to find it in, as on a Prometheus just started.
    old = [1] + [0] * (at(60) - 1) + sporadic(rng, SAMPLES - at(60), 15)
    series = [(_chain("neutron-server", "PUT /v2.0/ports/{id}/binding", "409 PortBindingFailed",
                      "nova-api", "POST /v2.1/servers"), counter(old))]
    errors = ("ValueError", "404", "409 Conflict", "MessagingTimeout", "DBDeadlock",
              "500 InternalServerError")
    for n, error in enumerate(errors):
        first = rng.randrange(at(10), at(MINUTES - 10))
        occurrences = {first: 1}
        if n % 3 == 0:  # a second time, over an hour later
            occurrences[min(SAMPLES - 1, first + at(70) + rng.randrange(at(30)))] = 1
        series.append((_chain("placement-api", f"GET /resource_providers/{n}", error,
                              "nova-api", "POST /v2.1/servers"), _chain_values(occurrences)))
    return ("New error chains that happen once or twice, over an hour apart, beside one "
            "that has always been there: never a new chain.",
            series, quiet("CommlensErrorChainNew", range(1, MINUTES + 1)))


def recurring_new_chain(_rng):
    """A chain that appears at minute 200 and comes back every minute."""
    name = _chain("neutron-server", "POST /v2.0/ports", "500 IpAddressGenerationFailure",
                  "nova-api", "POST /v2.1/servers")
    occurrences = {i: 1 for i in range(at(200), SAMPLES, PER_MINUTE)}
    values = _chain_values(occurrences)
    labels = {"severity": "warning", "origin_service": "neutron-server",
              "origin_operation": "POST /v2.0/ports",
              "origin_error": "500 IpAddressGenerationFailure", "entry_service": "nova-api",
              "entry_operation": "POST /v2.1/servers"}
    cases = quiet("CommlensErrorChainNew", (199, 201, 203))
    cases.append(fires(206, "CommlensErrorChainNew", labels, {
        "summary": "New error chain from neutron-server to nova-api",
        "description": "Errors that started at neutron-server POST /v2.0/ports (500 "
                       "IpAddressGenerationFailure) now reach nova-api POST /v2.1/servers; "
                       "this chain was not seen an hour ago and has happened "
                       f"{values[at(206)]} times since.",
        "runbook_url": RUNBOOKS + "commlenserrorchainnew"}))
    cases += quiet("CommlensErrorChainNew", (262, 300))  # seen an hour ago by then
    return ("A new chain at minute 200 that comes back every minute: new from its third "
            "time, for an hour.", [(name, values)], cases)


GROUPS = (flat_waits, growing_waits, sporadic_timeouts, creeping_to_timeouts,
          one_off_chains, recurring_new_chain)


# -- promtool's format ----------------------------------------------------------

def quiet(alertname, minutes):
    return [{"eval_time": f"{m}m", "alertname": alertname, "exp_alerts": []} for m in minutes]


def fires(minute, alertname, labels, annotations):
    return {"eval_time": f"{minute}m", "alertname": alertname,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]}


def _number(value):
    if value is None:
        return "_"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quoted(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render():
    rng = random.Random(18)
    lines = [
        "# GENERATED by dashboards/alerts/tests/noise.py: do not edit; run it again.",
        "# The alert rules against hours of generated noise, and real faults within it.",
        "rule_files:",
        "  - ../commlens.rules.yml",
        f"evaluation_interval: {STEP}s",
        "",
        "tests:",
    ]
    for group in GROUPS:
        comment, series, cases = group(rng)
        lines += ["  # " + comment, f"  - interval: {STEP}s", "    input_series:"]
        for name, values in series:
            lines.append(f"      - series: '{name}'")
            lines.append(f"        values: '{' '.join(map(_number, values))}'")
        lines.append("    alert_rule_test:")
        for case in cases:
            lines.append(f"      - eval_time: {case['eval_time']}")
            lines.append(f"        alertname: {case['alertname']}")
            if not case["exp_alerts"]:
                lines.append("        exp_alerts: []")
                continue
            lines.append("        exp_alerts:")
            for alert in case["exp_alerts"]:
                lines.append("          - exp_labels:")
                for key, value in alert["exp_labels"].items():
                    lines.append(f"              {key}: {_quoted(value)}")
                lines.append("            exp_annotations:")
                for key, value in alert["exp_annotations"].items():
                    lines.append(f"              {key}: {_quoted(value)}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed file is not what this writes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else None
        if current != text:
            print(f"{OUTPUT} is out of date: run python {pathlib.Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
