"""Where commlens reads its settings.

One place: the oslo.config group ``[commlens]`` of the service's own
configuration, with ``COMMLENS_*`` environment variables as the fallback for
services that do not use oslo.config (and for tests). A value set in the
config file wins over the environment; the environment wins over the default.

A setting of ours never stops a service: a value that is not of the option's
type or outside its bounds, from any source, is refused with one warning per
process and the next source's value (or the default) is used instead.
"""

import dataclasses
import logging
import math
import os
import re
import sys
import threading
import urllib.parse

from oslo_config import cfg

from commlens.tracer import names

GROUP = "commlens"

# The defaults used when no source sets an option. They are not the
# options' oslo.config defaults: a default there would hide the environment
# variable behind it (the config file wins over the environment only when
# it sets the option). oslo-config-generator and docs/configuration.md show
# them through each option's sample_default.
DEFAULTS = {
    "service_name": None,  # derived from the program name
    "export_url": None,    # derived from the transport URL
    "ship_interval": 5.0,
    "hop_sample_ratio": 0.01,
    "slow_hop_seconds": 1.0,
    "http_outbound": True,
    "http_max_routes": 200,
    "http_endpoints": [],
    "service_names": [],
}
# How a sample configuration file shows a default that is derived, not fixed.
DERIVED_DEFAULTS = {
    "service_name": "<the program's name>",
    "export_url": "<the commlens+ transport URL's first broker and vhost>",
}

_OPTS = [
    cfg.StrOpt("service_name",
               help="Name of this service in metrics and traces "
                    "(env COMMLENS_SERVICE_NAME). Default: the program's "
                    "name, e.g. nova-conductor; for a WSGI application, its "
                    "project's API service (nova-api, placement-api)."),
    cfg.StrOpt("export_url", secret=True,
               help="Where to ship records (env COMMLENS_EXPORT_URL): "
                    "amqp://user:pass@host:5672/vhost, the broker and vhost a "
                    "collector consumes, or memory:// for a collector in the "
                    "same process. Default: the broker and vhost of the "
                    "commlens+ transport URL. A service without one (an "
                    "API-only service: placement, keystone) must set it, "
                    "or it ships nothing and says so once."),
    cfg.FloatOpt("ship_interval", min=0.05, max=3600.0,
                 help="Seconds between two shipped snapshots "
                      "(env COMMLENS_SHIP_INTERVAL)."),
    cfg.FloatOpt("hop_sample_ratio", min=0.0, max=1.0,
                 help="Share of successful traces whose hops are shipped; "
                      "error and slow hops are always shipped "
                      "(env COMMLENS_HOP_SAMPLE_RATIO)."),
    cfg.FloatOpt("slow_hop_seconds", min=0.0,
                 help="A hop at least this slow is always shipped "
                      "(env COMMLENS_SLOW_HOP_SECONDS)."),
    cfg.BoolOpt("http_outbound",
                help="Trace outbound HTTP calls made with requests once the "
                     "WSGI middleware or a commlens+ transport is loaded "
                     "(env COMMLENS_HTTP_OUTBOUND)."),
    cfg.IntOpt("http_max_routes", min=1,
               help="Distinct route templates kept per service; more are "
                    "counted as 'other' (env COMMLENS_HTTP_MAX_ROUTES)."),
    cfg.ListOpt("http_endpoints",
                help="Outbound targets: SERVICE=URL pairs, e.g. "
                     "neutron-server=http://10.0.0.5:9696 (env "
                     "COMMLENS_HTTP_ENDPOINTS). Requests to other hosts are "
                     "labelled with the service keystoneauth1 asked the catalog "
                     "for (see service_names), else 'unknown'."),
    cfg.ListOpt("service_names",
                help="Catalog service types and the names those services have in "
                     "commlens: TYPE=NAME pairs, e.g. image=glance, on top of the "
                     "defaults (identity=keystone, compute=nova-api, "
                     "image=glance-api, network=neutron-server, "
                     "placement=placement-api, block-storage=cinder-api, ...; "
                     "docs/operator-guide.md) (env COMMLENS_SERVICE_NAMES)."),
]


