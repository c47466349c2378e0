"""The WSGI middleware at the edges: bodies, errors, disconnects, bad input, secrets.

A real werkzeug server runs in a thread of the test process, with the
middleware in front of small WSGI apps; requests go over real sockets. The
test process's own recorder is read directly for counts; hops and the
Prometheus view are read from the collector it ships to.
"""

import gc
import json
import random
import socket
import string
import textwrap
import time
import uuid

import pytest
import requests

from commlens.middleware import http_client
from commlens.middleware.wsgi import CommlensMiddleware
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import routes
from support import blocks_left_behind, serve_wsgi, wait_for


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class ClosableBody:
    def __init__(self, chunks, delay=0.0):
        self.chunks = chunks
        self.delay = delay
        self.closed = False

    def __iter__(self):
        for chunk in self.chunks:
            time.sleep(self.delay)
            yield chunk

    def close(self):
        self.closed = True


class App:
    """Routes by the first path segment; remembers what it returned."""

    def __init__(self):
        self.bodies = []

    def __call__(self, environ, start_response):
        kind = environ["PATH_INFO"].split("/")[1]
        if kind == "stream":
            body = ClosableBody([b"a" * 1000] * 5, delay=0.05)
            self.bodies.append(body)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return body
        if kind == "slowstream":
            body = ClosableBody([b"b" * 65536] * 200, delay=0.02)
            self.bodies.append(body)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return body
        if kind in ("empty", "notmodified"):
            start_response("204 No Content" if kind == "empty" else "304 Not Modified", [])
            return []
        if kind == "upload":
            data = environ["wsgi.input"].read()
            start_response("201 Created", [("Content-Type", "text/plain")])
            return [str(len(data)).encode()]
        if kind == "raise":
            raise KeyError("app failure")
        if kind == "raise-in-body":
            start_response("200 OK", [("Content-Type", "text/plain")])

            def failing():
                yield b"partial"
                raise ValueError("body failure")
            return failing()
        if kind == "fail":
            start_response("502 Bad Gateway", [("Content-Type", "text/plain")])
            return [b"upstream down"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


@pytest.fixture
def app():
    return App()


@pytest.fixture
def base_url(app, conf):
    middleware = CommlensMiddleware(app, http_outbound="false")
    with serve_wsgi(middleware) as url:
        yield url


def requests_seen(route, **labels):
    recorder = recorder_mod.get_recorder()
    snapshot_counters = recorder.snapshot(1.0, max_hops=0)["counters"]
    total = 0
    for name, values, value in snapshot_counters:
        if name != "commlens_http_requests_total":
            continue
        series = dict(zip(("service", "caller", "method", "route", "code"), values,
                          strict=True))
        if series["route"] == route and all(series[k] == v for k, v in labels.items()):
            total += value
    return total


def _series_for(path):
    counters = recorder_mod.get_recorder().snapshot(1.0, max_hops=0)["counters"]
    return [c for c in counters if c[0] == "commlens_http_requests_total" and path in c[1]]


def test_streamed_body_is_timed_to_the_last_byte_and_closed(app, base_url):
    before = requests_seen("/stream/{id}", code="200")
    started = time.monotonic()
    assert requests.get(f"{base_url}/stream/{uuid.uuid4()}", timeout=10).content == b"a" * 5000
    elapsed = time.monotonic() - started
    wait_for(lambda: requests_seen("/stream/{id}", code="200") == before + 1,
             message="the streamed request counted")
    wait_for(lambda: app.bodies[-1].closed, message="the app's body closed")
    # the duration histogram saw at least the body's 5 x 50 ms
    recorder = recorder_mod.get_recorder()
    durations = [h for h in recorder.snapshot(1.0, max_hops=0)["histograms"]
                 if h[0] == "commlens_http_request_duration_seconds" and h[1][2] == "/stream/{id}"]
    assert durations and durations[0][3] >= 0.25 and durations[0][3] <= elapsed + 1


@pytest.mark.parametrize("method, path, code", [
    ("HEAD", "/plain", "200"), ("GET", "/empty", "204"), ("GET", "/notmodified", "304"),
    ("GET", "/fail", "502"),
])
def test_head_and_bodiless_and_5xx_responses_are_counted(base_url, method, path, code):
    before = requests_seen(path, method=method, code=code)
    response = requests.request(method, base_url + path, timeout=10)
    assert str(response.status_code) == code
    wait_for(lambda: requests_seen(path, method=method, code=code) == before + 1,
             message=f"{method} {path} counted (before: {before}; recorded: "
                     f"{_series_for(path)})")


def test_chunked_upload_reaches_the_app_whole(base_url):
    before = requests_seen("/upload", code="201")
    chunks = (b"x" * 1000 for _ in range(10))  # a generator: Transfer-Encoding chunked
    response = requests.post(f"{base_url}/upload", data=chunks, timeout=10)
    assert response.status_code == 201 and response.text == "10000"
    wait_for(lambda: requests_seen("/upload", code="201") == before + 1,
             message="the upload counted")


def _start_response(status, headers, exc_info=None):
    return lambda data: None


def test_app_exceptions_propagate_unchanged_and_count_as_500(app, conf):
    middleware = CommlensMiddleware(app, http_outbound="false")
    before = requests_seen("/raise", code="500")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/raise"}
    with pytest.raises(KeyError, match="app failure"):
        middleware(environ, _start_response)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/raise-in-body"},
                      _start_response)
    with pytest.raises(ValueError, match="body failure"):
        list(body)
    body.close()
    assert requests_seen("/raise", code="500") == before + 1
    assert requests_seen("/raise-in-body", code="500") >= 1


