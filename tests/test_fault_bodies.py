"""Readable errors from every OpenStack API's error body (issue 18, item 6).

Real WSGI servers on loopback (werkzeug) answer with the fault bodies of
neutron, nova, cinder, placement, ironic, keystone and glance, made the way
each project makes them (webob's exceptions and Response for the webob
projects, a Flask response for keystone, whose body is an iterator); the
servers run commlens's filter and the test process calls them with
``requests`` through commlens's outbound hook. Both hops of each request,
as the collector received them over RabbitMQ, name the same error. Bodies
that are huge, binary, not UTF-8, malformed or carry a token name nothing
and break nothing; streamed bodies reach the client whole and at once.
"""

import json
import threading
import uuid

import flask
import pytest
import requests
import webob
import webob.exc

from commlens.middleware import faults
from commlens.middleware import http_client
from commlens.middleware import wsgi
from support import serve_wsgi, wait_for

pytestmark = pytest.mark.slow

TOKEN = "gAAAAABnT" + "x7Qk-Zr_9" * 24  # a Fernet-like token: never in a hop
HEX_TOKEN = "5f1e2d3c4b5a69788796a5b4c3d2e1f0"


def _webob(status, body, content_type="application/json"):
    """A webob Response, as nova's, cinder's and neutron's Fault produce."""
    return webob.Response(status=status, body=body, content_type=content_type,
                          charset=None)


def _nova_fault(code, name, message):
    # nova/api/openstack/wsgi.py (and cinder/api/openstack/wsgi.py), class
    # Fault: {fault_name: {"code": code, "message": explanation}}, the name
    # from _fault_names by status (409 conflictingRequest, 404 itemNotFound).
    return json.dumps({name: {"code": code, "message": message}}).encode()


def _placement_formatter(body, status, title, environ):
    # placement/util.py, json_error_formatter (microversion >= 1.23 adds
    # the code from the exception's comment).
    return {"errors": [{"status": int(status.split(None, 1)[0]), "title": title,
                        "detail": webob.exc.strip_tags(body),
                        "code": "placement.concurrent_update",
                        "request_id": "req-5c1a7b2e-0f3d-4e8a-9b6c-1d2e3f4a5b6c"}]}


def _keystone_app():
    # keystone/server/flask/application.py, render_exception: a Flask JSON
    # response, which werkzeug sends as an iterator (ClosingIterator).
    app = flask.Flask("keystone")

    @app.get("/v3/projects/<project>")
    def project(project):
        return flask.jsonify({"error": {
            "code": 404, "title": "Not Found",
            "message": f"Could not find project: {project}."}}), 404
    return app


class _Stream:
    """An iterator body whose second chunk waits for the client to have read
    the first: it proves nothing is held back."""

    def __init__(self, status):
        self.status = status
        self.first_read = threading.Event()

    def __call__(self, environ, start_response):
        start_response(self.status, [("Content-Type", "application/octet-stream")])

        def chunks():
            yield b"first chunk;"
            if not self.first_read.wait(15):
                yield b"timed out"
                return
            for i in range(100):
                yield b"%04d" % i * 256  # 100 KiB in all, past faults.MAX_BODY
        return chunks()


