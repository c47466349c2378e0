"""Work a service does for a request continues that request's trace.

The hop being served lives in a ContextVar (tracer/context.py), and a new
thread or eventlet greenthread starts with an empty context: without this
module every call made from spawned work (nova-compute's build, run in a
greenthread after ``build_and_run_instance`` was cast) started a trace of
its own. So, as an OpenTelemetry instrumentor does, the places where a
service hands work to another thread of control are patched once when the
agent is enabled (``instrument``, from recorder.install) and restored when it
is disabled (``uninstrument``):

- ``threading.Thread.start`` (so also ``threading.Timer`` and any subclass,
  whatever its ``run``; under eventlet's monkey-patching these are
  greenthreads);
- ``submit`` of ``concurrent.futures.ThreadPoolExecutor`` and of futurist's
  thread and green executors (oslo.messaging's RPC servers, nova's
  ``utils.spawn`` in threading mode), futurist where oslo.messaging is
  loaded or futurist already is;
- eventlet's greenthreads: ``GreenThread`` (``eventlet.spawn``,
  ``spawn_after``, ``GreenPool.spawn``) and ``spawn_n`` (also
  ``GreenPool.spawn_n``), when eventlet is imported before the agent is
  enabled, as a service that monkey-patches does.

What is carried is commlens's own hop and nothing else of the spawner's
context: a service's other context variables behave exactly as without
commlens. The work runs with the hop that was current when it was handed
over (or with none): a pool's worker thread never keeps a hop between
items, and the pools' threads themselves are started outside any hop.

Long-lived work (docs/architecture.md, "Traces across threads and greenthreads"): a thread
or greenthread continues the trace of the request that spawned it for its
whole life; one-shot work (a boot) can take minutes and is still that
request's. Repeating work is different: the runs of an oslo.service looping
call (what periodic tasks run on) continue the trace only while they start
within ``LOOP_INHERIT_SECONDS`` of the loop's start; later runs serve no
request, like a periodic task started with the service. eventlet's hub and
the threads commlens starts itself never carry a hop.
"""

import concurrent.futures
import functools
import sys
import threading
import time

from commlens.tracer import context

# How long the runs of a looping call started while serving a request
# continue that request's trace: waits a request does by polling (a
# volume attach, a migration) end well within it; a loop that goes on
# longer is the service's own, not the request's.
LOOP_INHERIT_SECONDS = 300.0

_current = context.current_var
_HOP_ATTRIBUTE = "_commlens_hop"
_LOOP_FUNCTION = "__commlens_loop_function__"
_patches = []   # (owner, name, original) of what instrument() replaced
_lock = threading.Lock()


def _hop_to_hand_over():
    """The hop being served, its ids drawn: another thread is about to
    share it, and two threads drawing them at once would give its children
    two different parents."""
    hop = _current.get()
    if hop is not None and (hop.span_id is None or hop.trace_id is None):
        try:
            hop.ensure_ids()
        except Exception:  # never into the service's spawn
            return None
    return hop


def carried(fn, hop):
    """``fn`` that runs with ``hop`` as the hop being served, wherever it runs."""
    def run_in_hop(*args, **kwargs):
        token = _current.set(hop)
        try:
            return fn(*args, **kwargs)
        finally:
            context.reset_current(token)
    return run_in_hop


def instrument():
    """Patch the places where work is handed to another thread of control.
    Safe to call twice."""
    with _lock:
        if _patches:
            return
        _patch(threading.Thread, "start", _thread_start)
        _patch(threading.Thread, "_bootstrap_inner", _thread_bootstrap_inner)
        _patch_submit(concurrent.futures.ThreadPoolExecutor)
        # futurist is what oslo.messaging's RPC servers run on (loaded when
        # the first one starts, after this): imported here for a process
        # that has oslo.messaging, never for one that has not (it imports
        # eventlet where installed).
        futurist = sys.modules.get("futurist") or (
            _import("futurist") if "oslo_messaging" in sys.modules else None)
        for name in ("ThreadPoolExecutor", "GreenThreadPoolExecutor"):
            executor = getattr(futurist, name, None)
            if isinstance(executor, type):
                _patch_submit(executor)
        greenthread = sys.modules.get("eventlet.greenthread")
        if greenthread is not None:
            _patch(greenthread.GreenThread, "__init__", _green_thread_init)
            _patch(greenthread.GreenThread, "main", _green_thread_main)
            if callable(getattr(greenthread, "_spawn_n", None)):
                _patch(greenthread, "_spawn_n", _spawn_n)
        loopingcall = sys.modules.get("oslo_service.loopingcall")
        base = getattr(loopingcall, "LoopingCallBase", None)
        # _start is the common base's (oslo.service 4: backend/_common).
        owner = next((k for k in getattr(base, "__mro__", ()) if "_start" in k.__dict__), None)
        if owner is not None:
            _patch(owner, "_start", _looping_call_start)


