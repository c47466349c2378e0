"""The control plane at 1,000 agents, with commlens and without, in one run.

Runs ``commlens emulate`` twice on the local RabbitMQ with the same fleet:
1,000 agents over 4 processes, each sending a state report (call) and a
resource update (cast) every second, which is more than this 2-core
machine's control plane can answer, so the rate it reaches is its capacity.
Prints that rate with and without commlens (the ratio), the reply waits, the
collector's CPU and memory and the number of Prometheus series.

    python benchmarks/emulate_scale.py [--agents 1000] [--duration 30]
"""

import argparse
import json
import subprocess
import sys


def emulate(args, *extra):
    done = subprocess.run(
        [sys.executable, "-m", "commlens.cli.main", "emulate", "--agents", str(args.agents),
         "--processes", str(args.processes), "--interval", str(args.interval),
         "--duration", str(args.duration), "--json", *extra],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args()
    off = emulate(args, "--without-commlens")
    on = emulate(args)
    print(f"{args.agents} agents over {args.processes} processes, a report every "
          f"{args.interval:g} s, {args.duration:g} s measured")
    for name, report in (("without commlens", off), ("with commlens", on)):
        print(f"  {name:17s} control plane {report['control_plane_rpc_per_second']:7.1f} RPC/s"
              f"  reply wait p50 {report['reply_wait_p50_seconds']} s"
              f" p99 {report['reply_wait_p99_seconds']} s"
              f"  timeouts {report['report_timeouts']}  skipped {report['reports_skipped']}"
              f"  agents seen {report['agents_seen_by_control_plane']}")
    ratio = on["control_plane_rpc_per_second"] / off["control_plane_rpc_per_second"]
    print(f"ratio with/without commlens: {ratio:.3f}")
    collector = on["collector"]
    print(f"collector: {collector['cpu_seconds']:.1f} s CPU over the run, "
          f"{collector['rss_mib']:.0f} MiB RSS; Prometheus series: {on['prometheus_series']} "
          f"({on['series_with_host_labels']} with a host label)")


if __name__ == "__main__":
    main()
