"""memory:// shipping: an instrumented process with its collector inside it."""

import json
import os
import subprocess
import sys

EMBEDDED = r"""
import json
import oslo_messaging as om
from oslo_config import cfg
from commlens.exporters import collector, intake, prometheus
from commlens.tracer import recorder

cfg.CONF([], project="commlens-embedded")
merged = collector.Collector()
memory = intake.make_intake("memory://", merged)
memory.start()
transport = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")

class Endpoint:
    def echo(self, ctxt, value):
        return value

server = om.get_rpc_server(transport, om.Target(topic="embedded", server="s"), [Endpoint()],
                           executor="threading")
server.start()
client = om.get_rpc_client(transport, om.Target(topic="embedded"), timeout=10)
for i in range(3):
    client.call({}, "echo", value=i)
client.cast({}, "echo", value=0)
server.stop(); server.wait()
recorder.get_recorder().shipper.flush()
text = prometheus.render(merged)[0].decode()
print(json.dumps({"metrics": text, "processes": merged.processes()}))
"""


def test_memory_shipping_feeds_a_collector_in_the_same_process():
    env = dict(os.environ, COMMLENS_EXPORT_URL="memory://", COMMLENS_SERVICE_NAME="embedded")
    done = subprocess.run([sys.executable, "-c", EMBEDDED], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    text = result["metrics"]
    assert ('commlens_rpc_received_total{caller="embedded",kind="call",method="echo",'
            'service="embedded",target="embedded"} 3.0') in text
    assert ('commlens_rpc_sent_total{kind="cast",method="echo",service="embedded",'
            'target="embedded"} 1.0') in text
    assert [p["service"] for p in result["processes"]] == ["embedded"]
