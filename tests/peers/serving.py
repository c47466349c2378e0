"""What every RPC peer does once it consumes: say READY, serve until SIGTERM."""

import signal
import time


def ready_until_sigterm():
    """Print READY, then return once the process is sent SIGTERM.

    It polls rather than blocking on a read of stdin: under eventlet that
    would stall the hub."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    print("READY", flush=True)
    while not stopping:
        time.sleep(0.1)
