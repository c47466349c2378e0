"""nova-api's WSGI file for gunicorn: nova's own entry point, as deployed.

nova's application parses the process's command line
(nova/api/openstack/wsgi_app.py: ``config.parse_args(sys.argv, ...)``), which
under gunicorn is gunicorn's: oslo.config would refuse its options. Keep the
program's name only, as an operator's WSGI file does; the config files come
from OS_NOVA_CONFIG_DIR and OS_NOVA_CONFIG_FILES.
"""

import sys

sys.argv = sys.argv[:1]

from nova.wsgi.osapi_compute import application  # noqa: E402,F401
