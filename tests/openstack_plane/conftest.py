"""The real Nova control plane's fixtures (plane.py). These tests run under
``make test-openstack`` (scripts/test-openstack), which builds the services'
virtualenv and names it in COMMLENS_OPENSTACK_VENV; ``make test`` leaves them
out (a nova install is minutes of downloads and ~600 MB)."""

import os

import pytest

VENV = os.environ.get("COMMLENS_OPENSTACK_VENV")

if not VENV:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="module")
def plane(rabbitmq, tmp_path_factory):
    from openstack_plane.plane import Plane

    with Plane(VENV, tmp_path_factory.mktemp("nova")) as started:
        yield started


@pytest.fixture(scope="module")
def booted(plane):
    """One server booted with commlens on: (server id, request id, the server)."""
    server_id, request_id = plane.boot("booted")
    server = plane.wait_status(server_id, {"ACTIVE"})
    return server_id, request_id, server


@pytest.fixture
def venv():
    return VENV
