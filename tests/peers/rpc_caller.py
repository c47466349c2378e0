"""A real oslo.messaging RPC client in its own process, driven line by line.

Run as ``python rpc_caller.py --url ... --topic ...``; prints READY, then
answers each command on stdin with one JSON line of ground truth:
- ``call N``: N sequential ``echo`` calls; {"made", "ok", "failed"}.
- ``cast N``: N ``count_cast`` casts; {"made", "ok", "failed"}.
- ``slow N SECONDS``: N concurrent calls of ``slow``; {"made", "ok", "failed"}.
- ``fail N ERROR``: N calls of ``fail`` raising ERROR; {"made", "ok", "failed"}.
- ``seen``: what the server says it ran: {"echoes", "casts"}.
- ``exit``: leaves at once, the way a CLI tool ends after its last call
  (commlens's exit hook is all that ships its last counts).
"""

import argparse
import json
import logging
import sys
import threading

import oslo_messaging as om
from oslo_config import cfg

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--topic", required=True)
parser.add_argument("--timeout", type=float, default=10)
parser.add_argument("--context", default="{}", help="the request context of every send (JSON)")
args = parser.parse_args()
ctxt = json.loads(args.context)
# As a service logs: INFO and up, each line naming its logger.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

cfg.CONF([], project="commlens-caller")
transport = om.get_rpc_transport(cfg.CONF, url=args.url)
client = om.get_rpc_client(transport, om.Target(topic=args.topic), timeout=args.timeout)


def drive(command, count, rest):
    result = {"made": 0, "ok": 0, "failed": {}}
    lock = threading.Lock()

    def one(send):
        try:
            send()
            outcome = "ok"
        except Exception as exc:
            outcome = type(exc).__name__
        with lock:
            result["made"] += 1
            if outcome == "ok":
                result["ok"] += 1
            else:
                result["failed"][outcome] = result["failed"].get(outcome, 0) + 1

    if command == "slow":
        seconds = float(rest[0])
        callers = [threading.Thread(target=one, args=(
            lambda: client.call(ctxt, "slow", seconds=seconds),)) for _ in range(count)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    elif command == "call":
        for index in range(count):
            one(lambda index=index: client.call(ctxt, "echo", value=index))
    elif command == "fail":
        for _ in range(count):
            one(lambda: client.call(ctxt, "fail", error=rest[0]))
    else:
        for _ in range(count):
            one(lambda: client.cast(ctxt, "count_cast"))
    return result


print("READY", flush=True)

for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "exit":
        sys.exit(0)
    if words[0] == "seen":
        print(json.dumps({"echoes": client.call({}, "echoes_seen"),
                          "casts": client.call({}, "casts_seen")}), flush=True)
        continue
    print(json.dumps(drive(words[0], int(words[1]), words[2:])), flush=True)
