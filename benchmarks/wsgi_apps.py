"""The minimal WSGI app of benchmarks/wsgi_overhead.py, wrapped per BENCH_VARIANT.

Loaded by gunicorn as ``wsgi_apps:app`` (run from benchmarks/).
"""

import os


def minimal(environ, start_response):
    body = b'{"server": {"status": "ACTIVE"}}'
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _wrap(variant):
    if variant == "plain":
        return minimal
    if variant == "passthrough":
        def passthrough(environ, start_response):
            return minimal(environ, start_response)

        return passthrough
    if variant in ("commlens", "commlens-python"):
        # commlens-python: the same, its server started with COMMLENS_PUREPYTHON=1.
        from commlens.middleware.wsgi import CommlensMiddleware

        return CommlensMiddleware(minimal, http_outbound="false")
    if variant == "otel-wsgi":
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        import common

        common.discarding_tracer_provider()
        return OpenTelemetryMiddleware(minimal)
    if variant == "ceilometermiddleware":
        from ceilometermiddleware import swift

        return swift.filter_factory({}, url=os.environ["BENCH_RABBIT_URL"],
                                    ignore_projects="")(minimal)
    raise SystemExit(f"unknown BENCH_VARIANT {variant!r}")


app = _wrap(os.environ.get("BENCH_VARIANT", "plain"))
