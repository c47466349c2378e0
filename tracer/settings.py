"""Where commlens reads its settings.

One place: the oslo.config group ``[commlens]`` of the service's own
configuration, with ``COMMLENS_*`` environment variables as the fallback for
services that do not use oslo.config (and for tests). A value set in the
config file wins over the environment; the environment wins over the default.
"""

import dataclasses
import os
import re
import sys

from oslo_config import cfg

GROUP = "commlens"

_OPTS = [
    cfg.StrOpt("service_name",
               help="Name of this service in metrics and traces "
                    "(env COMMLENS_SERVICE_NAME). Default: the program's "
                    "name, e.g. nova-conductor."),
    cfg.StrOpt("export_url", secret=True,
               help="Where to ship records (env COMMLENS_EXPORT_URL): "
                    "amqp://user:pass@host:5672/vhost or memory://. Default: "
                    "the broker of the commlens+ transport URL, else memory://."),
    cfg.FloatOpt("ship_interval", min=0.05,
                 help="Seconds between two shipped snapshots "
                      "(env COMMLENS_SHIP_INTERVAL). Default 5."),
    cfg.FloatOpt("hop_sample_ratio", min=0.0, max=1.0,
                 help="Share of successful traces whose hops are shipped; "
                      "error and slow hops are always shipped "
                      "(env COMMLENS_HOP_SAMPLE_RATIO). Default 0.01."),
    cfg.FloatOpt("slow_hop_seconds", min=0.0,
                 help="A hop at least this slow is always shipped "
                      "(env COMMLENS_SLOW_HOP_SECONDS). Default 1."),
    cfg.BoolOpt("http_outbound",
                help="Trace outbound HTTP calls made with requests once the "
                     "WSGI middleware or a commlens+ transport is loaded "
                     "(env COMMLENS_HTTP_OUTBOUND). Default true."),
    cfg.IntOpt("http_max_routes", min=1,
               help="Distinct route templates kept per service; more are "
                    "counted as 'other' (env COMMLENS_HTTP_MAX_ROUTES). Default 200."),
    cfg.ListOpt("http_endpoints",
                help="Outbound targets: SERVICE=URL pairs, e.g. "
                     "neutron-server=http://10.0.0.5:9696 (env "
                     "COMMLENS_HTTP_ENDPOINTS). Requests to other hosts are "
                     "labelled with the Keystone service type when keystoneauth1 "
                     "made them, else 'unknown'."),
]

DEFAULTS = {
    "service_name": None,  # derived from the program name
    "export_url": None,    # derived from the transport URL
    "ship_interval": 5.0,
    "hop_sample_ratio": 0.01,
    "slow_hop_seconds": 1.0,
    "http_outbound": True,
    "http_max_routes": 200,
    "http_endpoints": [],
}

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def list_opts():
    """The oslo-config-generator hook (entry point oslo.config.opts)."""
    return [(GROUP, _OPTS)]


def register_opts(conf):
    try:
        conf.register_opts(_OPTS, group=GROUP)
    except cfg.DuplicateOptError:
        pass


@dataclasses.dataclass(frozen=True)
class Settings:
    service_name: str
    export_url: str | None
    ship_interval: float
    hop_sample_ratio: float
    slow_hop_seconds: float
    http_outbound: bool
    http_max_routes: int
    http_endpoints: list


def program_service_name(argv0=None):
    """``/usr/bin/nova-conductor`` -> ``nova-conductor``."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0] or "")
    if name.endswith(".py"):
        name = name[:-3]
    return name if valid_service_name(name) else "unknown"


def valid_service_name(name):
    return isinstance(name, str) and bool(_SERVICE_NAME.match(name))


def _cast(opt, raw, origin):
    """A raw string (environment, paste.ini) as the option's type."""
    try:
        if isinstance(opt, cfg.BoolOpt):
            return {"true": True, "1": True, "yes": True, "on": True,
                    "false": False, "0": False, "no": False, "off": False}[raw.strip().lower()]
        if isinstance(opt, cfg.IntOpt):
            return int(raw)
        if isinstance(opt, cfg.FloatOpt):
            return float(raw)
        if isinstance(opt, cfg.ListOpt):
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"{origin}={raw!r} is not a valid {opt.type}") from None


def _from_env(opt):
    name = "COMMLENS_" + opt.dest.upper()
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    return _cast(opt, raw, name)


def load(conf=None, overrides=None):
    """Settings: ``overrides`` (a paste filter's local options), then ``conf``
    (a ConfigOpts, usually the service's), then the environment, then defaults.
    """
    values = {}
    group = None
    if conf is not None:
        register_opts(conf)
        try:
            group = conf[GROUP]
        except (cfg.NoSuchOptError, cfg.NoSuchGroupError, cfg.Error):
            group = None
    overrides = overrides or {}
    unknown = set(overrides) - {opt.dest for opt in _OPTS}
    if unknown:
        raise ValueError(f"unknown commlens option(s): {', '.join(sorted(unknown))}")
    for opt in _OPTS:
        value = None
        if opt.dest in overrides:
            value = overrides[opt.dest]
            if isinstance(value, str):  # from paste.ini; code may pass typed values
                value = _cast(opt, value, opt.dest)
        if value is None and group is not None:
            try:
                value = group[opt.dest]
            except (cfg.Error, RuntimeError):
                # An unparsed ConfigOpts (no args yet) raises; fall back.
                value = None
        if value is None:
            value = _from_env(opt)
        if value is None:
            value = DEFAULTS[opt.dest]
        values[opt.dest] = value

    name = values["service_name"] or program_service_name()
    if not valid_service_name(name):
        raise ValueError(
            f"commlens service_name {name!r}: use letters, digits, '.', '_' "
            "or '-', at most 64 characters")
    values["service_name"] = name
    return Settings(**values)
