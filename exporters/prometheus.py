"""Prometheus exposition of the collector's merged view."""

from prometheus_client import core
from prometheus_client import exposition
from prometheus_client import registry as prom_registry
from prometheus_client import samples
from prometheus_client.openmetrics import exposition as openmetrics

from commlens.exporters import exemplars as exemplars_mod

from commlens.exporters import graph
from commlens.tracer import metrics

_BOUNDS = [repr(float(b)) for b in metrics.LATENCY_BUCKETS] + ["+Inf"]

COLLECTOR_MESSAGES = metrics.Metric(
    "commlens_collector_messages_total", "counter", ("outcome",),
    "Messages the collector received, by outcome (accepted, stale, malformed, "
    "foreign, rejected, too_large, too_many_processes, rebaselined).")
COLLECTOR_INVALID_SERIES = metrics.Metric(
    "commlens_collector_invalid_series_total", "counter", (),
    "Series in accepted messages that did not match the metric schema.")
COLLECTOR_REFUSED_SERIES = metrics.Metric(
    "commlens_collector_series_refused_total", "counter", ("reason",),
    "Valid series the collector did not take because of a cap "
    "(reason: process_cap, total_cap).")
COLLECTOR_PROCESSES = metrics.Metric(
    "commlens_collector_processes", "gauge", ("service",),
    "Processes currently reporting to this collector.")
CHAIN_LABELS = ("origin_service", "origin_operation", "origin_error", "entry_service",
                "entry_operation")
ERROR_CHAINS = metrics.Metric(
    "commlens_error_chain_total", "counter", CHAIN_LABELS,
    "Error propagation chains that reached their entry point, by origin and entry "
    "(the first label sets seen are kept; the rest are summed as 'other').")
ABSORBED_CHAINS = metrics.Metric(
    "commlens_error_chain_absorbed_total", "counter", CHAIN_LABELS,
    "Error chains a caller caught and turned into a success (retry, fallback); "
    "entry is the hop that absorbed the error.")
COLLECTOR_HOPS = metrics.Metric(
    "commlens_collector_hops_total", "counter", ("outcome",),
    "Hops received, by outcome (assembled, duplicate, trace_full, invalid).")
COLLECTOR_TRACES_CLOSED = metrics.Metric(
    "commlens_collector_traces_closed_total", "counter", ("reason",),
    "Traces closed: after a quiet period, or early because the window was full.")
COLLECTOR_OPEN_TRACES = metrics.Metric(
    "commlens_collector_open_traces", "gauge", (),
    "Traces being assembled in the window.")
COLLECTOR_HISTORY_ERRORS = metrics.Metric(
    "commlens_collector_history_errors_total", "counter", (),
    "Failed reads or writes of the history store.")
BROKER_QUEUE_MESSAGES = metrics.Metric(
    "commlens_broker_queue_messages", "gauge", ("queue", "state"),
    "Messages in RPC topic queues, from RabbitMQ's management API (state: ready, unacked).")
BROKER_QUEUE_CONSUMERS = metrics.Metric(
    "commlens_broker_queue_consumers", "gauge", ("queue",),
    "Consumers of RPC topic queues, from RabbitMQ's management API.")
BROKER_UP = metrics.Metric(
    "commlens_broker_management_up", "gauge", (),
    "1 when the last poll of RabbitMQ's management API worked, else 0.")
UNRECEIVED_MESSAGES = metrics.Metric(
    "commlens_rpc_unreceived_messages", "gauge", ("target", "method", "kind"),
    "Casts, fanouts and notifications (kind notification; method: the event type) sent "
    "over the lost-message window (5 minutes, ending a grace period ago) and not "
    "received by any instrumented server; a lower bound (exporters/lost.py).")
COLLECTOR_OTLP_EXPORTED = metrics.Metric(
    "commlens_collector_otlp_spans_exported_total", "counter", (),
    "Hops the tracing backend took as OTLP spans (--otlp-endpoint).")
