"""Which implementation of the per-hop paths this process runs: compiled or Python.

Each compiled module has a Python twin beside it, with the same names and
the same behaviour (tests/test_differential.py feeds both the same inputs):

    tracer/_speedups.c             tracer/_speedups_py.py
    middleware/_rpc_send.c         middleware/_rpc_send_py.py
    middleware/_rpc_receive.c      middleware/_rpc_receive_py.py
    middleware/_wsgi_request.c     middleware/_wsgi_request_py.py

The Python twin is the reference and reads on its own; the C only makes
the same thing cheaper. The choice is made once, at the first import, for
all four together: the compiled middleware reads the compiled tracer's
objects as C structs, so they cannot be mixed, and a partial build (one
module failed to compile or load) runs Python everywhere. Python is chosen
when ``COMMLENS_PUREPYTHON`` is set to anything but "" or "0", or when a
compiled module does not import (installed without a compiler). Nothing is
logged: a service's import stays quiet; ``IMPLEMENTATION`` and ``REASON``
say what was chosen and why (``commlens`` diagnostics, tests).
"""

import importlib
import os

COMPILED = "compiled"
PYTHON = "python"

# Each part's (compiled module, Python twin).
_MODULES = {
    "speedups": ("commlens.tracer._speedups", "commlens.tracer._speedups_py"),
    "rpc_send": ("commlens.middleware._rpc_send", "commlens.middleware._rpc_send_py"),
    "rpc_receive": ("commlens.middleware._rpc_receive",
                    "commlens.middleware._rpc_receive_py"),
    "wsgi_request": ("commlens.middleware._wsgi_request",
                     "commlens.middleware._wsgi_request_py"),
}


def _choose():
    """(IMPLEMENTATION, REASON)."""
    if os.environ.get("COMMLENS_PUREPYTHON", "") not in ("", "0"):
        return PYTHON, "COMMLENS_PUREPYTHON is set"
    try:
        for compiled, _ in _MODULES.values():
            importlib.import_module(compiled)
    except ImportError as exc:
        return PYTHON, f"the compiled modules do not import ({exc})"
    return COMPILED, "the compiled modules import"


IMPLEMENTATION, REASON = _choose()


def module(part):
    """The module of ``part`` ("speedups", "rpc_send", "rpc_receive",
    "wsgi_request") in the implementation chosen."""
    compiled, python = _MODULES[part]
    return importlib.import_module(compiled if IMPLEMENTATION == COMPILED else python)

