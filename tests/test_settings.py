"""A bad commlens setting never stops a service (issue 15, item 5).

From every source (environment, a paste filter's options, ``[commlens]`` in
the service's config file) a bad value is refused with one warning naming the
option, where it came from, the value (never a secret's) and the value used
instead; the next source, or the default, is used. Through the real rabbit
transport and a real paste.deploy pipeline, nothing raises.
"""

import logging

import oslo_messaging as om
import pytest
from oslo_config import cfg

from commlens.tracer import recorder as recorder_mod
from commlens.tracer import settings

COMMLENS_RABBIT_URL = "commlens+rabbit://guest:guest@127.0.0.1:5672/"
SETTINGS_LOG = "commlens.tracer.settings"


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch, caplog):
    # Each test sees its own "logged once" memory, and the warnings.
    monkeypatch.setattr(settings, "_REPORTED", set(), raising=False)
    caplog.set_level(logging.WARNING, logger=SETTINGS_LOG)


@pytest.fixture
def own_recorder(monkeypatch):
    """The test builds the process's recorder itself, from its bad settings,
    without changing the one other tests of this process ship with."""
    monkeypatch.setattr(recorder_mod, "_RECORDER", None)
    monkeypatch.setenv("COMMLENS_EXPORT_URL", "memory://")
    yield
    recorder_mod.uninstall()


def refusals(caplog):
    return [r.getMessage() for r in caplog.records if r.name == SETTINGS_LOG]


def only_refusal(caplog, *words):
    lines = [line for line in refusals(caplog) if all(w in line for w in words)]
    assert len(lines) == 1, (words, refusals(caplog))
    return lines[0]


def app_factory(global_conf, **local_conf):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    return app


@pytest.mark.parametrize("variable, raw, option, used", [
    ("COMMLENS_SHIP_INTERVAL", "abc", "ship_interval", 5.0),
    ("COMMLENS_SHIP_INTERVAL", "0", "ship_interval", 5.0),
    ("COMMLENS_SHIP_INTERVAL", "-1", "ship_interval", 5.0),
    ("COMMLENS_SHIP_INTERVAL", "nan", "ship_interval", 5.0),
    ("COMMLENS_SHIP_INTERVAL", "inf", "ship_interval", 5.0),
    ("COMMLENS_SHIP_INTERVAL", "1e10", "ship_interval", 5.0),
    ("COMMLENS_HOP_SAMPLE_RATIO", "1.5", "hop_sample_ratio", 0.01),
    ("COMMLENS_HOP_SAMPLE_RATIO", "nan", "hop_sample_ratio", 0.01),
    ("COMMLENS_SLOW_HOP_SECONDS", "-1", "slow_hop_seconds", 1.0),
    ("COMMLENS_SLOW_HOP_SECONDS", "inf", "slow_hop_seconds", 1.0),
    ("COMMLENS_HTTP_OUTBOUND", "maybe", "http_outbound", True),
    ("COMMLENS_HTTP_MAX_ROUTES", "0", "http_max_routes", 200),
    ("COMMLENS_HTTP_MAX_ROUTES", "many", "http_max_routes", 200),
    ("COMMLENS_HTTP_ENDPOINTS", "neutron-server", "http_endpoints", []),
    ("COMMLENS_HTTP_ENDPOINTS", "nova=http://[::1:8774", "http_endpoints", []),
    ("COMMLENS_SERVICE_NAME", "nova conductor", "service_name", None),
    ("COMMLENS_SERVICE_NAMES", "image", "service_names", []),
    ("COMMLENS_SERVICE_NAMES", "image=glance api", "service_names", []),
    ("COMMLENS_SERVICE_NAMES", "Image=glance", "service_names", []),
])
def test_a_bad_environment_value_is_replaced_by_the_default_with_one_warning(
        monkeypatch, caplog, variable, raw, option, used):
    if used is None:
        used = settings.program_service_name()
    monkeypatch.setenv(variable, raw)
    loaded = settings.load(None)
    assert getattr(loaded, option) == used
    line = only_refusal(caplog, variable)
    assert repr(raw) in line
    assert f"using {option} = {used!r}" in line