COLLECTOR_OTLP_DROPPED = metrics.Metric(
    "commlens_collector_otlp_spans_dropped_total", "counter", ("reason",),
    "Hops not exported as OTLP spans (reason: queue_full, the backend is slower than "
    "the intake or down; export_failed, the backend refused, did not answer in time or "
    "could not be reached; encoding_failed).")
COLLECTOR_OTLP_QUEUE = metrics.Metric(
    "commlens_collector_otlp_queue_spans", "gauge", (),
    "Hops waiting to be exported as OTLP spans.")
COLLECTOR_INTAKE_UP = metrics.Metric(
    "commlens_collector_intake_up", "gauge", (),
    "1 while the collector is connected to where agents ship, else 0.")


class CollectorExposition:
    """A prometheus_client collector reading a commlens Collector."""

    def __init__(self, collector, intake=None, exemplars=False):
        self._collector = collector
        self._intake = intake
        self._exemplars = exemplars

    def collect(self):
        collector = self._collector
        counters, histograms, gauges = collector.merged()
        consumers = graph.topic_consumers(counters)
        topics = graph.known_topics(counters)
        counters, histograms = graph.resolve_rpc_servers(counters, histograms, consumers)
        families = {}
        for metric in metrics.SHIPPED.values():
            families[metric.name] = _family(metric)
        if not collector.metrics_warmed_up():
            # Not every process has reported into these sums yet: a partial
            # sum would read as a counter reset, then a rate spike
            # (exporters/collector.py). Gauges are not cumulative: shown.
            counters, histograms = {}, {}
        for (name, labels), value in counters.items():
            families[name].add_metric(list(labels), value)
        for (name, labels), value in gauges.items():
            families[name].add_metric(list(labels), value)
        found = {}
        if self._exemplars and histograms:
            collector.exemplars.update(collector)
            found = collector.exemplars.for_series(histograms)
        for key, (counts, total, _low, _high) in histograms.items():
            cumulative, running = [], 0
            bucket_exemplars = found.get(key, {})
            for index, (bound, count) in enumerate(zip(_BOUNDS, counts, strict=True)):
                running += count
                exemplar = bucket_exemplars.get(index)
                if exemplar is not None and count:
                    trace_id, value, timestamp = exemplar
                    cumulative.append((bound, running, samples.Exemplar(
                        {exemplars_mod.TRACE_ID_LABEL: trace_id}, value, timestamp)))
                else:
                    cumulative.append((bound, running))
            families[key[0]].add_metric(list(key[1]), cumulative, total)
        yield from families.values()

        messages = _family(COLLECTOR_MESSAGES)
        for outcome, count in sorted(self._collector.message_counts().items()):
            messages.add_metric([outcome], count)
        yield messages
        invalid = _family(COLLECTOR_INVALID_SERIES)
        invalid.add_metric([], self._collector.invalid_series)
        yield invalid
        refused = _family(COLLECTOR_REFUSED_SERIES)
        for reason, count in sorted(collector.refused_series_counts().items()):
            refused.add_metric([reason], count)
        yield refused
        processes = _family(COLLECTOR_PROCESSES)
        per_service = {}
        for process in self._collector.processes():
            per_service[process["service"]] = per_service.get(process["service"], 0) + 1
        for service, count in sorted(per_service.items()):
            processes.add_metric([service], count)
        yield processes
        for metric, counts in ((ERROR_CHAINS, collector.chain_counter.entry_errors),
                               (ABSORBED_CHAINS, collector.chain_counter.absorbed)):
            family = _family(metric)
            for labels, count in sorted(counts.items()):
                family.add_metric(list(labels), count)
            yield family
        hops = _family(COLLECTOR_HOPS)
        for outcome, count in sorted(collector.window.hop_outcomes.items()):
            hops.add_metric([outcome], count)
        hops.add_metric(["invalid"], collector.invalid_hops)
        yield hops
        closed = _family(COLLECTOR_TRACES_CLOSED)
        for reason, count in sorted(collector.window.closed.items()):
            closed.add_metric([reason], count)
        yield closed
        open_traces = _family(COLLECTOR_OPEN_TRACES)
        open_traces.add_metric([], len(collector.window))
        yield open_traces
        history_errors = _family(COLLECTOR_HISTORY_ERRORS)
        history_errors.add_metric([], collector.history_errors)
        yield history_errors
        unreceived = _family(UNRECEIVED_MESSAGES)
        for labels, value in sorted(collector.lost_messages()[1].items()):
            unreceived.add_metric(list(labels), value)
        yield unreceived
        if collector.queue_watcher is not None:
            yield from _broker_families(collector.queue_watcher, topics)
        if collector.span_export is not None:
            yield from _otlp_families(collector.span_export)
        if self._intake is not None:
            up = _family(COLLECTOR_INTAKE_UP)
            up.add_metric([], 1 if self._intake.connected else 0)
            yield up
            yield _lost_family(self._intake)


