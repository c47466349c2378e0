"""A service with no export URL says once, clearly, what to set.

An API-only service (placement, keystone without a transport_url) has no
commlens+ transport to take the broker from; a commlens+ transport of a
driver that is not AMQP (kafka, fake) has none either. Such a service keeps
counting, ships nothing, and logs one WARNING naming the option and the
environment variable, not a failure to ship to ``memory://`` every so often.
A collector in the same process (the embedded mode) still receives it.
"""

import json
import os
import subprocess
import sys

import pytest

# Run in a process of its own (one recorder per process): the service, the
# seconds it ships for, then every commlens log record at WARNING and up.
SERVICE = """
import json, logging, sys, time
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("commlens").addHandler(Keep())
logging.getLogger("commlens").setLevel(logging.WARNING)
logging.lastResort = None

kind = sys.argv[1]
if kind == "embedded":
    from commlens.exporters import collector, intake
    merged = collector.Collector()
    intake.make_intake("memory://", merged).start()
if kind in ("wsgi", "embedded"):
    from commlens.middleware.wsgi import CommlensMiddleware
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    wrapped = CommlensMiddleware(app, service_name="placement-api")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/resource_providers",
               "SCRIPT_NAME": "", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
    b"".join(wrapped(environ, lambda status, headers, exc_info=None: None))
else:
    import oslo_messaging as om
    from oslo_config import cfg
    cfg.CONF([], project="commlens-test")
    om.get_rpc_transport(cfg.CONF, url="commlens+fake://")
from commlens.tracer import recorder
shipper = recorder.get_recorder().shipper
deadline = time.monotonic() + 30
# Several ship attempts: the failures after the warning stay quiet.
while shipper.shipped + shipper._failures_in_row < 3 and time.monotonic() < deadline:
    shipper.ship_once(final=False)
    shipper._next_attempt = 0.0
    time.sleep(0.05)
print(json.dumps({"records": records, "shipped": shipper.shipped,
                  "failures": shipper._failures_in_row,
                  "transport": shipper._transport.description}))
"""


def _run(kind):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMLENS_")}
    env["COMMLENS_SHIP_INTERVAL"] = "0.05"
    done = subprocess.run([sys.executable, "-c", SERVICE, kind], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind, service", [("wsgi", "placement-api"),
                                           ("fake transport", None)])
def test_a_service_without_an_export_url_says_once_what_to_set(kind, service):
    found = _run(kind)
    assert found["shipped"] == 0 and found["failures"] >= 2, found
    (warning,) = found["records"]
    level, message = warning
    assert level == "WARNING"
    assert "has no export URL" in message
    assert "[commlens] export_url" in message and "COMMLENS_EXPORT_URL" in message
    assert "amqp://USER:PASSWORD@RABBIT:5672/VHOST" in message
    assert "ships nothing" in message
    if service:
        assert message.startswith(f"commlens: {service} has no export URL")


def test_a_collector_in_the_same_process_receives_it_without_a_warning():
    found = _run("embedded")
    assert found["records"] == [] and found["shipped"] >= 3, found
