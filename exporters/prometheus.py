"""Prometheus exposition of the collector's merged view."""

from prometheus_client import core
from prometheus_client import exposition
from prometheus_client import registry as prom_registry

from commlens.tracer import metrics

_BOUNDS = [repr(float(b)) for b in metrics.LATENCY_BUCKETS] + ["+Inf"]

COLLECTOR_MESSAGES = metrics.Metric(
    "commlens_collector_messages_total", "counter", ("outcome",),
    "Messages the collector received, by outcome (accepted, stale, "
    "malformed, foreign, rejected).")
COLLECTOR_INVALID_SERIES = metrics.Metric(
    "commlens_collector_invalid_series_total", "counter", (),
    "Series in accepted messages that did not match the metric schema.")
COLLECTOR_PROCESSES = metrics.Metric(
    "commlens_collector_processes", "gauge", ("service",),
    "Processes currently reporting to this collector.")
COLLECTOR_INTAKE_UP = metrics.Metric(
    "commlens_collector_intake_up", "gauge", (),
    "1 while the collector is connected to where agents ship, else 0.")


class CollectorExposition:
    """A prometheus_client collector reading a commlens Collector."""

    def __init__(self, collector, intake=None):
        self._collector = collector
        self._intake = intake

    def collect(self):
        counters, histograms, gauges = self._collector.merged()
        families = {}
        for metric in metrics.SHIPPED.values():
            families[metric.name] = _family(metric)
        for (name, labels), value in counters.items():
            families[name].add_metric(list(labels), value)
        for (name, labels), value in gauges.items():
            families[name].add_metric(list(labels), value)
        for (name, labels), (counts, total) in histograms.items():
            cumulative, running = [], 0
            for bound, count in zip(_BOUNDS, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            families[name].add_metric(list(labels), cumulative, total)
        yield from families.values()

        messages = _family(COLLECTOR_MESSAGES)
        for outcome, count in sorted(self._collector.message_counts().items()):
            messages.add_metric([outcome], count)
        yield messages
        invalid = _family(COLLECTOR_INVALID_SERIES)
        invalid.add_metric([], self._collector.invalid_series)
        yield invalid
        processes = _family(COLLECTOR_PROCESSES)
        per_service = {}
        for process in self._collector.processes():
            per_service[process["service"]] = per_service.get(process["service"], 0) + 1
        for service, count in sorted(per_service.items()):
            processes.add_metric([service], count)
        yield processes
        if self._intake is not None:
            up = _family(COLLECTOR_INTAKE_UP)
            up.add_metric([], 1 if self._intake.connected else 0)
            yield up


def _family(metric):
    name = metric.name
    if metric.kind == "counter":
        return core.CounterMetricFamily(name, metric.help, labels=metric.labels)
    if metric.kind == "gauge":
        return core.GaugeMetricFamily(name, metric.help, labels=metric.labels)
    return core.HistogramMetricFamily(name, metric.help, labels=metric.labels)


def render(collector, intake=None):
    """(body bytes, content type) of the Prometheus text format."""
    registry = prom_registry.CollectorRegistry(auto_describe=False)
    registry.register(CollectorExposition(collector, intake))
    return exposition.generate_latest(registry), exposition.CONTENT_TYPE_LATEST
