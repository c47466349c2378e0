"""A real Nova control plane from PyPI with commlens turned on, as an operator
sets it up (issue 17): nova-api under gunicorn with commlens's paste filter
after ``compute_req_id``; nova-conductor, nova-scheduler and nova-compute
(``fake.SmallFakeDriver``) on ``commlens+rabbit://``; placement under gunicorn
wrapped with the class middleware; sqlite databases; a stand-in for glance's
image API; and a commlens collector reading what they ship.

The services run from their own virtualenv (scripts/test-openstack builds it:
nova, openstack-placement, gunicorn and the commlens agent, pinned by
upper-constraints-2026.2.txt); the collector runs from the tests' venv. They
share the broker on 127.0.0.1:5672 but only on a vhost of their own, created
here and deleted on stop: nothing here touches another vhost.

CPU is kept small: one worker per service, INFO logs.
"""

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import uuid
from http.server import ThreadingHTTPServer

import requests

from peers.json_http import JsonRequestHandler
from rabbit_node import RABBITMQ_BIN, RabbitNode
from support import free_port, run_collector, wait_for

SERVICES = pathlib.Path(__file__).parent / "services"
# The release's pins (scripts/test-openstack installs the services under them).
PINS = pathlib.Path(__file__).parent / "upper-constraints-2026.2.txt"
RABBITMQCTL = "rabbitmqctl"
COMPUTE_HOST = "os-compute-1"
IMAGE_ID = "9d3c1f4e-7a7b-4f43-9c8f-6f2f3c0de001"
PROJECT = "6e3fbd4f1c6a4d5c9c1e2f3a4b5c6d7e"
# The microversion the tests speak: >= 2.37 lets a boot say "networks": "none",
# so no neutron is needed.
MICROVERSION = "2.37"
# RPC calls give up after this (nova.conf rpc_response_timeout), so the
# timeout test waits seconds, not a minute.
RPC_TIMEOUT = 10
# Traces close this long after their last hop: longer than the pauses inside
# a boot (sqlite writes, the scheduler's wait for placement).
TRACE_QUIET = "5s"


class ImageService(JsonRequestHandler):
    """Glance's image API as far as a boot needs it: every id is one active image."""

    def do_GET(self):
        if self.path.startswith("/v2/images/"):
            return self.send_json(200, self.image(self.path.split("/")[3].split("?")[0]))
        if self.path.startswith("/v2/schemas/image"):
            # glanceclient builds its image model from this schema, and nova
            # keeps the schema's properties as the image's own (the rest
            # become image properties).
            return self.send_json(200, {"name": "image", "additionalProperties": True,
                                        "properties": {k: {} for k in self.image("x")}})
        self.send_json(404, {"message": "not found"})

    @staticmethod
    def image(image_id):
        return {"id": image_id, "name": "cirros", "status": "active",
                "visibility": "public", "protected": False, "os_hidden": False,
                "container_format": "bare", "disk_format": "raw", "size": 1024,
                "virtual_size": 1024, "min_ram": 0, "min_disk": 0,
                "owner": PROJECT, "tags": [], "checksum": "0" * 32,
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
                "file": f"/v2/images/{image_id}/file", "schema": "/v2/schemas/image"}


class NetworkService(JsonRequestHandler):
    """Neutron's API as far as these boots need it ("networks": "none"): nova
    still lists a server's ports and security groups; there are none."""

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/v2.0/") and path.count("/") == 2:
            resource = path[len("/v2.0/"):].removesuffix(".json").replace("-", "_")
            return self.send_json(200, {resource: []})
        self.send_json(404, {"NeutronError": {"message": "not found"}})


