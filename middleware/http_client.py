"""The outbound HTTP hook: REST calls made with ``requests``, seen by the caller.

keystoneauth1 and openstacksdk send through ``requests.Session.send``; the
hook wraps it (``instrument()``), adds ``traceparent`` and our baggage member
to the request, and records target service, method, status and the time
until the response headers arrived. ``uninstrument()`` puts the original back.
Both are safe to call twice.

The target service comes from the ``http_endpoints`` map (SERVICE=URL, matched
on scheme, host and port), else from the Keystone catalog's service type when
keystoneauth1 made the request, as the name that service has in commlens
(tracer/names.py: image -> glance-api; the ``service_names`` setting adds to
it), else ``unknown``: never a URL. keystoneauth1's own requests while it finds
an endpoint (the version discovery ``GET /`` of that endpoint, a token from
the auth URL) are the endpoint's service's and keystone's.
"""

import contextvars
import logging
import re
import threading
import time
import urllib.parse

from commlens.middleware import faults
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import labels
from commlens.tracer import metrics
from commlens.tracer import names
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import settings as settings_mod
from commlens.tracer import shipping

LOG = logging.getLogger(__name__)

_lock = threading.Lock()
_original_send = None
_endpoints = {}
_catalog_names = dict(names.CATALOG_SERVICES)
# Session methods of keystoneauth1 that know the service type they serve.
_KEYSTONE_METHODS = ("request", "get_endpoint", "get_endpoint_data")
_original_keystone = {}
# The service type keystoneauth1 is resolving an endpoint for, if any.
_keystone_service_type = contextvars.ContextVar("commlens_keystone_service_type",
                                                default=None)
_perf_counter = time.perf_counter


def parse_endpoints(pairs):
    """["neutron-server=http://10.0.0.5:9696", ...] -> {("http", "10.0.0.5", 9696): name}."""
    mapping = {}
    for pair in pairs or ():
        service, sep, url = pair.partition("=")
        service = service.strip()
        if not sep or not settings_mod.valid_service_name(service):
            raise ValueError(f"http_endpoints: {pair!r} is not SERVICE=URL")
        mapping[_endpoint_key(url.strip())] = service
    return mapping


def _endpoint_key(url):
    parts = urllib.parse.urlsplit(url)
    scheme = (parts.scheme or "http").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def instrument(endpoint_pairs=None, conf=None, service_names=None):
    """Wrap requests.Session.send (and keystoneauth1's Session if installed).

    The one call a service with neither a WSGI pipeline nor a commlens+
    transport makes; it installs the process's agent from ``conf`` (default:
    oslo.config's global CONF) and the environment if nothing else did.
    """
    global _original_send, _endpoints, _catalog_names
    if endpoint_pairs is None or service_names is None or recorder_mod.get_recorder() is None:
        if conf is None:
            from oslo_config import cfg
            conf = cfg.CONF
        settings = settings_mod.load(conf)
        recorder_mod.install(settings, lambda rec: shipping.make_shipper(rec, settings))
        if endpoint_pairs is None:
            endpoint_pairs = settings.http_endpoints
        if service_names is None:
            service_names = settings.service_names
    endpoints = parse_endpoints(endpoint_pairs)
    catalog = names.parse_catalog_names(service_names)
    with _lock:
        _endpoints = {**_endpoints, **endpoints}
        _catalog_names = {**_catalog_names, **catalog}
        if _original_send is not None:
            return
        import requests

        _original_send = requests.Session.send
        requests.Session.send = _send
        try:
            from keystoneauth1 import session as ks_session
        except ImportError:
            return
        for name in _KEYSTONE_METHODS:
            original = getattr(ks_session.Session, name, None)
            if original is not None:
                _original_keystone[name] = original
                setattr(ks_session.Session, name, _keystone_wrapper(original))


def uninstrument():
    global _original_send, _endpoints, _catalog_names
    with _lock:
        if _original_send is not None:
            import requests

            requests.Session.send = _original_send
            _original_send = None
        if _original_keystone:
            from keystoneauth1 import session as ks_session

            for name, original in _original_keystone.items():
                setattr(ks_session.Session, name, original)
            _original_keystone.clear()
        _endpoints = {}
        _catalog_names = dict(names.CATALOG_SERVICES)


def _keystone_wrapper(original):
    """keystoneauth1's Session method ``original``, run with the service
    type it serves as the context of the requests it sends."""
    def wrapper(self, *args, **kwargs):
        try:
            service_type = _service_type_of(self, args, kwargs)
        except Exception:
            service_type = None
        token = _keystone_service_type.set(service_type)
        try:
            return original(self, *args, **kwargs)
        finally:
            _keystone_service_type.reset(token)
    wrapper.__wrapped__ = original
    return wrapper


