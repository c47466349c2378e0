"""A bare WSGI app wrapped by commlens, for a real gunicorn or uwsgi to serve.

``gunicorn --chdir tests/peers wsgi_app:application`` or
``uwsgi --wsgi-file tests/peers/wsgi_app.py``; its service name comes from
COMMLENS_SERVICE_NAME, its export URL from COMMLENS_EXPORT_URL.
"""

from commlens.middleware.wsgi import CommlensMiddleware


def ports(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"ports": []}']


application = CommlensMiddleware(ports)
