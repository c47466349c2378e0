"""Hops: one record per call seen from one end, linked into traces.

A hop is shipped when it failed, when it was slow, or when its trace is in
the sample. Sampling is decided by the trace id, so every process keeps or
drops the same traces and sampled traces arrive whole.
"""

import math
import time

# The hooks name a hop's side and protocol through this module; the values
# are the wire format's.
from commlens.tracer.wire import CLIENT, HTTP, RPC, SERVER  # noqa: F401


def sample_bound(ratio):
    """A trace is in the sample if its id's last 8 hex digits are below this
    string (Recorder.keeps_hop): below ``ratio`` * 2**32 as a number.

    Trace ids are lowercase hex of fixed width, which compare as strings
    the way the numbers they spell do, so the hot path parses nothing.
    """
    threshold = math.ceil(max(0.0, min(1.0, ratio)) * 0x100000000)
    if threshold > 0xffffffff:
        return "g"  # above every hex digit: all traces
    return "%08x" % threshold


def make_hop(ctx, *, service, side, protocol, peer, target, operation, kind,
             outcome, error, start, duration, request_id=None,
             global_request_id=None, server=None, timeout=None, pool_wait=None):
    """A JSON-ready hop record (its keys are wire.HOP_FIELDS). ``start`` is
    a wall-clock timestamp."""
    ctx.ensure_ids()
    return {
        "trace_id": ctx.trace_id,
        "span_id": ctx.span_id,
        "parent_id": ctx.parent_id,
        "service": service,
        "side": side,
        "protocol": protocol,
        "peer": peer,
        "target": target,
        "operation": operation,
        "kind": kind,
        "outcome": outcome,
        "error": error,
        "start": start,
        "duration": duration,
        "request_id": request_id,
        "global_request_id": global_request_id,
        "server": server,
        "timeout": timeout,
        "pool_wait": pool_wait,
    }


def wall_clock_start(monotonic_start, monotonic_now, wall_now=None):
    """Convert a perf_counter start into a wall-clock timestamp."""
    return (wall_now if wall_now is not None else time.time()) - (monotonic_now - monotonic_start)
