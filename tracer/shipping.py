"""Getting snapshots out of the process: a background shipper and its transports.

The shipper wakes every ``interval`` seconds, takes a snapshot from the
recorder, encodes it and hands it to a transport. It never blocks the
service: the service only ever touches the recorder. When the transport
fails, hops go back to the recorder's bounded buffer (or are counted as
dropped), and the shipper reconnects with exponential backoff.

Transports, chosen by the export URL:
- ``amqp://...``  publishes with pika to the ``commlens`` exchange;
- ``memory://``   hands snapshots to a collector in the same process.
"""

# Imported here, before any fork: pika resolves the broker's host in a thread
# of its own, and getaddrinfo imports the idna codec on first use. A worker
# forked (gunicorn --preload, uwsgi) while its master's shipper was resolving
# inherits that module's import lock held by a thread it does not have, and
# its own shipper then waits on it for ever (seen: about one fork in two).
import encodings.idna  # noqa: F401
import json
import logging
import threading
import time

from commlens.tracer import context
from commlens.tracer import urls
from commlens.tracer import wire

LOG = logging.getLogger(__name__)

# Hops travel apart from the metrics snapshot, grouped by trace
# (wire.hop_routing_key), at most this many per snapshot interval.
MAX_HOPS_PER_SNAPSHOT = 2000
BACKOFF_MAX = 30.0
# A process's exit (and an RPC server's stop) waits this long at most for its
# last snapshot to leave.
EXIT_SECONDS = 1.0


class ExportUrlError(ValueError):
    """The export URL cannot be used; the message never contains its secrets."""


def make_transport(export_url):
    if not isinstance(export_url, str) or "://" not in export_url:
        raise ExportUrlError(
            f"export URL {urls.redact(export_url)!r}: expected amqp://... or memory://")
    scheme = export_url.split("://", 1)[0].lower()
    if scheme in ("amqp", "amqps"):
        return AmqpTransport(export_url)
    if scheme == "memory":
        return MemoryTransport()
    raise ExportUrlError(
        f"export URL {urls.redact(export_url)!r}: unknown scheme {scheme!r} "
        "(expected amqp, amqps or memory)")


class MemoryBus:
    """Snapshots passed inside one process, to an embedded collector.

    With no subscriber, snapshots are dropped (and counted by the shipper as
    ship failures): there is nowhere to keep them.
    """

    def __init__(self):
        self._subscribers = []
        self._lock = threading.Lock()

    def subscribe(self, callback):
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback):
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def has_subscribers(self):
        with self._lock:
            return bool(self._subscribers)

    def publish(self, body):
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return False
        for callback in subscribers:
            callback(body)
        return True


MEMORY_BUS = MemoryBus()


class MemoryTransport:
    description = "memory://"
    # The shipper's first failed send is a WARNING unless the reason was
    # said already (make_shipper: no export URL).
    explained = False

    def open(self):
        pass

    def send(self, body, routing_key):
        if not MEMORY_BUS.publish(body):
            raise ConnectionError("no collector in this process")

    def close(self):
        pass


class NowhereTransport:
    """Stands in when the export URL is unusable: every send fails (and is counted)."""

    def __init__(self, reason):
        self.description = "nowhere (%s)" % reason

    def open(self):
        pass

    def send(self, body, routing_key):
        raise ConnectionError("no usable export URL")

    def close(self):
        pass


class BrokerBlocked(ConnectionError):
    """The broker blocks publishing (a memory or disk alarm): ship later."""


