"""The oslo.messaging driver wrapper: ``commlens+<driver>://`` transport URLs.

oslo.messaging loads the driver plugin named by the URL scheme up to the
first ``+``; for ``commlens+rabbit://`` that is this class, which builds the
real ``rabbit`` driver with the scheme rewritten and forwards every call to
it. The wrapper only adds recording around the calls: the inner driver's
return values, exceptions, timeouts, heartbeats, acks and requeues pass
through untouched, and a failure inside commlens is counted, never raised.

What travels with each message, in the message context (so every driver
carries it): only the W3C keys ``traceparent`` and ``baggage``, the ones
oslo.messaging's own OpenTelemetry tracing uses (see context.stamp_outgoing
for how a traceparent set by that tracing is kept). Our baggage member
``commlens.service=NAME;kind=KIND;span=SPAN`` names the caller and says call,
cast or fanout, because the server side cannot tell them apart reliably (the
RPC server replies to casts too).
"""

import functools
import logging
import weakref

from oslo_messaging._drivers import base
from oslo_messaging import exceptions as om_exceptions
from oslo_messaging import transport as om_transport
from stevedore import driver as stevedore_driver

from commlens.middleware import http_client
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import implementation
from commlens.tracer import labels
from commlens.tracer import metrics
from commlens.tracer import names
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import settings as settings_mod
from commlens.tracer import shipping
from commlens.tracer import urls

LOG = logging.getLogger(__name__)

# The per-message paths: middleware/_rpc_send.c and _rpc_receive.c, or their
# Python twins middleware/_rpc_send_py.py and _rpc_receive_py.py.
_rpc_send = implementation.module("rpc_send")
_rpc_receive = implementation.module("rpc_receive")

PLUGIN = "commlens"
CALL, CAST, FANOUT = "call", "cast", "fanout"
_KINDS = frozenset((CALL, CAST, FANOUT))
# Outcomes where no server answered: the caller counts the service-graph
# request itself, since no server-side hop will.
_UNANSWERED = frozenset((metrics.TIMEOUT, metrics.TRANSPORT_ERROR))
_URL_PREFIX = "commlens_"  # query parameters for us, removed before the inner driver
_AMQP_DRIVERS = frozenset(("rabbit", "kombu", "amqp"))


