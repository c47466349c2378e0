"""An emulated OpenStack control plane whose parts really talk over REST and RPC.

keystone validates tokens over REST; nova-api (REST) checks networks with
neutron-server (REST) and calls nova-conductor,
which calls nova-scheduler and then the chosen nova-compute over RPC; a
compute creates and binds its port on neutron-server over REST; neutron-server
tells its agents over an RPC fanout; computes and agents send periodic state
reports (RPC calls) and computes send notifications. Every part is
instrumented the way an operator would do it: a ``commlens+`` transport URL
naming the service, and the WSGI middleware as the paste filter would build
it. Nothing else in here knows about commlens.

Embedded, all parts run as threads of one process over ``fake://``
(oslo.messaging's in-memory driver, whose queues are shared by every
transport of a process, like one broker). Over a real broker
(``rabbit://``) each group of ``GROUPS`` runs in a process of its own
(``commlens.emulator.service``).
"""

import itertools
import json
import logging
import random
import threading
import time
import urllib.parse
import uuid

from werkzeug import serving

LOG = logging.getLogger(__name__)

TOKEN = "gAAAAAB-demo-secret-token"  # sent by the workload: must never leak
STATE_REPORT_SECONDS = 2.0
SLOW_CONDUCTOR_SECONDS = 3.0

CONDUCTOR, SCHEDULER, COMPUTE = "conductor", "scheduler", "compute"
PLUGIN, PORT_UPDATE = "q-plugin", "q-agent-notifier-port-update"


class PortBindingFailed(Exception):
    pass


class NeutronServerError(Exception):
    pass


def instrumented_url(transport_url, service, host=None):
    """What an operator writes to turn commlens on for ``service``:
    ``rabbit://...`` -> ``commlens+rabbit://...?commlens_service_name=SERVICE``;
    ``host``: the emulated host the transport speaks for (``commlens_host``),
    which then ships as a process of its own, as it would on its own machine."""
    ours = {"commlens_service_name": service}
    if host is not None:
        ours["commlens_host"] = host
    return ("commlens+" + transport_url + ("&" if "?" in transport_url else "?")
            + urllib.parse.urlencode(ours))


class _Wsgi:
    """A real WSGI server on loopback (werkzeug, threaded)."""

    def __init__(self):
        self.app = None
        self._server = serving.make_server("127.0.0.1", 0, self._call, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.port}"
        self._thread = None

    def _call(self, environ, start_response):
        return self.app(environ, start_response)

    def start(self, app):
        self.app = app
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


def _json_response(start_response, status, body=None, headers=()):
    payload = b"" if body is None else json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), *headers])
    return [payload]


def _request_ids(app):
    """What oslo.middleware's request_id filter does: a req- id per request,
    in the environ and on the response."""
    def middleware(environ, start_response):
        request_id = "req-" + str(uuid.uuid4())
        environ["openstack.request_id"] = request_id

        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, ("X-OpenStack-Request-ID", request_id)],
                                  exc_info)
        return app(environ, start)
    return middleware


# The parts, in the order they start (a part needs the URLs of those before
# it); with --transport rabbit:// each runs as a process of its own.
GROUPS = ("keystone", "neutron", "nova-control", "nova-compute", "nova-api")
_GROUP_WSGI = {"keystone": "keystone", "neutron": "neutron-server", "nova-api": "nova-api"}


