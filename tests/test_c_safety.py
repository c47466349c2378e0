"""The compiled paths cannot be crashed by a service's own code.

The C reads a hop's fields (context.TraceContext) as pointers and formats
its ids into headers; the service reaches the same object through
``context.current()``. Each scenario runs in a fresh process: a crash
(exit 139) must fail the test, not take pytest down with it.
"""

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

_ENV = dict(os.environ, COMMLENS_EXPORT_URL="memory://", COMMLENS_SHIP_INTERVAL="3600",
            COMMLENS_SERVICE_NAME="c-safety", COMMLENS_HOP_SAMPLE_RATIO="0")


def run_isolated(script):
    """The JSON that ``script`` prints last, run in a fresh process that
    records but never ships; the test fails if the process dies."""
    done = subprocess.run([sys.executable, "-c", script], env=_ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (
        f"the process died (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Values a service's code might put into its current hop, by mistake or by
# a bug: each must be refused at the assignment, leaving the field as it was.
_BAD_VALUES = r'''
class Text(str):
    pass

BAD = {
    "trace_id": [object(), 12345, b"a" * 32, "A" * 32, "0" * 32, "a" * 31,
                 "a" * 10_000_000, Text("a" * 32), "\u00e9" * 32],
    "span_id": [12345, b"b" * 16, "B" * 16, "0" * 16, "b" * 32, Text("b" * 16), 1.5],
    "parent_id": [12345, b"c" * 16, "c" * 15, "x" * 16, ["c" * 16]],
    "sampled": [None, 1, "yes", b"", 0.0],
    "child_failed": [None, 1, "no", object()],
    "service": [12345, b"nova-api", ("nova-api",)],
}
'''

_WSGI_APP_MUTATING_ITS_HOP = _BAD_VALUES + r'''
import json
from commlens.middleware.wsgi import CommlensMiddleware
from commlens.tracer import context, recorder as recorder_mod

refused, accepted = [], []

def app(environ, start_response):
    hop = context.current()
    field, value = environ["test.field"], environ["test.value"]
    before = getattr(hop, field)
    try:
        if value is DELETE:
            delattr(hop, field)
        else:
            setattr(hop, field, value)
    except (TypeError, ValueError, AttributeError) as exc:
        refused.append([field, type(exc).__name__, getattr(hop, field) == before])
    else:
        accepted.append([field, repr(value)[:40]])
    # The service goes on calling out while this hop is current.
    carrier = {}
    context.stamp_outgoing(carrier, "nova-api", "call")
    sent = context.parse_traceparent(carrier["traceparent"])
    start_response("200 OK", [])
    return [json.dumps({"sent_valid": sent is not None}).encode()]

DELETE = object()
middleware = CommlensMiddleware(app, http_outbound="false")
bodies = []
cases = [(field, value) for field, values in BAD.items() for value in values + [DELETE]]
for field, value in cases:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/servers", "test.field": field,
               "test.value": value}
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    bodies.append(json.loads(b"".join(body)))
    body.close()
counters = {(name, tuple(labels)): value
            for name, labels, value in recorder_mod.get_recorder().snapshot(1)["counters"]}
print(json.dumps({
    "cases": len(cases), "refused": refused, "accepted": accepted,
    "sent_valid": all(body["sent_valid"] for body in bodies),
    "requests": counters.get(("commlens_http_requests_total",
                              ("c-safety", "unknown", "GET", "/servers", "200")), 0),
    "recording_errors": counters.get(("commlens_agent_records_dropped_total",
                                      ("c-safety", "recording_error")), 0),
}))
'''


def test_a_wsgi_app_cannot_delete_or_retype_its_hops_fields_and_the_request_completes():
    # `del context.current().trace_id` in an application segfaulted the
    # worker (exit 139); an int or bytes id made the compiled paths format
    # garbage. Now the assignment raises in the application's own code, the
    # hop keeps its value, and the request is served and counted as usual.
    result = run_isolated(_WSGI_APP_MUTATING_ITS_HOP)
    assert result["accepted"] == []
    assert len(result["refused"]) == result["cases"]
    assert all(unchanged for _, _, unchanged in result["refused"])
    assert {error for _, error, _ in result["refused"]} <= {
        "TypeError", "ValueError", "AttributeError"}
    assert result["sent_valid"]
    assert result["requests"] == result["cases"]
    assert result["recording_errors"] == 0


_CONSTRUCTING_BAD_HOPS = _BAD_VALUES + r'''
import json
from commlens.tracer import context

POSITION = {"trace_id": 0, "span_id": 1, "parent_id": 2, "sampled": 3}
outcome = []
for field, values in BAD.items():
    if field not in POSITION:
        continue
    for value in values:
        args = ["a" * 32, "b" * 16, None, True]
        args[POSITION[field]] = value
        try:
            context.TraceContext(*args)
        except (TypeError, ValueError) as exc:
            outcome.append(type(exc).__name__)
        else:
            outcome.append("made " + field)
        hop = context.TraceContext("a" * 32, "b" * 16, "c" * 16, False)
        try:
            hop.__init__(*args)  # the same checks, and a refused call changes nothing
        except (TypeError, ValueError):
            pass
        outcome.append((hop.trace_id, hop.span_id, hop.parent_id, hop.sampled)
                       == ("a" * 32, "b" * 16, "c" * 16, False))
print(json.dumps(outcome))
'''


def test_a_trace_context_is_never_made_with_ids_the_compiled_paths_cannot_send():
    # TraceContext(12345) made a hop whose traceparent the compiled
    # stamp_outgoing formatted from a pointer to an int.
    outcome = run_isolated(_CONSTRUCTING_BAD_HOPS)
    assert outcome and not [o for o in outcome if isinstance(o, str) and o.startswith("made")]
    assert all(o is True for o in outcome if isinstance(o, bool))


_STAMPING_UNDER_ODD_HOPS = r'''
import json
from commlens.tracer import context

SPAN = "b7ad6b7169203331"
served_hops = {
    "span id without trace id": lambda: context.TraceContext(None, SPAN),
    "trace id cleared after the span was drawn": lambda: cleared(),
    "no ids yet": lambda: context.TraceContext(),
    "not sampled, span not drawn": lambda: context.TraceContext("a" * 32, None, None, False),
}

def cleared():
    hop = context.TraceContext("a" * 32, SPAN)
    hop.trace_id = None
    return hop

results = {}
for name, make in served_hops.items():
    for stamp in (context.stamp_outgoing, context._stamp_outgoing_in_python):
        served = make()
        token = context.set_current(served)
        try:
            carrier = {}
            sent = stamp(carrier, "nova-api", "cast")
        finally:
            context.reset_current(token)
        parsed = context.parse_traceparent(carrier["traceparent"])
        results.setdefault(name, []).append({
            "valid": parsed is not None,
            "matches_hop": parsed == (sent.trace_id, sent.span_id, sent.sampled),
            "child_of_served": (sent.trace_id, sent.parent_id)
                               == (served.trace_id, served.span_id),
            "served_ids_valid": context.parse_traceparent(served.traceparent()) is not None,
            "sampled": sent.sampled,
        })
print(json.dumps(results))
'''


@pytest.mark.parametrize("case", [
    "span id without trace id", "trace id cleared after the span was drawn", "no ids yet",
    "not sampled, span not drawn"])
def test_stamp_outgoing_sends_a_valid_traceparent_whatever_the_served_hop_holds(case):
    # A hop with a span id but no trace id made the compiled stamp_outgoing
    # read None as a str ("00-<garbage>-..." or a crash) and the Python one
    # send "00-None-...". Now that hop starts a fresh trace, both ways alike.
    compiled, in_python = run_isolated(_STAMPING_UNDER_ODD_HOPS)[case]
    assert compiled == in_python
    assert compiled["valid"] and compiled["matches_hop"] and compiled["child_of_served"]
    assert compiled["served_ids_valid"]
    assert compiled["sampled"] is (case != "not sampled, span not drawn")


_ODD_STATUS_CODE_LABEL = r'''
import json
from commlens.middleware import wsgi
from commlens.tracer import recorder as recorder_mod

def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]

# The memo of status lines is a Python dict the compiled path reads: a bad
# entry in it (another library, a debugger) must not be read as a str.
wsgi._STATUS_CODES["200 OK"] = 200
middleware = wsgi.CommlensMiddleware(app, http_outbound="false")
body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: None)
served = b"".join(body)
body.close()
counters = {(name, tuple(labels)): value
            for name, labels, value in recorder_mod.get_recorder().snapshot(1)["counters"]}
print(json.dumps({"served": served.decode(), "recording_errors": counters.get(
    ("commlens_agent_records_dropped_total", ("c-safety", "recording_error")), 0)}))
'''


def test_a_status_code_label_that_is_not_a_str_is_a_counted_recording_error():
    result = run_isolated(_ODD_STATUS_CODE_LABEL)
    assert result == {"served": "ok", "recording_errors": 1}


_SEND_WITH_A_STAMP_THAT_RETURNS_NO_HOP = r'''
import json
from commlens.middleware import _rpc_send
from commlens.tracer import labels, metrics, recorder as recorder_mod

recorder = recorder_mod.Recorder("c-safety")
failures = []
sender = _rpc_send.Sender(
    service="c-safety", recorder=recorder, sent_metric=metrics.RPC_SENT.name,
    reply_wait_metric=metrics.RPC_REPLY_WAIT.name,
    budget_metric=metrics.RPC_TIMEOUT_BUDGET.name,
    over_half_metric=metrics.RPC_OVER_HALF_TIMEOUT.name, method_label=labels.method,
    context_copy=dict, stamp=lambda carrier, service, kind: 12345,
    failed=lambda *args: None, add_hop=lambda *args: None,
    recording_failed=failures.append, inner_send=lambda *args, **kwargs: None)

class Target:
    topic = "conductor"
    fanout = False

try:
    send = sender.begin(Target(), {}, {"method": "build"}, False)
except TypeError as exc:
    outcome = "refused: " + str(exc)
else:
    send.end(None)
    outcome = "sent"
print(json.dumps({"outcome": outcome, "open_calls": len(sender.take_open_calls())}))
'''


def test_a_send_whose_stamp_returns_no_trace_context_is_refused_before_it_is_read():
    # Sender.end() reads the hop's trace id as a C field; a stamp (Python,
    # replaceable) that returned anything else was read as one.
    result = run_isolated(_SEND_WITH_A_STAMP_THAT_RETURNS_NO_HOP)
    assert result["outcome"].startswith("refused: ") and "TraceContext" in result["outcome"]
    assert result["open_calls"] == 0


_OBJECTS_MADE_OR_CHANGED_FROM_PYTHON = r'''
import json
from commlens.tracer import _speedups

outcome = {}
counter = _speedups.Counter.__new__(_speedups.Counter)  # __init__ never ran
counter.inc(2)
outcome["counter"] = counter.value

store = _speedups.Store(lambda *a: None, lambda *a: None)
try:
    store.on_first_use = 5
except TypeError:
    outcome["on_first_use"] = "refused"
store.on_first_use = None
outcome["on_first_use_cleared"] = store.on_first_use is None

sampler = _speedups.HopSampler.__new__(_speedups.HopSampler)
try:
    sampler.keeps_hop("a" * 32, 0.0, False)
except RuntimeError:
    outcome["sampler"] = "refused"
print(json.dumps(outcome))
'''


def test_compiled_objects_made_without_init_or_given_odd_callbacks_refuse_instead_of_crashing():
    assert run_isolated(_OBJECTS_MADE_OR_CHANGED_FROM_PYTHON) == {
        "counter": 2, "on_first_use": "refused", "on_first_use_cleared": True,
        "sampler": "refused"}


_MIDDLEWARE_BEFORE_BIND = r'''
import json
from commlens.middleware import _wsgi_request  # not wsgi.py, which binds it
from commlens.tracer import recorder as recorder_mod, routes

class Routes:
    remembered = {}
    def __call__(self, path):
        return path

recorder = recorder_mod.Recorder("c-safety")
try:
    middleware = _wsgi_request.Middleware(lambda e, s: [b""], "c-safety", recorder, Routes())
    middleware({"REQUEST_METHOD": "GET"}, lambda *a: None)
    outcome = "served"
except RuntimeError as exc:
    outcome = "refused: " + str(exc)
print(json.dumps({"outcome": outcome}))
'''


def test_a_compiled_middleware_made_before_its_module_is_bound_refuses_instead_of_crashing():
    # Its per-request path reads what wsgi.py's bind() gives (the hop's
    # class, the ContextVar); made without it, the first request read NULLs.
    result = run_isolated(_MIDDLEWARE_BEFORE_BIND)
    assert result["outcome"].startswith("refused: ") and "bind()" in result["outcome"]


# -- the build ------------------------------------------------------------------

_SOURCES = [pathlib.Path(__file__).resolve().parent.parent / name
            for name in ("tracer/_speedups.c", "middleware/_rpc_send.c",
                         "middleware/_rpc_receive.c", "middleware/_wsgi_request.c")]


OLDEST_PYTHON = (3, 10)  # pyproject.toml's requires-python


def _python_headers():
    """The header folder of each supported CPython on this machine: this
    interpreter's and pyenv's (3.10 to 3.13 in CI's image), by version."""
    found = {sysconfig.get_python_version(): sysconfig.get_path("include")}
    root = pathlib.Path(os.environ.get("PYENV_ROOT", pathlib.Path.home() / ".pyenv"))
    for header in root.glob("versions/3.*/include/python3.*/Python.h"):
        version = header.parent.name.removeprefix("python")  # 3.12, or 3.7m of old
        if re.fullmatch(r"\d+\.\d+", version) and _number(version) >= OLDEST_PYTHON:
            found.setdefault(version, str(header.parent))
    return sorted(found.items(), key=lambda item: _number(item[0]))


def _number(version):
    return tuple(int(part) for part in version.split("."))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to compile with")
@pytest.mark.parametrize("version, include", _python_headers(), ids=lambda v: str(v))
def test_the_c_compiles_without_a_warning_against_each_pythons_headers(version, include):
    # The multi-phase init's slots (Py_mod_multiple_interpreters from 3.12,
    # Py_mod_gil from 3.13) and 3.12's error API on older headers are
    # chosen by #ifdef: each version must see a clean build (pyproject.toml
    # builds with -Wall -Wextra).
    if not pathlib.Path(include, "Python.h").exists():
        pytest.skip(f"no headers for Python {version} ({include})")
    for source in _SOURCES:
        done = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                               "-I", include, str(source)], capture_output=True, text=True)
        assert done.returncode == 0 and not done.stderr, (version, source.name, done.stderr)


