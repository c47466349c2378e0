"""Export URLs: parsing, and printing them without their secrets."""

import re
import urllib.parse

# Query parameters of an export URL that are commlens's, not pika's:
# ?exchange=NAME (agents and collector) and ?queue=NAME (collector only).
OUR_QUERY = frozenset(("exchange", "queue"))
# Up to the last "@" of each host: oslo.messaging allows one "@" in a user name.
_USERINFO = re.compile(r"(://|,)[^/,]*@")


def redact(url):
    """``amqp://nova:s3cret@host/`` -> ``amqp://***@host/``, for logs and errors.

    Works on every host of a multi-host oslo.messaging URL and on anything
    that is not a URL at all.
    """
    if not isinstance(url, str):
        return "<not a string>"
    return _USERINFO.sub(r"\1***@", url)


def split_query(url, ours):
    """Remove the query parameters named in ``ours``; return (url, {name: value})."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    taken = {k: v for k, v in query if k in ours}
    rest = [(k, v) for k, v in query if k not in ours]
    cleaned = parts._replace(query=urllib.parse.urlencode(rest))
    return urllib.parse.urlunsplit(cleaned), taken


def amqp_url_from_transport(transport_url):
    """The AMQP URL of the first broker of an oslo.messaging TransportURL."""
    if not transport_url.hosts:
        return None
    host = transport_url.hosts[0]
    port = ":%d" % host.port if host.port else ""
    vhost = urllib.parse.quote(transport_url.virtual_host or "", safe="")
    return f"amqp://{_authority(host)}{port}/{vhost}"


def management_url_from_transport(transport_url):
    """RabbitMQ's management API on the first broker's host (its default
    port, 15672), with the transport's credentials."""
    if not transport_url.hosts:
        return None
    return f"http://{_authority(transport_url.hosts[0])}:15672/"


def _authority(host):
    """``user:password@hostname`` of a TransportHost, quoted, without the port."""
    userinfo = ""
    if host.username is not None:
        userinfo = urllib.parse.quote(host.username, safe="")
        if host.password is not None:
            userinfo += ":" + urllib.parse.quote(host.password, safe="")
        userinfo += "@"
    hostname = host.hostname or "localhost"
    if ":" in hostname:
        hostname = "[%s]" % hostname
    return userinfo + hostname