class ControlPlane:
    """``groups``: the parts to run here; ``urls``: {service: base URL} of the
    REST services running elsewhere."""

    def __init__(self, transport_url="fake://", faults=None, computes=4, agents=2,
                 rpc_timeout=5.0, groups=GROUPS, urls=None):
        from commlens.emulator import faults as faults_mod
        from commlens.emulator import truth as truth_mod

        self.transport_url = transport_url
        self.faults = faults or faults_mod.Faults()
        self.computes = computes
        self.agents = agents
        self.rpc_timeout = rpc_timeout
        self.groups = tuple(groups)
        self.urls = dict(urls or {})
        self._transports = {}
        self._servers = {}
        self._wsgi = {}
        self._stopping = threading.Event()
        self._threads = []
        self._computes = {}  # host -> endpoint, to serve again after compute-down
        self._notifications = None
        self._listeners = []  # (notification listener, its transport)
        self.instances = {}  # nova-api's view: instance -> host
        self._instances_lock = threading.Lock()
        self.compute_hosts = [f"compute-{i + 1}" for i in range(computes)]
        # What the parts really did, to check commlens's counts against.
        self.truth = truth_mod.GroundTruth()

    # -- transports and RPC -----------------------------------------------

    def transport(self, service, host=None):
        import oslo_messaging as om
        from oslo_config import cfg

        if (service, host) not in self._transports:
            self._transports[(service, host)] = om.get_rpc_transport(
                cfg.CONF, url=instrumented_url(self.transport_url, service, host),
                allowed_remote_exmods=[__name__])
        return self._transports[(service, host)]

    def client(self, service, topic, fanout=False, host=None):
        """``host``: an emulated host whose own process sends (its state
        reports), so commlens knows which host went silent."""
        import oslo_messaging as om

        return self.truth.client(om.get_rpc_client(
            self.transport(service, host), om.Target(topic=topic, fanout=fanout),
            serializer=om.NoOpSerializer(), timeout=self.rpc_timeout), service, topic, fanout)

    def serve(self, service, topic, endpoint, server):
        import oslo_messaging as om

        rpc = om.get_rpc_server(self.transport(service), om.Target(topic=topic, server=server),
                                [self.truth.endpoint(endpoint, service, topic)],
                                executor="threading",
                                serializer=om.NoOpSerializer())
        rpc.start()
        self._servers[(service, server)] = rpc
        return rpc

    def unserve(self, service, server):
        rpc = self._servers.pop((service, server), None)
        if rpc is not None:
            rpc.stop()
            rpc.wait()

    def every(self, seconds, task, alive=lambda: True):
        """Run ``task`` periodically (a state report) until the plane stops."""
        def run():
            time.sleep(random.uniform(0, seconds))
            while not self._stopping.wait(seconds):
                if alive():
                    try:
                        task()
                    except Exception as exc:
                        LOG.debug("periodic task failed: %s", type(exc).__name__)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the services -----------------------------------------------------

    def start(self):
        """Start this plane's parts; oslo.config's global CONF must be parsed already."""
        for group in self.groups:
            if group in _GROUP_WSGI:
                self._wsgi[_GROUP_WSGI[group]] = _Wsgi()
        self.urls.update({name: server.url for name, server in self._wsgi.items()})
        # What an operator writes as http_endpoints: who lives where.
        self.endpoints = [f"{name}={url}" for name, url in self.urls.items()]
        if "keystone" in self.groups:
            self._start_keystone()
        if "neutron" in self.groups:
            self._start_neutron()
            for i in range(self.agents):
                self._start_agent(f"agent-{i + 1}")
        if "nova-control" in self.groups:
            self._start_scheduler()
            self._start_conductor()
            self._start_notification_consumer()
        if "nova-compute" in self.groups:
            for host in self.compute_hosts:
                self._start_compute(host)
        if "nova-api" in self.groups:
            self._start_nova_api()

    def own_urls(self):
        """{service: URL} of the REST services running here."""
        return {name: server.url for name, server in self._wsgi.items()}

    def _middleware(self, app, service):
        from commlens.middleware.wsgi import CommlensMiddleware

        # As [filter:commlens] with service_name and http_endpoints set.
        return CommlensMiddleware(self.truth.wsgi(app, service), service_name=service,
                                  http_endpoints=self.endpoints)

    def _start_keystone(self):
        def keystone(environ, start_response):
            if environ["PATH_INFO"] == "/v3/auth/tokens" and environ.get("HTTP_X_SUBJECT_TOKEN"):
                return _json_response(start_response, "200 OK",
                                      {"token": {"expires_at": "2099-01-01T00:00:00Z"}})
            return _json_response(start_response, "401 Unauthorized", {"error": "no token"})
        self._wsgi["keystone"].start(self._middleware(_request_ids(keystone), "keystone"))

    def _validate(self, session, environ):
        """keystonemiddleware's job: validate the caller's token with keystone."""
        token = environ.get("HTTP_X_AUTH_TOKEN", "")
        response = session.get(self.urls["keystone"] + "/v3/auth/tokens",
                               headers={"X-Auth-Token": "service-token",
                                        "X-Subject-Token": token}, timeout=5)
        return response.status_code == 200

    def _start_neutron(self):
        import requests

        plane = self
        session = requests.Session()
        binding_failures = itertools.count()
        notifier = self.client("neutron-server", PORT_UPDATE, fanout=True)

        def neutron(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
            if not plane._validate(session, environ):
                return _json_response(start_response, "401 Unauthorized", {})
            if path == "/v2.0/ports" and method == "POST":
                port_id = str(uuid.uuid4())
                notifier.cast({}, "port_update", port_id=port_id)
                return _json_response(start_response, "201 Created", {"port": {"id": port_id}})
            if path.startswith("/v2.0/ports/") and method == "PUT":
                if "neutron-error" in plane.faults:
                    if next(binding_failures) % 3:
                        return _json_response(start_response, "409 Conflict", {"NeutronError": {
                            "type": "PortBindingFailed", "message": "binding failed",
                            "detail": ""}})
                    return _json_response(start_response, "500 Internal Server Error", {
                        "NeutronError": {"type": "NeutronServerError", "message": "db",
                                         "detail": ""}})
                return _json_response(start_response, "200 OK", {"port": {"status": "ACTIVE"}})
            if path.startswith("/v2.0/ports/") and method == "DELETE":
                return _json_response(start_response, "204 No Content")
            if path == "/v2.0/ports" and method == "GET":
                return _json_response(start_response, "200 OK", {"ports": []})
            return _json_response(start_response, "404 Not Found", {})

        class Plugin:
            def report_state(self, ctxt, agent):
                return "ok"

        self.serve("neutron-server", PLUGIN, Plugin(), "neutron-1")
        self._wsgi["neutron-server"].start(
            self._middleware(_request_ids(neutron), "neutron-server"))

    def _start_agent(self, host):
        service = "neutron-openvswitch-agent"

        class Agent:
            def port_update(self, ctxt, port_id):
                return None

        self.serve(service, PORT_UPDATE, Agent(), host)
        plugin = self.client(service, PLUGIN, host=host)
        self.every(STATE_REPORT_SECONDS,
                   lambda: plugin.call({}, "report_state", agent=host))

    def _start_scheduler(self):
        plane = self

        class Scheduler:
            def select_destinations(self, ctxt, instance):
                return random.choice(plane.compute_hosts)

        self.serve("nova-scheduler", SCHEDULER, Scheduler(), "scheduler-1")

    def _start_notification_consumer(self):
        """What reads the computes' notifications, as ceilometer's notification
        agent does: without it they wait in a queue nobody reads."""
        import oslo_messaging as om
        from oslo_config import cfg

        class Endpoint:
            def info(self, ctxt, publisher_id, event_type, payload, metadata):
                return None

        transport = om.get_notification_transport(
            cfg.CONF, url=instrumented_url(self.transport_url, "ceilometer-agent-notification"))
        listener = om.get_notification_listener(
            transport, [om.Target(topic="notifications")], [Endpoint()], executor="threading")
        listener.start()
        self._listeners.append((listener, transport))

    def _start_conductor(self):
        plane = self
        scheduler = self.client("nova-conductor", SCHEDULER)
        computes = self.client("nova-conductor", COMPUTE)
        built = []

        class Conductor:
            def _maybe_slow(self):
                if "slow-conductor" in plane.faults:
                    time.sleep(SLOW_CONDUCTOR_SECONDS)

            def build_instances(self, ctxt, instance):
                self._maybe_slow()
                host = scheduler.call(ctxt, "select_destinations", instance=instance)
                computes.prepare(server=host).call(ctxt, "build_and_run_instance",
                                                   instance=instance)
                built.append(instance)
                del built[:-50]
                return host

            def instance_list(self, ctxt):
                self._maybe_slow()
                return list(built)

            def compute_node_update(self, ctxt, host):
                self._maybe_slow()
                return "ok"

            def rebuild_instance(self, ctxt, instance, host):
                # Cast on to the instance's host, as nova's conductor does.
                computes.prepare(server=host).cast(ctxt, "rebuild_instance", instance=instance)

        self._conductor = Conductor()
        if "conductor-down" not in self.faults:
            self.serve("nova-conductor", CONDUCTOR, self._conductor, "conductor-1")

    def _start_compute(self, host):
        import requests

        session = requests.Session()
        neutron = self.urls["neutron-server"]
        headers = {"X-Auth-Token": "service-token"}
        notifier = self._notifier()
        ports = {}  # this compute's view: instance -> its ports
        ports_lock = threading.Lock()

        class Compute:
            def _bind_port(self, instance):
                port = session.post(neutron + "/v2.0/ports", headers=headers, timeout=10)
                port_id = port.json()["port"]["id"]
                bound = session.put(f"{neutron}/v2.0/ports/{port_id}", headers=headers,
                                    timeout=10)
                if bound.status_code == 409:
                    raise PortBindingFailed(f"port {port_id} of {instance}")
                if bound.status_code >= 500:
                    raise NeutronServerError(f"neutron-server: {bound.status_code}")
                return port_id

            def build_and_run_instance(self, ctxt, instance):
                port_id = self._bind_port(instance)
                with ports_lock:
                    ports[instance] = [port_id]
                notifier.info(ctxt, "compute.instance.create.end", {"instance": instance})
                return "ACTIVE"

            def attach_interface(self, ctxt, instance):
                port_id = self._bind_port(instance)
                with ports_lock:
                    ports.setdefault(instance, []).append(port_id)
                return port_id

            def rebuild_instance(self, ctxt, instance):
                return None

            def terminate_instance(self, ctxt, instance):
                with ports_lock:
                    instance_ports = ports.pop(instance, [])
                for port_id in instance_ports:
                    session.delete(f"{neutron}/v2.0/ports/{port_id}", headers=headers,
                                   timeout=10)

        self._computes[host] = Compute()
        if not (host == self.compute_hosts[0] and "compute-down" in self.faults):
            self.serve("nova-compute", COMPUTE, self._computes[host], host)
        reporter = self.client("nova-compute", CONDUCTOR, host=host)
        self.every(STATE_REPORT_SECONDS,
                   lambda: reporter.call({}, "compute_node_update", host=host),
                   alive=lambda: not (host == self.compute_hosts[0]
                                      and "compute-down" in self.faults))

    def _notifier(self):
        import oslo_messaging as om
        from oslo_config import cfg

        if self._notifications is None:
            transport = om.get_notification_transport(
                cfg.CONF, url=instrumented_url(self.transport_url, "nova-compute"))
            self._notifications = om.Notifier(transport, publisher_id="compute",
                                              driver="messaging", topics=["notifications"])
        return self._notifications

    def _start_nova_api(self):
        import flask
        import requests

        plane = self
        session = requests.Session()
        conductor = self.client("nova-api", CONDUCTOR)
        computes = self.client("nova-api", COMPUTE)
        app = flask.Flask("nova-api")
        app.logger.setLevel(logging.CRITICAL)  # its failures are what commlens shows

        def ctxt():
            return {"request_id": flask.request.environ.get("openstack.request_id"),
                    "auth_token": flask.request.headers.get("X-Auth-Token")}

        @app.before_request
        def authenticate():
            if not plane._validate(session, flask.request.environ):
                return {"error": "unauthorized"}, 401
            return None

        neutron = self.urls["neutron-server"]

        @app.post("/v2.1/servers")
        def boot():
            # nova-api checks the requested network with neutron first.
            session.get(neutron + "/v2.0/ports", headers={"X-Auth-Token": "service-token"},
                        timeout=10)
            instance = str(uuid.uuid4())
            # Real nova casts build requests and reports failures later; the
            # demo calls, so an error travels back to the user and shows as a
            # chain ending at nova-api.
            host = conductor.call(ctxt(), "build_instances", instance=instance)
            with plane._instances_lock:
                plane.instances[instance] = host
            return {"server": {"id": instance, "host": host}}, 202

        @app.get("/v2.1/servers")
        def servers():
            return {"servers": conductor.call(ctxt(), "instance_list")}

        @app.post("/v2.1/servers/<instance>/action")
        def action(instance):
            host = plane.host_of(instance)
            if host is None:
                return {"itemNotFound": {"code": 404}}, 404
            if "rebuild" in (flask.request.get_json(silent=True) or {}):
                # Real nova casts a rebuild to the conductor and answers at
                # once: with the conductor down, the casts wait in a queue
                # nobody reads (exporters/lost.py).
                conductor.cast(ctxt(), "rebuild_instance", instance=instance, host=host)
                return "", 202
            return {"port": computes.prepare(server=host).call(
                ctxt(), "attach_interface", instance=instance)}, 202

        @app.delete("/v2.1/servers/<instance>")
        def delete(instance):
            host = plane.host_of(instance)
            if host is None:
                return {"itemNotFound": {"code": 404}}, 404
            with plane._instances_lock:
                plane.instances.pop(instance, None)
            computes.prepare(server=host).cast(ctxt(), "terminate_instance",
                                               instance=instance)
            return "", 204

        self._wsgi["nova-api"].start(self._middleware(_request_ids(app), "nova-api"))

    def host_of(self, instance):
        with self._instances_lock:
            return self.instances.get(instance)

    # -- faults that change the topology ------------------------------------

    def apply(self, name, on):
        """Faults that change who consumes; the others are read per request."""
        if name == "conductor-down" and "nova-control" in self.groups:
            if on:
                self.unserve("nova-conductor", "conductor-1")
            else:
                self.serve("nova-conductor", CONDUCTOR, self._conductor, "conductor-1")
        elif name == "compute-down" and "nova-compute" in self.groups:
            host = self.compute_hosts[0]
            if on:
                self.unserve("nova-compute", host)
            else:
                self.serve("nova-compute", COMPUTE, self._computes[host], host)

    def stop(self):
        self._stopping.set()
        for service, server in list(self._servers):
            self.unserve(service, server)
        for server in self._wsgi.values():
            server.stop()
        for listener, transport in self._listeners:
            listener.stop()
            listener.wait()
            transport.cleanup()
        for thread in self._threads:
            thread.join(STATE_REPORT_SECONDS + 1)
        for transport in self._transports.values():
            transport.cleanup()
