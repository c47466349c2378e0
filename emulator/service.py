"""One part of the emulated control plane in a process of its own (demo over RabbitMQ).

    python -m commlens.emulator.service --group nova-control --transport rabbit://... \\
        --urls keystone=http://127.0.0.1:P,neutron-server=http://127.0.0.1:Q

Prints ``READY`` and the URLs of the REST services it runs, then serves until
SIGTERM, or until the demo that started it is gone (no orphans). Faults
arrive over an RPC fanout from the demo (``--faults-topic``), on a plain
transport: the fault control is the demo's, not part of what is observed.
"""

import argparse
import logging
import os
import signal
import sys
import threading
import uuid
import warnings

from commlens.emulator import controlplane
from commlens.emulator import faults as faults_mod


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", choices=controlplane.GROUPS, required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--urls", default="")
    parser.add_argument("--computes", type=int, default=4)
    parser.add_argument("--faults-topic", required=True)
    parser.add_argument("--fault", action="append", default=[])
    parser.add_argument("--truth-file", default=None,
                        help="write what this part really did here at exit "
                             "(emulator/truth.py; the fault soak reads it)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("oslo_messaging", "amqp", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    import oslo_messaging as om
    from oslo_config import cfg

    cfg.CONF([], project="commlens-demo", default_config_files=[])
    urls = dict(pair.split("=", 1) for pair in args.urls.split(",") if pair)
    plane = controlplane.ControlPlane(args.transport, computes=args.computes,
                                      groups=[args.group], urls=urls)
    plane.faults = faults_mod.Faults(on_change=plane.apply)
    for name in args.fault:
        plane.faults.set(name)
    plane.start()

    class FaultControl:
        def set_fault(self, ctxt, name, on):
            plane.faults.set(name, on)

    control = om.get_rpc_server(
        om.get_rpc_transport(cfg.CONF, url=args.transport),
        om.Target(topic=args.faults_topic, server=uuid.uuid4().hex),
        [FaultControl()], executor="threading")
    control.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # the demo stops us itself
    parent = os.getppid()
    print("READY", " ".join(f"{k}={v}" for k, v in plane.own_urls().items()), flush=True)
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break  # the demo died without stopping us
    control.stop()
    plane.stop()
    if args.truth_file:
        with open(args.truth_file, "w") as truth:
            truth.write(plane.truth.as_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
