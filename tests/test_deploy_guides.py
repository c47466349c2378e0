"""The deployment guides' snippets are read as the deployment tools read them.

Every fenced block of docs/deploy-*.md is taken from the page itself, so a
snippet cannot drift from what is tested:
- ``ini``: a paste file (it has filter:/composite:/pipeline: sections) is read
  by paste.deploy, which loads the commlens filter from it, and each API
  pipeline must carry ``commlens`` after the request id filter and before
  auth; any other is an oslo.config file whose ``[commlens]`` options are
  commlens's own and load without a refusal.
- ``yaml``: kolla-ansible's globals.yml may only set variables kolla-ansible
  defines; an openstack-helm values override may only use keys of that
  chart's values.yaml, but for the sections commlens adds, which are then read
  as above (``conf.<service>.commlens`` by oslo.config, ``conf.paste`` by
  paste.deploy, ``conf.wsgi_script`` as Python). The upstream keys are in
  tests/deploy_guides/upstream-keys.json, read from the tools' repositories.
- ``python``: compiled; its commlens imports must resolve.
"""

import ast
import configparser
import importlib
import json
import logging
import pathlib
import re

import pytest
import yaml
from oslo_config import cfg
from paste.deploy import loadwsgi

from commlens.tracer import settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDES = sorted((ROOT / "docs").glob("deploy-*.md"))
UPSTREAM = json.loads((ROOT / "tests" / "deploy_guides" / "upstream-keys.json").read_text())
CHECKED = ("ini", "yaml", "python")
PASTE_SECTIONS = ("filter:", "composite:", "pipeline:", "app:")
# Filters a pipeline's request id comes from, and those that must come after commlens.
REQUEST_ID_FILTERS = {"request_id", "compute_req_id"}
AUTH_FILTERS = {"authtoken", "keystonecontext", "noauth2", "noauth"}
SERVICES = ("nova", "neutron", "placement", "keystone")


def snippets():
    found = []
    for guide in GUIDES:
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", guide.read_text(), re.S | re.M):
            language, text = match.groups()
            if language in CHECKED:
                line = guide.read_text()[:match.start()].count("\n") + 1
                found.append(pytest.param(language, text, id=f"{guide.name}:{line}"))
    return found


@pytest.fixture(autouse=True)
def no_commlens_environment(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("COMMLENS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(settings, "_REPORTED", set())


def check_oslo_config(text, tmp_path, caplog):
    """The file as a service's oslo.config reads it; its [commlens] options
    are commlens's and every one is used as written."""
    path = tmp_path / "service.conf"
    path.write_text(text)
    raw = configparser.ConfigParser(interpolation=None, strict=True)
    raw.read_string(text)
    conf = cfg.ConfigOpts()
    conf.register_opt(cfg.StrOpt("transport_url"))
    settings.register_opts(conf)
    conf([], project="commlens-guide", default_config_files=[str(path)])
    if raw.has_section("commlens"):
        names = {opt.dest for opt in settings.list_opts()[0][1]}
        assert set(raw["commlens"]) <= names, set(raw["commlens"]) - names
    with caplog.at_level(logging.WARNING, logger="commlens.tracer.settings"):
        loaded = settings.load(conf)
    assert not [r for r in caplog.records if "refused" in r.getMessage()], caplog.text
    for name in raw["commlens"] if raw.has_section("commlens") else ():
        assert getattr(loaded, name) == conf.commlens[name], name
    if conf.transport_url:
        import oslo_messaging as om
        assert om.TransportURL.parse(conf, conf.transport_url).transport.startswith("commlens+")
    return conf


def check_paste(text, tmp_path):
    """paste.deploy loads the commlens filter from the file; every pipeline
    that serves the API carries it after the request id, before auth."""
    path = tmp_path / "api-paste.ini"
    path.write_text(text)
    factory = loadwsgi.loadfilter(f"config:{path}", name="commlens")
    assert callable(factory)
    parser = loadwsgi.NicerConfigParser(str(path))
    parser.read(str(path))
    pipelines = []
    for section in parser.sections():
        if section.startswith(("composite:", "pipeline:")):
            for key, value in parser.items(section):
                if key not in ("use", "here", "__file__") and " " in value:
                    pipelines.append(value.split())
    assert pipelines
    for words in pipelines:
        assert "commlens" in words, words
        where = words.index("commlens")
        assert REQUEST_ID_FILTERS & set(words[:where]), words
        assert not AUTH_FILTERS & set(words[:where]), words


def check_python(text):
    tree = ast.parse(text)
    compile(tree, "<snippet>", "exec")
    imported = [(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module.startswith("commlens")
                for alias in node.names]
    assert imported, "the snippet uses commlens"
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), (module, name)


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _known(chart, path):
    keys = UPSTREAM["openstack-helm"]["values"][chart]
    name = ".".join(path) if not any("." in p for p in path) else json.dumps(list(path))
    return name in keys


def check_helm_values(chart, values, tmp_path, caplog):
    for path, _ in _leaf_paths(values):
        if path[:1] == ("conf",) and len(path) > 2 and path[2] == "commlens" \
                and path[1] in SERVICES:
            continue  # the [commlens] section of the service's file: new
        if path[:3] == ("conf", "paste", "filter:commlens"):
            continue  # the filter's section: new
        depth = 4 if path[0] == "conf" else 3
        assert _known(chart, path[:depth]), f"{'.'.join(path)} is no key of the {chart} chart"
    conf = values.get("conf", {})
    for service in SERVICES:
        if "commlens" in conf.get(service, {}):
            lines = ["[commlens]"] + [f"{k} = {v}" for k, v in conf[service]["commlens"].items()]
            check_oslo_config("\n".join(lines) + "\n", tmp_path, caplog)
    if "paste" in conf:
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read_dict(conf["paste"])
        with open(tmp_path / "values-paste.ini", "w") as out:
            parser.write(out)
        check_paste((tmp_path / "values-paste.ini").read_text(), tmp_path)
    if "wsgi_script" in conf:
        check_python(conf["wsgi_script"])


@pytest.mark.parametrize("language, text", snippets())
def test_every_snippet_of_the_deployment_guides_reads_as_its_tool_reads_it(
        language, text, tmp_path, caplog):
    first = text.splitlines()[0]
    if language == "python":
        check_python(text)
    elif language == "ini":
        sections = re.findall(r"^\[([^\]]+)\]", text, re.M)
        if any(s.startswith(PASTE_SECTIONS) for s in sections):
            check_paste(text, tmp_path)
        else:
            check_oslo_config(text, tmp_path, caplog)
    elif "kolla-ansible" in first:
        variables = set(UPSTREAM["kolla-ansible"]["variables"])
        data = yaml.safe_load(text)
        assert set(data) <= variables, set(data) - variables
        if "om_rpc_transport" in data:
            assert data["om_rpc_transport"].startswith("commlens+")
    else:
        chart = re.match(r"# openstack-helm (\w+) chart", first)
        assert chart, f"a YAML snippet says what it is for on its first line: {first!r}"
        check_helm_values(chart.group(1), yaml.safe_load(text), tmp_path, caplog)


def test_every_guide_has_checked_snippets_and_is_linked():
    assert {g.name for g in GUIDES} == {"deploy-kolla-ansible.md", "deploy-openstack-helm.md",
                                        "deploy-placement-keystone.md"}
    counted = {g.name: 0 for g in GUIDES}
    for param in snippets():
        counted[param.id.split(":")[0]] += 1
    assert all(counted.values()), counted
    readme = (ROOT / "README.md").read_text()
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    for name in counted:
        assert f"(docs/{name})" in readme and f"({name})" in guide, name
