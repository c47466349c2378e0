"""Turning what arrives from the outside into bounded, safe label values.

Anything a peer sends (a method name, an event type, an exception class)
may be garbage or hostile; it becomes a label only if it looks like the
identifier it claims to be, otherwise it becomes ``invalid``. Valid values
are remembered, so the common case is one set look-up.
"""

import re

INVALID = "invalid"
UNKNOWN = "unknown"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# An error's name: an exception class, or a dotted error code of an API's
# fault body (placement's ``placement.concurrent_update``, middleware/faults.py).
_ERROR_NAME = re.compile(r"(?=.{1,128}\Z)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_DOTTED = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")
# A value a hop record carries but no label does (a request id, a host).
_HOP_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
_MAX_REMEMBERED = 10000


class _Checked:
    """``checked(value)``: the label. ``seen``: the values already found
    valid, which a compiled caller looks up itself (middleware/_rpc_send.c)."""

    __slots__ = ("_pattern", "seen")

    def __init__(self, pattern):
        self._pattern = pattern
        self.seen = set()

    def __call__(self, value):
        if not isinstance(value, str):
            return INVALID
        if value in self.seen:
            return value
        if self._pattern.match(value):
            if len(self.seen) < _MAX_REMEMBERED:
                self.seen.add(value)
            return value
        return INVALID


method = _Checked(_IDENTIFIER)       # an RPC method name
error_class = _Checked(_ERROR_NAME)  # an exception class name, an API's error code
dotted = _Checked(_DOTTED)           # a topic, an event type


# An HTTP method label: one of these, else OTHER_METHOD.
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
OTHER_METHOD = "other"


def http_method(value):
    """A standard HTTP method, else ``other``."""
    return value if value in HTTP_METHODS else OTHER_METHOD


def request_id(value):
    """An OpenStack request id fit for a hop record, or None."""
    if isinstance(value, str) and _HOP_VALUE.match(value):
        return value
    return None


def server(value):
    """An RPC server name (oslo.messaging's ``Target.server``, a host) fit for
    a hop record, or None. Never a metric label: hosts are unbounded."""
    return request_id(value)
