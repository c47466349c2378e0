"""The release files carry what an operator needs, and the wheel works installed.

scripts/build-dist builds the sdist and, from it, the manylinux wheel out of a
copy of the tracked files. The wheel is installed into a fresh virtualenv, and
the sdist's own agent tests run with it from a directory outside the source
tree, against the real broker.
"""

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent

# Repository housekeeping that no release carries.
NOT_RELEASED = {".gitignore", ".ci/run"}
# What the build itself adds to an sdist.
SDIST_METADATA = {"PKG-INFO", "setup.cfg"}

# What an operator takes from an installed commlens: every tracked file under
# these folders of the repository (the alert rules' promtool tests aside) and
# where it lands inside the wheel.
OPERATOR_DATA = {
    "dashboards/alerts/": "commlens/dashboards/alerts/",
    "dashboards/grafana/provisioning/": "commlens/dashboards/grafana/provisioning/",
    "dashboards/grafana/generated/": "commlens/dashboards/grafana/generated/",
    "helm/commlens/": "commlens/helm/commlens/",
}

COMPILED = ["commlens/tracer/_speedups", "commlens/middleware/_rpc_send",
            "commlens/middleware/_rpc_receive", "commlens/middleware/_wsgi_request"]

# The agent, end to end through the installed package: calls, casts and fanout
# casts through the commlens+rabbit:// driver counted at both ends, a remote
# error unchanged, and the WSGI middleware in a forked worker.
AGENT_TESTS = [
    "tests/test_rpc_path.py::test_received_counts_equal_sent_counts_per_method_and_kind",
    "tests/test_rpc_path.py::test_remote_errors_reach_the_caller_exactly_as_without_commlens"
    "[ValueError-ValueError]",
    "tests/test_agent_behaviour.py::test_forked_http_only_worker_ships_its_requests",
]

# Run inside the fresh virtualenv: where commlens comes from, its driver's entry
# point, and the data files an operator looks for.
INSTALLED_CHECK = """
import importlib.metadata, importlib.resources, json, sys
import commlens.middleware.rpc_driver, commlens.middleware.wsgi, commlens.tracer._speedups
from commlens.helm import CHART
(driver,) = [e for e in importlib.metadata.entry_points(group="oslo.messaging.drivers")
             if e.name == "commlens"]
dashboards = importlib.resources.files("commlens.dashboards")
print(json.dumps({
    "prefix": sys.prefix,
    "modules": [commlens.middleware.rpc_driver.__file__, commlens.tracer._speedups.__file__,
                str(CHART)],
    "driver": driver.load().__name__,
    "data": {
        "rules": (dashboards / "alerts/commlens.rules.yml").read_text(),
        "alertmanager": (dashboards / "alerts/alertmanager.example.yml").is_file(),
        "provisioning": (dashboards / "grafana/provisioning/dashboards/commlens.yaml").is_file(),
        "overview": (dashboards / "grafana/generated/commlens-overview.json").is_file(),
        "chart": (CHART / "Chart.yaml").is_file(),
        "chart_rules": (CHART / "files/commlens.rules.yml").read_text(),
    },
}))
"""


