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
any auth header, and of a body only the exception class of a small JSON
fault in an error response (see ``_hop_error``). Loading it also installs the outbound hook
(``http_outbound``), so a service that calls others needs no code change.

The application's behaviour is unchanged: its exceptions propagate as they
are (and count as 500), its status, headers and body pass through untouched.
"""

import json
import logging
import time

from commlens.exporters import shipping
from commlens.middleware import http_client
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import labels
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import routes
from commlens.tracer import settings as settings_mod

LOG = logging.getLogger(__name__)

# Products in User-Agent headers of OpenStack's clients, first match wins:
# keystoneauth1 puts the calling client first ("python-novaclient
# keystoneauth1/5.1 python-requests/2.31 CPython/3.11").
_USER_AGENT_CALLERS = (
    ("openstacksdk", "openstacksdk"), ("python-openstackclient", "openstackclient"),
    ("python-novaclient", "novaclient"), ("python-neutronclient", "neutronclient"),
    ("python-cinderclient", "cinderclient"), ("python-glanceclient", "glanceclient"),
    ("python-keystoneclient", "keystoneclient"), ("osc-placement", "placementclient"),
    ("keystonemiddleware", "keystonemiddleware"), ("keystoneauth1", "keystoneauth1"),
)
_REQUEST_ID_HEADERS = ("x-openstack-request-id", "x-compute-request-id")

_perf_counter = time.perf_counter


def filter_factory(global_conf, **local_conf):
    """paste.deploy entry: options in the filter section override [commlens]."""
    def make(app):
        return CommlensMiddleware(app, **local_conf)
    return make


class CommlensMiddleware:

    def __init__(self, app, conf=None, **options):
        """``conf``: the service's ConfigOpts (default: oslo.config's global
        CONF); ``options``: overrides, by [commlens] option name."""
        if conf is None:
            from oslo_config import cfg
            conf = cfg.CONF
        self._app = app
        settings = settings_mod.load(conf, overrides=options)
        explicit = options.get("service_name")
        if explicit is not None and not settings_mod.valid_service_name(explicit):
            explicit = None  # settings_mod.load has logged it
        self._recorder = recorder_mod.install(
            settings, lambda rec: shipping.make_shipper(rec, settings), service=explicit)
        # A name given to this filter is its own; otherwise the process's
        # (README: several services in one process).
        self._service = explicit or self._recorder.service
        self._routes = routes.RouteTemplates(settings.http_max_routes)
        if settings.http_outbound:
            http_client.instrument(settings.http_endpoints)

    # The per-request path below is written for as few calls, stores and
    # objects as possible (the request is its own start_response, a list body
    # stays a list, a hop's ids are drawn only if needed): between a server's
    # socket reads each one costs three to five times what it costs in a
    # loop, and a minimal app is about 120 µs. benchmarks/wsgi_instructions.py
    # counts what a change costs there, to a tenth of a percent. Compiling the
    # tracer and this module with Cython was measured (2026-11-25): 2 % fewer
    # instructions per request, because the cost is in the object operations
    # themselves, not in the interpreter loop.
    def __call__(self, environ, start_response):
        try:
            request = _Request(self, environ, start_response)
        except Exception:
            self._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a request failed", exc_info=True)
            return self._app(environ, start_response)
        token = _set_current(request.ctx)
        try:
            body = self._app(environ, request)
        except BaseException as exc:
            _reset_current(token)
            request.error = labels.error_class(type(exc).__name__)
            request.finish()
            raise
        _reset_current(token)
        if type(body) is list:
            # Already produced in full: the request ends when the server has
            # written it and calls close().
            body = _ListBody(body)
            body.request = request
            return body
        return _Body(body, request)


_set_current = context.set_current
_reset_current = context.reset_current_in_frame


class _Request:
    """One request in flight; also the start_response the application gets.

    ``error`` is None unless the application or its body raised: then the
    exception's class. ``headers`` is set only when the application sets it.
    Nothing here refers back to the body: a cycle would leave every
    request's objects (the environ with them) to the garbage collector.
    """

    __slots__ = ("middleware", "ctx", "caller", "method", "route", "environ", "start",
                 "start_response", "status", "headers", "error", "done")

    def __init__(self, middleware, environ, start_response):
        traceparent = environ.get("HTTP_TRACEPARENT")
        if traceparent is None:
            # What child_of_incoming(None) returns, without its call and tuple.
            ctx = context.TraceContext()
        else:
            ctx, valid = context.child_of_incoming(traceparent)
            if not valid:
                middleware._recorder.dropped("bad_context")
        ctx.service = middleware._service
        baggage = environ.get("HTTP_BAGGAGE")
        caller = (None if baggage is None
                  else context.parse_baggage_sender(baggage, ctx.parent_id)[0])
        if caller is None:
            user_agent = environ.get("HTTP_USER_AGENT")
            caller = _user_agent_memo.get(user_agent) or _caller_from_user_agent(user_agent)
        method = environ.get("REQUEST_METHOD")
        if method not in _HTTP_METHODS:
            method = labels.OTHER_METHOD
        path = environ.get("PATH_INFO")
        routes = middleware._routes
        self.route = routes.remembered.get(path) or routes(path)
        self.caller = caller
        self.method = method
        self.middleware = middleware
        self.ctx = ctx
        self.environ = environ
        self.start_response = start_response
        self.status = None
        self.error = None
        self.done = False
        self.start = _perf_counter()

    def __call__(self, status, headers, exc_info=None):
        self.status = status
        self.headers = headers
        if exc_info is None:
            return self.start_response(status, headers)
        return self.start_response(status, headers, exc_info)

    def finish(self, body=None):
        """Record the request, once, however it ended; ``body``: a list body,
        read for its fault if the request failed."""
        if self.done:
            return
        self.done = True
        try:
            duration = _perf_counter() - self.start
            try:
                code = _STATUS_CODES[self.status]
            except (KeyError, TypeError):
                code = _status_code(self.status)
            if self.error is not None:
                code = "500"
            middleware = self.middleware
            rec = middleware._recorder
            # One update for the request metrics and the graph edge alike
            # (tracer/derived.py).
            rec.observe(metrics.HTTP_SERVER_HOPS,
                        (middleware._service, self.caller, self.method, self.route, code),
                        duration)
            # 4xx counts as ok for latency but its hop is kept: a 409 is often
            # where an error chain starts.
            failed = code[0] in "45" or code == "000"
            ctx = self.ctx
            if rec.keeps_hop(ctx.trace_id, duration, failed or ctx.child_failed):
                rec.add_hop(self._hop(code, failed, duration, body))
        except Exception:
            self.middleware._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a response failed", exc_info=True)

    def _hop(self, code, failed, duration, body):
        request_id, global_request_id = _request_ids(self)
        return hops.make_hop(
            self.ctx, service=self.middleware._service, side=hops.SERVER,
            protocol=hops.HTTP, peer=self.caller, target=self.route,
            operation=self.method + " " + self.route, kind=self.method,
            outcome=metrics.ERROR if code[0] == "5" else metrics.OK,
            error=_hop_error(code, self.error, body) if failed else None,
            start=hops.wall_clock_start(self.start, self.start + duration),
            duration=duration, request_id=request_id, global_request_id=global_request_id)


_HTTP_METHODS = labels.HTTP_METHODS


class _Body:
    """The application's body, passed through.

    The request ends when the body is exhausted (its last byte went out), or
    at ``close()`` for a body the server stopped reading; whichever comes
    first, once. ``close()`` is always forwarded to the application's body.
    A server must call ``close()``, but werkzeug's development server skips
    it when the client has hung up first (seen with HEAD requests): then the
    request ends when the server lets go of the body, so it is still counted.
    """

    def __init__(self, body, request):
        self._body = body
        self._request = request

    def __iter__(self):
        try:
            yield from self._body
            self._request.finish()
        except GeneratorExit:
            # The server stopped iterating: the client went away. Not a
            # server error; the status that was sent is what counts.
            raise
        except BaseException as exc:
            self._request.error = labels.error_class(type(exc).__name__)
            raise

    def close(self):
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._request.finish()

    def __del__(self):
        if not self._request.done:
            self._request.finish()


class _ListBody(list):
    """A list body, still a list to the server (its length, its fast
    iteration), with the ``close()`` that ends the request (or, as for
    ``_Body``, its release by a server that skipped ``close()``)."""

    __slots__ = ("request",)

    def close(self):
        self.request.finish(self)

    def __del__(self):
        request = self.request
        if not request.done:
            request.finish(self)


def _hop_error(code, error, body):
    """What a failed request's hop names as its error: the status code, with
    the exception class when one is known ('409 PortBindingFailed').

    The class comes from an exception the application raised, or from the
    fault body OpenStack APIs return (neutron: {"NeutronError": {"type":
    "PortBindingFailed", ...}}), read only for error responses whose JSON
    body is already in memory and small. Only the class name is kept.
    """
    error = error or _fault_type(body)
    return code + " " + error if error and error != labels.INVALID else code


_MAX_FAULT_BODY = 16384


def _fault_type(body):
    if not body or len(body) != 1 or not isinstance(body[0], bytes):
        return None
    if len(body[0]) > _MAX_FAULT_BODY or not body[0].startswith(b"{"):
        return None
    try:
        fault = json.loads(body[0])
        (detail,) = fault.values()
        return labels.error_class(detail.get("type")) if isinstance(detail, dict) else None
    except (ValueError, AttributeError):
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
        for product, name in _USER_AGENT_CALLERS:
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
