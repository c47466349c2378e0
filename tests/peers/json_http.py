"""A quiet request handler that answers JSON: the base of the tests' stand-ins
for HTTP APIs that cannot run here (Grafana, a Kubernetes API server).
No dependencies, so it loads in .venv-helm too."""

import json
from http.server import BaseHTTPRequestHandler


class JsonRequestHandler(BaseHTTPRequestHandler):

    def log_message(self, *args):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