class CommlensDriver(base.BaseDriver):
    """A driver that records every message and delegates to a real driver."""

    def __init__(self, conf, url, default_exchange=None,
                 allowed_remote_exmods=None):
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        scheme, _, inner_scheme = url.transport.partition("+")
        if not inner_scheme or inner_scheme.split("+")[0] == PLUGIN:
            raise om_transport.DriverLoadFailure(
                url.transport, RuntimeError(
                    "commlens needs a real driver after '+', e.g. "
                    "commlens+rabbit://user:password@host:5672/"))
        query = {k: v for k, v in url.query.items() if not k.startswith(_URL_PREFIX)}
        inner_url = om_transport.TransportURL(
            conf, transport=inner_scheme, virtual_host=url.virtual_host,
            hosts=url.hosts, query=query)
        self._inner = stevedore_driver.DriverManager(
            "oslo.messaging.drivers", inner_scheme.split("+")[0],
            invoke_on_load=True, invoke_args=[conf, inner_url],
            invoke_kwds=dict(default_exchange=default_exchange,
                             allowed_remote_exmods=allowed_remote_exmods),
        ).driver

        settings = settings_mod.load(conf)
        explicit = url.query.get(_URL_PREFIX + "service_name")
        if explicit is not None and not settings_mod.valid_service_name(explicit):
            LOG.error("commlens: service name %r is not valid; using %r",
                      explicit, settings.service_name)
            explicit = None
        # In a WSGI server (nova-api under gunicorn) the transport comes before
        # the application: the program's name is not the service's. What the
        # service's oslo.config says (project nova: nova-api) names it until
        # the WSGI application does (middleware/wsgi.py).
        provisional = (not explicit and settings.named_by_program
                       and settings.service_name in names.WSGI_HOSTS)
        host = url.query.get(_URL_PREFIX + "host")
        if host is not None and (labels.server(host) is None or not explicit):
            LOG.error("commlens: %s=%r needs a valid host and %sservice_name; ignored",
                      _URL_PREFIX + "host", host, _URL_PREFIX)
            host = None
        if host is not None:
            # A host this transport speaks for: shipped as a process of its own.
            self._recorder = recorder_mod.install_for_host(
                settings, host, explicit, lambda rec: shipping.make_shipper(
                    rec, settings, _default_export_url(inner_url)))
        else:
            self._recorder = recorder_mod.install(
                settings, lambda rec: shipping.make_shipper(
                    rec, settings, _default_export_url(inner_url)),
                service=explicit or (names.wsgi_service_name(conf) if provisional else None),
                provisional=provisional)
        # A name given in the URL is this transport's own; otherwise the
        # process's (docs/architecture.md: "Who ships where"), which it
        # follows when a WSGI application names the process later.
        self._service = explicit or self._recorder.service
        self._listeners = weakref.WeakSet()
        self._retired_sends = []
        self._use_sender(self._make_sender())
        if not explicit:
            self._recorder.follow_identity(self._follow_identity)
        if settings.http_outbound:
            # Services without a WSGI pipeline (conductor, agents) get their
            # outbound REST calls traced from here.
            try:
                http_client.instrument(settings.http_endpoints,
                                     service_names=settings.service_names)
            except Exception as exc:
                LOG.error("commlens: outbound HTTP tracing not installed: %s", exc)

    def _make_sender(self):
        """The per-send path (middleware/_rpc_send_py.py, compiled as
        _rpc_send.c), calling back the methods below for what is rare."""
        return _rpc_send.Sender(
            service=self._service, recorder=self._recorder,
            sent_metric=metrics.RPC_SENT.name, reply_wait_metric=metrics.RPC_REPLY_WAIT.name,
            method_label=labels.method, context_copy=_context_copy,
            stamp=context.stamp_outgoing, failed=self._send_failed,
            add_hop=self._add_send_hop, recording_failed=self._send_recording_failed,
            inner_send=self._inner.send)

    def _use_sender(self, sender):
        """A send goes straight to the per-send path: compiled, no commlens
        frame is then in the traceback of an exception the inner driver
        raises (docs/architecture.md, "Tracebacks"). The ``send`` method below is the
        contract's; the instance's own shadows it. A send in progress keeps
        the sender that began it."""
        self._sends = sender
        self.send = sender.send

    def _follow_identity(self, service):
        """The process was renamed (recorder.Recorder.adopt): sends and
        receipts from now on carry the new name. The per-message paths hold
        the name, so they are made again; calls already sent end on the
        sender that began them (cleanup() still releases its open calls)."""
        self._service = service
        self._retired_sends.append(self._sends)
        self._use_sender(self._make_sender())
        for listener in list(self._listeners):
            listener._receiver = listener._make_receiver()

    # Everything the inner driver offers and we do not wrap stays reachable,
    # so code that peeks at driver attributes keeps working.
    def __getattr__(self, name):
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def prefetch_size(self):
        return self._inner.prefetch_size

    def require_features(self, requeue=False):
        return self._inner.require_features(requeue=requeue)

    # -- client side -----------------------------------------------------

    def send(self, target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        # Shadowed by the instance's own ``send`` (the Sender's), set in __init__.
        return self._sends.send(
            target, ctxt, message, wait_for_reply=wait_for_reply, timeout=timeout,
            call_monitor_timeout=call_monitor_timeout, retry=retry,
            transport_options=transport_options)

    def send_notification(self, target, ctxt, message, version, retry=None):
        try:
            ctxt = self._notification_sent(target, ctxt, message)
        except Exception:
            self._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a notification failed", exc_info=True)
        return self._inner.send_notification(target, ctxt, message, version,
                                             retry=retry)

    # Around every send, on the service's thread, between its socket reads,
    # self._sends does only what must happen there: copy and
    # stamp the context, count the send, open a call's waiting reply and,
    # at the end, close it, observe a call's wait and keep the hop if it is
    # sampled. Metrics that are sums of others are added at snapshot time
    # (tracer/derived.py); a hop record is built only for the few kept.

    def _send_failed(self, call, exc, duration):
        """The end of a send that raised ``exc`` (its waiting reply closed)."""
        outcome, error = _classify_send_error(exc, call.kind)
        rec = self._recorder
        rec.inc(metrics.RPC_CALL_ERRORS,
                (self._service, call.topic, call.method, outcome, error))
        if call.kind == CALL:
            # The service graph's client side is its sum (tracer/derived.py).
            rec.observe(metrics.RPC_REPLY_WAIT,
                        (self._service, call.topic, call.method, outcome), duration)
        if outcome in _UNANSWERED:
            edge = (self._service, call.topic, metrics.MESSAGING_SYSTEM)
            rec.inc(metrics.SERVICE_GRAPH_REQUESTS, edge)
            rec.inc(metrics.SERVICE_GRAPH_FAILED, edge)
        context.mark_child_failed()
        self._add_send_hop(call, outcome, error, duration)

    def _send_recording_failed(self, exc):
        self._recorder.dropped("recording_error")
        LOG.debug("commlens: recording a send failed", exc_info=exc)

    def _add_send_hop(self, call, outcome, error, duration):
        self._recorder.add_hop(hops.make_hop(
            call.ctx, service=self._service, side=hops.CLIENT,
            protocol=hops.RPC, peer=None, target=call.topic,
            operation=call.method, kind=call.kind, outcome=outcome,
            error=error, start=hops.wall_clock_start(call.start, call.start + duration),
            duration=duration,
            request_id=labels.request_id(call.ctxt.get("request_id")),
            global_request_id=labels.request_id(call.ctxt.get("global_request_id")),
            # The host a call was addressed to (``prepare(server=...)``), so
            # a timeout names the one that did not answer.
            server=labels.server(getattr(call.target, "server", None))))

    def _notification_sent(self, target, ctxt, message):
        out = _context_copy(ctxt)
        if out is None:
            self._recorder.dropped("bad_context")
            return ctxt
        context.stamp_outgoing(out, self._service, "notification")
        self._recorder.inc(metrics.NOTIFICATIONS_SENT, (
            self._service, labels.dotted(target.topic),
            labels.dotted(message.get("event_type")),
            labels.dotted(str(message.get("priority", "")).lower())))
        return out

    # -- server side -----------------------------------------------------

    def listen(self, target, batch_size, batch_timeout):
        listener = self._inner.listen(target, batch_size, batch_timeout)
        listener = _InstrumentedListener(
            listener, self, labels.dotted(target.topic), notifications=False,
            server=labels.server(getattr(target, "server", None)))
        self._listeners.add(listener)
        return listener

    def listen_for_notifications(self, targets_and_priorities, pool,
                                 batch_size, batch_timeout):
        listener = self._inner.listen_for_notifications(
            targets_and_priorities, pool, batch_size, batch_timeout)
        # A set of (target, priority); the label names the first topic.
        topics = sorted(str(target.topic) for target, _ in targets_and_priorities)
        return _InstrumentedListener(listener, self,
                                     labels.dotted(topics[0] if topics else None),
                                     notifications=True)

    def _received(self, incoming, topic, notifications):
        """Count a notification as it is handed to the service; for an RPC,
        read its context: (ctx, caller, method, kind), or None.

        This is the general case of what _rpc_receive.Receiver.wrap does
        compiled, and the reference for it."""
        ctxt = incoming.ctxt
        if not isinstance(ctxt, dict):
            return None
        ctx, valid = context.child_of_incoming(ctxt.get(context.TRACEPARENT))
        if not valid:
            self._recorder.dropped("bad_context")
        ctx.service = self._service
        caller, kind = context.parse_baggage_sender(ctxt.get(context.BAGGAGE), ctx.parent_id)
        caller = caller or labels.UNKNOWN
        message = incoming.message if isinstance(incoming.message, dict) else {}
        if notifications:
            priority = labels.dotted(str(message.get("priority", "")).lower())
            self._recorder.inc(metrics.NOTIFICATIONS_RECEIVED, (
                self._service, caller, topic + "." + priority,
                labels.dotted(message.get("event_type")), priority))
            return None
        if not isinstance(kind, str) or kind not in _KINDS:
            # An uninstrumented sender: a reply is expected only for a call.
            # A fanout from such a sender is counted as a cast.
            kind = CALL if getattr(incoming, "orig_msg_id", None) or ctxt.get("msg_id") else CAST
        return ctx, caller, labels.method(message.get("method")), kind

    # A message's processing ends (middleware/_rpc_receive.c): one update for
    # the processing metrics and the graph edge alike (tracer/derived.py),
    # and its hop if it is sampled; a failed one comes here.

    def _processing_failed(self, incoming, failure, duration, server=None):
        exc_type = failure[0] if isinstance(failure, tuple) else type(failure)
        error = labels.error_class(getattr(exc_type, "__name__", None))
        rec = self._recorder
        rec.inc(metrics.RPC_PROCESSING_ERRORS, (
            self._service, incoming.caller, incoming.topic, incoming.method, error))
        rec.observe(metrics.RPC_SERVER_HOPS, (self._service, incoming.caller, incoming.topic,
                                              incoming.method, metrics.ERROR), duration)
        self._add_receive_hop(incoming, metrics.ERROR, error, duration, server)

    def _add_receive_hop(self, incoming, outcome, error, duration, server=None):
        """``server``: the listener's own (the host that answered)."""
        self._recorder.add_hop(hops.make_hop(
            incoming.ctx, service=self._service, side=hops.SERVER,
            protocol=hops.RPC, peer=incoming.caller, target=incoming.topic,
            operation=incoming.method, kind=incoming.kind, outcome=outcome,
            error=error, start=hops.wall_clock_start(incoming.start, incoming.start + duration),
            duration=duration,
            request_id=labels.request_id(incoming.ctxt.get("request_id")),
            global_request_id=labels.request_id(incoming.ctxt.get("global_request_id")),
            server=server))

    def _receive_recording_failed(self, exc):
        self._recorder.dropped("recording_error")
        LOG.debug("commlens: recording a received message failed", exc_info=exc)

    def cleanup(self):
        # Calls still waiting will never get their reply through this driver.
        for sends in self._retired_sends + [self._sends]:
            self._recorder.release_calls(sends.take_open_calls())
        self._inner.cleanup()
        self._recorder.ship_now()


class _InstrumentedListener(base.Listener):
    """Wraps the inner driver's listener; wraps each incoming message."""

    def __init__(self, inner, driver, topic, notifications, server=None):
        super().__init__(inner.batch_size, inner.batch_timeout, inner.prefetch_size)
        self._inner = inner
        self._driver = driver
        self._topic = topic
        self._notifications = notifications
        self._server = server
        self._receiver = None if notifications else self._make_receiver()

    def _make_receiver(self):
        """The per-message path of RPC listeners (middleware/_rpc_receive_py.py,
        compiled as _rpc_receive.c). Its hops name this listener's server
        (the host an RPC server was started for), bound here."""
        driver = self._driver
        return _rpc_receive.Receiver(
            service=driver._service, topic=self._topic, recorder=driver._recorder,
            received_metric=metrics.RPC_RECEIVED.name,
            hops_metric=metrics.RPC_SERVER_HOPS.name, method_label=labels.method,
            incoming_type=_InstrumentedIncoming, trace_context=context.TraceContext,
            current=context.current_var, in_python=self._wrap_in_python,
            failed=functools.partial(driver._processing_failed, server=self._server),
            add_hop=functools.partial(driver._add_receive_hop, server=self._server),
            recording_failed=driver._receive_recording_failed)

    def __getattr__(self, name):
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def start(self, on_incoming_callback):
        super().start(on_incoming_callback)

        def on_incoming(incoming):
            return on_incoming_callback([self._wrap(m) for m in incoming])

        self._inner.start(on_incoming)

    def _wrap(self, message):
        try:
            if self._receiver is None:
                return self._wrap_in_python(message)
            return self._receiver.wrap(message)
        except Exception:
            self._driver._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a received message failed", exc_info=True)
            return message

    def _wrap_in_python(self, message):
        """A notification (counted, passed on as it is), or an RPC whose
        context the compiled Receiver leaves to _received."""
        received = self._driver._received(message, self._topic, self._notifications)
        if received is None:
            return message
        return self._receiver.incoming(message, *received)

    def stop(self):
        self._inner.stop()
        super().stop()

    def cleanup(self):
        self._inner.cleanup()
        # An RPC server stops here (MessageHandlingServer.wait), and an
        # oslo.service worker then leaves with os._exit, past atexit.
        self._driver._recorder.ship_now()


class _InstrumentedIncoming(_rpc_receive.Incoming, base.RpcIncomingMessage):
    """An incoming RPC whose processing is timed from dispatch to reply.

    The RPC server calls ``acknowledge()`` in the worker right before
    dispatching and ``reply()`` right after, for casts too; between the two,
    the hop is the current one, so calls the endpoint makes become its
    children. Its methods are _rpc_receive's Incoming: made by a Receiver,
    never here; ``ctxt``, ``message``, ``msg_id`` and ``client_timeout`` are the
    inner message's, and what else the server reads of it is delegated.
    """

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _context_copy(ctxt):
    """A dict copy of the message context we may add keys to, or None."""
    if isinstance(ctxt, dict):
        return dict(ctxt)
    to_dict = getattr(ctxt, "to_dict", None)
    if to_dict is not None:
        value = to_dict()
        if isinstance(value, dict):
            return value
    return None


def _default_export_url(inner_url):
    """The transport's own broker and vhost for AMQP drivers; else None
    (tracer/shipping.py make_shipper: the service says what to set)."""
    if inner_url.transport.split("+")[0] in _AMQP_DRIVERS:
        return urls.amqp_url_from_transport(inner_url)
    return None


_TRANSPORT_MODULES = ("kombu", "amqp", "pika", "socket", "ssl")


def _classify_send_error(exc, kind):
    """(outcome, error class label) for an exception out of the inner send."""
    if isinstance(exc, om_exceptions.MessagingTimeout):
        return metrics.TIMEOUT, "MessagingTimeout"
    exc_type = type(exc)
    name = exc_type.__name__
    exc_type_remote = getattr(exc, "exc_type", None)
    if name == "RemoteError" and exc_type_remote:
        return metrics.REMOTE_ERROR, labels.error_class(exc_type_remote)
    if name.endswith("_Remote"):
        return metrics.REMOTE_ERROR, labels.error_class(name[:-len("_Remote")])
    module = getattr(exc_type, "__module__", "") or ""
    if (isinstance(exc, (om_exceptions.MessagingException, OSError))
            or not isinstance(exc, Exception)
            or module.split(".")[0] in _TRANSPORT_MODULES):
        return metrics.TRANSPORT_ERROR, labels.error_class(name)
    # A builtin exception raised by the endpoint comes back as the same
    # builtin class (no _Remote suffix is possible on builtins).
    if kind == CALL:
        return metrics.REMOTE_ERROR, labels.error_class(name)
    return metrics.TRANSPORT_ERROR, labels.error_class(name)