_COMPILED_MODULES = ["commlens.tracer._speedups", "commlens.middleware._rpc_send",
                     "commlens.middleware._rpc_receive", "commlens.middleware._wsgi_request"]


def _stubbed(stub):
    """{public name: set of member names (None for a function)} in a .pyi."""
    names = {}
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {item.name if not isinstance(item, ast.AnnAssign)
                                else item.target.id for item in node.body
                                if isinstance(item, (ast.FunctionDef, ast.AnnAssign))}
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = None
    return names


@pytest.mark.parametrize("name", _COMPILED_MODULES)
def test_each_compiled_module_has_a_stub_that_names_what_it_has(name):
    # Type checkers and editors read the .pyi beside each .c (markupsafe's
    # _speedups.pyi); one that names a member the C lacks, or misses one,
    # misleads them. (mypy's stubtest checks them further; it is not a
    # dependency.)
    module = pytest.importorskip(name, reason="the compiled paths did not build")
    stub = pathlib.Path(module.__file__).with_name(name.rsplit(".", 1)[1] + ".pyi")
    at_runtime = {}
    for attribute, value in vars(module).items():
        if attribute.startswith("_"):
            continue
        at_runtime[attribute] = None if not isinstance(value, type) else {
            member for member in vars(value)
            if not member.startswith("_") or member in ("__init__", "__new__", "__call__")}
    stubbed = _stubbed(stub)
    assert stubbed.keys() == at_runtime.keys()
    for attribute, members in stubbed.items():
        if members is not None:
            # __init__/__new__ are the stub's choice of which to spell out
            runtime = at_runtime[attribute] - {"__init__", "__new__"}
            assert members - {"__init__", "__new__"} == runtime, attribute
