"""Soak: the emulated control plane over RabbitMQ, a fault every minute, exact counts.

    python benchmarks/fault_soak.py [--minutes 10] [--fault-every 60]

Runs the emulated control plane (emulator/: keystone, neutron, nova-api,
-conductor, -scheduler, -compute, agents; each group a process of its own)
on a RabbitMQ node of its own (tests/rabbit_node.py: never the shared broker
on 5672), with a collector process and the demo's users. Every
``--fault-every`` seconds one fault, in turn: the broker restarted
(stop_app/start_app), a memory alarm, the collector killed and started
again, the nova-control process frozen with SIGSTOP.

At the end the parts stop (each writes what it really did: emulator/truth.py)
and every counter the collector exports is compared with that ground truth:
RPC sent by (service, topic, method, kind), RPC received by (service, topic,
method), REST requests by service. Prints the totals, every mismatch, what
commlens counted as lost, and the collector's memory. Exits 1 on a mismatch.
"""

import argparse
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import common  # noqa: E402  (benchmarks/ is the script's own folder)
from rabbit_node import RabbitNode  # noqa: E402

from commlens.emulator import controlplane  # noqa: E402
from commlens.emulator import workload as workload_mod  # noqa: E402
from commlens.tracer import metrics  # noqa: E402

FAULTS = ("broker-restart", "memory-alarm", "collector-restart", "server-freeze")
SHIP_INTERVAL = "1"


