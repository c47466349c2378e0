"""Placement from PyPI under gunicorn with commlens's class middleware (issue 17).

The real openstack-placement (scripts/placement-venv pins it; its own
virtualenv, so Placement's dependencies stay out of the main one) serves a
sqlite database under gunicorn, mounted at /placement so the prefix lands in
SCRIPT_NAME. keystoneauth1 drives it with placement's noauth2 admin token, as
nova's report client would (without commlens in the caller: its requests are
known only by their User-Agent). The collector counts every route and code
exactly, the routes keep their prefix, and the graph has the edge from the
keystoneauth1 caller, an unknown caller of that user agent.
"""

import os
import pathlib
import subprocess
import textwrap
import uuid

import pytest

from support import EXPORT_URL, PEERS, Peer, free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parent.parent
VENV = ROOT / ".venv-placement"
SERVICE = "placement-api"
MICROVERSION = {"OpenStack-API-Version": "placement 1.39"}


@pytest.fixture(scope="module")
def placement_venv():
    # Builds it on the first run (about a minute), then only checks it.
    subprocess.run([str(ROOT / "scripts" / "placement-venv")], check=True, timeout=600)
    return VENV


@pytest.fixture
def placement(placement_venv, rabbitmq, tmp_path):
    (tmp_path / "placement.conf").write_text(textwrap.dedent(f"""
        [api]
        auth_strategy = noauth2

        [placement_database]
        connection = sqlite:///{tmp_path / 'placement.sqlite'}
        sync_on_startup = true
    """))
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("COMMLENS_SERVICE_NAME")}
    env.update(OS_PLACEMENT_CONFIG_DIR=str(tmp_path), COMMLENS_EXPORT_URL=EXPORT_URL,
               COMMLENS_SHIP_INTERVAL="0.2", COMMLENS_HOP_SAMPLE_RATIO="1")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(placement_venv / "bin" / "gunicorn"), "--chdir", str(PEERS),
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "placement_wsgi:application"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    peer = Peer(process, log_path)
    base = f"http://127.0.0.1:{port}"

    def answers():
        if process.poll() is not None:
            raise AssertionError("gunicorn exited:\n" + peer.log())
        import requests
        try:
            return requests.get(base + "/", timeout=2).status_code == 404
        except OSError:
            return False
    try:
        wait_for(answers, timeout=60, message="placement under gunicorn answering")
        yield base + "/placement"
    finally:
        peer.stop()


def test_placement_s_routes_and_codes_are_counted_exactly_with_their_prefix(
        placement, collector):
    from keystoneauth1 import adapter, session, token_endpoint

    client = adapter.Adapter(session.Session(auth=token_endpoint.Token(placement, "admin")),
                             service_type="placement", additional_headers=MICROVERSION)
    assert client.get("/").status_code == 200  # the version document
    providers = [str(uuid.uuid4()) for _ in range(3)]
    for number, provider in enumerate(providers):
        response = client.post("/resource_providers",
                               json={"uuid": provider, "name": f"rp-{number}"})
        assert response.status_code == 200
    for _ in range(2):
        assert len(client.get("/resource_providers").json()["resource_providers"]) == 3
    for provider in providers:
        assert client.get(f"/resource_providers/{provider}").status_code == 200
    missing = client.get(f"/resource_providers/{uuid.uuid4()}", raise_exc=False)
    assert missing.status_code == 404
    assert client.delete(f"/resource_providers/{providers[0]}").status_code == 204

    expected = {
        ("GET", "/placement", "200"): 1,
        ("POST", "/placement/resource_providers", "200"): 3,
        ("GET", "/placement/resource_providers", "200"): 2,
        ("GET", "/placement/resource_providers/{id}", "200"): 3,
        ("GET", "/placement/resource_providers/{id}", "404"): 1,
        ("DELETE", "/placement/resource_providers/{id}", "204"): 1,
    }

    def counted():
        series = collector.metrics().series("commlens_http_requests_total", service=SERVICE)
        found = {(labels["method"], labels["route"], labels["code"]): value
                 for labels, value in series}
        return found if found == expected else None
    found = wait_for(counted, timeout=30, message="placement's requests counted")
    assert found == expected
    series = collector.metrics().series("commlens_http_requests_total", service=SERVICE)
    assert {labels["caller"] for labels, _ in series} == {"keystoneauth1"}

    graph = collector.json("/api/graph?window=15m")
    edge = next(e for e in graph["edges"] if (e["client"], e["server"]) == (
        "keystoneauth1", SERVICE))
    assert (edge["protocol"], edge["requests"], edge["measured_by"]) == ("http", 11, "server")
    nodes = {node["service"]: node for node in graph["nodes"]}
    assert (nodes["keystoneauth1"]["instrumented"], nodes["keystoneauth1"]["user_agent"]) == (
        False, "keystoneauth1")
    assert nodes[SERVICE]["instrumented"] is True
    assert "gunicorn" not in nodes


def test_a_placement_conflict_is_named_by_its_error_code_at_both_ends(placement, collector,
                                                                       conf):
    # issue 18 item 6: a stale generation is placement's 409 with
    # {"errors": [{"code": "placement.concurrent_update", ...}]}; both the
    # filter in placement and the caller's outbound hook name that code.
    from keystoneauth1 import adapter, session, token_endpoint

    from commlens.middleware import http_client

    http_client.instrument([f"{SERVICE}={placement.rsplit('/placement', 1)[0]}"], conf=conf)
    try:
        client = adapter.Adapter(session.Session(auth=token_endpoint.Token(placement, "admin")),
                                 service_type="placement", additional_headers=MICROVERSION)
        provider = str(uuid.uuid4())
        assert client.post("/resource_providers",
                           json={"uuid": provider, "name": "rp-conflict"}).status_code == 200
        stale = client.put(f"/resource_providers/{provider}/inventories", raise_exc=False,
                           json={"resource_provider_generation": 7, "inventories": {
                               "VCPU": {"total": 8}}})
    finally:
        http_client.uninstrument()
    assert stale.status_code == 409
    assert stale.json()["errors"][0]["code"] == "placement.concurrent_update"

    def hops():
        server = [h for h in collector.hops(service=SERVICE, side="server")
                  if h["error"] and h["error"].startswith("409")]
        client_side = [h for h in collector.hops(target=SERVICE, side="client")
                       if h["error"] and h["error"].startswith("409")]
        return (server, client_side) if server and client_side else None
    server, client_side = wait_for(hops, timeout=30, message="the conflict's hops")
    assert [h["error"] for h in server] == ["409 placement.concurrent_update"]
    assert [h["error"] for h in client_side] == ["409 placement.concurrent_update"]
    assert provider not in str(server + client_side)