def _service_type_of(session, args, kwargs):
    """The catalog type a keystoneauth1 call serves: its own argument, else
    (a request with none: keystoneauth1's own, made while it finds the
    endpoint of an outer call) keystone's for the auth URL, else the outer
    call's (the version discovery of that endpoint, ``GET /``)."""
    endpoint_filter = kwargs.get("endpoint_filter") or {}
    service_type = kwargs.get("service_type") or endpoint_filter.get("service_type")
    if service_type:
        return service_type
    url = args[0] if args else kwargs.get("url")
    auth_url = getattr(getattr(session, "auth", None), "auth_url", None)
    if isinstance(url, str) and isinstance(auth_url, str) and _same_endpoint(url, auth_url):
        return "identity"
    return _keystone_service_type.get()


def _same_endpoint(url, base):
    """Whether ``url`` is under ``base`` (scheme, host, port and the path
    before the version: ``http://h/identity/v3`` covers ``http://h/identity``)."""
    try:
        if _endpoint_key(url) != _endpoint_key(base):
            return False
    except ValueError:
        return False
    prefix = _VERSION_SUFFIX.sub("", urllib.parse.urlsplit(base).path.rstrip("/"))
    path = urllib.parse.urlsplit(url).path
    return not prefix or path == prefix or path.startswith(prefix + "/")


_VERSION_SUFFIX = re.compile(r"/v\d+(?:\.\d+)?$")


def _send(self, request, **kwargs):
    original = _original_send
    try:
        call = _begin(request)
    except Exception:
        call = None
        recorder = recorder_mod.get_recorder()
        if recorder is not None:
            recorder.dropped("recording_error")
        LOG.debug("commlens: recording an outbound request failed", exc_info=True)
    if call is None:
        return original(self, request, **kwargs)
    try:
        response = original(self, request, **kwargs)
    except BaseException:
        _end(call, None)
        raise
    _end(call, response)
    return response


class _Call:
    __slots__ = ("recorder", "service", "ctx", "target", "method", "start")


def _begin(request):
    recorder = recorder_mod.get_recorder()
    if recorder is None:
        return None
    call = _Call()
    call.recorder = recorder
    call.service = context.current_service(recorder.service)
    call.ctx = context.stamp_outgoing(request.headers, call.service, "http")
    call.target = _target(request.url)
    call.method = labels.http_method(request.method)
    call.start = _perf_counter()
    return call


def _target(url):
    try:
        service = _endpoints.get(_endpoint_key(url))
    except ValueError:
        service = None
    if service is None:
        service_type = _keystone_service_type.get()
        if not service_type:
            return labels.UNKNOWN
        service = _catalog_names.get(service_type) or labels.dotted(service_type)
    return service


def _end(call, response):
    try:
        duration = _perf_counter() - call.start
        rec = call.recorder
        if response is None:
            code, outcome = metrics.FAILED, metrics.FAILED
        else:
            code = str(response.status_code)
            outcome = metrics.ERROR if code.startswith("5") else metrics.OK
        rec.inc(metrics.HTTP_CLIENT_REQUESTS, (call.service, call.target, call.method, code))
        # The service graph's client side is its sum (tracer/derived.py).
        rec.observe(metrics.HTTP_CLIENT_DURATION,
                    (call.service, call.target, call.method, outcome), duration)
        if response is None:
            edge = (call.service, call.target, "")
            rec.inc(metrics.SERVICE_GRAPH_REQUESTS, edge)
            rec.inc(metrics.SERVICE_GRAPH_FAILED, edge)
        failed = outcome != metrics.OK or (response is not None and code[0] == "4")
        if failed:
            context.mark_child_failed()
        if rec.keeps_hop(call.ctx.trace_id, duration, failed):
            request_id = None
            if response is not None:
                request_id = labels.request_id(
                    response.headers.get("x-openstack-request-id")
                    or response.headers.get("x-compute-request-id"))
            rec.add_hop(hops.make_hop(
                call.ctx, service=call.service, side=hops.CLIENT, protocol=hops.HTTP,
                peer=None, target=call.target, operation=call.method, kind=call.method,
                outcome=outcome, error=_hop_error(code, response) if failed else None,
                start=hops.wall_clock_start(call.start, call.start + duration),
                duration=duration, request_id=request_id))
    except Exception:
        call.recorder.dropped("recording_error")
        LOG.debug("commlens: recording an outbound response failed", exc_info=True)


def _hop_error(code, response):
    """The status code, with the error the response's body names when it has
    one (middleware/faults.py): '409 placement.concurrent_update'. Only a
    body ``requests`` has already read is looked at (``stream=False``, the
    default, reads it before send returns); a streamed one is left alone,
    for its reader."""
    if response is None or not faults.is_error_status(code):
        return code
    content = getattr(response, "_content", None)
    if type(content) is not bytes:  # False: not read (stream=True)
        return code
    name = faults.error_name(content[:faults.MAX_BODY], response.headers.get("content-type"))
    return code + " " + name if name else code
