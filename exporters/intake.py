"""How the collector receives what agents ship: from AMQP or from memory."""

import collections
import json
import logging
import re
import threading
import urllib.parse

from commlens.exporters import durations
from commlens.tracer import shipping
from commlens.tracer import urls
from commlens.tracer import wire

LOG = logging.getLogger(__name__)

DEFAULT_QUEUE = "commlens.collector"
# Snapshots are cumulative: an old one is worth nothing once a newer one is
# there, so the queue is bounded and drops its oldest messages first.
MAX_QUEUE_LENGTH = 100000
DEFAULT_QUEUE_TTL = 120.0
# RabbitMQ keeps x-message-ttl in an unsigned 32-bit number of milliseconds.
MAX_QUEUE_TTL = 49 * 86400
# What the queue drops (too old, or pushed out by newer messages) is
# dead-lettered to a queue the collector reads only to count it, so a loss
# is never silent. One dead-letter queue per queue name: replicas share it
# and each counts what it takes, so their sums add up. It has no TTL (the
# dead letters wait for a collector) and is bounded like the queue, in
# messages and in bytes; past that the broker drops its oldest uncounted.
DEAD_LETTER_SUFFIX = ".dead"
DEAD_LETTER_ARGUMENTS = {
    "x-max-length": MAX_QUEUE_LENGTH,
    "x-max-length-bytes": 256 * 1024 * 1024,
    "x-overflow": "drop-head",
}
# RabbitMQ's reasons in x-death; any other is counted as "other" so the
# labels stay bounded.
LOSS_REASONS = ("expired", "maxlen", "rejected", "delivery_limit")
LOST_WHAT = ("hops", "snapshots")
BACKOFF_MAX = 30.0
# Deliveries taken before they are made durable and acknowledged together;
# below the prefetch, so the broker never waits on an acknowledgement.
PREFETCH = 200
ACK_EVERY = 100


SHARD_EXCHANGE_SUFFIX = ".shard"


def queue_ttl(text):
    """Seconds of a ``--queue-ttl`` value; ValueError with a readable message."""
    seconds = durations.parse(text)
    if seconds > MAX_QUEUE_TTL:
        raise ValueError(f"{text!r}: at most {MAX_QUEUE_TTL // 86400}d (RabbitMQ's limit)")
    return seconds


def queue_arguments(ttl_seconds, dead_letter_exchange):
    return {
        "x-max-length": MAX_QUEUE_LENGTH,
        "x-overflow": "drop-head",
        "x-message-ttl": int(ttl_seconds * 1000),
        "x-dead-letter-exchange": dead_letter_exchange,
    }


# Several export URLs in one value: separated by whitespace, or by a comma
# before the next URL's scheme (a comma inside a URL, in a password, stays).
_URL_SEPARATOR = re.compile(r"\s+|,\s*(?=(?:amqps?|memory)://)", re.IGNORECASE)


def split_export_urls(value):
    """``"amqp://h/nova amqp://h/neutron"`` (or with commas) -> a list of URLs."""
    return [url for url in _URL_SEPARATOR.split(value or "") if url.strip(", ")]


def check_export_url(export_url):
    """``export_url`` if the intake can consume it; ExportUrlError, whose
    message never holds the URL's secrets, if not."""
    try:
        urllib.parse.urlsplit(export_url).port  # noqa: B018 - reading the port checks it
    except ValueError:
        raise shipping.ExportUrlError(
            f"export URL {urls.redact(export_url)!r} is not a valid URL "
            "(an unclosed '[' or a port that is no number?)") from None
    shipping.make_transport(export_url).close()  # the scheme, and pika's reading of it
    return export_url


def make_intakes(export_urls, collector, replica=None, queue_ttl=DEFAULT_QUEUE_TTL):
    """One intake per export URL (a vhost each, say), as one intake."""
    intakes = [make_intake(url, collector, replica=replica, queue_ttl=queue_ttl)
               for url in export_urls]
    return intakes[0] if len(intakes) == 1 else Intakes(intakes)


class Intakes:
    """Several intakes consumed at once (openstack-helm gives each service
    its own vhost; agents ship to their transport's): one collector merges
    them all. Ready and up while every one of them consumes."""

    def __init__(self, intakes):
        self.intakes = list(intakes)
        self.description = ", ".join(intake.description for intake in self.intakes)

    @property
    def connected(self):
        return all(intake.connected for intake in self.intakes)

    def start(self):
        for intake in self.intakes:
            intake.start()

    def stop(self):
        for intake in self.intakes:
            intake.stop()

    def lost_counts(self):
        total = collections.Counter()
        for intake in self.intakes:
            total.update(intake.lost_counts())
        return dict(total)


