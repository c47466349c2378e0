"""A real WSGI service behind a real WSGI server (werkzeug), instrumented by commlens.

``--kind flask``: a Flask app, the "api" that calls a downstream service with
requests. ``--kind plain``: a bare WSGI callable, the "network service".
Prints ``READY <port>``; SIGTERM stops it.
"""

import argparse
import json
import signal
import threading

import requests
from werkzeug import serving

from commlens.middleware.wsgi import CommlensMiddleware

parser = argparse.ArgumentParser()
parser.add_argument("--kind", choices=("flask", "plain"), required=True)
parser.add_argument("--service", required=True)
parser.add_argument("--downstream", default=None)
parser.add_argument("--endpoints", default="")
args = parser.parse_args()


def flask_app():
    import flask

    app = flask.Flask("api")

    @app.get("/v2.1/servers/<server_id>")
    def show(server_id):
        port = requests.get(f"{args.downstream}/v2.0/ports/{server_id}", timeout=10)
        return {"server": server_id, "port_status": port.status_code}

    @app.post("/v2.1/servers/<server_id>/action")
    def action(server_id):
        binding = requests.put(f"{args.downstream}/v2.0/ports/{server_id}/binding",
                               timeout=10)
        if binding.status_code >= 400:
            return {"error": "port binding failed"}, 500
        return {}, 202

    @app.get("/boom")
    def boom():
        raise RuntimeError("handler failed")

    return app


def plain_app(environ, start_response):
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    request_id = "req-6f1c4b2e-5d3a-4c1b-9e8f-0a1b2c3d4e5f"
    if path.endswith("/binding") and method == "PUT":
        start_response("409 Conflict", [("Content-Type", "application/json"),
                                        ("X-OpenStack-Request-ID", request_id)])
        return [b'{"NeutronError": "PortBindingFailed"}']
    if path.startswith("/v2.0/ports/"):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"port": path.rsplit("/", 1)[-1]}).encode()]
    if path == "/stream":
        def chunks():
            for i in range(5):
                yield b"chunk %d\n" % i
        start_response("200 OK", [("Content-Type", "text/plain")])
        return chunks()
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/not-modified":
        start_response("304 Not Modified", [])
        return []
    if path == "/upload":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"%d" % len(body)]
    if path == "/fail":
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"down"]
    if path == "/boom":
        raise RuntimeError("app failed")
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


app = flask_app() if args.kind == "flask" else plain_app
options = {"service_name": args.service}
if args.endpoints:
    options["http_endpoints"] = args.endpoints
app = CommlensMiddleware(app, **options)
server = serving.make_server("127.0.0.1", 0, app, threaded=True)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print("READY", server.port, flush=True)
server.serve_forever()
