"""``commlens demo`` on its embedded default: traffic, every fault's signature, a clean stop."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from support import RABBIT_URL, Demo, wait_for

pytestmark = pytest.mark.slow

TOKEN = "gAAAAAB-demo-secret-token"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    started = time.monotonic()
    demo = Demo(tmp_path_factory.mktemp("demo"))
    wait_for(demo.up, timeout=30, message="demo serving")
    demo.started = started
    yield demo
    if demo.process.poll() is None:
        demo.process.kill()
        demo.process.wait()


def _chain(demo, origin_service=None, origin_error=None, entry_service="nova-api",
           entry_operation=None):
    for chain in demo.json("/api/chains?since=15m")["chains"]:
        origin = chain["origin"]
        if ((origin_service is None or origin["service"] == origin_service)
                and (origin_error is None or origin["error"] == origin_error)
                and chain["entry"]["service"] == entry_service
                and entry_operation in (None, chain["entry"]["operation"])):
            return chain
    return None


def test_the_control_plane_talks_within_ten_seconds(demo):
    def traffic():
        metrics = demo.metrics()
        received = {labels["service"] for labels, value
                    in metrics.series("commlens_rpc_received_total") if value > 0}
        rest = metrics.value("commlens_http_client_requests_total", service="nova-api",
                             target="neutron-server", method="GET", code="200")
        return {"nova-conductor", "nova-scheduler", "nova-compute"} <= received and rest
    wait_for(traffic, timeout=10, message="RPCs received and nova-api -> neutron-server")
    assert time.monotonic() - demo.started < 30


def test_slow_conductor_makes_waiting_replies_grow(demo):
    demo.fault("slow-conductor")
    try:
        wait_for(lambda: sum(v for _, v in demo.metrics().series(
            "commlens_rpc_waiting_replies", target="conductor")) >= 2,
            timeout=15, message="waiting replies on the conductor")
        # Where the wait goes: processing (3 s a call), in a pool far from full.
        split = wait_for(lambda: _conductor_split(
            demo, "processing", lambda split: split["p50"]["processing"] >= 2.5),
            timeout=90, message="the conductor's calls dominated by 3 s of processing")
        assert split["p50"]["pool_wait"] < 0.5
        labels = {"service": "nova-conductor", "target": "conductor"}
        metrics = demo.metrics()
        assert metrics.value("commlens_rpc_executor_pool_size", **labels) == 64
        assert 0 < metrics.value("commlens_rpc_pool_saturation_peak", **labels) < 1
    finally:
        demo.fault("slow-conductor", on=False)


def _conductor_split(demo, dominant, also=lambda split: True):
    """nova-api -> nova-conductor's wait split over the last 30 s, if its
    largest part is ``dominant`` (and ``also`` holds): the window passes
    the calls from before the fault by within 45 s (sampled every 15 s)."""
    for edge in demo.json("/api/graph?window=30s")["edges"]:
        if (edge["client"], edge["server"], edge["protocol"]) == (
                "nova-api", "nova-conductor", "rpc"):
            split = edge.get("wait_split")
            if split and split["calls"] >= 3 and split["dominant"] == dominant \
                    and also(split):
                return split
    return None


def test_starved_conductor_shows_pool_wait_and_a_full_pool(demo):
    labels = {"service": "nova-conductor", "target": "conductor"}
    demo.fault("starved-conductor")
    try:
        wait_for(lambda: demo.metrics().value("commlens_rpc_executor_pool_size",
                                              **labels) == 2,
                 timeout=20, message="the conductor's pool of 2 (the old one gone)")
        wait_for(lambda: demo.metrics().value("commlens_rpc_pool_saturation_peak",
                                              **labels) == 1.0,
                 timeout=20, message="the conductor's pool full")
        split = wait_for(lambda: _conductor_split(demo, "pool_wait"), timeout=90,
                         message="the conductor's calls dominated by pool wait")
        assert split["p99"]["pool_wait"] > split["p99"]["processing"] >= 0.25
        assert split["saturation_peak"] == 1.0
    finally:
        demo.fault("starved-conductor", on=False)
    wait_for(lambda: demo.metrics().value("commlens_rpc_executor_pool_size", **labels) == 64,
             timeout=20, message="the conductor's pool back to 64")


def test_neutron_error_shows_a_chain_from_neutron_to_nova_api(demo):
    demo.fault("neutron-error")
    try:
        # The boot, not the interface attach that the same fault also breaks
        # (nova-api -> nova-compute -> neutron, with no conductor).
        chain = wait_for(lambda: _chain(demo, "neutron-server", "409 PortBindingFailed",
                                        entry_operation="POST /v2.1/servers"),
                         timeout=30, message="neutron-origin chain of a boot")
    finally:
        demo.fault("neutron-error", on=False)
    services = [h["service"] for h in chain["hops"]]
    assert "nova-conductor" in services and "nova-compute" in services
    example = chain["examples"][0]["request_id"]
    assert example.startswith("req-")
    assert demo.json("/api/traces/" + example)["hops"]


def test_conductor_down_gives_a_timeout_chain(demo):
    demo.fault("conductor-down")
    try:
        wait_for(lambda: _chain(demo, "conductor", "MessagingTimeout"), timeout=40,
                 message="timeout chain with the conductor as origin")
    finally:
        demo.fault("conductor-down", on=False)


def test_compute_down_times_out_calls_to_its_host_and_names_it(demo):
    demo.fault("compute-down")
    try:
        wait_for(lambda: demo.metrics().value("commlens_rpc_call_errors_total",
                                              target="compute", outcome="timeout") >= 1,
                 timeout=40, message="timeouts calling the compute that went away")
        # The stopped compute is compute-1 (emulator/controlplane.py): the
        # list of servers that stopped answering and the chain name it.
        silent = wait_for(lambda: [s for s in demo.json("/api/silent-servers")["servers"]
                                   if s["target"] == "compute"],
                          timeout=30, message="the compute that went away, listed")
        chain = wait_for(lambda: _chain(demo, "compute", "MessagingTimeout",
                                        entry_service="nova-api"),
                         timeout=30, message="a timeout chain from the compute")
    finally:
        demo.fault("compute-down", on=False)
    assert {s["server"] for s in silent} == {"compute-1"}
    assert silent[0]["timeouts"] >= 1
    assert chain["origin"]["server"] == "compute-1"
    # Hosts are never metric labels.
    assert "compute-1" not in demo.get("/metrics")


def test_unknown_fault_is_a_clear_error(demo):
    request = urllib.request.Request(f"{demo.base}/api/demo/faults/meteor", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 404 and b"unknown fault" in raised.value.read()


def test_no_token_anywhere_and_sigint_stops_cleanly(demo):
    exposed = demo.get("/metrics") + demo.get("/api/chains?since=1h") + demo.get(
        "/api/hops?limit=10000") + demo.get("/api/graph")
    assert TOKEN not in exposed
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(30) == 0
    log = demo.log_path.read_text()
    assert "commlens demo: stopped" in log and TOKEN not in log
    assert "Traceback" not in log


def test_bad_arguments_are_clear_errors():
    done = subprocess.run([sys.executable, "-m", "commlens.cli.main", "demo",
                           "--fault", "broker-restart", "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs --transport rabbit" in done.stderr


def _children(pid):
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(p) for p, parent in (line.split() for line in out.splitlines())
            if int(parent) == pid]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_over_rabbitmq_the_parts_are_processes_and_faults_reach_them(rabbitmq, tmp_path):
    demo = Demo(tmp_path, "--transport", RABBIT_URL)
    try:
        wait_for(demo.up, timeout=60, message="demo over RabbitMQ serving")
        children = wait_for(lambda: (lambda c: c if len(c) == 5 else None)(
            _children(demo.process.pid)), timeout=30, message="five part processes")

        def traffic():
            metrics = demo.metrics()
            reporting = {labels["service"] for labels, _ in
                         metrics.series("commlens_collector_processes")}
            received = {labels["service"] for labels, value
                        in metrics.series("commlens_rpc_received_total") if value > 0}
            # A process is named after its first service (scheduler before conductor).
            return ({"nova-api", "nova-scheduler", "nova-compute", "neutron-server",
                     "keystone"} <= reporting
                    and {"nova-conductor", "nova-scheduler", "nova-compute"} <= received)
        wait_for(traffic, timeout=20, message="every part reporting over AMQP")

        demo.fault("neutron-error")
        wait_for(lambda: _chain(demo, "neutron-server", "409 PortBindingFailed"),
                 timeout=40, message="neutron-origin chain across processes")
        demo.fault("neutron-error", on=False)
        # broker-restart: tests/test_demo_broker_restart.py
    finally:
        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(60) == 0
    assert not [pid for pid in children if _alive(pid)], "no part process left behind"
    assert TOKEN not in demo.log_path.read_text()
