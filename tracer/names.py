"""Service names: one name per service, wherever it is seen from.

A service names itself (``[commlens] service_name``, a paste filter's option,
the program's name); its callers know it by other names: keystoneauth1 asks
the catalog for ``image``, not ``glance-api``; a WSGI application's
oslo.config knows its project (``nova``), not its service; an uninstrumented
caller is only a client product in a User-Agent. This module is the one
table between them, so the graph draws one node per service.
"""

import re

# (OpenStack project, the name its API service calls itself in commlens,
# the Keystone catalog's service types it is registered under). The names are
# the services' programs, as packaged (``neutron-server``, ``glance-api``).
_SERVICES = (
    ("keystone", "keystone", ("identity",)),
    ("nova", "nova-api", ("compute",)),
    ("placement", "placement-api", ("placement",)),
    ("glance", "glance-api", ("image",)),
    ("neutron", "neutron-server", ("network",)),
    ("cinder", "cinder-api", ("block-storage", "volumev3", "volumev2", "volume")),
    ("heat", "heat-api", ("orchestration",)),
    ("swift", "swift-proxy-server", ("object-store",)),
    ("octavia", "octavia-api", ("load-balancer",)),
    ("designate", "designate-api", ("dns",)),
    ("barbican", "barbican-api", ("key-manager",)),
    ("ironic", "ironic-api", ("baremetal",)),
    ("manila", "manila-api", ("shared-file-system", "sharev2")),
)

# Catalog service type -> service name (docs/operator-guide.md: "Outbound calls").
CATALOG_SERVICES = {kind: name for _, name, kinds in _SERVICES for kind in kinds}
# oslo.config project of a WSGI application -> the name of its API service.
PROJECT_API_SERVICES = {project: name for project, name, _ in _SERVICES}

# Programs that host WSGI applications: their name is not the application's.
# (mod_wsgi sets sys.argv to ["mod_wsgi"]; Apache itself is httpd or apache2.)
# A process with another program's name is still renamed by the first WSGI
# application it loads (tracer/recorder.py Recorder.adopt).
WSGI_HOSTS = frozenset(("gunicorn", "uwsgi", "mod_wsgi", "httpd", "apache2",
                        "waitress-serve", "uvicorn"))

# Products in User-Agent headers of OpenStack's clients, first match wins:
# keystoneauth1 puts the calling client first ("python-novaclient
# keystoneauth1/5.1 python-requests/2.31 CPython/3.11"). An uninstrumented
# caller is named after its client: a caller label, never a service.
USER_AGENT_CALLERS = (
    ("openstacksdk", "openstacksdk"), ("python-openstackclient", "openstackclient"),
    ("python-novaclient", "novaclient"), ("python-neutronclient", "neutronclient"),
    ("python-cinderclient", "cinderclient"), ("python-glanceclient", "glanceclient"),
    ("python-keystoneclient", "keystoneclient"), ("osc-placement", "placementclient"),
    ("keystonemiddleware", "keystonemiddleware"), ("keystoneauth1", "keystoneauth1"),
)
CLIENT_CALLERS = frozenset(name for _, name in USER_AGENT_CALLERS)



_CATALOG_TYPE = re.compile(r"^[a-z][a-z0-9\-]{0,63}$")


def parse_catalog_names(pairs):
    """["image=glance", ...] -> {"image": "glance"}; raises ValueError on a
    pair that is not TYPE=NAME (tracer/settings.py refuses those first)."""
    from commlens.tracer import settings  # settings imports this module

    mapping = {}
    for pair in pairs or ():
        kind, sep, name = str(pair).partition("=")
        kind, name = kind.strip(), name.strip()
        if not sep or not _CATALOG_TYPE.match(kind) or not settings.valid_service_name(name):
            raise ValueError(f"{pair!r} is not TYPE=NAME")
        mapping[kind] = name
    return mapping


def catalog_names(pairs=()):
    """The catalog type -> service name map: the defaults, then ``pairs``
    (the ``service_names`` setting) on top."""
    return {**CATALOG_SERVICES, **parse_catalog_names(pairs)}


def wsgi_service_name(conf):
    """A WSGI application's name from its oslo.config ``conf``, or None:
    ``prog`` when the service chose one (not a WSGI host's name), else the
    API service of its ``project`` (nova -> nova-api; an unknown project X
    -> X-api)."""
    from commlens.tracer import settings

    try:
        prog, project = getattr(conf, "prog", None), getattr(conf, "project", None)
    except Exception:  # a service's ConfigOpts is not ours to trust
        return None
    if isinstance(prog, str):
        prog = settings.program_service_name(prog)
        if prog not in WSGI_HOSTS and prog != "unknown" and not _is_python(prog):
            return prog
    if isinstance(project, str) and project:
        name = PROJECT_API_SERVICES.get(project, project + "-api")
        if settings.valid_service_name(name):
            return name
    return None


def _is_python(program):
    # "python3 app.py" leaves the interpreter as the program: no service's name.
    return program.startswith("python") or program in ("pytest", "py.test")
