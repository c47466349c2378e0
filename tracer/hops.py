"""Hops: one record per call seen from one end, linked into traces.

A hop is shipped when it failed, when it was slow, or when its trace is in
the sample. Sampling is decided by the trace id, so every process keeps or
drops the same traces and sampled traces arrive whole.
"""

import math
import time

CLIENT = "client"
SERVER = "server"
RPC = "rpc"
HTTP = "http"


def sample_threshold(ratio):
    """A trace is in the sample if its id's last 8 hex digits, as a number, are
    below this (Recorder.keeps_hop)."""
    return math.ceil(max(0.0, min(1.0, ratio)) * 0x100000000)


def make_hop(ctx, *, service, side, protocol, peer, target, operation, kind,
             outcome, error, start, duration, request_id=None,
             global_request_id=None):
    """A JSON-ready hop record. ``start`` is a wall-clock timestamp."""
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
    }


def wall_clock_start(monotonic_start, monotonic_now, wall_now=None):
    """Convert a perf_counter start into a wall-clock timestamp."""
    return (wall_now if wall_now is not None else time.time()) - (monotonic_now - monotonic_start)
