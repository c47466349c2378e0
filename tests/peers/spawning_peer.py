"""An RPC server whose cast handler spawns work that calls back, as nova-compute's
``build_and_run_instance`` does: ``python spawning_peer.py --url ... --topic ...
--executor threading|eventlet``; prints READY once it consumes.

``spawn_and_call(how, topic)`` is a cast: it hands the work to another
thread of control in the way ``how`` names and returns at once; the work
then calls ``called_back(how=how, run=n)`` on ``topic`` (the test's own RPC
server), with the cast's context as nova passes its RequestContext on.
"""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--topic", required=True)
parser.add_argument("--executor", default="threading", choices=("threading", "eventlet"))
parser.add_argument("--loop-window", type=float, default=None,
                    help="propagation.LOOP_INHERIT_SECONDS for this process")
args = parser.parse_args()

if args.executor == "eventlet":
    import eventlet
    eventlet.monkey_patch()
    import eventlet.greenpool  # noqa: E402

import _thread  # noqa: E402
import concurrent.futures  # noqa: E402
import functools  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

import futurist  # noqa: E402
import oslo_messaging as om  # noqa: E402
from oslo_config import cfg  # noqa: E402
from serving import ready_until_sigterm  # noqa: E402

if args.executor == "eventlet":
    # oslo.service's default backend is eventlet's (its threading backend
    # needs cotyledon, which the tests do not install).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from oslo_service import loopingcall  # noqa: E402

cfg.CONF([], project="commlens-spawning-peer")
# The agent is enabled here, with its transport: eventlet and oslo.service
# are already imported, as in a service.
transport = om.get_rpc_transport(cfg.CONF, url=args.url)

from commlens.tracer import propagation  # noqa: E402

if args.loop_window is not None:
    propagation.LOOP_INHERIT_SECONDS = args.loop_window

if args.executor == "eventlet":
    green_pool = eventlet.greenpool.GreenPool()
    executor = futurist.GreenThreadPoolExecutor(max_workers=4)
else:
    executor = futurist.ThreadPoolExecutor(max_workers=4)
stdlib_executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)


def utils_spawn(func, *f_args, **f_kwargs):
    """nova.utils.spawn's shape: a wrapper that restores the request's
    context in the new thread of control, handed to the default executor
    (eventlet.spawn under eventlet)."""
    @functools.wraps(func)
    def context_wrapper(*w_args, **w_kwargs):
        return func(*w_args, **w_kwargs)
    if args.executor == "eventlet":
        return eventlet.spawn(context_wrapper, *f_args, **f_kwargs)
    return executor.submit(context_wrapper, *f_args, **f_kwargs)


class Endpoint:
    def __init__(self):
        self.loops = []

    def spawn_and_call(self, ctxt, how, topic, runs=1, interval=0.2):
        client = om.get_rpc_client(transport, om.Target(topic=topic))

        def work(run=1):
            client.call(ctxt, "called_back", how=how, run=run)

        if how == "thread":
            threading.Thread(target=work).start()
        elif how == "timer":
            threading.Timer(0.01, work).start()
        elif how == "concurrent.futures":
            stdlib_executor.submit(work)
        elif how == "futurist":
            executor.submit(work)
        elif how == "utils.spawn":
            utils_spawn(work)
        elif how == "eventlet.spawn":
            eventlet.spawn(work)
        elif how == "eventlet.spawn_n":
            eventlet.spawn_n(work)
        elif how == "eventlet.spawn_after":
            eventlet.spawn_after(0.01, work)
        elif how == "greenpool.spawn":
            green_pool.spawn(work)
        elif how == "greenpool.spawn_n":
            green_pool.spawn_n(work)
        elif how == "looping_call":
            self._loop(work, runs, interval)
        elif how == "raw_thread":
            # Not patched: the work starts a trace of its own, and only the
            # request id joins it to the cast's.
            _thread.start_new_thread(work, ())
        else:
            raise ValueError(how)

    def _loop(self, work, runs, interval):
        """An oslo.service looping call, as periodic tasks run on: calls back
        on each run, ``runs`` times."""
        done = []

        def run_once():
            done.append(1)
            work(len(done))
            if len(done) >= runs:
                raise loopingcall.LoopingCallDone()

        loop = loopingcall.FixedIntervalLoopingCall(run_once)
        self.loops.append(loop)
        loop.start(interval=interval)


server = om.get_rpc_server(transport, om.Target(topic=args.topic, server="spawner"),
                           [Endpoint()], executor=args.executor,
                           serializer=om.NoOpSerializer())
server.start()
try:
    ready_until_sigterm()
finally:
    server.stop()
    server.wait()
    transport.cleanup()
