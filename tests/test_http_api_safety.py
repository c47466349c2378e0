"""The collector's HTTP face: the dashboard token never reaches a log line,
and every limit of the JSON API is bounded, with a clear 400 for nonsense."""

import logging
import re
import socket
import urllib.parse
import urllib.request
import uuid

import pytest

from commlens.exporters import collector as collector_mod
from commlens.exporters import http
from support import run_collector, wait_for

# Nothing listens there: this collector serves HTTP and creates nothing on a broker.
UNREACHABLE_EXPORT_URL = "amqp://127.0.0.1:1/"


def _raw(port, request_line, headers=()):
    """Send one request line as is; return the status line's code (None when
    the answer has none: an HTTP/0.9 answer to a line with no valid version)."""
    lines = [request_line, "Host: 127.0.0.1", "Connection: close", *headers, "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/"):
        return None
    return int(answer.split(b" ", 2)[1])


def _healthy(collector):
    try:
        return collector.get("/healthz")[0] == 200
    except OSError:
        return False


@pytest.mark.slow
def test_the_dashboard_token_never_reaches_the_collector_log(tmp_path):
    token = "tok-" + uuid.uuid4().hex
    with run_collector(UNREACHABLE_EXPORT_URL, tmp_path, ["--dashboard-token", token]) \
            as collector:
        wait_for(lambda: _healthy(collector), timeout=30, message="collector serving")
        port = urllib.parse.urlsplit(collector.base_url).port
        bearer = f"Authorization: Bearer {token}"
        sent = [
            # Werkzeug logged these lines whole ("Bad request syntax (...)").
            (f"GET /dashboard/?token={token} x HTTP/1.1", (), 400),
            (f"GET /dashboard/?token={token} HTTP/1.1 extra", (), None),
            # The dashboard decodes %74 to t and accepts the token.
            (f"GET /dashboard/?%74oken={token} HTTP/1.1", (), 302),
            (f"GET /dashboard/?token={token} HTTP/1.1", (), 302),
            (f"GET /api/graph?a=1&token={token} HTTP/1.1", (), 200),
            (f"GET /dashboard/?TOKEN={token} HTTP/1.1", (), 401),
            (f"GET /dashboard/#token={token} HTTP/1.1", (), 401),
            (f"GET /dashboard/{token} HTTP/1.1", (), 401),
            (f"GET /api/traces/{token} HTTP/1.1", (bearer,), 404),
            (f"{token} /dashboard/ HTTP/1.1", (), 401),
            ("GET /api/processes HTTP/1.1", (bearer,), 200),
        ]
        for request_line, headers, status in sent:
            assert _raw(port, request_line, headers) == status, request_line

        def logged():
            log = collector.log()
            return log if len(re.findall(r'" [1-5][0-9][0-9] ', log)) >= len(sent) else None
        log = wait_for(logged, timeout=10, message="a log line per request")
        assert token not in log
        assert token not in log.replace("%", "").lower()
        # Still useful: each request by its route and status.
        assert '"(malformed request line)" 400' in log
        assert '"GET /api/processes HTTP/1.1" 200' in log
        assert '"GET /api/traces/<trace_or_request_id> HTTP/1.1" 404' in log
        assert '"GET /dashboard/ HTTP/1.1" 302' in log
        assert '"(unknown method) (no route) HTTP/1.1" 401' in log

        # The token still opens the dashboard and the API.
        request = urllib.request.Request(collector.base_url + "/api/processes",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(f"{collector.base_url}/dashboard/?token={token}", timeout=5) as page:
            assert page.status == 200 and page.url == collector.base_url + "/dashboard/"
        assert token not in collector.log()


@pytest.fixture
def app():
    return http.create_app(collector_mod.Collector())


def test_an_exception_is_logged_by_route_not_by_the_path_a_client_chose(app, caplog,
                                                                         monkeypatch):
    collector = app.config["COMMLENS_COLLECTOR"]

    def broken(service, window_seconds):
        raise RuntimeError("node details failed")
    monkeypatch.setattr(collector, "node_details", broken)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/api/graph/node/tok-SECRET-42?token=tok-SECRET-42")
    assert response.status_code == 500
    assert "Exception on /api/graph/node/<service> [GET]" in caplog.text
    assert "SECRET" not in caplog.text


def _stored_hops(collector, count):
    collector.hops.extend({"trace_id": f"{i:032x}", "n": i} for i in range(count))


@pytest.mark.parametrize("path, cap", [("/api/hops", 10000), ("/api/chains", 1000)])
@pytest.mark.parametrize("value", ["0", "-1", "-20000", "abc", "1.5", "", "1e3", "+5", " 7"])
def test_a_limit_below_one_or_not_a_whole_number_is_refused_naming_the_range(
        app, path, cap, value):
    response = app.test_client().get(path, query_string={"limit": value})
    assert response.status_code == 400
    assert response.json["error"].startswith("limit: expected a whole number from 1 to "
                                             f"{cap}")


def test_hops_are_capped_at_ten_thousand_whatever_the_limit(app):
    _stored_hops(app.config["COMMLENS_COLLECTOR"], 10500)
    client = app.test_client()
    assert len(client.get("/api/hops?limit=20000").json["hops"]) == 10000
    assert len(client.get("/api/hops?limit=99999999999999999999").json["hops"]) == 10000
    assert len(client.get("/api/hops").json["hops"]) == 1000
    last = client.get("/api/hops?limit=3").json["hops"]
    assert [h["n"] for h in last] == [10497, 10498, 10499]


def test_chains_take_a_limit_up_to_their_cap(app):
    client = app.test_client()
    assert client.get("/api/chains?limit=5000").status_code == 200
    assert client.get("/api/chains?limit=1").status_code == 200
