"""Route templates: raw request paths turned into bounded label values.

``/v2.1/servers/6f1c.../action`` -> ``/v2.1/servers/{id}/action``. Three rules,
in order, per path segment:
1. a segment that looks like an id (UUID, number, long hex, request id) or
   that is not a plain word (any digit outside a version segment, odd
   characters, non-ASCII, longer than 32) is ``{id}``: a token or a password
   pasted into a URL is high-entropy and never becomes a label;
2. after a collection of a known OpenStack API (compute, network, identity,
   image, volume, placement) the next segment is ``{id}`` unless it is one of
   that API's literal words (``detail``, ``action``, ...), which is how names in
   id positions (``/flavors/m1.small``) stay out of labels;
3. anything else is kept.
Whatever still explodes is capped per service: past ``max_routes`` distinct
templates, new ones are counted as ``other``.
"""

import re
import threading

ID = "{id}"
OTHER = "other"
DEFAULT_MAX_ROUTES = 200
MAX_SEGMENTS = 8

_WORD = re.compile(r"^[A-Za-z][A-Za-z_.\-]{0,31}$")
_ID_LIKE = re.compile(
    r"^(?:[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    r"|\d+|[0-9a-fA-F]{8,}|req-[0-9a-fA-F\-]{8,})$")
_VERSION = re.compile(r"^v\d+(?:\.\d+)?$")

# Collections whose next segment is an id or a name, across the APIs an
# OpenStack control plane serves.
COLLECTIONS = frozenset("""
servers flavors images os-keypairs os-hypervisors os-aggregates os-services
os-volume_attachments os-interface ips metadata os-instance-actions
os-server-groups os-migrations migrations os-quota-sets os-availability-zone
ports networks subnets routers floatingips security-groups security-group-rules
agents quotas subnetpools trunks address-scopes qos policies rules
users projects domains roles groups services endpoints regions credentials
role_assignments application_credentials
volumes snapshots types backups attachments qos-specs
resource_providers allocations inventories traits resource_classes
aggregates usages members tags tasks
""".split())

# Words that follow a collection without being an id.
LITERALS = frozenset("""
detail action actions diagnostics os-interface ips metadata os-volume_attachments
os-instance-actions tags add_router_interface remove_router_interface
auth tokens catalog file stage import members schemas inventories allocations
usages traits aggregates extensions limits defaults os-security-groups
""".split())


def template(path):
    """The route template of a raw PATH_INFO (a str, possibly latin-1 garbage)."""
    if not isinstance(path, str):
        return OTHER
    segments = [s for s in path.split("/") if s]
    if not segments:
        return "/"
    out = []
    previous = None
    for segment in segments[:MAX_SEGMENTS]:
        if _VERSION.match(segment):
            out.append(segment)
        elif _ID_LIKE.match(segment) or not _WORD.match(segment):
            out.append(ID)
        elif previous in COLLECTIONS and segment not in LITERALS:
            out.append(ID)
        else:
            out.append(segment)
        previous = segment
    if len(segments) > MAX_SEGMENTS:
        out.append("...")
    return "/" + "/".join(out)


_MEMO_SIZE = 4096


class RouteTemplates:
    """Raw paths to their route templates, at most ``max_routes`` distinct
    ones (the rest become ``other``).

    Remembered for the last few thousand distinct paths: it runs on every
    request, and clients poll the same resources (a server's status while it
    builds) again and again. A template once admitted stays admitted and one
    refused stays refused, so a remembered answer never goes stale.
    """

    def __init__(self, max_routes=DEFAULT_MAX_ROUTES):
        self._max = max_routes
        self._seen = set()
        self._lock = threading.Lock()
        # Path -> template; callers on a hot path read it before calling.
        self.remembered = {}

    def __call__(self, path):
        try:
            return self.remembered[path]
        except (KeyError, TypeError):
            pass
        route = template(path)
        with self._lock:
            if route not in self._seen:
                if len(self._seen) < self._max:
                    self._seen.add(route)
                else:
                    route = OTHER
            if isinstance(path, str) and len(path) <= 1024:
                if len(self.remembered) >= _MEMO_SIZE:
                    self.remembered.clear()
                self.remembered[path] = route
        return route

