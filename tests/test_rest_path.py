"""The REST path end to end: real WSGI servers, real requests, a collector process."""

import uuid

import pytest
import requests

from support import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def api_and_network(start_wsgi):
    """nova-api (Flask) calling neutron-server (plain WSGI) over HTTP."""
    suffix = uuid.uuid4().hex[:6]
    network_service = f"neutron-server-{suffix}"
    api_service = f"nova-api-{suffix}"
    _, network_url = start_wsgi("plain", network_service)
    _, api_url = start_wsgi("flask", api_service, downstream=network_url,
                            endpoints=f"{network_service}={network_url}")
    return api_service, api_url, network_service, network_url


def test_both_ends_of_a_rest_edge_name_each_other_and_share_the_trace(collector,
                                                                       api_and_network):
    api_service, api_url, network_service, _ = api_and_network
    server_id = str(uuid.uuid4())
    response = requests.get(f"{api_url}/v2.1/servers/{server_id}", timeout=10)
    assert response.status_code == 200 and response.json()["port_status"] == 200

    collector.wait_metric("commlens_http_requests_total", 1, service=network_service,
                          caller=api_service, method="GET", route="/v2.0/ports/{id}",
                          code="200")
    collector.wait_metric("commlens_http_client_requests_total", 1, service=api_service,
                          target=network_service, method="GET", code="200")
    # The caller is "unknown", or "test-client" once an earlier test has
    # installed the outbound hook in this process.
    collector.wait_metric("commlens_http_requests_total", 1, service=api_service,
                          method="GET", route="/v2.1/servers/{id}", code="200")
    (client_hop,) = wait_for(lambda: collector.hops(service=api_service, side="client"),
                             message="the api's outbound hop")
    (network_hop,) = wait_for(lambda: collector.hops(service=network_service),
                              message="the network service's hop")
    (api_hop,) = wait_for(lambda: collector.hops(service=api_service, side="server"),
                          message="the api's inbound hop")
    assert api_hop["trace_id"] == client_hop["trace_id"] == network_hop["trace_id"]
    assert client_hop["parent_id"] == api_hop["span_id"]
    assert network_hop["parent_id"] == client_hop["span_id"]
    assert server_id not in collector.metrics().text


def test_errors_are_counted_at_both_ends_with_the_request_id(collector, api_and_network):
    api_service, api_url, network_service, _ = api_and_network
    response = requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}/action", timeout=10)
    assert response.status_code == 500
    collector.wait_metric("commlens_http_requests_total", 1, service=network_service,
                          caller=api_service, method="PUT", route="/v2.0/ports/{id}/binding",
                          code="409")
    collector.wait_metric("commlens_http_client_requests_total", 1, service=api_service,
                          target=network_service, method="PUT", code="409")
    collector.wait_metric("commlens_http_requests_total", 1, service=api_service,
                          route="/v2.1/servers/{id}/action", code="500")
    (hop,) = wait_for(lambda: collector.hops(service=network_service, error="409"),
                      message="the 409 hop")
    assert hop["request_id"] == "req-6f1c4b2e-5d3a-4c1b-9e8f-0a1b2c3d4e5f"


def test_keystoneauth_requests_are_labelled_with_the_service_of_the_catalog_type(collector,
                                                                          start_wsgi, conf):
    from keystoneauth1 import adapter, noauth, session

    from commlens.middleware import http_client

    service = f"neutron-server-{uuid.uuid4().hex[:6]}"
    _, network_url = start_wsgi("plain", service)
    http_client.instrument()  # what loading the middleware or the RPC driver does
    try:
        network = adapter.Adapter(session.Session(auth=noauth.NoAuth()),
                                  service_type="network", endpoint_override=network_url)
        assert network.get(f"/v2.0/ports/{uuid.uuid4()}").status_code == 200
    finally:
        http_client.uninstrument()
    collector.wait_metric("commlens_http_client_requests_total", 1, service="test-client",
                          target="neutron-server", method="GET", code="200")
    collector.wait_metric("commlens_http_requests_total", 1, service=service,
                          caller="test-client", route="/v2.0/ports/{id}", code="200")