def test_service_names_add_to_the_default_catalog_names(monkeypatch):
    from commlens.tracer import names

    monkeypatch.setenv("COMMLENS_SERVICE_NAMES", "image=glance, dns=designate")
    loaded = settings.load(None)
    assert loaded.service_names == ["image=glance", "dns=designate"]
    catalog = names.catalog_names(loaded.service_names)
    assert catalog["image"] == "glance" and catalog["dns"] == "designate"
    assert catalog["network"] == "neutron-server" and catalog["identity"] == "keystone"


def test_the_same_bad_value_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setenv("COMMLENS_SHIP_INTERVAL", "abc")
    settings.load(None)
    settings.load(None, overrides={"service_name": "nova-api"})
    assert len(refusals(caplog)) == 1
    monkeypatch.setenv("COMMLENS_SHIP_INTERVAL", "-1")
    settings.load(None)
    assert len(refusals(caplog)) == 2


def test_a_bad_paste_value_falls_back_to_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("COMMLENS_SHIP_INTERVAL", "0.2")
    loaded = settings.load(None, overrides={"ship_interval": "abc", "http_outbound": "maybe"})
    assert loaded.ship_interval == 0.2
    assert loaded.http_outbound is True
    line = only_refusal(caplog, "paste option ship_interval")
    assert "'abc'" in line and "using ship_interval = 0.2 (environment variable" in line
    only_refusal(caplog, "paste option http_outbound", "'maybe'")


def test_unknown_paste_options_are_ignored_without_their_values(caplog):
    loaded = settings.load(None, overrides={"export_ulr": "amqp://nova:s3cret@rabbit/"})
    assert loaded.service_name == "test-client"
    only_refusal(caplog, "export_ulr", "not a commlens option")
    assert "s3cret" not in caplog.text


def test_a_secret_bad_value_is_refused_without_showing_it(monkeypatch, caplog):
    monkeypatch.setenv("COMMLENS_EXPORT_URL", "amqp://nova:s3cret@[::1:5672/")
    assert settings.load(None).export_url is None
    only_refusal(caplog, "COMMLENS_EXPORT_URL", "****")
    assert "s3cret" not in caplog.text


def test_a_url_in_a_refused_value_is_shown_without_its_credentials(monkeypatch, caplog):
    monkeypatch.setenv("COMMLENS_HTTP_ENDPOINTS", "nova=http://admin:s3cret@10.0.0.5:abc/")
    assert settings.load(None).http_endpoints == []
    only_refusal(caplog, "COMMLENS_HTTP_ENDPOINTS", "10.0.0.5")
    assert "s3cret" not in caplog.text


CONFIG_FILE = """
[commlens]
ship_interval = abc
hop_sample_ratio = 2
slow_hop_seconds = nan
http_outbound = maybe
service_name = nova conductor
"""


def config_with_bad_values(tmp_path):
    path = tmp_path / "nova.conf"
    path.write_text(CONFIG_FILE)
    conf = cfg.ConfigOpts()
    settings.register_opts(conf)
    conf(["--config-file", str(path)])
    return conf, str(path)


def test_bad_values_in_the_config_file_fall_back_with_one_warning_each(
        tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("COMMLENS_SLOW_HOP_SECONDS", raising=False)
    monkeypatch.delenv("COMMLENS_HTTP_OUTBOUND", raising=False)
    conf, path = config_with_bad_values(tmp_path)
    loaded = settings.load(conf)
    # The environment (tests/support.py) is the next source, then the default.
    assert loaded.ship_interval == 0.2
    assert loaded.hop_sample_ratio == 1.0
    assert loaded.slow_hop_seconds == 1.0
    assert loaded.http_outbound is True
    assert loaded.service_name == "test-client"
    for option in ("ship_interval", "hop_sample_ratio", "slow_hop_seconds",
                   "http_outbound", "service_name"):
        assert path in only_refusal(caplog, f"[commlens] {option}")
    assert "'abc'" in only_refusal(caplog, "[commlens] ship_interval")
    assert "using ship_interval = 0.2 (environment variable COMMLENS_SHIP_INTERVAL)" in (
        only_refusal(caplog, "[commlens] ship_interval"))
    assert "'nova conductor'" in only_refusal(caplog, "[commlens] service_name")


def test_the_wsgi_middleware_starts_with_bad_values_in_the_config_file(
        tmp_path, own_recorder, caplog):
    from commlens.middleware.wsgi import CommlensMiddleware

    conf, _ = config_with_bad_values(tmp_path)
    middleware = CommlensMiddleware(app_factory({}), conf=conf)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/v2.1/servers"},
                      lambda status, headers, exc_info=None: None)
    assert list(body) == [b"ok"]
    body.close()
    assert middleware.service == "test-client"
    assert recorder_mod.get_recorder().shipper.interval == 0.2
    only_refusal(caplog, "[commlens] service_name")


