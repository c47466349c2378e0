"""What the broker drops from the collector's queue is counted, and the queue's TTL is set.

Real agents' shippers publish to a fresh exchange on the shared broker while
the collector is down; what expires in the collector's queue is dead-lettered
and counted when the collector is back. Every exchange and queue a test
declares is deleted at its end.
"""

import contextlib
import uuid

import pika
import pytest

from commlens.cli import main as cli_main
from commlens.exporters import intake
from commlens.tracer import context
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping
from commlens.tracer import wire
from support import collector_ready, run_collector, wait_for

pytestmark = pytest.mark.slow

# What commlens declared before dead-lettering: an existing queue of an upgrade.
OLD_QUEUE_ARGUMENTS = {"x-max-length": 100000, "x-overflow": "drop-head",
                       "x-message-ttl": 120000}


@pytest.fixture
def names(rabbitmq):
    """(export URL, exchange, queue) of this test alone; all deleted at the end."""
    run = uuid.uuid4().hex[:8]
    exchange, queue = f"commlens-losses-{run}", f"commlens.losses-{run}"
    yield (f"amqp://guest:guest@127.0.0.1:5672/?exchange={exchange}&queue={queue}",
           exchange, queue)
    with _channel() as channel:
        for name in (queue, queue + intake.DEAD_LETTER_SUFFIX):
            channel.queue_delete(queue=name)
        for name in (exchange, queue + intake.DEAD_LETTER_SUFFIX):
            channel.exchange_delete(exchange=name)


@contextlib.contextmanager
def _channel():
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _waiting(queue):
    with _channel() as channel:
        return channel.queue_declare(queue=queue, passive=True).method.message_count


def _hop(trace_id, span_id, service):
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": None,
            "service": service, "side": "server", "protocol": "rpc", "peer": None,
            "target": "topic", "operation": "build", "kind": "call", "outcome": "error",
            "error": "Boom", "start": 1.0e9, "duration": 0.01, "request_id": None,
            "global_request_id": None}


def _ship(recorder, export_url):
    transport = shipping.AmqpTransport(export_url)
    try:
        assert shipping.Shipper(recorder, transport, 1.0).ship_once()
    finally:
        transport.close()


def _consuming(collector):
    return collector_ready(collector) and collector.metrics().value(
        "commlens_collector_intake_up") == 1


def test_hops_that_expire_while_the_collector_is_down_are_counted_exactly(names, tmp_path):
    export_url, _exchange, queue = names
    with run_collector(export_url, tmp_path, ["--queue-ttl", "1"]) as first:
        wait_for(lambda: _consuming(first), timeout=30, message="collector consuming")
    # The collector is down; its queue stays and keeps what agents ship for 1 s.
    recorder = recorder_mod.Recorder("svc-lost")
    hops = 0
    for shipment in range(2):
        for _ in range(3):  # three traces: up to three hops messages per shipment
            trace_id = context.new_trace_id()
            for _ in range(4 + shipment):
                recorder.add_hop(_hop(trace_id, context.new_span_id(), recorder.service))
                hops += 1
        recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
        _ship(recorder, export_url)
    wait_for(lambda: _waiting(queue) == 0, timeout=30, message="every message expired")
    assert _waiting(queue + intake.DEAD_LETTER_SUFFIX) > 0

    with run_collector(export_url, tmp_path, ["--queue-ttl", "1"]) as second:
        wait_for(lambda: _consuming(second), timeout=30, message="collector back")
        second.wait_metric("commlens_collector_lost_total", hops, what="hops",
                           reason="expired")
        scrape = second.metrics()
        assert scrape.value("commlens_collector_lost_total", what="snapshots",
                            reason="expired") == 2
        assert scrape.value("commlens_collector_lost_total", reason="maxlen") == 0
        # Lost, not late: none of them reached the collector.
        assert scrape.value("commlens_rpc_sent_total", service="svc-lost") == 0


def test_an_old_queue_is_read_to_its_end_and_declared_again_with_dead_letters(
        names, tmp_path):
    export_url, exchange, queue = names
    with _channel() as channel:
        wire.declare_exchange(channel, exchange)
        channel.queue_declare(queue=queue, durable=False, auto_delete=False,
                              arguments=OLD_QUEUE_ARGUMENTS)
        channel.queue_bind(queue=queue, exchange=exchange, routing_key="#")
    recorder = recorder_mod.Recorder("svc-upgraded")
    for _ in range(3):
        recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
    _ship(recorder, export_url)
    assert _waiting(queue) == 1

    with run_collector(export_url, tmp_path, ["--queue-ttl", "30"]) as collector:
        wait_for(lambda: _consuming(collector), timeout=30, message="collector consuming")
        # What waited in the old queue was read, not dropped.
        collector.wait_metric("commlens_rpc_sent_total", 3, service="svc-upgraded")
        assert collector.metrics().value("commlens_collector_lost_total") == 0
        # And what is shipped now reaches the queue declared again.
        recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
        _ship(recorder, export_url)
        collector.wait_metric("commlens_rpc_sent_total", 4, service="svc-upgraded")
        log = collector.log()
    assert log.count("exists with other arguments") == 1
    assert "cannot consume" not in log
    # RabbitMQ accepts a declaration only with the arguments the queue has.
    with _channel() as channel:
        channel.queue_declare(queue=queue, durable=False, auto_delete=False,
                              arguments=intake.queue_arguments(
                                  30, queue + intake.DEAD_LETTER_SUFFIX))


def test_queue_ttl_comes_from_the_flag_or_the_environment_and_is_bounded(monkeypatch):
    parse = cli_main.build_parser().parse_args
    assert parse(["collector"]).queue_ttl == 120
    assert parse(["collector", "--queue-ttl", "10m"]).queue_ttl == 600
    monkeypatch.setenv("COMMLENS_QUEUE_TTL", "45")
    assert cli_main.build_parser().parse_args(["collector"]).queue_ttl == 45
    for bad in ("0", "-1", "abc", "60d"):
        with pytest.raises(SystemExit):
            parse(["collector", "--queue-ttl", bad])


def test_a_dead_letter_is_counted_by_its_reason_and_what_it_carried():
    counted = intake.AmqpIntake("amqp://guest:guest@127.0.0.1:5672/", collector=None)

    class Channel:
        def basic_ack(self, tag):
            pass

    class Method:
        delivery_tag = 1

    def dead_letter(reason, body):
        properties = pika.BasicProperties(headers={"x-death": [
            {"reason": reason, "queue": "commlens.collector", "count": 1}]})
        counted._on_dead_letter(Channel(), Method(), properties, body)

    dead_letter("maxlen", shipping._encode({"format": wire.HOPS_FORMAT,
                                            "hops": [{}] * 7}))
    dead_letter("maxlen", shipping._encode({"format": wire.SNAPSHOT_FORMAT, "hops": []}))
    dead_letter("expired", b"not json")
    dead_letter("something-new", shipping._encode({"format": wire.HOPS_FORMAT,
                                                   "hops": [{}]}))
    lost = counted.lost_counts()
    assert lost[("hops", "maxlen")] == 7 and lost[("snapshots", "maxlen")] == 1
    assert lost[("unreadable", "expired")] == 1 and lost[("hops", "other")] == 1
    assert lost[("hops", "expired")] == 0