def test_a_list_body_stays_a_list_and_ends_at_close(conf):
    def app(environ, start_response):
        start_response("201 Created", [("Content-Length", "5")])
        return [b"hello"]

    middleware = CommlensMiddleware(app, http_outbound="false")
    before = requests_seen("/listbody", code="201")
    body = middleware({"REQUEST_METHOD": "POST", "PATH_INFO": "/listbody"}, _start_response)
    # Servers size one-item lists (Content-Length) and iterate them natively.
    assert isinstance(body, list) and len(body) == 1 and list(body) == [b"hello"]
    assert requests_seen("/listbody", code="201") == before  # not yet written out
    body.close()
    body.close()  # a second close counts nothing more
    assert requests_seen("/listbody", code="201") == before + 1


def test_a_body_the_server_never_closes_is_counted_when_released(conf):
    # werkzeug's development server skips close() when the client hung up
    # first; the request must still count, once.
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"ok"] if environ["PATH_INFO"] == "/unclosed-list" else iter([b"ok"])

    middleware = CommlensMiddleware(app, http_outbound="false")
    for path in ("/unclosed-list", "/unclosed-iter"):
        before = requests_seen(path, code="200")
        body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, _start_response)
        assert requests_seen(path, code="200") == before
        del body
        assert requests_seen(path, code="200") == before + 1
        body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, _start_response)
        list(body)
        body.close()
        del body  # closed: counted once, not again when released
        assert requests_seen(path, code="200") == before + 2


def test_a_request_leaves_no_reference_cycle_behind(conf):
    # A cycle (request <-> body) would keep each request's objects, its
    # environ with them, until the garbage collector runs: on a busy API
    # server that is most of what the collector does all day.
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"] if environ["PATH_INFO"] == "/list" else iter([b"o", b"k"])

    middleware = CommlensMiddleware(app, http_outbound="false")
    for path in ("/list", "/iter"):
        middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, _start_response)  # warm
    gc.collect()
    gc.disable()
    try:
        for path, traceparent in [("/list", None), ("/iter", None),
                                  ("/list", TRACEPARENT), ("/iter", TRACEPARENT)] * 25:
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
            if traceparent:
                environ["HTTP_TRACEPARENT"] = traceparent
            body = middleware(environ, _start_response)
            assert b"".join(body) == b"ok"
            body.close()
        del body
        assert gc.collect() == 0
    finally:
        gc.enable()