def _app(streams):
    keystone = _keystone_app()
    ironic_inner = json.dumps({"faultcode": "Client", "faultstring":
                               "Node 1be26c0b-03f2-4d2e-ae87-c02d7f33c123 could not be "
                               "found.", "debuginfo": None})
    bodies = {
        # neutron: neutron/api/v2/base.py's fault body
        "/neutron": ("409 Conflict", json.dumps({"NeutronError": {
            "type": "PortBindingFailed", "message": "Binding failed for port",
            "detail": ""}}).encode()),
        "/nova": ("409 Conflict", _nova_fault(
            409, "conflictingRequest",
            "Cannot 'resize' instance while it is in task_state migrating")),
        "/nova-missing": ("404 Not Found", _nova_fault(
            404, "itemNotFound", "Instance 3f2a could not be found.")),
        "/nova-fault": ("500 Internal Server Error", _nova_fault(
            500, "computeFault", "Unexpected API Error.")),
        "/cinder": ("400 Bad Request", _nova_fault(400, "badRequest", "Invalid volume")),
        # ironic/api/middleware/parsable_error.py around method.format_exception:
        # its faultcode is the generic Client, its faultstring free text.
        "/ironic": ("404 Not Found", json.dumps({"error_message": ironic_inner}).encode()),
        "/huge": ("409 Conflict", json.dumps({"NeutronError": {
            "type": "PortBindingFailed", "message": "x" * 1_000_000}}).encode()),
        "/binary": ("500 Internal Server Error", bytes(range(256)) * 64),
        "/not-utf8": ("409 Conflict", b'{"NeutronError": {"type": "Port\xff\xfeFailed"}}'),
        "/malformed": ("409 Conflict", b'{"NeutronError": {"type": "PortBindingFailed",'),
        "/token-type": ("409 Conflict", json.dumps({"NeutronError": {
            "type": TOKEN, "message": TOKEN}}).encode()),
        "/hex-type": ("409 Conflict", json.dumps({"NeutronError": {
            "type": HEX_TOKEN}}).encode()),
        "/token-message": ("401 Unauthorized", _nova_fault(
            401, "unauthorized", f"token {TOKEN} is not valid")),
        "/ok": ("200 OK", json.dumps({"NeutronError": {"type": "NotAnError"}}).encode()),
    }

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path in bodies:
            status, body = bodies[path]
            return _webob(status, body)(environ, start_response)
        if path == "/placement":
            # placement/handlers/*: webob.exc.HTTPConflict(..., comment=code,
            # json_formatter=util.json_error_formatter), Accept: application/json
            return webob.exc.HTTPConflict(
                "resource provider generation conflict",
                json_formatter=_placement_formatter)(environ, start_response)
        if path.startswith("/glance"):
            # glance/api/v2/images.py raises webob.exc.HTTPConflict; webob
            # renders it by the Accept header: plain text, HTML or JSON.
            return webob.exc.HTTPConflict(explanation="Image 6a1f is in use")(
                environ, start_response)
        if path.startswith("/v3/projects/"):
            return keystone(environ, start_response)
        if path in streams:
            return streams[path](environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such path"]
    return app


@pytest.fixture
def api(collector, conf):
    """(service, base URL, streams): a server with commlens's filter, and the
    outbound hook naming it as the target ``service``. The filter takes the
    process's name (a name of its own would rename this test process,
    which later tests count as test-client)."""
    service = f"faults-{uuid.uuid4().hex[:6]}"
    streams = {"/stream-ok": _Stream("200 OK"), "/stream-error": _Stream("503 Service Unavailable")}
    middleware = wsgi.CommlensMiddleware(_app(streams), conf=conf, http_outbound="false")
    with serve_wsgi(middleware) as base:
        http_client.instrument([f"{service}={base}"], conf=conf)
        try:
            yield service, base, streams
        finally:
            http_client.uninstrument()


def _hops(collector, service, requests_made=1):
    """(server hops, client hops) of the requests to ``service`` once both
    ends' hops of every one have arrived: the server's are in the client's
    traces."""
    def arrived():
        client = collector.hops(target=service, side="client")
        traces = {h["trace_id"] for h in client}
        server = [h for h in collector.hops(side="server") if h["trace_id"] in traces]
        if len(server) >= requests_made and len(client) >= requests_made:
            return server, client
        return None
    return wait_for(arrived, timeout=30, message="both ends' hops")


CASES = [
    ("/neutron", {}, "409 PortBindingFailed"),
    ("/nova", {}, "409 conflictingRequest"),
    ("/nova-missing", {}, "404 itemNotFound"),
    ("/nova-fault", {}, "500 computeFault"),
    ("/cinder", {}, "400 badRequest"),
    ("/placement", {"Accept": "application/json"}, "409 placement.concurrent_update"),
    ("/ironic", {}, "404"),
    ("/v3/projects/p1", {}, "404 NotFound"),
    ("/glance/text", {"Accept": "text/plain"}, "409 Conflict"),
    ("/glance/html", {"Accept": "text/html"}, "409 Conflict"),
    ("/glance/json", {"Accept": "application/json"}, "409 Conflict"),
    ("/huge", {}, "409"),
    ("/binary", {}, "500"),
    ("/not-utf8", {}, "409"),
    ("/malformed", {}, "409"),
    ("/token-type", {}, "409"),
    ("/hex-type", {}, "409"),
    ("/token-message", {}, "401 unauthorized"),
]


def test_both_ends_name_the_error_each_project_s_body_gives(collector, api):
    service, base, _ = api
    sent = {}
    for path, headers, _expected in CASES:
        response = requests.get(base + path, headers=headers, timeout=10)
        assert response.status_code >= 400
        sent[path] = response
    # The bodies reached the client whole.
    assert len(sent["/huge"].content) > 1_000_000
    assert sent["/binary"].content == bytes(range(256)) * 64
    assert sent["/placement"].json()["errors"][0]["code"] == "placement.concurrent_update"
    server_hops, client_hops = _hops(collector, service, len(CASES))
    inbound = sorted(h["error"] for h in server_hops)
    outbound = sorted(h["error"] for h in client_hops)
    expected = sorted(e for _, _, e in CASES)
    assert inbound == expected
    assert outbound == expected
    everything = json.dumps(server_hops + client_hops) + collector.metrics().text
    assert TOKEN not in everything and HEX_TOKEN not in everything
    assert "could not be found" not in everything and "in use" not in everything


def test_a_success_body_is_never_read(collector, api):
    service, base, _ = api
    assert requests.get(base + "/ok", timeout=10).status_code == 200
    server, client = _hops(collector, service)
    assert [h["error"] for h in server + client] == [None, None]


@pytest.mark.parametrize("path, error", [("/stream-ok", None), ("/stream-error", "503")])
def test_streamed_bodies_reach_the_client_at_once_and_unchanged(collector, api, path, error):
    service, base, streams = api
    stream = streams[path]
    with requests.get(base + path, stream=True, timeout=10) as response:
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        # The server holds its second chunk until the client has the first:
        # a filter that buffered the body would never let it through.
        assert first.startswith(b"first chunk;")
        stream.first_read.set()
        rest = first + b"".join(chunks)
    expected = b"first chunk;" + b"".join(b"%04d" % i * 256 for i in range(100))
    assert rest == expected
    if error:
        # Its first bytes name nothing (binary): the status code alone, at
        # both ends (the client's body was streamed: not read by the hook).
        server, client = _hops(collector, service)
        assert [h["error"] for h in server] == [error]
        assert [h["error"] for h in client] == [error]


def test_error_name_bounds():
    """The parser alone: each bound holds (no server needed)."""
    assert faults.error_name(b'{"NeutronError": {"type": "PortBindingFailed"}}') == \
        "PortBindingFailed"
    # Cut at MAX_BODY: a JSON body longer than that names nothing.
    long = json.dumps({"NeutronError": {"type": "PortBindingFailed",
                                        "message": "x" * faults.MAX_BODY}}).encode()
    assert faults.error_name(faults.head([long])) is None
    # A deep nest, a list, a number: nothing, no exception.
    for body in (b"[" * 5000, b"{" * 5000, b"12", b"null", b'"x"', b"\x00" * 10):
        assert faults.error_name(body) is None
    # A name too long, with too many digits, or free text: nothing.
    for name in ("A" * 65, "Error12345", "Port Binding", "a.b..c", "x\n"):
        body = json.dumps({"NeutronError": {"type": name}}).encode()
        assert faults.error_name(body) is None
    # A plain-text status line whose reason is not a phrase of words.
    assert faults.error_name(b"409 " + TOKEN.encode()) is None
    assert faults.error_name(b"404 Not Found\n\nThe resource could not be found.") == "NotFound"
    # head() takes at most MAX_BODY bytes of bytes chunks, and stops at anything else.
    assert len(faults.head([b"a" * 3000, b"b" * 3000])) == faults.MAX_BODY
    assert faults.head([b"ab", "text", b"cd"]) == b"ab"
