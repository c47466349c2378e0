"""commlens on a real Nova 34 control plane (plane.py), what issue 17 says
must be true there. The tests run in file order on one plane; the last one
stops nova-compute.

What the collector shows is read from its API, as an operator's tools do.
"""

import json
import pathlib
import time

import pytest

from openstack_plane.plane import COMPUTE_HOST, RPC_TIMEOUT
from support import wait_for

pytestmark = [pytest.mark.openstack, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = pathlib.Path(__file__).parents[2]
NOVA_SERVICES = {"nova-api", "nova-conductor", "nova-scheduler", "nova-compute", "placement"}


def hops_of(plane, request_id):
    """Every hop the collector received that belongs to the request: its own
    request id, or (placement's side) nova's id as the global request id."""
    return [h for h in plane.collector.hops()
            if request_id in (h.get("request_id"), h.get("global_request_id"))]


def settled(fetch, quiet=8.0, timeout=120):
    """``fetch()`` once it has stopped changing for ``quiet`` seconds: every
    process has shipped (0.5 s) and the collector has closed the traces (5 s)."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
        time.sleep(0.5)
    raise AssertionError(f"still changing after {timeout}s: {last!r}")


def chain_text(chain):
    """A chain as `commlens chains` reads it: origin first, one service per step."""
    steps = []
    for hop in chain["hops"]:
        step = f"{hop['service']} {hop['operation']}" + (f" ({hop['error']})"
                                                         if hop.get("error") else "")
        if not steps or not steps[-1].startswith(hop["service"] + " "):
            steps.append(step)
    return " -> ".join(steps)


def chains(plane):
    return plane.collector.json("/api/chains?since=1h&limit=1000")["chains"]


def test_a_boot_with_commlens_on_reaches_active(plane, booted):
    server_id, _, server = booted
    assert server["status"] == "ACTIVE"
    assert server["OS-EXT-SRV-ATTR:host"] == COMPUTE_HOST
    # No warning or error of commlens's, no traceback through its code.
    ours = ("commlens", str(ROOT / "middleware"), str(ROOT / "tracer"))
    for name in NOVA_SERVICES:
        bad = [line for line in plane.log(name).splitlines()
               if any(word in line for word in ours)
               and any(level in line for level in (" WARNING ", " ERROR ", " CRITICAL "))]
        assert not bad, f"{name}:\n" + "\n".join(bad[:40])


def test_a_boot_is_one_trace_from_nova_api_to_computes_last_placement_call(plane, booted):
    _, request_id, _ = booted
    received = settled(lambda: sorted(h["span_id"] for h in hops_of(plane, request_id)))
    assert received, f"no hop with {request_id}"
    trace = plane.collector.trace(request_id, timeout=30)
    hops = trace["hops"]
    shown = "\n".join(f"{h['service']} {h['side']} {h['protocol']} {h['operation']} "
                      f"{h.get('target')} {h.get('trace_id')}" for h in hops)

    # One trace: every hop of the request is in the one the lookup returns.
    all_of_it = hops_of(plane, request_id)
    traces = {h["trace_id"] for h in all_of_it}
    assert traces == {trace["trace_id"]}, (
        f"{request_id} is in {len(traces)} traces; /api/traces returned {trace['trace_id']}"
        f" with {len(hops)} hops of {len(all_of_it)}:\n{shown}")
    # Entry first: the request the user made.
    entry = hops[0]
    assert (entry["service"], entry["side"], entry["protocol"], entry["operation"]) == \
        ("nova-api", "server", "http", "POST /v2.1/servers"), shown
    assert NOVA_SERVICES <= {h["service"] for h in hops}, shown
    assert any(h["service"] == "nova-compute" and h["side"] == "server"
               and h["operation"] == "build_and_run_instance" for h in hops), shown
    # Through to compute's placement calls, the last thing a boot does there.
    compute_to_placement = [h for h in hops if h["service"] == "nova-compute"
                            and h["protocol"] == "http" and h["side"] == "client"]
    assert compute_to_placement, shown
    last_call = max(compute_to_placement, key=lambda h: h["start"])
    assert any(h["parent_id"] == last_call["span_id"] and h["service"] == "placement"
               for h in hops), shown


def test_nothing_is_named_after_the_wsgi_server(plane, booted):
    graph = plane.collector.json("/api/graph?window=1h")
    names = {n.get("id") or n.get("service") or n.get("name") for n in graph["nodes"]}
    names |= {e.get(side) for e in graph["edges"] for side in ("client", "server")}
    processes = plane.collector.json("/api/processes")
    hops = plane.collector.hops()
    everything = json.dumps([graph, processes, [(h["service"], h["peer"]) for h in hops]])
    assert "gunicorn" not in everything, sorted(n for n in names if n)
    # nova-api's RPC is nova-api's, as its requests are.
    assert any(e.get("client") == "nova-api" and e.get("server") == "nova-conductor"
               and e.get("protocol") == "rpc" for e in graph["edges"]), graph["edges"]


def test_a_no_valid_host_boot_gives_its_chain(plane):
    server_id, request_id = plane.boot("too-big", flavor="huge")
    server = plane.wait_status(server_id, {"ERROR"})
    assert "No valid host" in server["fault"]["message"]

    def found():
        for chain in chains(plane):
            if (chain["origin"]["service"] == "nova-scheduler"
                    and chain["origin"]["operation"] == "select_destinations"
                    and str(chain["origin"]["error"]).startswith("NoValidHost")
                    and request_id in [e["request_id"] for e in chain["examples"]]):
                return chain
        return None
    chain = wait_for(found, timeout=60, interval=1, message=f"NoValidHost chain of {request_id}")
    assert chain_text(chain).startswith(
        "nova-scheduler select_destinations (NoValidHost) -> nova-conductor"), chain_text(chain)
    # The conductor catches it and puts the instance in ERROR: absorbed there.
    assert chain["absorbed"] is True
    assert chain["entry"]["service"] == "nova-conductor"


def test_stopping_the_compute_gives_a_timeout_chain_naming_its_host(plane, booted):
    server_id, _, _ = booted
    plane.stop_service("nova-compute")
    started = time.monotonic()
    response = plane.api("GET", f"/servers/{server_id}/diagnostics", timeout=RPC_TIMEOUT + 60)
    assert response.status_code >= 500, response.text
    assert time.monotonic() - started >= RPC_TIMEOUT - 1
    request_id = response.headers["X-OpenStack-Request-ID"]

    def found():
        for chain in chains(plane):
            if request_id in [e["request_id"] for e in chain["examples"]]:
                return chain
        return None
    chain = wait_for(found, timeout=60, interval=1, message=f"timeout chain of {request_id}")
    origin = chain["origin"]
    assert origin["operation"] == "get_diagnostics", chain
    assert "timeout" in str(origin["error"]).lower(), chain
    assert chain["entry"]["service"] == "nova-api" and chain["absorbed"] is False
    # The compute that did not answer is named, not only its topic: nova
    # prepared the call with server=<its host> (issue 18 item 1).
    assert origin["service"] == "compute" and origin.get("server") == COMPUTE_HOST, chain
    assert chain["entry"]["operation"] == "GET /v2.1/servers/{id}/diagnostics", chain
