"""The WSGI middleware: every inbound REST request, seen from the server's end.

In an api-paste.ini pipeline::

    [filter:commlens]
    paste.filter_factory = commlens.middleware.wsgi:filter_factory
    # optional, the same names as the [commlens] options:
    service_name = nova-api

or around a WSGI app in code: ``app = CommlensMiddleware(app)``.

Per request it records the calling service (from our baggage member, else a
known OpenStack client's User-Agent, else ``unknown``), the method, the route
template, the status code and the time to the last byte of the body (the
body iterator is wrapped and ``close()`` always forwarded), with OpenStack's
request ids next to the trace id. It reads neither the query string nor
any auth header, and of a body only the name of the error an error
response's first bytes give (see ``_hop_error``). Loading it also installs the outbound hook
(``http_outbound``), so a service that calls others needs no code change.

The application's behaviour is unchanged: its exceptions propagate as they
are (and count as 500), its status, headers and body pass through untouched.
"""

import itertools
import logging

from commlens.middleware import faults
from commlens.middleware import http_client
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import implementation
from commlens.tracer import labels
from commlens.tracer import metrics
from commlens.tracer import names
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import routes
from commlens.tracer import settings as settings_mod
from commlens.tracer import shipping

LOG = logging.getLogger(__name__)

# middleware/_wsgi_request.c, or its Python twin middleware/_wsgi_request_py.py
_wsgi_request = implementation.module("wsgi_request")

_REQUEST_ID_HEADERS = ("x-openstack-request-id", "x-compute-request-id")


def filter_factory(global_conf, **local_conf):
    """paste.deploy entry: options in the filter section override [commlens]."""
    def make(app):
        return CommlensMiddleware(app, **local_conf)
    return make


class CommlensMiddleware(_wsgi_request.Middleware):
    """The middleware. Its per-request path (``__call__``, the request that
    is the application's start_response, the list body's ``close()``) is
    middleware/_wsgi_request_py.py, compiled as middleware/_wsgi_request.c.
    It does what the comments below say and calls back into this module
    for anything rare.

    Why compiled: on a minimal app under a fast server the same path in
    Python cost about 8 % of the request, most of it in making and calling
    Python objects; benchmarks/wsgi_instructions.py counts it. Cython on the
    Python code saved 2 % (2026-11-25): the cost was in the objects, which
    are C structs here.
    """

    def __init__(self, app, conf=None, **options):
        """``conf``: the service's ConfigOpts (default: oslo.config's global
        CONF); ``options``: overrides, by [commlens] option name."""
        if conf is None:
            from oslo_config import cfg
            conf = cfg.CONF
        settings = settings_mod.load(conf, overrides=options)
        explicit = options.get("service_name")
        if explicit is not None and not settings_mod.valid_service_name(explicit):
            explicit = None  # settings_mod.load has logged it
        identity = _identity(settings, explicit, conf)
        recorder = recorder_mod.install(
            settings, lambda rec: shipping.make_shipper(rec, settings), service=identity)
        # The process's RPC identity follows its WSGI identity: a transport
        # made before this filter (nova-api under gunicorn) took the
        # program's name, which is provisional.
        recorder.adopt(identity)
        self._routes = routes.RouteTemplates(settings.http_max_routes)
        # A name given to this filter is its own; otherwise the process's
        # (docs/architecture.md: "Who ships where").
        super().__init__(app, explicit or recorder.service, recorder, self._routes)
        if settings.http_outbound:
            http_client.instrument(settings.http_endpoints, service_names=settings.service_names)


def _identity(settings, explicit, conf):
    """The application's name: the filter's option or the class's argument,
    else [commlens] service_name or COMMLENS_SERVICE_NAME, else what its
    oslo.config says (prog, else its project's API service: nova -> nova-api),
    else the program's name."""
    if explicit:
        return explicit
    if settings.named_by_program:
        return names.wsgi_service_name(conf) or settings.service_name
    return settings.service_name


# Per request, middleware/_wsgi_request_py.py (or its compiled twin):
# - the hop's context: a child of an incoming traceparent (a malformed one
#   counts as dropped "bad_context"), else a new trace's first hop, its ids
#   drawn only when needed; it is the current hop while the application runs;
# - the caller: our baggage member (parse_baggage_sender), else a known
#   OpenStack client's User-Agent (remembered), else "unknown";
# - the method (one of labels.HTTP_METHODS, else "other") and the route
#   template (routes.RouteTemplates, remembered);
# - the end: when the server closes a list body (or lets go of it without
#   closing, see _Body), when an iterator body is exhausted or closed, or
#   when the application raises (then a 500, the exception going on as it
#   is). One observation of metrics.HTTP_SERVER_HOPS, and a hop record if the
#   recorder keeps it (_record_hop).


def _record_hop(request, code, failed, duration, body):
    """The hop record of a request the recorder keeps; ``body``: a list
    body, or the head of an iterator body (_Body), read for its fault if
    the request failed."""
    request_id, global_request_id = _request_ids(request)
    service = request.middleware.service
    request.middleware.recorder.add_hop(hops.make_hop(
        request.ctx, service=service, side=hops.SERVER,
        protocol=hops.HTTP, peer=request.caller, target=request.route,
        operation=request.method + " " + request.route, kind=request.method,
        outcome=metrics.ERROR if code[0] == "5" else metrics.OK,
        error=_hop_error(code, request.error, body, request.headers) if failed else None,
        start=hops.wall_clock_start(request.start, request.start + duration),
        duration=duration, request_id=request_id, global_request_id=global_request_id))


