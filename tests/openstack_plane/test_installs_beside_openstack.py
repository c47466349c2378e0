"""Issue 17, item 10: commlens installs beside OpenStack's services and leaves
``pip check`` clean, under the release's own pins."""

import json
import pathlib
import subprocess

import pytest

from openstack_plane.plane import PINS

pytestmark = [pytest.mark.openstack, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = pathlib.Path(__file__).parents[2]
# OpenStack 2026.2's services on PyPI.
SERVICES_2026_2 = ("nova==34.0.0", "openstack-placement==16.0.0", "neutron==29.0.0",
                   "keystone==30.0.0", "glance==33.0.0", "cinder==29.0.0")
# urllib3-future installs its own top-level ``urllib3`` over the real one (under
# requests and keystoneauth1); niquests is what brings it.
REPLACES_URLLIB3 = {"urllib3-future", "niquests"}


def test_pip_check_is_clean_with_the_agent_beside_nova_and_placement(venv):
    result = subprocess.run([f"{venv}/bin/python", "-m", "pip", "check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = subprocess.run([f"{venv}/bin/python", "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, timeout=120, check=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert {"nova", "openstack-placement", "commlens"} <= names
    assert not names & REPLACES_URLLIB3


def test_the_collector_extra_resolves_beside_every_2026_2_service(venv, tmp_path):
    """The agent and the collector extra with nova, placement, neutron,
    keystone, glance and cinder, all at once under the release's pins: pip's
    resolver finds one consistent set (what ``pip check`` then confirms) and
    nothing in it replaces urllib3."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [f"{venv}/bin/python", "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--quiet", "--disable-pip-version-check", "--report", str(report), "-c", str(PINS),
         *SERVICES_2026_2, "-e", f"{ROOT}[collector]"],
        capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stderr[-5000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    for service in SERVICES_2026_2:
        name, version = service.split("==")
        assert chosen[name] == version
    assert not set(chosen) & REPLACES_URLLIB3, sorted(set(chosen) & REPLACES_URLLIB3)
    assert {"flask", "rich", "commlens"} <= set(chosen)
