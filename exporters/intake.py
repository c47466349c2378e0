"""How the collector receives what agents ship: from AMQP or from memory."""

import logging
import threading

from commlens.exporters import shipping
from commlens.exporters import urls

LOG = logging.getLogger(__name__)

DEFAULT_QUEUE = "commlens.collector"
# Snapshots are cumulative: an old one is worth nothing once a newer one is
# there, so the queue is bounded and drops its oldest messages first.
QUEUE_ARGUMENTS = {
    "x-max-length": 100000,
    "x-overflow": "drop-head",
    "x-message-ttl": 120000,
}
BACKOFF_MAX = 30.0


SHARD_EXCHANGE_SUFFIX = ".shard"


def make_intake(export_url, collector, replica=None):
    """``replica``: a name for this collector when several share the load."""
    transport = shipping.make_transport(export_url)  # validates the URL
    transport.close()
    if isinstance(transport, shipping.MemoryTransport):
        return MemoryIntake(collector)
    return AmqpIntake(export_url, collector, replica=replica)


class MemoryIntake:
    description = "memory://"

    def __init__(self, collector):
        self._collector = collector
        self.connected = False

    def start(self):
        shipping.MEMORY_BUS.subscribe(self._collector.ingest)
        self.connected = True

    def stop(self):
        shipping.MEMORY_BUS.unsubscribe(self._collector.ingest)
        self.connected = False


class AmqpIntake:
    """Consumes the commlens exchange in a thread; reconnects with backoff."""

    def __init__(self, export_url, collector, replica=None):
        import pika

        self._pika = pika
        url, ours = urls.split_query(export_url, urls.OUR_QUERY)
        self.exchange = ours.get("exchange") or urls.DEFAULT_EXCHANGE
        self.queue = ours.get("queue") or DEFAULT_QUEUE
        # Replicas: the agents' exchange feeds a consistent-hash exchange
        # (RabbitMQ plugin rabbitmq_consistent_hash_exchange) hashing the
        # routing key, which is the process id for snapshots and the trace
        # id's first byte for hops (shipping.*_routing_key). Each replica
        # binds its own queue with equal weight: a process's totals and a
        # trace's hops always reach the same replica.
        self.replica = replica
        if replica is not None:
            self.queue = "%s.%s" % (self.queue, replica)
        self.description = urls.redact(url)
        try:
            self._params = pika.URLParameters(url)
        except Exception as exc:
            raise shipping.ExportUrlError(
                f"export URL {self.description!r} is not a valid AMQP URL: "
                f"{type(exc).__name__}") from None
        self._params.connection_attempts = 1
        self._params.socket_timeout = 5
        self._params.heartbeat = 30
        self._collector = collector
        self._stopping = threading.Event()
        self._thread = None
        self._connection = None
        self.connected = False

    def start(self):
        self._thread = threading.Thread(target=self._run, name="commlens-intake",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=5.0):
        self._stopping.set()
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(connection.close)
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        delay = 1.0
        while not self._stopping.is_set():
            try:
                self._consume()
                delay = 1.0
            except Exception as exc:
                self.connected = False
                if self._stopping.is_set():
                    break
                LOG.warning("collector: cannot consume from %s (%s: %s); "
                            "retrying in %.0fs", self.description,
                            type(exc).__name__, urls.redact(str(exc)), delay)
                self._stopping.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
        self.connected = False

    def _consume(self):
        connection = self._pika.BlockingConnection(self._params)
        self._connection = connection
        try:
            channel = connection.channel()
            shipping.declare_exchange(channel, self.exchange)
            channel.queue_declare(queue=self.queue, durable=False,
                                  auto_delete=False, arguments=QUEUE_ARGUMENTS)
            if self.replica is None:
                channel.queue_bind(queue=self.queue, exchange=self.exchange,
                                   routing_key="#")
            else:
                shard = self.exchange + SHARD_EXCHANGE_SUFFIX
                channel.exchange_declare(exchange=shard, exchange_type="x-consistent-hash",
                                         durable=True, auto_delete=False)
                channel.exchange_bind(destination=shard, source=self.exchange,
                                      routing_key="#")
                channel.queue_bind(queue=self.queue, exchange=shard, routing_key="1")
            channel.basic_qos(prefetch_count=200)
            self.connected = True
            LOG.info("collector: consuming %s on %s (queue %s)", self.exchange,
                     self.description, self.queue)
            for method, _properties, body in channel.consume(self.queue, inactivity_timeout=1.0):
                if self._stopping.is_set():
                    break
                if method is None:
                    continue
                self._collector.ingest(body)
                channel.basic_ack(method.delivery_tag)
        finally:
            self._connection = None
            self.connected = False
            try:
                if connection.is_open:
                    connection.close()
            except Exception:
                pass
