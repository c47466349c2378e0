"""A RabbitMQ node of the tests' own, for faults the shared broker must never see.

Tests that stop, alarm or block a broker start this node on other ports, with
its own node name, data and log folders and Erlang cookie (its HOME), so the
shared broker on 127.0.0.1:5672 is never touched. It uses the machine's
installed RabbitMQ (Debian's rabbitmq-server) and listens on loopback only.
"""

import os
import pathlib
import random
import shutil
import socket
import subprocess
import time

RABBITMQ_BIN = pathlib.Path("/usr/lib/rabbitmq/bin")


def _free_port():
    """A free port below the kernel's ephemeral range. While the node is
    stopped, clients retrying against an ephemeral port can connect to
    themselves (TCP simultaneous open) and hold it: the node then cannot
    listen again."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class RabbitNode:
    """One private node: start(), the faults, stop(). Ports are chosen free."""

    def __init__(self, base_dir, name="commlens-faults"):
        self.base = pathlib.Path(base_dir)
        self.node = f"{name}-{os.getpid()}@localhost"
        self.port = _free_port()
        self.management_port = _free_port()
        self.dist_port = _free_port()
        self.url = f"rabbit://guest:guest@127.0.0.1:{self.port}/"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @staticmethod
    def available():
        return (RABBITMQ_BIN / "rabbitmq-server").exists()

    def _env(self):
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.management_port}\n"
            # A memory alarm set by a test must not be undone by the node's
            # own periodic recheck before the test lifts it.
            "vm_memory_high_watermark.relative = 0.4\n")
        (self.base / "enabled_plugins").write_text(
            "[rabbitmq_management,rabbitmq_consistent_hash_exchange].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        return dict(
            os.environ,
            HOME=str(self.base),  # its own Erlang cookie, shared with rabbitmqctl below
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )

    def ctl(self, *args, timeout=60):
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def start(self, timeout=90):
        subprocess.run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"],
                       env=self._env(), check=True, timeout=30)
        try:
            # ``wait`` waits for the pid file, then for the app: ``await_startup``
            # fails at once while the node is not registered yet.
            self.ctl("wait", str(self.base / "pid"), "--timeout", str(timeout),
                     timeout=timeout + 10)
            self.wait_accepting(timeout)
        except BaseException:
            self.stop()  # never leave a node behind
            raise
        return self

    def wait_accepting(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.node} does not accept on {self.port}")
            time.sleep(0.2)

    # -- faults ------------------------------------------------------------

    def alarm_memory(self):
        """Raise the memory alarm: every publishing connection is blocked."""
        self.ctl("set_vm_memory_high_watermark", "0.0000001")

    def clear_memory_alarm(self):
        self.ctl("set_vm_memory_high_watermark", "0.4")

    def stop_app(self):
        self.ctl("stop_app")

    def start_app(self):
        self.ctl("start_app")
        self.wait_accepting()

    def stop(self):
        try:
            self.ctl("stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.base / "pid"
            if pid_file.exists():
                subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)
        shutil.rmtree(self.base / "mnesia", ignore_errors=True)