def uninstrument():
    """Restore what instrument() patched. Safe to call twice."""
    with _lock:
        while _patches:
            owner, name, original = _patches.pop()
            setattr(owner, name, original)


def instrumented():
    return bool(_patches)


def _import(name):
    try:
        return __import__(name)
    except Exception:
        return None


def _patch(owner, name, make):
    """Replace ``owner.name`` with ``make(original)``. Only what the owner
    itself defines is patched (a subclass inherits the patched one)."""
    original = owner.__dict__.get(name)
    if original is None:
        return
    patched = make(original)
    patched.__commlens_original__ = original
    setattr(owner, name, patched)
    _patches.append((owner, name, original))


# -- threads ------------------------------------------------------------------

def _thread_start(original):
    def start(self):
        hop = _hop_to_hand_over()
        if hop is not None:
            self.__dict__[_HOP_ATTRIBUTE] = hop
        return original(self)
    return start


def _thread_bootstrap_inner(original):
    # Runs in the new thread for every Thread, whatever its run().
    def _bootstrap_inner(self):
        hop = self.__dict__.pop(_HOP_ATTRIBUTE, None)
        if hop is not None:
            _current.set(hop)
        return original(self)
    return _bootstrap_inner


# -- executors ----------------------------------------------------------------

def _patch_submit(executor):
    _patch(executor, "submit", _submit)


def _submit(original):
    def submit(self, fn, /, *args, **kwargs):
        hop = _hop_to_hand_over()
        if hop is None:
            return original(self, fn, *args, **kwargs)
        # The pool may start a worker thread here: started outside the hop,
        # it never keeps one between items.
        token = _current.set(None)
        try:
            return original(self, carried(fn, hop), *args, **kwargs)
        finally:
            context.reset_current(token)
    return submit


# -- eventlet -----------------------------------------------------------------

def _green_thread_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        hop = _hop_to_hand_over()
        if hop is not None:
            self.__dict__[_HOP_ATTRIBUTE] = hop
    return __init__


def _green_thread_main(original):
    def main(self, function, args, kwargs):
        hop = self.__dict__.pop(_HOP_ATTRIBUTE, None)
        if hop is None:
            return original(self, function, args, kwargs)
        return original(self, carried(function, hop), args, kwargs)
    return main


def _spawn_n(original):
    def _spawn_n(seconds, func, args, kwargs):
        hop = _hop_to_hand_over()
        if hop is not None:
            func = carried(func, hop)
        return original(seconds, func, args, kwargs)
    return _spawn_n


# -- oslo.service looping calls -------------------------------------------------

def _looping_call_start(original):
    # LoopingCallBase._start(idle_for, initial_delay=None, stop_on_exception=True)
    # starts the loop (a greenthread or a thread, which would carry the hop
    # for its whole life); each run of the loop's function gets the hop
    # only while it starts within LOOP_INHERIT_SECONDS of the loop's start.
    def _start(self, *args, **kwargs):
        function = getattr(self.f, _LOOP_FUNCTION, self.f)  # started again
        hop = _hop_to_hand_over()
        if hop is None:
            self.f = function
            return original(self, *args, **kwargs)
        until = time.monotonic() + LOOP_INHERIT_SECONDS

        @functools.wraps(function)   # the loop logs the function's name
        def run_in_window(*f_args, **f_kwargs):
            return carried(function, hop if time.monotonic() < until else None)(
                *f_args, **f_kwargs)

        setattr(run_in_window, _LOOP_FUNCTION, function)
        self.f = run_in_window
        token = _current.set(None)
        try:
            return original(self, *args, **kwargs)
        finally:
            context.reset_current(token)
    return _start