class Soak:

    def __init__(self, node, workdir):
        self.node = node
        self.workdir = workdir
        self.export_url = (f"{node.amqp_url}?exchange=commlens-soak&queue=commlens-soak")
        self.env = dict(os.environ, COMMLENS_EXPORT_URL=self.export_url,
                        COMMLENS_SHIP_INTERVAL=SHIP_INTERVAL, COMMLENS_HOP_SAMPLE_RATIO="0.01")
        self.collector = None
        self.collector_url = None
        self.groups = {}
        self.faults_done = collections.Counter()

    # -- processes -----------------------------------------------------------

    def start_collector(self):
        port = common.free_port()
        self.collector_url = f"http://127.0.0.1:{port}"
        log = open(self.workdir / "collector.log", "a")
        self.collector = subprocess.Popen(
            [sys.executable, "-m", "commlens.cli.main", "collector", "--listen",
             f"127.0.0.1:{port}", "--export-url", self.export_url,
             "--history", str(self.workdir / "history.sqlite")],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.collector_url + "/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the collector did not get ready; see collector.log")

    def stop_collector(self):
        self.collector.terminate()
        self.collector.wait(30)

    def start_plane(self):
        urls = {}
        for group in controlplane.GROUPS:
            command = [sys.executable, "-m", "commlens.emulator.service", "--group", group,
                       "--transport", self.node.url, "--faults-topic", "commlens-soak-faults",
                       "--truth-file", str(self.workdir / f"truth-{group}.json"),
                       "--urls", ",".join(f"{k}={v}" for k, v in urls.items())]
            log = open(self.workdir / f"{group}.log", "w")
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=self.env,
                                     text=True)
            words = child.stdout.readline().split()
            if not words or words[0] != "READY":
                raise RuntimeError(f"{group} did not start; see {group}.log")
            urls.update(word.split("=", 1) for word in words[1:])
            self.groups[group] = child
        return urls["nova-api"]

    def stop_plane(self):
        for child in reversed(list(self.groups.values())):
            child.send_signal(signal.SIGTERM)
        for group, child in self.groups.items():
            if child.wait(60) != 0:
                raise RuntimeError(f"{group} exited with {child.returncode}")

    # -- faults ----------------------------------------------------------------

    def inject(self, fault):
        print(f"  {time.strftime('%H:%M:%S')} fault: {fault}", flush=True)
        if fault == "broker-restart":
            self.node.stop_app()
            time.sleep(10)
            self.node.start_app()
        elif fault == "memory-alarm":
            self.node.alarm_memory()
            time.sleep(20)
            self.node.clear_memory_alarm()
        elif fault == "collector-restart":
            self.stop_collector()
            time.sleep(10)
            self.start_collector()
        elif fault == "server-freeze":
            frozen = self.groups["nova-control"]
            os.kill(frozen.pid, signal.SIGSTOP)
            time.sleep(12)
            os.kill(frozen.pid, signal.SIGCONT)
        self.faults_done[fault] += 1

    # -- comparing -------------------------------------------------------------

    def scrape(self):
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(self.collector_url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
                for s in family.samples]

    def counted(self, samples):
        sent, received, http = (collections.Counter(), collections.Counter(),
                                collections.Counter())
        for name, labels, value in samples:
            if name == metrics.RPC_SENT.name:
                sent[(labels["service"], labels["target"], labels["method"],
                      labels["kind"])] += value
            elif name == metrics.RPC_RECEIVED.name:
                received[(labels["service"], labels["target"], labels["method"])] += value
            elif name == metrics.HTTP_REQUESTS.name:
                http[labels["service"]] += value
        return sent, received, http

    def truth(self):
        sent, received, http = (collections.Counter(), collections.Counter(),
                                collections.Counter())
        for group in self.groups:
            for row in json.loads((self.workdir / f"truth-{group}.json").read_text()):
                side, key, value = row[0], tuple(row[1:-1]), row[-1]
                {"sent": sent, "received": received, "http": http}[side][
                    key if side != "http" else key[0]] += value
        return sent, received, http

    def settled_scrape(self, timeout=90):
        """A scrape once the counts stop moving (the last snapshots are in)."""
        previous, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.scrape()
            counts = self.counted(samples)
            if counts == previous:
                return samples
            previous = counts
            time.sleep(3 * float(SHIP_INTERVAL))
        return samples

    def collector_memory(self):
        status = pathlib.Path(f"/proc/{self.collector.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return fields["VmRSS"].strip(), fields["VmHWM"].strip()


def _compare(what, truth, counted):
    mismatches = [(key, truth.get(key, 0), counted.get(key, 0))
                  for key in sorted(set(truth) | set(counted), key=str)
                  if truth.get(key, 0) != counted.get(key, 0)]
    print(f"{what:<14} made {sum(truth.values()):>9,.0f}   counted "
          f"{sum(counted.values()):>9,.0f}   series {len(truth):>4}   "
          f"mismatched series {len(mismatches)}")
    for key, made, seen in mismatches[:20]:
        print(f"    {key}: made {made:g}, counted {seen:g}")
    return mismatches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=60.0)
    parser.add_argument("--users", type=int, default=8)
    args = parser.parse_args()

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="commlens-soak-"))
    node = RabbitNode(workdir / "rabbit", name="commlens-soak")
    print(f"fault soak: {args.minutes:g} min, a fault every {args.fault_every:g} s; "
          f"logs in {workdir}", flush=True)
    node.start()
    soak = Soak(node, workdir)
    try:
        soak.start_collector()
        nova_api = soak.start_plane()
        users = workload_mod.Workload(nova_api, users=args.users)
        users.start()
        started = time.monotonic()
        end = started + args.minutes * 60
        for index in range(10 ** 6):
            next_fault = started + (index + 1) * args.fault_every
            if next_fault >= end:
                break
            time.sleep(max(0.0, next_fault - time.monotonic()))
            soak.inject(FAULTS[index % len(FAULTS)])
        time.sleep(max(0.0, end - time.monotonic()))
        users.stop()
        soak.stop_plane()
        samples = soak.settled_scrape()
        truth, counted = soak.truth(), soak.counted(samples)
        print()
        mismatches = []
        for what, made, seen in zip(("RPC sent", "RPC received", "REST requests"),
                                    truth, counted, strict=True):
            mismatches += _compare(what, made, seen)
        losses = collections.Counter()
        for name, labels, value in samples:
            if name in ("commlens_agent_records_dropped_total", "commlens_collector_lost_total"):
                losses[(name, labels.get("reason"), labels.get("what"))] += value
            elif name == "commlens_agent_ship_failures_total":
                losses[(name, None, None)] += value
        print("losses and failures commlens counted:")
        for (name, reason, what), value in sorted(losses.items(), key=str):
            detail = ", ".join(f"{k}={v}" for k, v in (("what", what), ("reason", reason)) if v)
            print(f"    {name}{{{detail}}} {value:g}")
        rss, peak = soak.collector_memory()
        print(f"faults: {dict(soak.faults_done)}")
        print(f"collector RSS {rss} (peak {peak})")
        print("counts exact" if not mismatches else f"{len(mismatches)} series NOT exact")
        return 1 if mismatches else 0
    finally:
        for child in soak.groups.values():
            if child.poll() is None:
                child.kill()
        if soak.collector is not None and soak.collector.poll() is None:
            soak.collector.terminate()
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