def _recording_failed(recorder, exc):
    recorder.dropped("recording_error")
    LOG.debug("commlens: recording a request failed", exc_info=exc)


def _baggage_caller(baggage, parent_id):
    return context.parse_baggage_sender(baggage, parent_id)[0]


class _Body:
    """The application's body, passed through.

    The request ends when the body is exhausted (its last byte went out), or
    at ``close()`` for a body the server stopped reading; whichever comes
    first, once. ``close()`` is always forwarded to the application's body.
    A server must call ``close()``, but werkzeug's development server skips
    it when the client has hung up first (seen with HEAD requests): then the
    request ends when the server lets go of the body, so it is still counted.

    Of an error response (4xx, 5xx) the first faults.MAX_BODY bytes are
    kept as they pass (``head``), for the fault they name: every chunk
    goes on to the server at once and unchanged, nothing waits for the rest.
    """

    def __init__(self, body, request):
        self._body = body
        self._request = request
        self.head = None  # chunks of an error response's first bytes

    def __iter__(self):
        try:
            chunks = iter(self._body)
            for chunk in chunks:
                # WSGI: start_response is called by the first non-empty chunk.
                status = self._request.status
                if status is None:
                    yield chunk
                    continue
                if type(status) is str and status[:1] in ("4", "5"):
                    self.head = []
                    yield from self._keeping_head(itertools.chain((chunk,), chunks))
                else:
                    yield chunk
                    yield from chunks
                break
            self._request.finish(self.head)
        except GeneratorExit:
            # The server stopped iterating: the client went away. Not a
            # server error; the status that was sent is what counts.
            raise
        except BaseException as exc:
            self._request.error = labels.error_class(type(exc).__name__)
            raise

    def _keeping_head(self, chunks):
        room = faults.MAX_BODY
        head = self.head
        for chunk in chunks:
            if room > 0 and type(chunk) is bytes:
                piece = chunk[:room]  # the same object when it fits: no copy
                head.append(piece)
                room -= len(piece)
            yield chunk

    def close(self):
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._request.finish(self.head)

    def __del__(self):
        if not self._request.done:
            self._request.finish(self.head)


def _hop_error(code, error, body, headers):
    """What a failed request's hop names as its error: the status code, with
    the exception class when one is known ('409 PortBindingFailed').

    The class comes from an exception the application raised, or from the
    fault body OpenStack APIs return (middleware/faults.py: neutron's type,
    nova's and cinder's key, placement's code, keystone's and webob's
    title), of which only the first faults.MAX_BODY bytes of an error
    response are read: a list body's, or what an iterator body let through
    (_Body). Only the name is kept.
    """
    if not error and body and faults.is_error_status(code):
        error = faults.error_name(faults.head(body), _content_type(headers))
    return code + " " + error if error and error != labels.INVALID else code


def _content_type(headers):
    try:
        for name, value in headers or ():
            if isinstance(name, str) and name.lower() == "content-type":
                return value
    except (TypeError, ValueError):  # headers the server will refuse anyway
        pass
    return None


def _status_code(status):
    """'404 Not Found' -> '404'; anything odd -> '000'. Remembered in
    _STATUS_CODES, read first by the caller: applications send a few
    constant status lines."""
    if isinstance(status, str) and len(status) >= 3 and status[:3].isdigit():
        if len(_STATUS_CODES) < 1024:
            _STATUS_CODES[status] = status[:3]
        return status[:3]
    return "000"


_STATUS_CODES = {}


_user_agent_memo = {}


def _caller_from_user_agent(user_agent):
    """A fleet sends a handful of distinct User-Agents: remembered (in
    _user_agent_memo, read first by the caller), bounded."""
    caller = labels.UNKNOWN
    if isinstance(user_agent, str):
        head = user_agent[:512]
        for product, name in names.USER_AGENT_CALLERS:
            if product in head:
                caller = name
                break
    elif user_agent is not None:
        return caller
    if len(_user_agent_memo) >= 1024:
        _user_agent_memo.clear()
    _user_agent_memo[user_agent] = caller
    return caller


def _request_ids(request):
    """OpenStack's request ids: response headers first, then oslo.middleware's environ."""
    found = None
    for name, value in getattr(request, "headers", None) or ():
        if name.lower() in _REQUEST_ID_HEADERS:
            found = labels.request_id(value)
            if found:
                break
    environ = request.environ
    return (found or labels.request_id(environ.get("openstack.request_id")),
            labels.request_id(environ.get("openstack.global_request_id")))


# What the per-request path calls back, given to it once (and to the other
# implementation's by tests/test_differential.py).
_CALLBACKS = dict(
    trace_context=context.TraceContext, child_of_incoming=context.child_of_incoming,
    baggage_caller=_baggage_caller, user_agent_memo=_user_agent_memo,
    caller_from_user_agent=_caller_from_user_agent, status_codes=_STATUS_CODES,
    status_code=_status_code, http_methods=labels.HTTP_METHODS,
    other_method=labels.OTHER_METHOD, current=context.current_var,
    hop_metric=metrics.HTTP_SERVER_HOPS.name, error_class=labels.error_class,
    record_hop=_record_hop, recording_failed=_recording_failed, wrap_iterable=_Body)
_wsgi_request.bind(**_CALLBACKS)
