"""The demo's users: a steady mix of boots, lists, port attaches, rebuilds and deletes.

They call nova-api the way python-novaclient would (its User-Agent, a token
in X-Auth-Token) with urllib, which commlens does not hook: the users are
outside the control plane, so nova-api is where every trace enters.
"""

import json
import random
import threading
import urllib.error
import urllib.request

from commlens.emulator import controlplane

USER_AGENT = "python-novaclient keystoneauth1/5.18 python-requests/2.32"
# (operation, weight)
MIX = (("boot", 4), ("list", 3), ("attach", 2), ("delete", 2), ("rebuild", 1))


class Workload:

    def __init__(self, nova_api_url, users=8, requests_per_user=4.0):
        self._url = nova_api_url
        self._users = users
        self._pause = 1.0 / requests_per_user
        self._stop = threading.Event()
        self._threads = []
        self._mine = []
        self._lock = threading.Lock()

    def start(self):
        for _ in range(self._users):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self):
        operations, weights = zip(*MIX, strict=True)
        while not self._stop.wait(self._pause * random.uniform(0.5, 1.5)):
            operation = random.choices(operations, weights)[0]
            try:
                getattr(self, "_" + operation)()
            except OSError:
                pass  # the control plane failing is the point of a fault

    def _request(self, method, path, body=None):
        headers = {"User-Agent": USER_AGENT, "X-Auth-Token": controlplane.TOKEN}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(body).encode()
        request = urllib.request.Request(self._url + path, data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def _boot(self):
        status, body = self._request("POST", "/v2.1/servers")
        if status == 202:
            with self._lock:
                self._mine.append(body["server"]["id"])

    def _list(self):
        self._request("GET", "/v2.1/servers")

    def _pick(self, remove=False):
        with self._lock:
            if not self._mine:
                return None
            index = random.randrange(len(self._mine))
            return self._mine.pop(index) if remove else self._mine[index]

    def _attach(self):
        instance = self._pick()
        if instance:
            self._request("POST", f"/v2.1/servers/{instance}/action")

    def _rebuild(self):
        instance = self._pick()
        if instance:
            self._request("POST", f"/v2.1/servers/{instance}/action", {"rebuild": {}})

    def _delete(self):
        instance = self._pick(remove=True)
        if instance:
            self._request("DELETE", f"/v2.1/servers/{instance}")
