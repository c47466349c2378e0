"""What an OpenStack API error body names as its error: a bounded label.

A failed REST hop reads ``409``; with this, ``409 placement.concurrent_update``
or ``404 itemNotFound``. Both ends use it: the WSGI filter on the response
its application sends (middleware/wsgi.py) and the outbound hook on the
response a service receives (middleware/http_client.py).

What is read, and why it is safe:
- only error responses (4xx, 5xx), only their first ``MAX_BODY`` bytes, only
  bytes already on their way (a list body in memory, the chunks of an
  iterator body as they pass, a ``requests`` response already read); a
  streamed response is never read by us;
- nothing of it is logged or kept: only the name it yields, which must be
  an identifier (``labels.error_class``: letters, digits, ``_`` and, for
  placement's codes, ``.``), at most ``MAX_NAME`` characters with at most
  ``MAX_DIGITS`` digits, so no message, id, host or token becomes a label:
  a token is longer, or has more digits, than any error name.

Why 4 KiB: the fault bodies of the projects below are a few hundred bytes
(a name, a one-line message, a request id); the name comes first in all of
them but placement's, whose ``code`` follows a ``detail`` that is one or two
sentences. Past 4 KiB a JSON body is cut and not parsed (the hop keeps its
status code): what is copied per failed request stays small, and a huge or
hostile body costs nothing but the slice.

The shapes, each from its project's source:
- neutron (neutron_lib/.../api/faults.py, neutron/api/v2/base.py):
  ``{"NeutronError": {"type": "PortBindingFailed", "message": ..., "detail": ""}}``
  -> the type;
- nova and cinder (nova/api/openstack/wsgi.py, cinder/api/openstack/wsgi.py,
  class Fault, ``_fault_names``): ``{"conflictingRequest": {"code": 409,
  "message": ...}}``, and badRequest, itemNotFound, forbidden, overLimit,
  computeFault ...: the one key names the error;
- placement (placement/util.py json_error_formatter, placement/errors.py):
  ``{"errors": [{"status": 409, "title": "Conflict", "detail": ...,
  "code": "placement.concurrent_update", "request_id": ...}]}`` -> the
  first error's code; before microversion 1.23 there is no code: its title;
- ironic (ironic/api/middleware/parsable_error.py, ironic/api/method.py
  format_exception): ``{"error_message": "{\\"faultcode\\": \\"Client\\",
  \\"faultstring\\": ..., \\"debuginfo\\": null}"}`` -> the faultcode when it
  is more than ironic's generic Client or Server (the faultstring is free
  text: never read); the ``errors`` list as placement's;
- keystone (keystone/server/flask/application.py, render_exception):
  ``{"error": {"code": 409, "title": "Conflict", "message": ...}}`` -> the
  title, its words joined (``Not Found`` -> ``NotFound``);
- glance, and any webob application (webob/exc.py, WSGIHTTPException's
  templates): plain text ``409 Conflict\\n\\n...``, HTML ``<title>409
  Conflict</title>``, or JSON ``{"code": "409 Conflict", "title": "Conflict",
  "message": ...}`` -> the title.
"""

import json
import re

from commlens.tracer import labels

MAX_BODY = 4096
MAX_NAME = 64
MAX_DIGITS = 3

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_DIGIT = re.compile(r"\d")
# A reason phrase (webob's titles, keystone's): words of letters.
_TITLE = re.compile(r"[A-Za-z][A-Za-z'\-]{0,19}(?: [A-Za-z][A-Za-z'\-]{0,19}){0,7}\Z")
_STATUS_LINE = re.compile(rb"\s*\d{3} ([^\r\n<]{1,80})")
_HTML_TITLE = re.compile(rb"<title>\s*\d{3} ([^<]{1,80})</title>", re.IGNORECASE)
# ironic's faultcode when the exception names none.
_GENERIC_FAULTCODES = frozenset(("Client", "Server"))


def is_error_status(code):
    """A status code label ('409') of a response whose body may name its error."""
    return type(code) is str and code[:1] in ("4", "5")


def head(chunks):
    """The first MAX_BODY bytes of a body given as chunks (bytes; anything else
    ends it), joined; b'' for none."""
    if not chunks:
        return b""
    parts = []
    room = MAX_BODY
    for chunk in chunks:
        if type(chunk) is not bytes or room <= 0:
            break
        parts.append(chunk[:room])
        room -= len(parts[-1])
    return b"".join(parts)


def error_name(body, content_type=None):
    """The error an error response's body (bytes, at most MAX_BODY of them
    read) names, as a label, or None. Never raises."""
    try:
        if not isinstance(body, bytes) or not body:
            return None
        body = body[:MAX_BODY]
        text = body.lstrip()
        if text[:1] == b"{":
            return _from_json(json.loads(text))
        kind = content_type.lower() if isinstance(content_type, str) else ""
        if "html" in kind or text[:1] == b"<":
            found = _HTML_TITLE.search(text)
        else:
            found = _STATUS_LINE.match(text)
        return _title(found.group(1).decode("ascii").strip()) if found else None
    except Exception:  # malformed, cut, binary, too deep: the status code stays alone
        return None


def _from_json(fault):
    if not isinstance(fault, dict):
        return None
    errors = fault.get("errors")
    if isinstance(errors, list):  # placement, ironic
        first = errors[0] if errors else None
        if not isinstance(first, dict):
            return None
        return _name(first.get("code")) or _title(first.get("title"))
    message = fault.get("error_message")
    if isinstance(message, str):  # ironic: a JSON document in a string
        inner = json.loads(message) if message.lstrip()[:1] == "{" else None
        if isinstance(inner, dict) and inner.get("faultcode") not in _GENERIC_FAULTCODES:
            return _name(inner.get("faultcode"))
        return None
    error = fault.get("error")
    if isinstance(error, dict):  # keystone
        return _title(error.get("title"))
    if isinstance(fault.get("title"), str) and "code" in fault:  # webob's JSON
        return _title(fault["title"])
    if len(fault) == 1:
        ((key, detail),) = fault.items()
        if isinstance(detail, dict):
            if "type" in detail:  # neutron
                return _name(detail["type"])
            if "message" in detail or "code" in detail:  # nova, cinder
                return _name(key)
    return None


def _name(value):
    """An error name fit for a label, or None."""
    if (not isinstance(value, str) or len(value) > MAX_NAME or not _NAME.match(value)
            or len(_DIGIT.findall(value)) > MAX_DIGITS):
        return None
    name = labels.error_class(value)
    return None if name == labels.INVALID else name


def _title(value):
    """A reason phrase as a name: 'Not Found' -> 'NotFound'."""
    if not isinstance(value, str) or not _TITLE.match(value):
        return None
    return _name("".join(word[:1].upper() + word[1:]
                         for word in re.split(r"[ '\-]", value) if word))
