"""nova-api's start-up order, for a real gunicorn or uwsgi to serve.

The oslo.messaging transport (``commlens+rabbit://``) is made and used before
the WSGI application is wrapped by commlens, as nova-api's does before paste
loads the filter; TEST_NAMING_DELAY seconds pass in between, so a snapshot
under the provisional name (the server's program) is shipped first. Every
request then casts once. The application's name is TEST_SERVICE.
"""

import os
import time

import oslo_messaging as om
from oslo_config import cfg

from commlens.middleware.wsgi import CommlensMiddleware

transport = om.get_rpc_transport(cfg.CONF, url=os.environ["TEST_TRANSPORT_URL"])
client = om.get_rpc_client(transport, om.Target(topic=os.environ["TEST_TOPIC"]))
client.cast({}, "started")
time.sleep(float(os.environ.get("TEST_NAMING_DELAY", "0")))


def api(environ, start_response):
    client.cast({}, "served")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


application = CommlensMiddleware(api, service_name=os.environ["TEST_SERVICE"],
                                 http_outbound="false")