LEAK_CHECK = r"""
import sys
from commlens.middleware.wsgi import CommlensMiddleware
from commlens.tracer import recorder as recorder_mod

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BAGGAGE = "commlens.service=nova-api;kind=http;span=00f067aa0ba902b7"

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/raise":
        raise KeyError("app failure")
    if path == "/exc-info":
        start_response("200 OK", [])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"failed"]
    start_response("200 OK", [("Content-Length", "2")])
    if path == "/iter":
        return iter([b"o", b"k"])
    if path == "/raise-in-body":
        def body():
            yield b"o"
            raise ValueError("body failure")
        return body()
    return [b"ok"]

def start_response(status, headers, exc_info=None):
    return None

middleware = CommlensMiddleware(app, http_outbound="false")

def one_of_each():
    for path in ("/list", "/iter", "/raise", "/raise-in-body", "/exc-info", "/unclosed"):
        for headers in ({}, {"HTTP_TRACEPARENT": TRACEPARENT, "HTTP_BAGGAGE": BAGGAGE},
                        {"HTTP_TRACEPARENT": "garbage"}):
            environ = dict(headers, REQUEST_METHOD="GET", PATH_INFO=path)
            try:
                body = middleware(environ, start_response)
                if path == "/unclosed":
                    del body
                    continue
                for _ in body:
                    pass
            except (KeyError, ValueError):
                pass
            else:
                body.close()
    # Failed requests' hops are always kept: taken here, as the shipper would.
    recorder_mod.get_recorder().snapshot(1.0)
"""


def test_the_compiled_request_path_leaks_nothing():
    # middleware/_wsgi_request.c counts its references by hand: a missed
    # release on any path (list or iterator body, an exception from the app
    # or its body, start_response with exc_info, a traceparent good or bad,
    # a body never closed) would leave 2,000 objects here, or more.
    assert blocks_left_behind(LEAK_CHECK, warm_up=200, rounds=2000) < 200


def test_client_disconnect_mid_body_still_closes_and_counts(app, base_url):
    before = requests_seen("/slowstream", code="200")
    host, port = base_url.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port))) as sock:
        sock.sendall(b"GET /slowstream HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1024)
    wait_for(lambda: app.bodies and app.bodies[-1].closed, timeout=20,
             message="the app's body closed after the client left")
    wait_for(lambda: requests_seen("/slowstream", code="200") == before + 1,
             message="the aborted request counted")


def test_garbage_headers_and_odd_paths_are_served_and_kept_out_of_labels(base_url, collector):
    odd = [
        {"traceparent": "zz" * 1000, "baggage": "commlens.service=evil\"}" * 100},
        {"traceparent": "00-" + "f" * 32 + "-" + "f" * 16 + "-01",
         "baggage": "commlens.service=x;kind=http;span=" + "f" * 16 + ",a=\u00e9"},
        {"user-agent": "python-novaclient" + "x" * 10000},
    ]
    for headers in odd:
        assert requests.get(f"{base_url}/plain", headers=headers, timeout=10).status_code == 200
    # A non-UTF-8 path and a header injection attempt, sent raw.
    host, port = base_url.rsplit(":", 1)
    for raw in (b"GET /plain/\xff\xfe%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"GET /plain HTTP/1.1\r\nHost: x\r\nbaggage: commlens.service=a\r\n"
                b" injected: 1\r\nConnection: close\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", int(port))) as sock:
            sock.sendall(raw)
            assert sock.recv(100).split(b" ")[1] in (b"200", b"400")
    recorder = recorder_mod.get_recorder()
    labels = {v for _, values, _ in recorder.snapshot(1.0, max_hops=0)["counters"]
              for v in values}
    assert all(set(v) <= set(string.ascii_letters + string.digits + "_.-/{}")
               for v in labels), sorted(v for v in labels if not v.isascii())


def test_tokens_and_passwords_never_reach_labels_hops_or_metrics(base_url, collector):
    token = "gAAAAAB" + uuid.uuid4().hex
    password = "Pw-" + uuid.uuid4().hex
    for path in (f"/fail?password={password}", f"/plain/{password}"):
        requests.post(base_url + path, timeout=10,
                      headers={"X-Auth-Token": token, "X-Subject-Token": token},
                      json={"auth": {"identity": {"password": {"user": {
                          "name": "admin", "password": password}}}}})
    wait_for(lambda: requests_seen("/fail", code="502") >= 1, message="the requests counted")
    time.sleep(0.5)  # one more ship interval
    exposed = collector.get("/metrics")[1] + collector.get("/api/hops")[1]
    exposed += json.dumps(recorder_mod.get_recorder().snapshot(1.0, max_hops=0))
    assert token not in exposed and password not in exposed