# The intake's (exporters/intake.py): what the broker dropped from the
# collector's queue, counted from its dead-letter queue.
COLLECTOR_LOST = metrics.Metric(
    "commlens_collector_lost_total", "counter", ("what", "reason"),
    "What the broker dropped from the collector's queue before a collector read it, "
    "counted from the dead-letter queue (what: hops, snapshots, unreadable; "
    "reason: expired, maxlen, other).")


def _lost_family(intake):
    family = _family(COLLECTOR_LOST)
    for (what, reason), count in sorted(intake.lost_counts().items()):
        family.add_metric([what, reason], count)
    return family


def _otlp_families(span_export):
    exported, dropped = span_export.counts()
    family = _family(COLLECTOR_OTLP_EXPORTED)
    family.add_metric([], exported)
    yield family
    family = _family(COLLECTOR_OTLP_DROPPED)
    for reason, count in sorted(dropped.items()):
        family.add_metric([reason], count)
    yield family
    family = _family(COLLECTOR_OTLP_QUEUE)
    family.add_metric([], span_export.queued())
    yield family


def _broker_families(watcher, topics):
    up = _family(BROKER_UP)
    up.add_metric([], 1 if watcher.up else 0)
    yield up
    messages, consumer_counts = _family(BROKER_QUEUE_MESSAGES), _family(BROKER_QUEUE_CONSUMERS)
    queues = watcher.queues()
    # Only topic queues: their names are bounded, the broker's others are not.
    for topic in sorted(topics & set(queues)):
        queue = queues[topic]
        messages.add_metric([topic, "ready"], queue["ready"])
        messages.add_metric([topic, "unacked"], queue["unacked"])
        consumer_counts.add_metric([topic], queue["consumers"])
    yield messages
    yield consumer_counts


def _family(metric):
    name = metric.name
    if metric.kind == "counter":
        return core.CounterMetricFamily(name, metric.help, labels=metric.labels)
    if metric.kind == "gauge":
        return core.GaugeMetricFamily(name, metric.help, labels=metric.labels)
    return core.HistogramMetricFamily(name, metric.help, labels=metric.labels)


def render(collector, intake=None, accept=None):
    """(body bytes, content type): the Prometheus text format, or OpenMetrics
    with trace-id exemplars on the latency histograms when ``accept`` (the
    request's Accept header) asks for it, as Prometheus does with exemplar
    storage on."""
    generate, content_type = exposition.choose_encoder(accept or "")
    # Newer prometheus_client hands a functools.partial of it.
    with_exemplars = getattr(generate, "func", generate) is openmetrics.generate_latest
    registry = prom_registry.CollectorRegistry(auto_describe=False)
    registry.register(CollectorExposition(collector, intake, exemplars=with_exemplars))
    return generate(registry), content_type
