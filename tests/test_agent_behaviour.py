"""The in-process agent: never blocks the service, survives fork."""

import json
import os
import socket
import subprocess
import sys

import pytest

from support import COMMLENS_URL, PEERS

pytestmark = pytest.mark.slow


@pytest.fixture
def black_hole():
    """A TCP port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"amqp://guest:guest@127.0.0.1:{sock.getsockname()[1]}/"


@pytest.mark.parametrize("mode", ["eventlet", "threading"])
def test_service_is_never_blocked_by_shipping_and_counts_stay_right(
        rabbitmq, black_hole, topic, mode):
    env = dict(os.environ, COMMLENS_SERVICE_NAME=f"load-{mode}",
               COMMLENS_EXPORT_URL=black_hole, COMMLENS_SHIP_INTERVAL="0.1")
    done = subprocess.run(
        [sys.executable, str(PEERS / "service_under_load.py"), "--mode", mode,
         "--url", COMMLENS_URL, "--topic", topic],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    calls = result["ok_calls"]
    assert calls > 20
    assert result["sent_calls"] == result["received_calls"] == calls
    assert result["sent_casts"] == calls
    # Shipping was tried and failed while the service ran...
    assert result["ship_failures"] >= 1
    # ...without stalling it: a ship attempt hangs for seconds, the ticker
    # was never late by more than a fraction of that.
    assert result["max_lag"] < 1.0, result
    assert result["waiting_slow"] in (None, 0), result


FORKING_SERVICE = r"""
import json, os, sys
import oslo_messaging as om
from oslo_config import cfg
from commlens.tracer import recorder as recorder_mod

cfg.CONF([], project="commlens-fork")
topic = sys.argv[1]

def casts(target, n):
    transport = om.get_rpc_transport(cfg.CONF, url=sys.argv[2])
    client = om.get_rpc_client(transport, om.Target(topic=target))
    for _ in range(n):
        client.cast({}, "note")
    transport.cleanup()

casts(topic + "-parent", 5)
recorder = recorder_mod.get_recorder()
parent_id = recorder.process_id
recorder.shipper.flush()
pid = os.fork()
if pid == 0:
    # A worker: new transport after fork, as oslo.service workers do.
    casts(topic + "-child", 3)
    child = recorder_mod.get_recorder()
    print(json.dumps({"child_id": child.process_id}), flush=True)
    recorder_mod.uninstall()
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"parent_id": parent_id}), flush=True)
recorder_mod.uninstall()
"""


def test_forked_worker_starts_fresh_and_ships_its_own_counts(collector, topic):
    env = dict(os.environ, COMMLENS_SERVICE_NAME="forking-service")
    done = subprocess.run([sys.executable, "-c", FORKING_SERVICE, topic, COMMLENS_URL],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = {}
    for line in done.stdout.splitlines():
        ids.update(json.loads(line))
    assert ids["child_id"] != ids["parent_id"]
    collector.wait_metric("commlens_rpc_sent_total", 3, service="forking-service",
                          target=topic + "-child")
    collector.wait_metric("commlens_rpc_sent_total", 5, service="forking-service",
                          target=topic + "-parent")


FORKING_WSGI_SERVER = r"""
import os, sys, time
from commlens.middleware.wsgi import CommlensMiddleware

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

# Loaded in the master, as uwsgi (without lazy-apps) and gunicorn --preload do.
middleware = CommlensMiddleware(app, http_outbound="false")
pid = os.fork()
if pid == 0:
    # A worker that only serves HTTP: it observes, it never counts.
    for _ in range(4):
        body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/v2.1/servers"},
                          lambda status, headers, exc_info=None: None)
        body.close()
    # No final snapshot: only the worker's own shipper can report these
    # (os._exit); it is given time to, on a loaded machine too.
    from commlens.tracer import recorder
    deadline = time.monotonic() + 30
    while recorder.get_recorder().shipper.shipped < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_forked_http_only_worker_ships_its_requests(collector):
    env = dict(os.environ, COMMLENS_SERVICE_NAME="forking-api", COMMLENS_SHIP_INTERVAL="0.2")
    done = subprocess.run([sys.executable, "-c", FORKING_WSGI_SERVER],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    collector.wait_metric("commlens_http_requests_total", 4, service="forking-api",
                          route="/v2.1/servers")
