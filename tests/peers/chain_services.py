"""Three real services for the error-chain tests, one role per process.

- ``--role network``: a plain WSGI app behind a neutron-style fault wrapper
  (an exception becomes a 409 with a NeutronError body); commlens's filter
  sits outside the wrapper, where an api-paste.ini pipeline puts it.
- ``--role conductor``: an oslo.messaging RPC server (``commlens+rabbit://``)
  whose endpoints call the network service over REST with requests.
- ``--role api``: a Flask app behind oslo.middleware's request_id filter and
  commlens, whose handlers call the conductor over RPC.

Prints ``READY [port]``; SIGTERM stops it. All roles run this same file, so
``__main__.PortBindingFailed`` exists in the api too and the api's
``allowed_remote_exmods`` rebuilds it as ``PortBindingFailed_Remote``.
"""

import argparse
import signal

parser = argparse.ArgumentParser()
parser.add_argument("--role", choices=("network", "conductor", "api"), required=True)
parser.add_argument("--url", help="the transport URL (conductor, api)")
parser.add_argument("--topic", help="the conductor's topic (conductor, api)")
parser.add_argument("--network", help="the network service's base URL (conductor)")
parser.add_argument("--executor", default="threading", choices=("threading", "eventlet"))
args = parser.parse_args()

if args.executor == "eventlet":
    import eventlet
    eventlet.monkey_patch()

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from werkzeug import serving  # noqa: E402


class PortBindingFailed(Exception):
    """Raised where the error starts (network) and again above it (conductor)."""


def serve_wsgi(app):
    server = serving.make_server("127.0.0.1", 0, app, threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("READY", server.port, flush=True)
    server.serve_forever()


def network():
    from commlens.middleware.wsgi import CommlensMiddleware

    flaky_seen = set()
    lock = threading.Lock()

    def ports(environ, start_response):
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if method == "PUT" and path.endswith("/binding"):
            raise PortBindingFailed("binding failed for port %s" % path.split("/")[3])
        if method == "PUT" and path.endswith("/flaky"):
            with lock:
                first = path not in flaky_seen
                flaky_seen.add(path)
            if first:
                raise PortBindingFailed("not yet")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"port": {"status": "ACTIVE"}}']

    def fault_wrapper(environ, start_response):
        # What neutron's FaultWrapper does: an exception becomes an HTTP error
        # whose body names the exception's type.
        try:
            return ports(environ, start_response)
        except PortBindingFailed as exc:
            body = json.dumps({"NeutronError": {"type": type(exc).__name__,
                                                "message": str(exc), "detail": ""}})
            start_response("409 Conflict", [("Content-Type", "application/json")])
            return [body.encode()]

    serve_wsgi(CommlensMiddleware(fault_wrapper, service_name="neutron-server"))


def conductor():
    import oslo_messaging as om
    import requests
    from oslo_config import cfg

    cfg.CONF([], project="commlens-chain-conductor")

    class Conductor:
        def build_instances(self, ctxt, server_id):
            response = requests.put(f"{args.network}/v2.0/ports/{server_id}/binding",
                                    timeout=10)
            if response.status_code == 409:
                raise PortBindingFailed(f"port of {server_id}: {response.status_code}")
            return "built"

        def reserve(self, ctxt, server_id):
            for _attempt in range(3):
                response = requests.put(f"{args.network}/v2.0/ports/{server_id}/flaky",
                                        timeout=10)
                if response.status_code == 200:
                    return "reserved"
            raise PortBindingFailed("gave up")

        def hang(self, ctxt):
            time.sleep(120)

        def ping(self, ctxt):
            return "pong"

    transport = om.get_rpc_transport(cfg.CONF, url=args.url)
    server = om.get_rpc_server(transport, om.Target(topic=args.topic, server="c1"),
                               [Conductor()], executor=args.executor,
                               serializer=om.NoOpSerializer())
    server.start()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print("READY", flush=True)
    while not stopping:
        time.sleep(0.1)
    server.stop()
    transport.cleanup()


def api():
    import flask
    import oslo_messaging as om
    from oslo_config import cfg
    from oslo_middleware import request_id

    from commlens.middleware.wsgi import CommlensMiddleware

    cfg.CONF([], project="commlens-chain-api")
    transport = om.get_rpc_transport(cfg.CONF, url=args.url,
                                     allowed_remote_exmods=["__main__"])
    client = om.get_rpc_client(transport, om.Target(topic=args.topic),
                               serializer=om.NoOpSerializer())
    app = flask.Flask("api")

    def ctxt():
        return {"request_id": flask.request.environ.get("openstack.request_id")}

    @app.post("/v2.1/servers/<server_id>")
    def boot(server_id):
        # An RPC error propagates: the WSGI server turns it into a 500.
        return {"result": client.prepare(timeout=10).call(ctxt(), "build_instances",
                                                          server_id=server_id)}

    @app.post("/v2.1/servers/<server_id>/action")
    def reserve(server_id):
        return {"result": client.prepare(timeout=10).call(ctxt(), "reserve",
                                                          server_id=server_id)}

    @app.get("/v2.1/servers/<server_id>/console")
    def console(server_id):
        return {"result": client.prepare(timeout=1).call(ctxt(), "hang")}

    @app.get("/v2.1/servers/<server_id>")
    def show(server_id):
        return {"result": client.prepare(timeout=10).call(ctxt(), "ping")}

    serve_wsgi(CommlensMiddleware(request_id.RequestId(app), service_name="nova-api"))


{"network": network, "conductor": conductor, "api": api}[args.role]()