def sample_default(opt):
    """The default as a configuration file would spell it."""
    if opt.dest in DERIVED_DEFAULTS:
        return DERIVED_DEFAULTS[opt.dest]
    value = DEFAULTS[opt.dest]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


for _opt in _OPTS:
    _opt.sample_default = sample_default(_opt)
del _opt

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_URL_CREDENTIALS = re.compile(r"(//)[^/@\s]*@")

LOG = logging.getLogger(__name__)
# (option, source, value) of each refused setting already logged.
_REPORTED = set()
_REPORTED_LOCK = threading.Lock()


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
    service_names: list
    # The service name is the program's (no source set it): a WSGI
    # application loaded later names the process (middleware/wsgi.py).
    named_by_program: bool = False


def program_service_name(argv0=None):
    """``/usr/bin/nova-conductor`` -> ``nova-conductor``."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0] or "")
    if name.endswith(".py"):
        name = name[:-3]
    return name if valid_service_name(name) else "unknown"


def valid_service_name(name):
    return isinstance(name, str) and bool(_SERVICE_NAME.match(name))


def _shown(opt, value):
    """A value as a log line may show it: never a secret option's, and never
    the credentials of a URL inside any other."""
    if opt.secret:
        return "****"
    text = _URL_CREDENTIALS.sub(r"\1***@", repr(value))
    return text if len(text) <= 200 else text[:200] + "..."


def _report(key, message, *args):
    """Log a refused setting once per process: services load settings once
    per transport and per paste filter, and the same line again says nothing."""
    with _REPORTED_LOCK:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    LOG.warning("commlens: " + message, *args)


def _endpoint_problem(pair):
    """Why an http_endpoints item is unusable (middleware/http_client.py
    parse_endpoints would raise on it), or None."""
    if not isinstance(pair, str):
        return "not SERVICE=URL"
    service, sep, url = pair.partition("=")
    if not sep or not valid_service_name(service.strip()):
        return "not SERVICE=URL with a valid service name"
    problem = _url_problem(url.strip())
    return f"not a valid URL: {problem}" if problem else None


def _url_problem(url):
    """Why urllib cannot read ``url`` (an unclosed IPv6 bracket, a port
    that is no number), or None: what the URL's users would raise on."""
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - reading the port checks it
    except ValueError as exc:
        return str(exc)
    return None


def _checked(opt, raw):
    """``raw`` (a string from the environment or paste.ini, or a typed value
    from code or oslo.config) as the option's value: ``(value, None)``, or
    ``(None, why)`` when it is refused. The bounds are the option's own, as
    oslo.config applies them to the config file, plus finiteness: oslo.config
    lets ``nan`` and ``inf`` through a min/max check."""
    if isinstance(raw, str) and isinstance(opt, cfg.BoolOpt):
        raw = raw.strip()
    try:
        value = opt.type(raw)
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        if opt.secret:
            return None, "not valid"  # the reason may quote the value
        return None, str(exc) or type(exc).__name__
    if value is None:
        return None, "empty"
    if isinstance(value, float) and not math.isfinite(value):
        return None, "not a finite number"
    if opt.dest == "service_name" and not valid_service_name(value):
        return None, ("not a service name: letters, digits, '.', '_' or '-', "
                      "at most 64 characters")
    if opt.dest == "http_endpoints":
        for pair in value:
            problem = _endpoint_problem(pair)
            if problem:
                return None, f"item {_shown(opt, pair)}: {problem}"
    if opt.dest == "service_names":
        for pair in value:
            try:
                names.parse_catalog_names([pair])
            except ValueError:
                return None, (f"item {_shown(opt, pair)}: not TYPE=NAME with a catalog "
                              "type (lower case) and a valid service name")
    if opt.dest == "export_url" and _url_problem(value):
        return None, "not a valid URL"  # the reason may quote the password
    return value, None