def test_routes_keep_the_prefix_a_url_map_moved_into_script_name(app, conf):
    """nova's urlmap (here werkzeug's dispatcher, which does the same) moves
    /v2 or /v2.1 into SCRIPT_NAME: the routes still tell the versions apart,
    and a service mounted at a prefix (/placement) keeps it."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    v2, v21, mounted = (CommlensMiddleware(app, http_outbound="false") for _ in range(3))
    urlmap = DispatcherMiddleware(app, {"/v2": v2, "/v2.1": v21, "/placement": mounted})
    before = {route: requests_seen(route) for route in (
        "/v2/servers/{id}/action", "/v2.1/servers/{id}/action",
        "/placement/resource_providers")}
    with serve_wsgi(urlmap) as url:
        server = uuid.uuid4()
        assert requests.post(f"{url}/v2/servers/{server}/action", timeout=10).ok
        for _ in range(2):
            assert requests.post(f"{url}/v2.1/servers/{server}/action", timeout=10).ok
        assert requests.get(f"{url}/placement/resource_providers", timeout=10).ok
    assert requests_seen("/v2/servers/{id}/action") - before["/v2/servers/{id}/action"] == 1
    assert (requests_seen("/v2.1/servers/{id}/action")
            - before["/v2.1/servers/{id}/action"]) == 2
    assert (requests_seen("/placement/resource_providers")
            - before["/placement/resource_providers"]) == 1


def test_ten_thousand_random_paths_stay_within_the_route_cap(conf):
    middleware = CommlensMiddleware(lambda e, s: s("200 OK", []) or [b""],
                                    http_outbound="false", http_max_routes="50")
    alphabet = string.ascii_letters + string.digits + "-_."
    rng = random.Random(7)
    for _ in range(10000):
        path = "/" + "/".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
                              for _ in range(rng.randint(1, 5)))
        body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, _start_response)
        body.close()
    assert len(middleware._routes._seen) <= 50
    assert middleware._routes("/a-new-route") == routes.OTHER


def test_outbound_hook_is_symmetric_and_can_be_turned_off(conf):
    http_client.uninstrument()  # the RPC driver may have installed it already
    original = requests.Session.send
    CommlensMiddleware(App(), http_outbound="false")
    assert requests.Session.send is original
    CommlensMiddleware(App())
    CommlensMiddleware(App())  # twice is safe
    assert requests.Session.send is not original
    http_client.uninstrument()
    http_client.uninstrument()
    assert requests.Session.send is original


PASTE_INI = textwrap.dedent("""
    [pipeline:main]
    pipeline = request_id commlens app

    [filter:request_id]
    paste.filter_factory = oslo_middleware:RequestId.factory

    [filter:commlens]
    paste.filter_factory = commlens.middleware.wsgi:filter_factory
    http_outbound = false

    [app:app]
    paste.app_factory = test_rest_edges:app_factory
""")


def app_factory(global_conf, **local_conf):
    def app(environ, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such server"]
    return app


def test_openstack_paste_pipeline_keeps_request_ids(tmp_path, collector, conf):
    from paste import deploy

    ini = tmp_path / "api-paste.ini"
    ini.write_text(PASTE_INI)
    pipeline = deploy.loadapp(f"config:{ini}")
    with serve_wsgi(pipeline) as url:
        response = requests.get(f"{url}/v2.1/servers/{uuid.uuid4()}", timeout=10)
    assert response.status_code == 404
    request_id = response.headers["X-OpenStack-Request-ID"]
    assert request_id.startswith("req-")
    (hop,) = wait_for(lambda: collector.hops(request_id=request_id),
                      message="the hop with the request id")
    assert hop["target"] == "/v2.1/servers/{id}" and hop["error"] == "404"