def tracked_files():
    """The repository's files as a release sees them: a symlinked folder
    (the chart's files/dashboards) stands for the files it points to."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    files = set()
    for name in filter(None, listed):
        path = REPO / name
        if path.is_dir():
            files.update(f"{name}/{child.name}" for child in path.iterdir() if child.is_file())
        else:
            files.add(name)
    return files


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(sdist, wheel) as scripts/build-dist makes them."""
    outdir = tmp_path_factory.mktemp("dist")
    done = subprocess.run([str(REPO / "scripts/build-dist"), str(outdir)],
                          env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    return sdist, wheel


def test_the_sdist_carries_every_tracked_file_and_nothing_else(release):
    sdist, _ = release
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        members = {m.name.removeprefix(root + "/") for m in archive.getmembers() if m.isfile()}
    shipped = {m for m in members if not m.startswith("commlens.egg-info/")} - SDIST_METADATA
    expected = tracked_files() - NOT_RELEASED
    assert expected - shipped == set(), "tracked files missing from the sdist"
    assert shipped - expected == set(), "files in the sdist that are not tracked"
    # Spot checks of what the issue names, so a failure reads plainly.
    for name in ("LICENSE", "tests/peers/rpc_peer.py", "tracer/_speedups.c",
                 "tracer/_speedups.h", "middleware/_rpc_send.c", "helm/commlens/Chart.yaml",
                 "helm/commlens/files/commlens.rules.yml",
                 "dashboards/alerts/alertmanager.example.yml"):
        assert name in shipped


def test_the_wheel_is_manylinux_and_carries_the_license_and_the_operators_files(release):
    _, wheel = release
    assert "-manylinux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        chart_rules = archive.read("commlens/helm/commlens/files/commlens.rules.yml")
    dist_info = wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(
        f"{dist_info}/METADATA").decode()

    expected = {target + name.removeprefix(folder)
                for name in tracked_files() if "/tests/" not in name
                for folder, target in OPERATOR_DATA.items() if name.startswith(folder)}
    assert "commlens/dashboards/alerts/alertmanager.example.yml" in expected
    assert "commlens/helm/commlens/files/dashboards/commlens-rpc.json" in expected
    assert expected - names == set(), "operator files missing from the wheel"
    # The chart's symlinks arrive as copies of what they point to.
    assert chart_rules == (REPO / "dashboards/alerts/commlens.rules.yml").read_bytes()
    for module in COMPILED:
        assert any(n.startswith(module + ".") and n.endswith(".so") for n in names), module
        # and its signatures, for type checkers (markupsafe's _speedups.pyi)
        assert module + ".pyi" in names, module
    # Tests and build inputs stay in the sdist.
    assert not [n for n in names if n.endswith((".c", ".h")) or "/tests/" in n
                or n.startswith("tests/")]


@pytest.fixture(scope="module")
def installed(release, tmp_path_factory):
    """A fresh virtualenv holding the wheel and what the sdist's tests need;
    returns (venv, unpacked sdist)."""
    sdist, wheel = release
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # [collector]: the sdist's tests start a collector; pip only warns while
    # the package has no such extra.
    done = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
         f"{wheel}[collector]", "pytest>=8", "pytest-timeout", "requests"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(sdist) as archive:
        # The extraction filter exists from 3.10.12/3.11.4 on; the sdist is ours.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(root, **safe)
    (unpacked,) = [p for p in root.iterdir() if p.name.startswith("commlens-")]
    return venv, unpacked


def installed_env(venv):
    """The environment of a service on a host where commlens was pip-installed:
    nothing of this checkout or its .venv on any path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_installed_wheel_brings_its_driver_and_the_operators_files(installed):
    venv, unpacked = installed
    done = subprocess.run([str(venv / "bin/python"), "-c", INSTALLED_CHECK], cwd=unpacked,
                          env=installed_env(venv), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    site = pathlib.Path(found["prefix"]).resolve()
    assert site == venv.resolve()
    for module in found["modules"]:
        assert pathlib.Path(module).resolve().is_relative_to(site), module
    assert found["driver"] == "CommlensDriver"
    data = found["data"]
    assert data["rules"] == (REPO / "dashboards/alerts/commlens.rules.yml").read_text()
    assert data["chart_rules"] == data["rules"]
    assert all(data[k] for k in ("alertmanager", "provisioning", "overview", "chart"))
    help_text = subprocess.run([str(venv / "bin/commlens"), "--help"], cwd=unpacked,
                               env=installed_env(venv), capture_output=True, text=True,
                               timeout=60)
    assert help_text.returncode == 0, help_text.stderr[-3000:]


def test_the_sdists_agent_tests_pass_with_the_installed_wheel(installed, rabbitmq):
    venv, unpacked = installed
    # The sdist's folders are tracer/, middleware/...: no commlens/ there, so
    # every `import commlens.*` in these tests reaches the installed wheel.
    assert not (unpacked / "commlens").exists()
    done = subprocess.run(
        [str(venv / "bin/pytest"), "-q", "-p", "no:cacheprovider", *AGENT_TESTS],
        cwd=unpacked, env=installed_env(venv), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert f"{len(AGENT_TESTS)} passed" in done.stdout, done.stdout[-3000:]
