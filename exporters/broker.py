"""The broker's side of RPC edges: RabbitMQ queue depths and consumers.

A growing reply wait and a growing queue with no consumers are one incident
seen from two ends, so the graph shows both. The collector polls RabbitMQ's
management API (``/api/queues``) when given its URL
(``--rabbitmq-management-url http://user:pw@host:15672/``). Only queues named
like a topic commlens has seen become metric labels, so the series stay
bounded whatever else the broker carries (reply_ and fanout queues with
random names never do).
"""

import base64
import json
import logging
import threading
import urllib.parse
import urllib.request

from commlens.tracer import urls

LOG = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 10.0
MAX_QUEUES = 20000


class BrokerUrlError(ValueError):
    """The management URL cannot be used; the message never holds its secrets."""


def _api(management_url, path):
    """(URL of an API path, Authorization header value) for a management URL."""
    parts = urllib.parse.urlsplit(management_url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BrokerUrlError(
            f"RabbitMQ management URL {urls.redact(management_url)!r}: "
            "expected http://user:password@host:15672/")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + path, "", ""))
    credentials = "%s:%s" % (urllib.parse.unquote(parts.username or "guest"),
                             urllib.parse.unquote(parts.password or "guest"))
    return url, "Basic " + base64.b64encode(credentials.encode()).decode()


def _nodes(management_url, columns, timeout):
    """The broker's nodes (``/api/nodes``) with ``columns``; [] if unknown."""
    try:
        url, auth = _api(management_url, "/api/nodes?columns=" + columns)
        request = urllib.request.Request(url, headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            nodes = json.loads(response.read(1024 * 1024))
    except Exception:
        return []
    return [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []


def open_files_limit(management_url, timeout=5.0):
    """The smallest limit of open files among the broker's nodes, or None if unknown."""
    limits = [node["fd_total"] for node in _nodes(management_url, "fd_total", timeout)
              if isinstance(node.get("fd_total"), int)]
    return min(limits) if limits else None


def open_files(management_url, timeout=5.0):
    """{"used", "total"} of the broker node closest to its limit of open
    files, or None if unknown."""
    nodes = [{"used": node["fd_used"], "total": node["fd_total"]}
             for node in _nodes(management_url, "fd_used,fd_total", timeout)
             if isinstance(node.get("fd_used"), int) and isinstance(node.get("fd_total"), int)
             and node["fd_total"] > 0]
    return max(nodes, key=lambda n: n["used"] / n["total"]) if nodes else None


class QueueWatcher:
    """Polls the management API in a thread; ``queues()`` is the latest view."""

    def __init__(self, management_url, poll_seconds=DEFAULT_POLL_SECONDS, timeout=5.0):
        self.description = urls.redact(management_url)
        self._url, self._auth = _api(management_url, "/api/queues")
        self._url += "?columns=name,vhost,messages_ready,messages_unacknowledged,consumers"
        self.poll_seconds = poll_seconds
        self._timeout = timeout
        self._queues = {}
        self._stop = threading.Event()
        self._thread = None
        self.up = False
        self.failures = 0

    def queues(self):
        """{queue name: {"ready", "unacked", "consumers"}} of the last poll."""
        return self._queues

    def poll(self):
        request = urllib.request.Request(self._url, headers={"Authorization": self._auth})
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                data = json.loads(response.read(64 * 1024 * 1024))
        except Exception as exc:
            self.failures += 1
            log = LOG.warning if self.up or self.failures == 1 else LOG.debug
            log("collector: cannot read queues from %s (%s)", self.description,
                type(exc).__name__)
            self.up = False
            return False
        queues = {}
        for queue in data if isinstance(data, list) else ():
            if not isinstance(queue, dict) or not isinstance(queue.get("name"), str):
                continue
            if len(queues) >= MAX_QUEUES:
                break
            queues[queue["name"]] = {
                "ready": _count(queue.get("messages_ready")),
                "unacked": _count(queue.get("messages_unacknowledged")),
                "consumers": _count(queue.get("consumers")),
            }
        self._queues = queues
        self.up = True
        return True

    def start(self):
        self._thread = threading.Thread(target=self._run, name="commlens-queues", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout + 1)

    def _run(self):
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_seconds)


def _count(value):
    return value if isinstance(value, int) and value >= 0 else 0
