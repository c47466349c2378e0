"""The ``commlens`` command's own edges: its version, and every error it can
meet before it runs (a bad option, a URL it cannot use, an address this
machine does not have) ends in one line on stderr and exit status 2, never a
traceback or a usage block."""

import importlib.metadata
import os
import socket
import subprocess
import sys

import pytest

PASSWORD = "Hunter2pw"


def commlens(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMMLENS_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "commlens.cli.main", *args],
                          capture_output=True, text=True, timeout=60, env=environment)


def test_version_is_the_installed_distributions():
    done = commlens("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"commlens {importlib.metadata.version('commlens')}"


def _address_of_this_machine(host):
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
        return True


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


# (arguments, environment, what the line must say). The collector's cases
# keep their history in memory: nothing is written, whatever they do.
NO_HISTORY = ("--history", ":memory:")
ERRORS = {
    "log level": (["--log-level", "LOUD", "graph"], {}, "'LOUD' is not a log level"),
    "log level from the environment": (["graph"], {"COMMLENS_LOG_LEVEL": "chatty"},
                                       "'chatty' is not a log level"),
    "export URL: unclosed bracket": (
        ["collector", *NO_HISTORY, "--export-url", f"amqp://nova:{PASSWORD}@[::1/"], {},
        "is not a valid URL"),
    "export URL: port": (
        ["collector", *NO_HISTORY, "--export-url", f"amqp://nova:{PASSWORD}@rabbit:ab/"], {},
        "is not a valid URL"),
    "export URL: scheme": (["collector", *NO_HISTORY, "--export-url", "kafka://rabbit/"], {},
                           "unknown scheme 'kafka'"),
    "export URL: not a URL": (["collector", *NO_HISTORY, "--export-url", "rabbit"], {},
                              "expected amqp://"),
    "export URL: pika refuses it": (
        ["collector", *NO_HISTORY, "--export-url",
         f"amqp://nova:{PASSWORD}@127.0.0.1:5672/?heartbeat=notanumber"], {},
        "not a valid AMQP URL"),
    "export URL from the environment": (
        ["collector", *NO_HISTORY],
        {"COMMLENS_EXPORT_URL": f"amqp://nova:{PASSWORD}@127.0.0.1/nova kafka://x/"},
        "unknown scheme 'kafka'"),
    "export URL given twice": (
        ["collector", *NO_HISTORY, "--export-url", f"amqp://nova:{PASSWORD}@rabbit/nova",
         "--export-url", f"amqp://nova:{PASSWORD}@rabbit/nova"], {}, "is given twice"),
    "listen: an address this machine lacks": (
        ["collector", *NO_HISTORY, "--listen", "10.255.255.1:9780"], {},
        "cannot listen on 10.255.255.1:9780: Cannot assign requested address"),
    "listen: a name that does not resolve": (
        ["collector", *NO_HISTORY, "--listen", "no-such-host.invalid:9780"], {},
        "cannot listen on no-such-host.invalid:9780"),
    "listen: not HOST:PORT": (["collector", *NO_HISTORY, "--listen", "9780"], {},
                              "expected HOST:PORT"),
    "history: a folder that cannot be made": (
        ["collector", "--listen", "127.0.0.1:0", "--history", "/proc/commlens/h.sqlite"], {},
        "history '/proc/commlens/h.sqlite'"),
    "queue TTL": (["collector", *NO_HISTORY, "--queue-ttl", "forever"], {}, "--queue-ttl"),
    "graph --top": (["graph", "--top", "0"], {}, "a whole number of at least 1"),
    "graph --sort": (["graph", "--sort", "size"], {}, "invalid choice: 'size'"),
    "no command": ([], {}, "the following arguments are required: command"),
    "unknown command": (["collect"], {}, "invalid choice: 'collect'"),
    "demo --listen": (["demo", "--listen", "10.255.255.1:9780", "--duration", "1"], {},
                      "cannot listen on 10.255.255.1:9780"),
}


@pytest.mark.parametrize("args, env, says", ERRORS.values(), ids=ERRORS)
def test_every_error_before_running_is_one_line_and_exit_2(args, env, says):
    if "10.255.255.1:9780" in args:
        assert not _address_of_this_machine("10.255.255.1"), "the test needs an absent address"
    done = commlens(*args, env=env)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("commlens"), lines
    assert says in lines[0]
    assert PASSWORD not in done.stderr


def test_a_port_in_use_is_one_line_and_exit_2(busy_port):
    done = commlens("collector", *NO_HISTORY, "--listen", f"127.0.0.1:{busy_port}")
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"commlens collector: cannot listen on 127.0.0.1:{busy_port}: Address already in use"]


def test_a_collector_that_cannot_be_reached_is_one_line_and_exit_1():
    """Not a usage error: the command was right, the collector is not there."""
    done = commlens("graph", "--collector", "http://127.0.0.1:9")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "commlens graph: cannot reach the collector at http://127.0.0.1:9: "
        "[Errno 111] Connection refused"]


def test_export_urls_from_one_value_split_on_spaces_and_on_commas_before_a_scheme():
    from commlens.exporters import intake

    value = ("amqp://nova:pa,ss@rabbit:5672/nova, amqp://neutron:pw@rabbit:5672/neutron\n"
             "  amqps://keystone:pw@rabbit:5671/keystone,memory://")
    assert intake.split_export_urls(value) == [
        "amqp://nova:pa,ss@rabbit:5672/nova", "amqp://neutron:pw@rabbit:5672/neutron",
        "amqps://keystone:pw@rabbit:5671/keystone", "memory://"]
    assert intake.split_export_urls("  ") == []
