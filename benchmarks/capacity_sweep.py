"""The capacity sweep: where the emulated control plane breaks as the fleet grows.

Runs ``commlens emulate --sweep 100,250,500,1000`` on a RabbitMQ node of its
own (tests/rabbit_node.py: 1,000 agents need about 1,450 open files, more
than the shared broker has), with the conductor as a small deployment runs
it (``--conductor-pool 8``, 50 ms of database per state report); then again
after the tuning change the first sweep advises (``--conductor-pool 64``),
compared with the first. Prints both tables, the verdicts and the
comparison; the JSON files and the plots go to ``--out``.

    python benchmarks/capacity_sweep.py [--sizes 100,250,500,1000] [--out artifacts/sweep]
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from rabbit_node import RabbitNode  # noqa: E402

from commlens.exporters import broker  # noqa: E402


def sweep(node, out, name, args, *extra):
    command = [sys.executable, "-m", "commlens.cli.main", "emulate",
               "--transport", node.url,
               "--rabbitmq-management-url",
               f"http://guest:guest@127.0.0.1:{node.management_port}/",
               "--sweep", args.sizes, "--processes", str(args.processes),
               "--interval", str(args.interval), "--duration", str(args.duration),
               "--processing", str(args.processing), "--listen", "127.0.0.1:19799",
               "--save", str(out / f"{name}.json"), "--plot", str(out / f"{name}.png"),
               *extra]
    subprocess.run(command, check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,250,500,1000")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--processing", type=float, default=0.05)
    parser.add_argument("--out", default="artifacts/sweep")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as base:
        node = RabbitNode(base, name="commlens-sweep-bench").start()
        try:
            # The management API (the broker's open files, queue depths)
            # starts a little after AMQP: emulate refuses 1,000 agents
            # while it cannot read the limit.
            management = f"http://guest:guest@127.0.0.1:{node.management_port}/"
            deadline = time.monotonic() + 120
            while broker.open_files_limit(management) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the node's management API did not answer")
                time.sleep(1)
            sweep(node, out, "before", args, "--conductor-pool", "8")
            sweep(node, out, "after", args, "--conductor-pool", "64",
                  "--compare", str(out / "before.json"))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
