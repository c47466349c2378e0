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
        self._routes = routes.RouteCap(settings.http_max_routes)
        if settings.http_outbound:
            http_client.instrument(settings.http_endpoints)

    def __call__(self, environ, start_response):
        try:
            request = self._begin(environ)
        except Exception:
            self._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a request failed", exc_info=True)
            return self._app(environ, start_response)

        def recording_start_response(status, headers, exc_info=None):
            request.status = status
            request.headers = headers
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        token = context.set_current(request.ctx)
        try:
            body = self._app(environ, recording_start_response)
        except BaseException as exc:
            context.reset_current(token)
            request.failed = True
            request.error = labels.error_class(type(exc).__name__)
            self._finish(request)
            raise
        context.reset_current(token)
        if type(body) is list:
            # Already produced in full: the request ends when the server has
            # written it and calls close().
            return _ListBody(body, self, request)
        return _Body(body, self, request)

    def _begin(self, environ):
        ctx, valid = context.child_of_incoming(environ.get("HTTP_TRACEPARENT"))
        if not valid:
            self._recorder.dropped("bad_context")
        ctx.service = self._service
        caller, _kind = context.parse_baggage_sender(environ.get("HTTP_BAGGAGE"), ctx.parent_id)
        if caller is None:
            caller = _caller_from_user_agent(environ.get("HTTP_USER_AGENT"))
        return _Request(ctx, caller, labels.http_method(environ.get("REQUEST_METHOD")),
                        self._routes(routes.template(environ.get("PATH_INFO"))), environ)

    def _finish(self, request):
        if request.done:
            return
        request.done = True
        try:
            duration = _perf_counter() - request.start
            code = _status_code(request.status)
            if request.failed:
                code = "500"
            outcome = metrics.ERROR if code[0] == "5" else metrics.OK
            rec = self._recorder
            # One update for the request metrics and the graph edge alike
            # (tracer/derived.py).
            rec.observe(metrics.HTTP_SERVER_HOPS,
                        (self._service, request.caller, request.method, request.route, code),
                        duration)
            # 4xx counts as ok for latency but its hop is kept: a 409 is often
            # where an error chain starts.
            failed = code[0] in "45" or code == "000"
            if rec.keeps_hop(request.ctx.trace_id, duration,
                             failed or request.ctx.child_failed):
                request_id, global_request_id = _request_ids(request)
                rec.add_hop(hops.make_hop(
                    request.ctx, service=self._service, side=hops.SERVER,
                    protocol=hops.HTTP, peer=request.caller, target=request.route,
                    operation=request.method + " " + request.route, kind=request.method,
                    outcome=outcome, error=_hop_error(code, request) if failed else None,
                    start=hops.wall_clock_start(request.start, request.start + duration),
                    duration=duration, request_id=request_id,
                    global_request_id=global_request_id))
        except Exception:
            self._recorder.dropped("recording_error")
            LOG.debug("commlens: recording a response failed", exc_info=True)


class _Request:
    __slots__ = ("ctx", "caller", "method", "route", "environ", "start", "status",
                 "headers", "failed", "error", "body", "done")

    def __init__(self, ctx, caller, method, route, environ):
        self.ctx = ctx
        self.caller = caller
        self.method = method
        self.route = route
        self.environ = environ
        self.start = _perf_counter()
        self.status = None
        self.headers = None
        self.failed = False
        self.error = None
        self.body = None
        self.done = False


class _Body:
    """The application's body, passed through.

    The request ends when the body is exhausted (its last byte went out), or
    at ``close()`` for a body the server stopped reading; whichever comes
    first, once. ``close()`` is always forwarded to the application's body.
    """

    def __init__(self, body, middleware, request):
        self._body = body
        self._middleware = middleware
        self._request = request

    def __iter__(self):
        try:
            yield from self._body
            self._middleware._finish(self._request)
        except GeneratorExit:
            # The server stopped iterating: the client went away. Not a
            # server error; the status that was sent is what counts.
            raise
        except BaseException:
            self._request.failed = True
            raise

    def close(self):
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._middleware._finish(self._request)


class _ListBody:
    __slots__ = ("_body", "_middleware", "_request")

    def __init__(self, body, middleware, request):
        self._body = body
        self._middleware = middleware
        self._request = request

    def __iter__(self):
        return iter(self._body)

    def __len__(self):
        # Servers (gunicorn among them) use len() of a one-item body to set
        # Content-Length, as they would on the application's own list.
        return len(self._body)

    def close(self):
        self._request.body = self._body
        self._middleware._finish(self._request)


def _hop_error(code, request):
    """What a failed request's hop names as its error: the status code, with
    the exception class when one is known ('409 PortBindingFailed').

    The class comes from an exception the application raised, or from the
    fault body OpenStack APIs return (neutron: {"NeutronError": {"type":
    "PortBindingFailed", ...}}), read only for error responses whose JSON
    body is already in memory and small. Only the class name is kept.
    """
    error = request.error or _fault_type(request)
    return code + " " + error if error and error != labels.INVALID else code


_MAX_FAULT_BODY = 16384


def _fault_type(request):
    body = request.body
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
    """'404 Not Found' -> '404'; anything odd -> '000'."""
    if isinstance(status, str) and len(status) >= 3 and status[:3].isdigit():
        return status[:3]
    return "000"


_user_agent_memo = {}


def _caller_from_user_agent(user_agent):
    """A fleet sends a handful of distinct User-Agents: remembered, bounded."""
    try:
        return _user_agent_memo[user_agent]
    except (KeyError, TypeError):
        pass
    caller = labels.UNKNOWN
    if isinstance(user_agent, str):
        head = user_agent[:512]
        for product, name in _USER_AGENT_CALLERS:
            if product in head:
                caller = name
                break
        if len(_user_agent_memo) >= 1024:
            _user_agent_memo.clear()
        _user_agent_memo[user_agent] = caller
    return caller


def _request_ids(request):
    """OpenStack's request ids: response headers first, then oslo.middleware's environ."""
    found = None
    for name, value in request.headers or ():
        if name.lower() in _REQUEST_ID_HEADERS:
            found = labels.request_id(value)
            if found:
                break
    environ = request.environ
    return (found or labels.request_id(environ.get("openstack.request_id")),
            labels.request_id(environ.get("openstack.global_request_id")))