def _candidates(opt, overrides, conf, group):
    """Where the option may be set, first wins: ``(source, raw, error)``;
    ``error`` when the source itself failed to give a value."""
    if _is_set(overrides.get(opt.dest)):
        yield f"paste option {opt.dest}", overrides[opt.dest], None
    if group is not None:
        source = f"[{GROUP}] {opt.dest}"
        try:
            raw = group[opt.dest]
        except cfg.ConfigSourceValueError as exc:
            # A bad value in the config file: oslo.config raises on access.
            location, why = _config_error(exc)
            yield f"{source} in {location}" if location else source, None, (
                "not valid" if opt.secret else why)
        except (cfg.Error, RuntimeError):
            pass  # an unparsed ConfigOpts (no args yet) raises: not set
        except Exception as exc:  # a service's ConfigOpts is not ours to trust
            yield source, None, f"could not be read ({type(exc).__name__})"
        else:
            if _is_set(raw):
                location = _config_location(conf, opt)
                yield f"{source} in {location}" if location else source, raw, None
    raw = os.environ.get(env_name(opt))
    if _is_set(raw):
        yield f"environment variable {env_name(opt)}", raw, None


def _is_set(raw):
    # A blank value ("option =" in paste.ini, VAR= in a unit file) is no value.
    return raw is not None and not (isinstance(raw, str) and not raw.strip())


def env_name(opt):
    return "COMMLENS_" + opt.dest.upper()


def _config_location(conf, opt):
    """The file a [commlens] value came from, when oslo.config knows it."""
    try:
        return conf.get_location(opt.dest, GROUP).detail
    except Exception:  # only a detail of a log line
        return None


def _config_error(exc):
    """oslo.config's message as (file, reason) for our log line."""
    message = str(exc)
    location = re.search(r"detail='([^']*)'", message)
    _, sep, why = message.partition(" is not valid: ")
    return (location.group(1) if location else None), (why if sep else message)


def _resolve(opt, overrides, conf, group):
    """(value, whether it is the default)."""
    refused = []
    for source, raw, error in _candidates(opt, overrides, conf, group):
        value, why = (None, error) if error else _checked(opt, raw)
        if why is None:
            used_from, default = source, False
            break
        refused.append((source, raw, error is None, why))
    else:
        value, used_from, default = DEFAULTS[opt.dest], "the default", True
        if opt.dest == "service_name":
            value, used_from = program_service_name(), "the program's name"
    used = (f"{opt.dest} = {_shown(opt, value)} ({used_from})"
            if value is not None else f"the default {opt.dest}")
    for source, raw, has_raw, why in refused:
        shown = _shown(opt, raw) if has_raw else None
        _report((opt.dest, source, shown or why), "refused %s%s (%s); using %s",
                source, f" = {shown}" if shown else "", why, used)
    return value, default


def load(conf=None, overrides=None):
    """Settings: ``overrides`` (a paste filter's local options), then ``conf``
    (a ConfigOpts, usually the service's), then the environment, then defaults.

    Never raises for a setting's value: a bad one is logged (once per
    process) and the next source's value, or the default, is used.
    """
    group = None
    if conf is not None:
        try:
            register_opts(conf)
            group = conf[GROUP]
        except Exception:  # a service's ConfigOpts: no group, the environment decides
            group = None
    overrides = dict(overrides or {})
    for name in sorted(set(overrides) - {opt.dest for opt in _OPTS}):
        # The value stays out of the log: a misspelt export_url carries a password.
        _report((name, "paste option", None),
                "ignored paste option %s: not a commlens option", name)
    resolved = {opt.dest: _resolve(opt, overrides, conf, group) for opt in _OPTS}
    return Settings(**{name: value for name, (value, _) in resolved.items()},
                    named_by_program=resolved["service_name"][1])