class AmqpTransport:
    """Publishes to a topic exchange with pika; one connection, reopened on failure.

    Every publish is confirmed by the broker: a publish that returns was taken.
    Without confirms, pika hands a message to a socket it has already aborted
    (after ``blocked_connection_timeout`` under a broker alarm the connection
    and channel still say they are open) and every later snapshot vanishes
    with no error. While the broker says it blocks publishers, nothing is
    published: the send fails at once, the shipper keeps the hops and retries
    with backoff, so its thread never waits out an alarm.
    """

    def __init__(self, export_url):
        import pika  # imported here so memory-only processes never need it

        self._pika = pika
        url, ours = urls.split_query(export_url, urls.OUR_QUERY)
        self.exchange = ours.get("exchange") or wire.DEFAULT_EXCHANGE
        self.description = urls.redact(url)
        try:
            self._params = pika.URLParameters(url)
        except Exception as exc:
            raise ExportUrlError(
                f"export URL {self.description!r} is not a valid AMQP URL: "
                f"{type(exc).__name__}") from None
        # Fail fast on a dead broker rather than hang the shipper thread.
        self._params.socket_timeout = 2
        self._params.stack_timeout = 3
        self._params.blocked_connection_timeout = 5
        self._params.connection_attempts = 1
        self._connection = None
        self._channel = None
        self._blocked = None  # the broker's reason while it blocks publishers

    def _connect(self):
        connection = self._pika.BlockingConnection(self._params)
        try:
            connection.add_on_connection_blocked_callback(self._on_blocked)
            connection.add_on_connection_unblocked_callback(self._on_unblocked)
            channel = connection.channel()
            channel.confirm_delivery()
            wire.declare_exchange(channel, self.exchange)
        except Exception:
            _close_quietly(connection)
            raise
        self._connection, self._channel, self._blocked = connection, channel, None

    def _on_blocked(self, _connection, frame):
        self._blocked = getattr(frame.method, "reason", None) or "blocked"

    def _on_unblocked(self, _connection, _frame):
        self._blocked = None

    def open(self):
        """Connect now if not connected (the shipper's thread, at its start)."""
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connect()

    def send(self, body, routing_key):
        try:
            if self._channel is None or not self._channel.is_open:
                self.open()
            else:
                # Delivers the broker's blocked/unblocked notices and notices
                # a connection that was lost since the last interval.
                self._connection.process_data_events(0)
            if self._blocked is not None:
                raise BrokerBlocked(f"the broker blocks publishing ({self._blocked})")
            self._channel.basic_publish(
                self.exchange, routing_key, body,
                self._pika.BasicProperties(content_type="application/json",
                                           delivery_mode=1))
        except Exception:
            self.close()
            raise

    def close(self):
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            _close_quietly(connection)


def _close_quietly(connection):
    try:
        if connection.is_open:
            connection.close()
    except Exception:
        pass


def _join(thread, timeout):
    """``thread.join(timeout)``, which returns at the deadline, except under
    eventlet's monkey-patching on Python 3.13 (eventlet 0.40, nova and
    neutron's 2026.1): its green thread handle raises eventlet's Timeout
    there, which would reach the service's listener cleanup or exit. Either
    way, a join that timed out."""
    try:
        thread.join(timeout)
    except BaseException as exc:
        if type(exc).__module__ != "eventlet.timeout":
            raise


class Shipper:
    """Ships the recorder's snapshots from a thread of its own.

    Only one thread at a time uses the transport (pika's connections are not
    thread-safe): the shipper's own loop, or a flush at exit when that loop
    is not running.
    """

    def __init__(self, recorder, transport, interval):
        self._recorder = recorder
        self._transport = transport
        self.interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._ship_lock = threading.Lock()
        self._thread = None
        self._failures_in_row = 0
        self._next_attempt = 0.0
        self.shipped = 0

    def start(self):
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="commlens-shipper",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=EXIT_SECONDS):
        """Ship a last snapshot (marked final) and stop the thread.

        Waits ``timeout`` seconds at most: a service's shutdown never waits
        on a broker that is down or blocked; what could not be shipped by
        then is lost with the process.
        """
        self._stopped.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            _join(thread, timeout)  # its loop ships the final snapshot on the way out
            done = not thread.is_alive()
        else:
            done = self._ship_within(timeout, final=True)
        if done:
            self._transport.close()

    def flush(self, timeout=EXIT_SECONDS):
        """Ship what there is now, waiting ``timeout`` seconds at most; True if shipped."""
        return self._ship_within(timeout, final=False)

    def _ship_within(self, timeout, final):
        shipped = []
        worker = threading.Thread(target=lambda: shipped.append(self.ship_once(final=final)),
                                  name="commlens-flush", daemon=True)
        worker.start()
        _join(worker, timeout)
        return bool(shipped and shipped[0])

    def after_fork_in_child(self):
        # The parent's thread does not exist here and its connection (a
        # socket shared with the parent) must not be used: start clean.
        self._thread = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._ship_lock = threading.Lock()
        self._transport = _reopen(self._transport)

    def _run(self):
        # commlens's own thread serves no request, even if started in one.
        context.set_current(None)
        # Connected before there is anything to ship: a process that ends
        # early (a worker recycled after a few requests) then spends its
        # exit's one second publishing, not connecting.
        with self._ship_lock:
            try:
                self._transport.open()
            except Exception as exc:
                self._transport.close()
                self._failed([], exc)  # counted and said like any failed ship
        while not self._stopped.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped.is_set():
                break
            self.ship_once()
        self.ship_once(final=True)

    def ship_once(self, final=False):
        with self._ship_lock:
            return self._ship_once(final)

    def _ship_once(self, final):
        now = time.monotonic()
        if not final and now < self._next_attempt:
            return False
        try:
            snapshot = self._recorder.snapshot(self.interval, final=final,
                                               max_hops=MAX_HOPS_PER_SNAPSHOT)
        except Exception:
            LOG.debug("commlens: snapshot failed", exc_info=True)
            self._recorder.dropped("recording_error")
            return False
        process = snapshot["process"]
        hops, snapshot["hops"] = snapshot["hops"], []
        try:
            self._transport.send(_encode(snapshot), wire.snapshot_routing_key(process))
        except Exception as exc:
            self._failed(hops, exc)
            return False
        batches = _hop_batches(hops)
        while batches:
            key, batch = batches[-1]
            try:
                self._transport.send(_encode({
                    "format": wire.HOPS_FORMAT,
                    "process": {field: process[field] for field in wire.HOPS_PROCESS_FIELDS},
                    "hops": batch}), key)
            except Exception as exc:
                self._failed([hop for _, b in batches for hop in b], exc)
                return False
            batches.pop()
        if self._failures_in_row:
            LOG.info("commlens: shipping to %s works again (after %d failed attempts)",
                     self._transport.description, self._failures_in_row)
        self._failures_in_row = 0
        self._next_attempt = 0.0
        self.shipped += 1
        return True

    def _failed(self, hops, exc):
        self._failures_in_row += 1
        backoff = min(BACKOFF_MAX, self.interval * (2 ** min(self._failures_in_row, 10)))
        self._next_attempt = time.monotonic() + backoff
        self._recorder.inc_ship_failure()
        self._recorder.return_hops(hops)
        # One line when shipping stops working and one when it works again
        # (_ship_once); the failures in between are counted, not logged.
        first = self._failures_in_row == 1 and not getattr(self._transport, "explained", False)
        log = LOG.warning if first else LOG.debug
        log("commlens: cannot ship to %s (%s); keeping records and retrying, "
            "the service is not affected", self._transport.description, _reason(exc))


