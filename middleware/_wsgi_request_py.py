"""The WSGI middleware's per-request path in Python: the reference for middleware/_wsgi_request.c.

middleware/wsgi.py is the middleware (CommlensMiddleware subclasses
Middleware); this module is what runs for every request, and wsgi.py says
what it records and why. Whatever is rare (a traceparent to parse, an
unseen User-Agent, route or status line, a hop to ship, an error) is
wsgi.py's own Python, given to bind() once at import.

A request: the middleware makes a Request, which is also the
start_response the application gets; the request ends when the server
closes a list body (ListBody), when an iterator body (wsgi._Body) is
exhausted or closed, or when the application raises. tracer/implementation.py
picks this module or the compiled one.
"""

import time
import types

_clock = time.perf_counter  # CLOCK_MONOTONIC, as the compiled path reads it

# What wsgi.py binds (see bind()).
_bound = types.SimpleNamespace()


def bind(*, trace_context, child_of_incoming, baggage_caller, user_agent_memo,
         caller_from_user_agent, status_codes, status_code, http_methods, other_method,
         current, hop_metric, error_class, record_hop, recording_failed, wrap_iterable):
    """Give the per-request path the Python it calls back (wsgi.py, once)."""
    _bound.__dict__.update(
        trace_context=trace_context,          # context.TraceContext
        child_of_incoming=child_of_incoming,  # traceparent -> (ctx, valid)
        baggage_caller=baggage_caller,        # (baggage, parent_id) -> caller or None
        user_agent_memo=user_agent_memo,      # dict: User-Agent -> caller
        caller_from_user_agent=caller_from_user_agent,
        status_codes=status_codes,            # dict: status line -> code
        status_code=status_code,              # status line -> code, remembering it
        http_methods=http_methods,            # frozenset
        other_method=other_method,
        current=current,                      # ContextVar of the hop being served
        hop_metric=hop_metric,                # metrics.HTTP_SERVER_HOPS.name
        error_class=error_class,              # exception class name -> label
        record_hop=record_hop,                # (request, code, failed, duration, body)
        recording_failed=recording_failed,    # (recorder, exception)
        wrap_iterable=wrap_iterable)          # (body, request) -> wsgi._Body


class Middleware:
    """Middleware(app, service, recorder, routes): the per-request path of
    wsgi.CommlensMiddleware."""

    def __init__(self, app, service, recorder, routes):
        if not isinstance(service, str):
            raise TypeError("Middleware() argument 'service' must be str")
        if type(routes.remembered) is not dict:
            raise TypeError("routes.remembered is not a dict")
        self.app = app
        self.service = service
        self.recorder = recorder
        self._routes = routes                     # RouteTemplates
        self._routes_memo = routes.remembered     # the templates it found
        self._observe = recorder.observe
        self._keeps_hop = recorder.keeps_hop

    def __call__(self, environ, start_response):
        try:
            request = Request(self, environ, start_response)
        except Exception as exc:
            _bound.recording_failed(self.recorder, exc)
            return self.app(environ, start_response)
        # The hop is the current one while the application runs: the calls
        # it makes are its children.
        token = _bound.current.set(request.ctx)
        try:
            body = self.app(environ, request)
        except BaseException as exc:
            # The application raised: a 500, and its exception goes on as it is.
            self._reset_current(token)
            try:
                request._error = _bound.error_class(type(exc).__name__)
            except Exception:
                request._error = "500"
            request.finish()
            raise
        self._reset_current(token)
        if type(body) is list:
            # Already produced in full: the request ends when the server has
            # written it and calls close().
            return ListBody(body, request)
        return _bound.wrap_iterable(body, request)

    def _reset_current(self, token):
        try:
            _bound.current.reset(token)
        except Exception as exc:
            _bound.recording_failed(self.recorder, exc)