class Plane:
    """Start with ``with Plane(venv, base_dir) as plane:``; everything it
    started (processes, vhost, the image service, the collector) is gone
    when the block ends, also when starting failed half-way."""

    def __init__(self, venv, base_dir):
        self.venv = pathlib.Path(venv).resolve()
        self.base = pathlib.Path(base_dir)
        self.vhost = f"commlens-nova-{uuid.uuid4().hex[:8]}"
        self.broker_port = 5672
        self._rabbitmqctl = [RABBITMQCTL]
        self._rabbitmqctl_env = None
        self.processes = {}
        self.collector = None
        self.api_url = self.placement_url = self.image_url = self.network_url = None
        self._stack = contextlib.ExitStack()

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            # What the services said, shown with the failure (pytest prints stderr).
            print(self.logs_tail(), file=sys.stderr)
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _start(self):
        if os.environ.get("COMMLENS_OPENSTACK_BROKER") == "private":
            # A RabbitMQ node of the plane's own (tests/rabbit_node.py), for
            # when the shared broker is too busy to be fair to the services.
            node = RabbitNode(self.base / "rabbit", name="commlens-nova").start()
            self._stack.callback(node.stop)
            self.broker_port = node.port
            self._rabbitmqctl = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.node]
            self._rabbitmqctl_env = node._env()
        self.rabbit_url = f"rabbit://guest:guest@127.0.0.1:{self.broker_port}/{self.vhost}"
        self.export_url = f"amqp://guest:guest@127.0.0.1:{self.broker_port}/{self.vhost}"
        self._add_vhost()
        self.collector = self._stack.enter_context(run_collector(
            self.export_url, self.base, extra_args=("--trace-quiet", TRACE_QUIET)))
        self._start_stand_ins()
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.placement_url = f"http://127.0.0.1:{free_port()}"
        self._write_config()
        self._sync_databases()
        self._start_service("placement", [
            self._bin("gunicorn"), "--workers", "1", "--bind", self.placement_url[7:],
            "--chdir", str(SERVICES), "placement_wsgi:application"])
        wait_for(lambda: self._answers(self.placement_url + "/"), timeout=60,
                 message="placement answers")
        self._start_service("nova-api", [
            self._bin("gunicorn"), "--workers", "1", "--timeout", "120",
            "--bind", self.api_url[7:], "--chdir", str(SERVICES),
            "nova_api_wsgi:application"])
        for binary in ("nova-conductor", "nova-scheduler"):
            self._start_service(binary, [self._bin(binary), "--config-file", str(self.nova_conf)])
        self.start_compute()
        wait_for(lambda: self._answers(self.api_url + "/"), timeout=300,
                 message="nova-api answers")
        self._discover_compute()
        self._create_flavors()

    def stop_service(self, name):
        """SIGTERM the service's process group, SIGKILL what is left after 20 s."""
        process = self.processes.pop(name)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        # Workers forked by the service may outlive their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def start_compute(self):
        self._start_service("nova-compute", [
            self._bin("nova-compute"), "--config-file", str(self.nova_conf),
            "--config-file", str(self.conf_dir / "compute.conf")])

    def log(self, name):
        return (self.base / f"{name}.log").read_text(errors="replace")

    def logs_tail(self, lines=40):
        """The end of every service's log: what a failing test shows."""
        out = []
        for path in sorted(self.base.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==== {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- the broker ----------------------------------------------------------

    def _add_vhost(self):
        _run([*self._rabbitmqctl, "add_vhost", self.vhost], env=self._rabbitmqctl_env)
        self._stack.callback(self._delete_vhost)
        _run([*self._rabbitmqctl, "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"],
             env=self._rabbitmqctl_env)

    def _delete_vhost(self):
        """Only this plane's vhost: the shared broker's others are never touched.
        A busy broker can take minutes; a failure here is said, never raised
        (it would hide why the plane stopped)."""
        try:
            subprocess.run([*self._rabbitmqctl, "delete_vhost", self.vhost],
                           env=self._rabbitmqctl_env, capture_output=True, timeout=300,
                           check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"openstack plane: could not delete vhost {self.vhost}: {exc}; "
                  f"delete it with: rabbitmqctl delete_vhost {self.vhost}", file=sys.stderr)

    # -- configuration ---------------------------------------------------------

    def _write_config(self):
        self.conf_dir = self.base / "etc"
        state = self.base / "state"
        for path in (self.conf_dir, state, state / "instances", state / "locks"):
            path.mkdir(parents=True, exist_ok=True)
        self.db = {name: f"sqlite:///{self.base / name}.sqlite"
                   for name in ("nova_api", "nova_cell0", "nova_cell1", "placement")}
        self.transport_url = "commlens+" + self.rabbit_url
        self.nova_conf = self.conf_dir / "nova.conf"
        placement_auth = (f"auth_type = admin_token\nendpoint = {self.placement_url}\n"
                          f"endpoint_override = {self.placement_url}\ntoken = admin\n")
        self.nova_conf.write_text(f"""\
[DEFAULT]
transport_url = {self.transport_url}
state_path = {state}
instances_path = {state / 'instances'}
compute_driver = fake.SmallFakeDriver
my_ip = 127.0.0.1
rpc_response_timeout = {RPC_TIMEOUT}
debug = false
use_stderr = true

[api]
auth_strategy = keystone

[wsgi]
api_paste_config = {self.conf_dir / 'api-paste.ini'}

[api_database]
connection = {self.db['nova_api']}

[database]
connection = {self.db['nova_cell1']}

[conductor]
workers = 1

[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1

[placement]
{placement_auth}
[glance]
endpoint_override = {self.image_url}

[neutron]
auth_type = admin_token
endpoint = {self.network_url}
endpoint_override = {self.network_url}
token = admin

[quota]
# Quotas are not what these tests are about (the NoValidHost flavor is huge).
driver = nova.quota.NoopQuotaDriver

[oslo_concurrency]
lock_path = {state / 'locks'}

[oslo_policy]
enforce_scope = false

[commlens]
ship_interval = 0.5
hop_sample_ratio = 1
""")
        (self.conf_dir / "compute.conf").write_text(f"[DEFAULT]\nhost = {COMPUTE_HOST}\n")
        self._write_api_paste()
        (self.conf_dir / "placement.conf").write_text(f"""\
[DEFAULT]
debug = false

[api]
auth_strategy = noauth2

[placement_database]
connection = {self.db['placement']}

[oslo_policy]
enforce_scope = false
""")

    def _write_api_paste(self):
        """nova's own api-paste.ini, edited as docs/operator-guide.md tells an operator:
        commlens after compute_req_id; and no keystone here, so authtoken and
        keystonecontext give way to services/token_context.py."""
        shipped = (self.venv / "etc" / "nova" / "api-paste.ini").read_text()
        edited = shipped.replace("compute_req_id faultwrap", "compute_req_id commlens faultwrap")
        edited = edited.replace("authtoken keystonecontext", "token_context")
        if edited.count("compute_req_id commlens") < 4 or "authtoken keystonecontext" in edited:
            raise AssertionError("nova's api-paste.ini changed shape: " + shipped)
        edited += ("\n[filter:commlens]\n"
                   "paste.filter_factory = commlens.middleware.wsgi:filter_factory\n"
                   "service_name = nova-api\n"
                   "\n[filter:token_context]\n"
                   "paste.filter_factory = token_context:filter_factory\n")
        (self.conf_dir / "api-paste.ini").write_text(edited)

    def _environment(self):
        # The tests' own COMMLENS_* (support.py: they ship as "test-client" to
        # the tests' exchange) must not leak into the services.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("COMMLENS_", "OS_", "VIRTUAL_ENV"))}
        env.update({
            "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(SERVICES),
            "OS_NOVA_CONFIG_DIR": str(self.conf_dir),
            "OS_NOVA_CONFIG_FILES": "api-paste.ini;nova.conf",
            "OS_PLACEMENT_CONFIG_DIR": str(self.conf_dir),
            # Placement has no transport: commlens reads the environment.
            "COMMLENS_EXPORT_URL": self.export_url,
            "COMMLENS_SHIP_INTERVAL": "0.5",
            "COMMLENS_HOP_SAMPLE_RATIO": "1",
        })
        return env

    # -- processes ---------------------------------------------------------------

    def _bin(self, name):
        return str(self.venv / "bin" / name)

    def _manage(self, *args):
        return _run([self._bin("nova-manage"), "--config-file", str(self.nova_conf), *args],
                    env=self._environment())

    def _sync_databases(self):
        self._manage("api_db", "sync")
        self._manage("cell_v2", "map_cell0", "--database_connection", self.db["nova_cell0"])
        # The cell mapping stores the commlens+ transport URL as given.
        self._manage("cell_v2", "create_cell", "--name", "cell1", "--verbose",
                     "--transport-url", self.transport_url,
                     "--database_connection", self.db["nova_cell1"])
        self._manage("db", "sync")
        _run([self._bin("placement-manage"), "--config-file",
              str(self.conf_dir / "placement.conf"), "db", "sync"], env=self._environment())

    def _start_service(self, name, command):
        log = open(self.base / f"{name}.log", "ab")
        with log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env=self._environment(), cwd=self.base,
                                       start_new_session=True)
        self.processes[name] = process
        self._stack.callback(lambda: name in self.processes and self.stop_service(name))
        return process

    def _answers(self, url):
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited ({process.returncode}):\n"
                                     + self.logs_tail())
        try:
            return requests.get(url, timeout=5).status_code < 500
        except requests.RequestException:
            return False

    def _discover_compute(self):
        def compute_up():
            services = self.api("GET", "/os-services?binary=nova-compute").json()["services"]
            return any(s["host"] == COMPUTE_HOST and s["state"] == "up" for s in services)
        wait_for(compute_up, timeout=300, interval=1, message="nova-compute up")

        def mapped():
            out = self._manage("cell_v2", "discover_hosts", "--verbose")
            return COMPUTE_HOST in out or COMPUTE_HOST in self._manage("cell_v2", "list_hosts")
        wait_for(mapped, timeout=60, interval=2, message="compute host mapped to cell1")

        def has_inventory():
            providers = self.placement("GET", "/resource_providers").json()
            return any(p["name"] == COMPUTE_HOST for p in providers["resource_providers"])
        wait_for(has_inventory, timeout=60, interval=1, message="compute's resource provider")

    def _create_flavors(self):
        for flavor in ({"name": "tiny", "id": "tiny", "ram": 64, "vcpus": 1, "disk": 1},
                       # More memory than SmallFakeDriver has: NoValidHost.
                       {"name": "huge", "id": "huge", "ram": 10_000_000, "vcpus": 1,
                        "disk": 1}):
            self.api("POST", "/flavors", json={"flavor": flavor}).raise_for_status()

    # -- clients -----------------------------------------------------------------

    def api(self, method, path, **kwargs):
        """nova-api at MICROVERSION, as the admin of PROJECT."""
        headers = {"X-Auth-Token": f"admin:{PROJECT}",
                   "OpenStack-API-Version": f"compute {MICROVERSION}",
                   **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.api_url}/v2.1{path}", headers=headers,
                                timeout=kwargs.pop("timeout", 60), **kwargs)

    def placement(self, method, path, **kwargs):
        headers = {"X-Auth-Token": "admin", "OpenStack-API-Version": "placement 1.14"}
        return requests.request(method, self.placement_url + path, headers=headers,
                                timeout=30, **kwargs)

    def boot(self, name, flavor="tiny"):
        """POST /servers; returns (server id, the request id nova-api gave it)."""
        response = self.api("POST", "/servers", json={"server": {
            "name": name, "imageRef": IMAGE_ID, "flavorRef": flavor, "networks": "none"}})
        if response.status_code != 202:
            raise AssertionError(f"boot refused: {response.status_code} {response.text}")
        return response.json()["server"]["id"], response.headers["X-OpenStack-Request-ID"]

    def wait_status(self, server_id, wanted, timeout=120):
        def status():
            response = self.api("GET", f"/servers/{server_id}")
            if response.status_code >= 500:
                return None  # sqlite's "database is locked", with or without commlens
            server = response.json()["server"]
            if server["status"] in wanted:
                return server
            if server["status"] == "ERROR":
                raise AssertionError(f"server {server_id} went to ERROR: "
                                     f"{server.get('fault')}\n{self.logs_tail()}")
            return None
        return wait_for(status, timeout=timeout, interval=0.5,
                        message=f"server {server_id} {wanted}")

    # -- the stand-ins for glance and neutron -------------------------------------

    def _start_stand_ins(self):
        """glance and neutron, uninstrumented, in threads of the tests' process."""
        self.image_url = self._serve(ImageService)
        self.network_url = self._serve(NetworkService)

    def _serve(self, handler):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
        self._stack.callback(stop)
        return f"http://127.0.0.1:{server.server_address[1]}"


def _run(command, env=None, timeout=300):
    """Run a setup command to completion; its output on failure."""
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr

