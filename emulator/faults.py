"""Faults the demo can inject, by name, on the command line or at run time."""

import threading

FAULTS = {
    "slow-conductor": "nova-conductor takes 3 s per call: waiting replies grow",
    "conductor-down": "nova-conductor stops consuming: callers time out, the rebuilds cast "
                      "to it wait in a queue nobody reads",
    "neutron-error": "neutron-server fails port bindings (409 PortBindingFailed, some 500): "
                     "error chains through nova-compute and nova-conductor to nova-api",
    "compute-down": "one nova-compute disappears: calls to its host time out, its state "
                    "reports stop",
    "broker-restart": "RabbitMQ closes the demo's own connections, as a restart would "
                      "(only with --transport rabbit://; through the management API, "
                      "other clients untouched): transport errors, then recovery",
}


class UnknownFault(ValueError):
    pass


class Faults:
    """The faults in force; services read them on every request."""

    def __init__(self, on_change=None):
        self._active = set()
        self._lock = threading.Lock()
        self._on_change = on_change

    def __contains__(self, name):
        return name in self._active

    def active(self):
        return sorted(self._active)

    def set(self, name, on=True):
        if name not in FAULTS:
            raise UnknownFault(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            changed = (name in self._active) != on
            if on:
                self._active.add(name)
            else:
                self._active.discard(name)
        if changed and self._on_change is not None:
            self._on_change(name, on)
        return changed