def _reason(exc):
    """Why a send failed, in words safe to log: the type and a redacted,
    bounded message (a connection error names the host, never the password,
    but the URL itself might carry one)."""
    detail = urls.redact(str(exc))[:200]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _encode(message):
    return json.dumps(message, separators=(",", ":"), default=str).encode()


def _hop_batches(hops):
    """[(routing key, hops)] grouping the hops by their trace's routing key."""
    batches = {}
    for hop in hops:
        batches.setdefault(wire.hop_routing_key(hop["trace_id"]), []).append(hop)
    return list(batches.items())


def _reopen(transport):
    if isinstance(transport, AmqpTransport):
        # Drop the inherited connection without closing the parent's socket.
        transport._connection = None
        transport._channel = None
    return transport


def make_shipper(recorder, settings, default_export_url=None):
    """The shipper for a process: settings' export URL, else the default
    (the commlens+ transport's broker and vhost), else none at all.

    A service must start even with a bad commlens setting: an unusable export
    URL is logged once and records are then kept but never shipped. A service
    with no export URL (an API-only service, placement or keystone, with no
    transport URL) says once what to set; a collector in the same process
    (memory://) still receives it, as the embedded mode does.
    """
    export_url = settings.export_url or default_export_url
    _quiet_pika()
    if export_url is None:
        transport = MemoryTransport()
        if not MEMORY_BUS.has_subscribers():
            transport.explained = True
            LOG.warning(
                "commlens: %s has no export URL, so what it records reaches no collector: "
                "set [commlens] export_url (or COMMLENS_EXPORT_URL) to the broker and "
                "vhost the collector consumes, e.g. amqp://USER:PASSWORD@RABBIT:5672/VHOST; "
                "until then it counts in memory and ships nothing "
                "(docs/deploy-placement-keystone.md)", recorder.service)
    else:
        try:
            transport = make_transport(export_url)
        except ExportUrlError as exc:
            LOG.error("commlens: %s; records will not be shipped", exc)
            transport = NowhereTransport(str(exc))
    LOG.info("commlens: %s ships to %s every %.1fs", recorder.service,
             transport.description, settings.ship_interval)
    return Shipper(recorder, transport, settings.ship_interval)


def _quiet_pika():
    """pika logs an ERROR with a traceback for every failed connection
    attempt: inside a service, that floods the service's own log while the
    export broker is down (56 lines in 40 s). The shipper says it once
    itself, with the reason. A level the service set on "pika" is kept."""
    logger = logging.getLogger("pika")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)
