"""Outbound REST calls name their target as the target names itself (issue 17, item 5).

keystoneauth1 asks the catalog for ``placement``; placement calls itself
``placement-api``: the caller's series use the service's name. keystoneauth1's
own requests while it finds an endpoint (the token from keystone, the version
discovery ``GET /`` of the endpoint) belong to keystone and to that endpoint's
service, never to ``unknown``.

A real keystoneauth1 session against small keystone and placement stand-ins
mounted devstack-style under one host and port (``/identity``, ``/placement``),
served by werkzeug over real sockets; the test process's own recorder counts.
"""

import contextlib
import datetime
import json
import threading

import pytest
from werkzeug import serving

from commlens.middleware import http_client
from commlens.tracer import recorder as recorder_mod

CLIENT_REQUESTS = "commlens_http_client_requests_total"


def _placement_and_keystone(base):
    """One WSGI app: keystone's token API under /identity, placement under
    /placement (its version document at its root)."""
    seen = []

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        seen.append((environ["REQUEST_METHOD"], path))
        if path == "/identity/v3/auth/tokens":
            expires = (datetime.datetime.now(datetime.timezone.utc)
                       + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
            token = {"token": {
                "methods": ["password"], "expires_at": expires,
                "user": {"id": "u", "name": "admin", "domain": {"id": "default"}},
                "project": {"id": "p", "name": "admin", "domain": {"id": "default"}},
                "catalog": [{"type": "placement", "id": "s", "name": "placement",
                             "endpoints": [{"id": "e", "interface": "public",
                                            "region": "RegionOne", "region_id": "RegionOne",
                                            "url": base + "/placement"}]}]}}
            start_response("201 Created", [("Content-Type", "application/json"),
                                           ("X-Subject-Token", "gAAAA-token")])
            return [json.dumps(token).encode()]
        start_response("200 OK", [("Content-Type", "application/json")])
        if path in ("/placement", "/placement/"):
            return [json.dumps({"versions": [{
                "id": "v1.0", "min_version": "1.0", "max_version": "1.39",
                "status": "CURRENT", "links": [{"rel": "self", "href": ""}]}]}).encode()]
        return [b'{"resource_providers": []}']
    return app, seen


@contextlib.contextmanager
def _cloud():
    holder = {}
    server = serving.make_server("127.0.0.1", 0, lambda e, s: holder["app"](e, s),
                                 threaded=True)
    base = f"http://127.0.0.1:{server.port}"
    holder["app"], seen = _placement_and_keystone(base)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, seen
    finally:
        server.shutdown()
        thread.join(5)


def _client_requests():
    counters = recorder_mod.get_recorder().snapshot(1.0, max_hops=0)["counters"]
    return {tuple(labels): value for name, labels, value in counters
            if name == CLIENT_REQUESTS}


def _added(before, after):
    return {key: value - before.get(key, 0) for key, value in after.items()
            if value != before.get(key, 0)}


@pytest.fixture
def hooked(conf):
    http_client.instrument()
    yield
    http_client.uninstrument()


def test_a_token_discovery_and_request_are_keystone_s_and_placement_s(hooked):
    from keystoneauth1 import adapter, session
    from keystoneauth1.identity import v3

    with _cloud() as (base, seen):
        before = _client_requests()
        auth = v3.Password(auth_url=base + "/identity/v3", username="admin", password="pw",
                           project_name="admin", user_domain_id="default",
                           project_domain_id="default")
        placement = adapter.Adapter(session.Session(auth=auth), service_type="placement",
                                    interface="public", min_version="1.0",
                                    max_version="1.latest")
        assert placement.get("/resource_providers").status_code == 200
        added = _added(before, _client_requests())
    # The stand-in saw the three requests keystoneauth1 makes.
    assert seen == [("POST", "/identity/v3/auth/tokens"), ("GET", "/placement"),
                    ("GET", "/placement/resource_providers")]
    assert added == {("test-client", "keystone", "POST", "201"): 1,
                     ("test-client", "placement-api", "GET", "200"): 2}


def test_service_names_rename_a_catalog_type(conf):
    from keystoneauth1 import adapter, session, token_endpoint

    http_client.instrument(service_names=["placement=placement"])
    try:
        with _cloud() as (base, _seen):
            before = _client_requests()
            placement = adapter.Adapter(
                session.Session(auth=token_endpoint.Token(base + "/placement", "admin")),
                service_type="placement", min_version="1.0", max_version="1.latest")
            placement.get_endpoint_data()  # the version discovery, on its own
            assert placement.get("/resource_providers").status_code == 200
            added = _added(before, _client_requests())
    finally:
        http_client.uninstrument()
    assert added == {("test-client", "placement", "GET", "200"): 2}


def test_keystoneauth_is_restored_as_it_was(conf):
    from keystoneauth1 import session

    http_client.uninstrument()
    originals = {name: getattr(session.Session, name) for name in
                 ("request", "get_endpoint", "get_endpoint_data")}
    http_client.instrument()
    http_client.instrument()  # twice is safe
    assert all(getattr(session.Session, name) is not original
               for name, original in originals.items())
    http_client.uninstrument()
    assert all(getattr(session.Session, name) is original
               for name, original in originals.items())
