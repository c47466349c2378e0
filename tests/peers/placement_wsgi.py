"""Placement from PyPI with commlens's class middleware, mounted at /placement.

``gunicorn --chdir tests/peers placement_wsgi:application`` in the virtualenv
tests/test_placement.py builds (scripts/placement-venv). Placement reads
placement.conf from OS_PLACEMENT_CONFIG_DIR; commlens ships to
COMMLENS_EXPORT_URL. The mount moves ``/placement`` into SCRIPT_NAME, as a
WSGI server's mount point or nova's urlmap does, so the route templates must
keep it.
"""

from placement.wsgi import init_application

from commlens.middleware.wsgi import CommlensMiddleware

PREFIX = "/placement"

placement = CommlensMiddleware(init_application(), service_name="placement-api")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path != PREFIX and not path.startswith(PREFIX + "/"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not under /placement\n"]
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + PREFIX
    environ["PATH_INFO"] = path[len(PREFIX):]
    return placement(environ, start_response)