def make_intake(export_url, collector, replica=None, queue_ttl=DEFAULT_QUEUE_TTL):
    """``replica``: a name for this collector when several share the load;
    ``queue_ttl``: seconds a shipped message waits in the queue for a collector."""
    transport = shipping.make_transport(export_url)  # validates the URL
    transport.close()
    if isinstance(transport, shipping.MemoryTransport):
        return MemoryIntake(collector)
    return AmqpIntake(export_url, collector, replica=replica, queue_ttl=queue_ttl)


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

    def lost_counts(self):
        # Nothing waits in a queue in memory: a snapshot nobody takes is
        # counted by the shipper as a ship failure.
        return {}


class AmqpIntake:
    """Consumes the commlens exchange in a thread; reconnects with backoff."""

    def __init__(self, export_url, collector, replica=None, queue_ttl=DEFAULT_QUEUE_TTL):
        import pika

        self._pika = pika
        url, ours = urls.split_query(export_url, urls.OUR_QUERY)
        self.exchange = ours.get("exchange") or wire.DEFAULT_EXCHANGE
        base = ours.get("queue") or DEFAULT_QUEUE
        self.dead_letters = base + DEAD_LETTER_SUFFIX
        self.queue = base
        # Replicas: the agents' exchange feeds a consistent-hash exchange
        # (RabbitMQ plugin rabbitmq_consistent_hash_exchange) hashing the
        # routing key, which is the process id for snapshots and the trace
        # id's first byte for hops (wire.*_routing_key). Each replica
        # binds its own queue with equal weight: a process's totals and a
        # trace's hops always reach the same replica.
        self.replica = replica
        if replica is not None:
            self.queue = "%s.%s" % (self.queue, replica)
        if self.queue == self.dead_letters:
            raise shipping.ExportUrlError(
                f"replica name {replica!r} is taken by the dead-letter queue {self.dead_letters}")
        self.queue_ttl = queue_ttl
        self._arguments = queue_arguments(queue_ttl, self.dead_letters)
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
        self.connected = False
        self._unacked = None  # the last delivery taken and not yet acknowledged
        self._unacked_count = 0
        self._lost_lock = threading.Lock()
        self._lost = collections.Counter(
            {(what, reason): 0 for what in LOST_WHAT for reason in ("expired", "maxlen")})

    def start(self):
        self._thread = threading.Thread(target=self._run, name="commlens-intake",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=5.0):
        # The consuming loop looks at the flag at least once a second.
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def lost_counts(self):
        """{(what, reason): count} the broker dropped before a collector read it,
        as this collector found them in the dead-letter queue."""
        with self._lost_lock:
            return dict(self._lost)

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
        try:
            channel = self._declare(connection)
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(self.queue, self._on_message)
            channel.basic_consume(self.dead_letters, self._on_dead_letter)
            self.connected = True
            LOG.info("collector: consuming %s on %s (queue %s, TTL %gs, losses counted "
                     "from %s)", self.exchange, self.description, self.queue,
                     self.queue_ttl, self.dead_letters)
            # Each call returns once what arrived is dispatched: what it took
            # is made durable and acknowledged before waiting for more.
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=1.0)
                self._acknowledge(channel)
        finally:
            self.connected = False
            # What was not acknowledged comes again from the broker (to the
            # next consumer of the queue), marked as redelivered.
            self._unacked, self._unacked_count = None, 0
            try:
                if connection.is_open:
                    connection.close()
            except Exception:
                pass

    def _on_message(self, channel, method, _properties, body):
        # Acknowledged only once durable (docs/architecture.md, "A hop is
        # acknowledged once it is durable"): a collector killed before that
        # gets it again at its next start, from the broker.
        self._collector.ingest(body, redelivered=method.redelivered)
        self._unacked = method.delivery_tag
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            self._acknowledge(channel)

    def _acknowledge(self, channel):
        """Write what was taken to the journal, then acknowledge it all at once."""
        if self._unacked is None:
            return
        self._collector.commit()
        channel.basic_ack(self._unacked, multiple=True)
        self._unacked, self._unacked_count = None, 0

    def _on_dead_letter(self, channel, method, properties, body):
        reason = _death_reason(properties.headers)
        with self._lost_lock:
            for what, count in _carried(body):
                self._lost[(what, reason)] += count
        channel.basic_ack(method.delivery_tag)

    def _declare(self, connection):
        """A channel on which the exchanges, the queue and its dead-letter queue exist."""
        channel = connection.channel()
        wire.declare_exchange(channel, self.exchange)
        channel.exchange_declare(exchange=self.dead_letters, exchange_type="fanout",
                                 durable=True, auto_delete=False)
        channel.queue_declare(queue=self.dead_letters, durable=False, auto_delete=False,
                              arguments=DEAD_LETTER_ARGUMENTS)
        channel.queue_bind(queue=self.dead_letters, exchange=self.dead_letters)
        if self.replica is not None:
            channel.exchange_declare(exchange=self._shard, exchange_type="x-consistent-hash",
                                     durable=True, auto_delete=False)
            channel.exchange_bind(destination=self._shard, source=self.exchange,
                                  routing_key="#")
        try:
            channel.queue_declare(queue=self.queue, durable=False, auto_delete=False,
                                  arguments=self._arguments)
        except self._pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: other arguments
                raise
            channel = connection.channel()
            self._declare_again(channel)
        self._bind(channel, self.queue)
        return channel

    def _declare_again(self, channel):
        """The queue exists with other arguments (a commlens before dead-letter
        counting, or another --queue-ttl), which RabbitMQ cannot change in
        place. A holding queue takes what agents ship meanwhile; the old
        queue is read to its end, deleted, declared anew, and the holding
        queue read too: nothing is lost. A message shipped at the instant of
        a switch may be read twice: a snapshot read twice is stale and
        ignored, a hop read twice is counted as a duplicate."""
        LOG.warning("collector: queue %s exists with other arguments (no dead-letter "
                    "queue, or another TTL); reading it to its end and declaring it again "
                    "with TTL %gs and dead-letter queue %s", self.queue, self.queue_ttl,
                    self.dead_letters)
        holding = channel.queue_declare(queue="", exclusive=True).method.queue
        self._bind(channel, holding)
        self._unbind(channel, self.queue)
        carried = self._read_to_end(channel, self.queue)
        channel.queue_delete(queue=self.queue)
        channel.queue_declare(queue=self.queue, durable=False, auto_delete=False,
                              arguments=self._arguments)
        self._bind(channel, self.queue)
        self._unbind(channel, holding)
        carried += self._read_to_end(channel, holding)
        channel.queue_delete(queue=holding)
        LOG.info("collector: queue %s declared again; %d waiting messages read first",
                 self.queue, carried)

    def _read_to_end(self, channel, queue):
        count = 0
        while True:
            method, _properties, body = channel.basic_get(queue)
            if method is None:
                return count
            self._collector.ingest(body, redelivered=method.redelivered)
            self._collector.commit()
            channel.basic_ack(method.delivery_tag)
            count += 1

    @property
    def _shard(self):
        return self.exchange + SHARD_EXCHANGE_SUFFIX

    def _bind(self, channel, queue):
        if self.replica is None:
            channel.queue_bind(queue=queue, exchange=self.exchange, routing_key="#")
        else:
            channel.queue_bind(queue=queue, exchange=self._shard, routing_key="1")

    def _unbind(self, channel, queue):
        if self.replica is None:
            channel.queue_unbind(queue=queue, exchange=self.exchange, routing_key="#")
        else:
            channel.queue_unbind(queue=queue, exchange=self._shard, routing_key="1")


def _death_reason(headers):
    """Why RabbitMQ dropped a message: the latest x-death entry's reason."""
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    reason = None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return reason if reason in LOSS_REASONS else "other"


def _carried(body):
    """[(what, count)] a dropped message carried. A hops message loses its
    hops for good. A snapshot is cumulative: a later one of the same process
    carries the same totals, so one lost is no lost count unless it was the
    process's last; it is counted as one snapshot all the same."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return [("unreadable", 1)]
    if not isinstance(data, dict):
        return [("unreadable", 1)]
    hops = data.get("hops")
    hops = len(hops) if isinstance(hops, list) else 0
    if data.get("format") == wire.HOPS_FORMAT:
        return [("hops", hops)]
    # Agents before hops travelled on their own put them in the snapshot.
    return [("snapshots", 1), ("hops", hops)] if hops else [("snapshots", 1)]
