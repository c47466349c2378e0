"""The agent is light: what runs inside a service imports no collector package,
the wire format has one home, and the commands say what to install.

The imports are checked in a fresh interpreter: this test process has long
imported the collector for other tests.
"""

import json
import re
import subprocess
import sys

from commlens.exporters import collector as collector_mod
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping
from commlens.tracer import wire

# Installed only by the collector extra, or parts of commlens that are the
# collector's. werkzeug counts: only flask brings it (no agent dependency
# does), and the collector serves with it.
COLLECTOR_ONLY = ("flask", "werkzeug", "rich", "prometheus_client",
                  "opentelemetry.sdk", "commlens.exporters", "commlens.dashboards",
                  "commlens.cli", "commlens.emulator")

AGENT_IN_A_SERVICE = """
import json, sys
import commlens.middleware.rpc_driver
import commlens.middleware.wsgi
import commlens.tracer.shipping
import oslo_messaging
from oslo_config import cfg
transport = oslo_messaging.get_rpc_transport(
    cfg.CONF, url="commlens+rabbit://guest:guest@127.0.0.1:5672/")
app = commlens.middleware.wsgi.CommlensMiddleware(lambda environ, start_response: [b"ok"])
collector_only = %r
loaded = sorted(name for name in sys.modules
                if any(name == c or name.startswith(c + ".") for c in collector_only))
transport.cleanup()
print(json.dumps(loaded))
""" % (COLLECTOR_ONLY,)


def _run_python(code, env_extra=None, *options):
    # memory://: the shipper of this throwaway process ships nowhere on the
    # shared broker (at exit it would otherwise send a final snapshot there).
    env = {"COMMLENS_EXPORT_URL": "memory://", "COMMLENS_SERVICE_NAME": "footprint",
           "PATH": "/usr/bin:/bin"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *options, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_rpc_driver_and_the_wsgi_filter_import_no_collector_package():
    result = _run_python(AGENT_IN_A_SERVICE)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"collector packages imported inside a service: {loaded}"


def test_agent_import_time_is_reported():
    """Not a limit: the figure for docs/benchmarks.md (``python -X importtime``)."""
    result = _run_python("import commlens.middleware.rpc_driver, commlens.middleware.wsgi",
                         None, "-X", "importtime")
    assert result.returncode == 0, result.stderr
    # "import time: self [us] | cumulative | name"; a top-level import has no indent.
    cumulative = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if match:
            cumulative[match.group(2)] = int(match.group(1))
    total = sum(cumulative.values())
    print("\nagent import time (python -X importtime, cumulative): " + ", ".join(
        f"{name} {micros / 1000:.0f} ms" for name, micros in cumulative.items()
        if name.startswith("commlens.")) + f"; {total / 1000:.0f} ms in all")
    assert total > 0


# -- the commands without the collector extra --------------------------------

WITHOUT_FLASK = """
import sys

class RefuseCollectorExtra:
    # What an agent-only install looks like to the import system.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flask", "werkzeug"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, RefuseCollectorExtra())
from commlens.cli import main
sys.exit(main.main(sys.argv[1:]))
"""


def _commlens_without_flask(*argv):
    return subprocess.run([sys.executable, "-c", WITHOUT_FLASK, *argv],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def test_collector_command_without_the_collector_extra_says_what_to_install():
    result = _commlens_without_flask("collector", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "commlens collector needs the collector extra: pip install 'commlens[collector]'")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_every_command_without_the_collector_extra_names_itself():
    for command in ("demo", "graph", "chains"):
        result = _commlens_without_flask(command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == (
            f"commlens {command} needs the collector extra: pip install 'commlens[collector]'")


def test_usage_errors_stay_argparse_errors_without_the_collector_extra():
    result = _commlens_without_flask("no-such-command")
    assert result.returncode == 2 and "invalid choice" in result.stderr


# -- the wire format has one home ---------------------------------------------

def test_the_wire_format_is_defined_only_in_wire():
    for module, names in ((recorder_mod, ("SNAPSHOT_FORMAT",)),
                          (shipping, ("HOPS_FORMAT", "snapshot_routing_key",
                                      "hop_routing_key", "declare_exchange")),
                          (collector_mod, ("_HOP_FIELDS", "_HEX32", "_HEX16"))):
        for name in names:
            assert not hasattr(module, name), f"{module.__name__}.{name} is the wire's"


def test_a_hop_has_exactly_the_wire_fields():
    ctx, _valid = context.child_of_incoming(None)
    hop = hops.make_hop(ctx, service="nova-api", side=wire.SERVER, protocol=wire.HTTP,
                        peer=None, target="/servers", operation="GET /servers", kind=None,
                        outcome="ok", error=None, start=1.0, duration=0.1)
    assert tuple(hop) == wire.HOP_FIELDS


def test_a_snapshot_has_exactly_the_wire_fields():
    recorder = recorder_mod.Recorder("nova-api")
    snapshot = recorder.snapshot(interval=10.0)
    assert tuple(snapshot) == wire.SNAPSHOT_FIELDS
    assert snapshot["format"] == wire.SNAPSHOT_FORMAT
    assert tuple(snapshot["process"]) == wire.PROCESS_FIELDS


def test_ids_the_collector_accepts_are_the_ids_a_traceparent_carries():
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert context.parse_traceparent(f"00-{trace_id}-{span_id}-01") == (trace_id, span_id, True)
    assert wire.match_trace_id(trace_id) and wire.match_span_id(span_id)
    for bad_trace, bad_span in ((trace_id.upper(), span_id.upper()),
                                (trace_id[:-1], span_id[:-1]),
                                (trace_id + "0", span_id + "0")):
        assert context.parse_traceparent(f"00-{bad_trace}-{span_id}-01") is None
        assert context.parse_traceparent(f"00-{trace_id}-{bad_span}-01") is None
        assert not wire.match_trace_id(bad_trace) and not wire.match_span_id(bad_span)