class Request:
    """One request in flight; also the start_response the application gets."""

    __slots__ = ("middleware", "ctx", "caller", "method", "route", "environ",
                 "start_response", "status", "headers", "_error", "start", "done")

    def __init__(self, middleware, environ, start_response):
        if not isinstance(environ, dict):
            raise TypeError("environ is not a dict")
        self.middleware = middleware
        self.environ = environ
        self.start_response = start_response
        self.status = self.headers = self._error = None
        self.done = False
        # The hop: a child of an incoming traceparent (a malformed one counts
        # as dropped "bad_context"), else a new trace's first hop.
        traceparent = environ.get("HTTP_TRACEPARENT")
        if traceparent is None:
            ctx = _bound.trace_context()
        else:
            ctx, valid = _bound.child_of_incoming(traceparent)
            if not valid:
                middleware.recorder.dropped("bad_context")
        ctx.service = middleware.service
        self.ctx = ctx
        self.caller = _caller(environ, ctx, traceparent is not None)
        method = environ.get("REQUEST_METHOD")
        try:
            known = method in _bound.http_methods
        except TypeError:  # an unhashable value
            known = False
        self.method = method if known else _bound.other_method
        path = _route_path(environ)
        try:
            route = middleware._routes_memo.get(path)
        except TypeError:
            route = None
        self.route = route if route is not None else middleware._routes(path)
        self.start = _clock()

    def __call__(self, status, headers, exc_info=None):
        self.status = status
        self.headers = headers
        if exc_info is None:
            return self.start_response(status, headers)
        return self.start_response(status, headers, exc_info)

    @property
    def error(self):
        """The class of what the application or its body raised, or None."""
        return self._error

    @error.setter
    def error(self, value):
        if value is not None and not isinstance(value, str):
            raise TypeError("Request.error: a str or None")
        self._error = value

    def finish(self, body=None):
        """Record the request, once, however it ended; ``body``: a list body,
        read for its fault if the request failed. Never raises."""
        if self.done:
            return
        self.done = True
        try:
            self._record(body)
        except Exception as exc:
            _bound.recording_failed(self.middleware.recorder, exc)

    def _record(self, body):
        duration = _clock() - self.start
        middleware = self.middleware
        if self._error is not None:
            code = "500"
        else:
            status = self.status
            code = _bound.status_codes.get(status) if type(status) is str else None
            if code is None:
                code = _bound.status_code(status)
        if not isinstance(code, str):
            raise TypeError("a status code label is a str")
        # 4xx counts as ok for latency but its hop is kept: a 409 is often
        # where an error chain starts.
        failed = not code or code[0] in "45" or code == "000"
        # One update for the request metrics and the graph edge alike
        # (tracer/derived.py).
        middleware._observe(_bound.hop_metric, (middleware.service, self.caller, self.method,
                                                self.route, code), duration)
        ctx = self.ctx
        if middleware._keeps_hop(ctx.trace_id, duration, True if failed else ctx.child_failed):
            _bound.record_hop(self, code, failed, duration, body)


def _route_path(environ):
    """The path the client asked for: SCRIPT_NAME + PATH_INFO. What a URL map
    or a mount point moved into SCRIPT_NAME (nova's ``/v2.1``, placement at
    ``/placement``) is part of the route: without it v2 and v2.1 of an API,
    or two APIs mounted on one server, read the same. A SCRIPT_NAME that is
    not a non-empty str, or a PATH_INFO that is neither absent nor a str,
    leaves PATH_INFO as it is (its template decides: ``other`` for garbage)."""
    path = environ.get("PATH_INFO")
    script = environ.get("SCRIPT_NAME")
    if type(script) is str and script:
        if path is None:
            return script
        if type(path) is str:
            return script + path
    return path


def _caller(environ, ctx, has_traceparent):
    """Our baggage member, else the User-Agent. The member names the caller
    only with the span id of the traceparent (context.parse_baggage_sender),
    so without one it is not read."""
    if has_traceparent and ctx.parent_id is not None:
        baggage = environ.get("HTTP_BAGGAGE")
        if baggage is not None:
            caller = _bound.baggage_caller(baggage, ctx.parent_id)
            if caller is not None:
                return caller
    user_agent = environ.get("HTTP_USER_AGENT")
    try:
        caller = _bound.user_agent_memo.get(user_agent)
    except TypeError:  # an unhashable value
        caller = None
    if caller is None:
        caller = _bound.caller_from_user_agent(user_agent)
    return caller


class ListBody(list):
    """A list body, still a list to the server (its length, its fast
    iteration), with the close() that ends the request."""

    __slots__ = ("request",)

    def __init__(self, items, request):
        super().__init__(items)
        self.request = request

    def close(self):
        """End the request."""
        self.request.finish(self)

    def __del__(self):
        # A server that never called close() (werkzeug's development server
        # when the client hung up): the request still ends, once.
        if not self.request.done:
            self.request.finish(self)
