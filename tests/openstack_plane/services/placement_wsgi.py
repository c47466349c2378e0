"""Placement's WSGI file for gunicorn, wrapped with commlens's class middleware
(docs/operator-guide.md: "Code that wraps a WSGI app itself"). Placement has no RPC transport,
so commlens takes its settings from the environment (COMMLENS_EXPORT_URL, ...);
placement.conf comes from OS_PLACEMENT_CONFIG_DIR."""

from placement.wsgi.api import application as placement_application

from commlens.middleware.wsgi import CommlensMiddleware

application = CommlensMiddleware(placement_application, service_name="placement")