PASTE_INI = """
[pipeline:main]
pipeline = commlens app

[filter:commlens]
paste.filter_factory = commlens.middleware.wsgi:filter_factory
ship_interval = abc
http_outbound = maybe
hop_sample_ratio = 2
service_name = nova api
colour = blue

[app:app]
paste.app_factory = test_settings:app_factory
"""


def test_a_paste_pipeline_starts_with_bad_and_unknown_filter_options(
        tmp_path, own_recorder, caplog):
    from paste import deploy

    ini = tmp_path / "api-paste.ini"
    ini.write_text(PASTE_INI)
    pipeline = deploy.loadapp(f"config:{ini}")
    statuses = []
    body = pipeline({"REQUEST_METHOD": "GET", "PATH_INFO": "/v2.1/servers"},
                    lambda status, headers, exc_info=None: statuses.append(status))
    assert list(body) == [b"ok"] and statuses == ["200 OK"]
    body.close()
    # The invalid name given to the filter is refused: the environment's is used.
    assert pipeline.service == "test-client"
    assert recorder_mod.get_recorder().shipper.interval == 0.2
    assert "'abc'" in only_refusal(caplog, "paste option ship_interval")
    assert "'maybe'" in only_refusal(caplog, "paste option http_outbound")
    assert "'2'" in only_refusal(caplog, "paste option hop_sample_ratio")
    assert "'nova api'" in only_refusal(caplog, "paste option service_name")
    only_refusal(caplog, "paste option colour", "not a commlens option")


def test_a_commlens_transport_starts_with_bad_environment_values(
        rabbitmq, conf, own_recorder, monkeypatch, caplog):
    bad = {"COMMLENS_SHIP_INTERVAL": "abc", "COMMLENS_HTTP_OUTBOUND": "maybe",
           "COMMLENS_SERVICE_NAME": "nova conductor", "COMMLENS_HOP_SAMPLE_RATIO": "nan",
           "COMMLENS_HTTP_ENDPOINTS": "neutron-server"}
    for variable, raw in bad.items():
        monkeypatch.setenv(variable, raw)
    transport = om.get_rpc_transport(conf, url=COMMLENS_RABBIT_URL)
    try:
        recorder = recorder_mod.get_recorder()
        assert recorder.service == settings.program_service_name()
        assert recorder.shipper.interval == 5.0
        for variable, raw in bad.items():
            assert repr(raw) in only_refusal(caplog, variable)
    finally:
        transport.cleanup()


NASTY = ["", " ", "abc", "0", "-1", "nan", "-inf", "1e400", "1" * 400, "true", "yes ",
         "\x00", "é", "=", "a=", "=http://h", "a=http://[::1", "a=http://h:99999999",
         "amqp://u:p@[::1:5672/", "nova conductor", "x" * 65]


def test_no_value_of_any_option_from_any_source_raises(monkeypatch, tmp_path):
    path = tmp_path / "service.conf"
    for opt in settings.list_opts()[0][1]:
        variable = "COMMLENS_" + opt.dest.upper()
        for raw in NASTY:
            if "\x00" not in raw:  # the OS refuses it in the environment
                monkeypatch.setenv(variable, raw)
            from_environment = settings.load(None)
            from_paste = settings.load(None, overrides={opt.dest: raw})
            path.write_text(f"[commlens]\n{opt.dest} = {raw}\n")
            conf = cfg.ConfigOpts()
            conf(["--config-file", str(path)])
            from_file = settings.load(conf)
            for loaded in (from_environment, from_paste, from_file):
                assert settings.valid_service_name(loaded.service_name)
                assert 0.05 <= loaded.ship_interval <= 3600
                assert 0.0 <= loaded.hop_sample_ratio <= 1.0
                assert 0.0 <= loaded.slow_hop_seconds < float("inf")
                assert loaded.http_max_routes >= 1
        monkeypatch.delenv(variable)
