"""``commlens emulate``: the control plane's behaviour as the fleet of agents grows.

Starts a collector (unless ``--without-commlens``), the emulated control plane
and ``--agents`` agents multiplexed over ``--processes`` processes
(``commlens.emulator.scale``), all on a real RabbitMQ; measures a window of
``--duration`` seconds once everything is up, and reports RPC rates, reply
waits, timeouts, broker queue depths and open files, the conductor pool's
peak, commlens's own cost and the advice (exporters/advice_rules.py, and the
run's collector's ``/api/advice``). ``--sweep`` does so for each fleet size
in turn (emulator/sweep.py).
"""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid

DEFAULT_TRANSPORT = "rabbit://guest:guest@127.0.0.1:5672/"
# Broker file descriptors an emulated agent takes (1,000 agents measured
# about 1,200), and some for everything else.
OPEN_FILES_PER_AGENT = 1.25
OPEN_FILES_SPARE = 200
# What a broker whose limit cannot be read (no management API) is assumed to
# allow: RabbitMQ's packages start it with the usual soft limit of 1,024.
# Assuming more would let a large run exhaust the broker's files, which breaks
# it for every client until it is restarted; so an unreadable limit refuses
# any run that needs more than this.
OPEN_FILES_ASSUMED = 1024


def add_command(commands, listen_type, default_listen):
    emulate = commands.add_parser(
        "emulate", help="many emulated agents on a real RabbitMQ, for control-plane tuning")
    emulate.add_argument("--transport", default=DEFAULT_TRANSPORT,
                         help="rabbit://user:pw@host:5672/ (default the local broker)")
    emulate.add_argument("--agents", type=int, default=200, help="emulated agents (200)")
    emulate.add_argument("--processes", type=int, default=4,
                         help="processes the agents are spread over (4)")
    emulate.add_argument("--interval", type=float, default=10.0,
                         help="seconds between an agent's state reports (10)")
    emulate.add_argument("--duration", type=float, default=30.0,
                         help="seconds measured once every agent is up (30)")
    emulate.add_argument("--without-commlens", action="store_true",
                         help="plain rabbit:// transports and no collector")
    emulate.add_argument("--listen", type=listen_type, default=default_listen,
                         help=f"the collector's address (default {default_listen})")
    emulate.add_argument("--rabbitmq-management-url", default=None,
                         help="for queue depths (default: the broker's host, port 15672)")
    emulate.add_argument("--conductor-pool", type=int, default=0,
                         help="the emulated conductor's executor_thread_pool_size "
                              "(default: oslo.messaging's, 64)")
    emulate.add_argument("--processing", type=float, default=0.0,
                         help="seconds the emulated conductor spends on each state report "
                              "(its database; default 0)")
    emulate.add_argument("--sweep", type=_sizes, default=None,
                         help="run each fleet size in turn (e.g. 100,250,500,1000) and say "
                              "where reply waits grow and what saturates first")
    emulate.add_argument("--save", default="commlens-sweep.json",
                         help="with --sweep: every size's figures (default commlens-sweep.json)")
    emulate.add_argument("--plot", default="commlens-sweep.png",
                         help="with --sweep: the PNG plot (default commlens-sweep.png)")
    emulate.add_argument("--compare", default=None, metavar="BEFORE.json",
                         help="with --sweep: print the difference from an earlier sweep")
    emulate.add_argument("--json", action="store_true", help="print the report as JSON")
    emulate.set_defaults(run=run_emulate)


def _sizes(value):
    import argparse

    try:
        sizes = [int(size) for size in value.split(",") if size.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected agent counts, e.g. 100,250,500")
    return sorted(set(sizes))


def run_emulate(args):
    from commlens.tracer import urls

    sizes = args.sweep or [args.agents]
    if (not args.transport.startswith("rabbit://") or min(sizes) < 1
            or args.processes < 1):
        print("commlens emulate: needs --transport rabbit://..., --agents >= 1 and "
              "--processes >= 1", file=sys.stderr)
        return 2
    if args.compare and not args.sweep:
        print("commlens emulate: --compare needs --sweep", file=sys.stderr)
        return 2
    before = None
    if args.compare:
        from commlens.emulator import sweep
        try:
            before = sweep.load(args.compare)
        except (OSError, ValueError) as exc:
            print(f"commlens emulate: --compare: {exc}", file=sys.stderr)
            return 2
    parts = urllib.parse.urlsplit(args.transport)
    management = args.rabbitmq_management_url or urllib.parse.urlunsplit(
        ("http", f"{parts.netloc.rsplit(':', 1)[0] if parts.port else parts.netloc}:15672",
         "/", "", ""))
    refused = _open_files_refused(management, max(sizes))
    if refused:
        print(f"commlens emulate: {refused}", file=sys.stderr)
        return 2
    if args.sweep:
        return _run_sweep(args, sizes, management, before)
    report = _measure(args, args.agents, management)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, urls.redact(args.transport))
    return 0


def _open_files_refused(management, agents):
    """Why ``agents`` would be too many for the broker, or None.

    Each emulated agent holds its own broker connections, as a real one
    does (1,000 agents: about 1,200 open files on the broker). Past its
    limit RabbitMQ does not refuse them cleanly: queue declarations start
    timing out and the broker stays broken for everyone until restarted."""
    from commlens.exporters import broker
    from commlens.tracer import urls

    needed = int(OPEN_FILES_PER_AGENT * agents) + OPEN_FILES_SPARE
    limit = broker.open_files_limit(management)
    if limit is None and needed > OPEN_FILES_ASSUMED:
        return (f"{agents} agents need about {needed} open files on the broker, and its "
                f"limit could not be read from {urls.redact(management)} (is "
                "rabbitmq_management enabled? --rabbitmq-management-url); refusing more "
                f"than {OPEN_FILES_ASSUMED} without it")
    if limit is not None and limit < needed:
        return (f"RabbitMQ allows {limit} open files and {agents} agents need about "
                f"{needed}; raise the broker's limit (scripts/ensure-rabbitmq starts it with "
                "its hard limit) or emulate fewer agents")
    return None


def _measure(args, agents, management):
    """One run of ``agents`` agents: its report, with its advice."""
    from commlens.exporters import advice_rules
    from commlens.exporters import broker

    run = uuid.uuid4().hex[:8]
    parts = urllib.parse.urlsplit(args.transport)
    amqp = urllib.parse.urlunsplit(("amqp",) + tuple(parts[1:]))
    export_url = f"{amqp}{'&' if parts.query else '?'}exchange=commlens-emulate-{run}" \
                 f"&queue=commlens.emulate-{run}"
    env = dict(os.environ, COMMLENS_EXPORT_URL=export_url, COMMLENS_SHIP_INTERVAL="2")
    host, port = args.listen
    processes, collector = [], None
    started = time.monotonic()
    collector_advice = None
    try:
        if not args.without_commlens:
            collector = _start([sys.executable, "-m", "commlens.cli.main", "collector",
                                "--listen", f"{host}:{port}", "--export-url", export_url,
                                "--history", ":memory:",
                                # A collector of this run alone: nothing to warm
                                # up after (docs/architecture.md, "A collector restart is not
                                # a burst of traffic"); series are counted from
                                # its first snapshots.
                                "--metrics-warm-up", "0"], env, ready=False)
            _wait_http(f"http://{host}:{port}/readyz", collector)
        common = ["--transport", args.transport, "--agents", str(agents),
                  "--interval", str(args.interval)]
        if args.without_commlens:
            common.append("--plain")
        scale = [sys.executable, "-m", "commlens.emulator.scale"]
        processes.append(_start(scale + ["--role", "control", "--conductor-pool",
                                          str(args.conductor_pool), "--processing",
                                          str(args.processing)] + common, env))
        per = -(-agents // args.processes)
        agent_processes = [_start(scale + ["--role", "agents", "--first", str(first),
                                           "--count", str(min(per, agents - first))] + common,
                                  env, ready=False)
                           for first in range(0, agents, per)]
        processes += agent_processes
        for process in agent_processes:
            _await_ready(process)
        startup = time.monotonic() - started
        _mark(processes)  # the window starts
        watcher = broker.QueueWatcher(management, poll_seconds=1.0)
        depth = _watch_queues(watcher, args.duration)
        open_files = broker.open_files(management)
        _mark(processes)  # the window ends
        metrics_text = _get(f"http://{host}:{port}/metrics") if collector else ""
        if collector:
            collector_advice = json.loads(_get(
                f"http://{host}:{port}/api/advice?window={max(1, round(args.duration))}s"))
        collector_cost = _cost(collector.pid) if collector else None
    finally:
        # Agents first: their last reports still find the control plane up.
        results = _stop(processes[1:]) + _stop(processes[:1])
        if collector is not None:
            _stop([collector], parse=False)
    report = _report(args, agents, results, depth, metrics_text, collector_cost, startup)
    report["broker_open_files"] = open_files
    report["advice"] = advice_rules.emulated_run(report) + (
        collector_advice["findings"] if collector_advice else [])
    return report


def _run_sweep(args, sizes, management, before):
    from commlens.emulator import sweep

    runs = []
    for agents in sizes:
        print(f"commlens emulate: {agents} agents...", file=sys.stderr, flush=True)
        runs.append(_measure(args, agents, management))
    settings = {"processes": args.processes, "interval": args.interval,
                "duration": args.duration, "commlens": not args.without_commlens,
                "conductor_pool": args.conductor_pool or None, "processing": args.processing}
    document = sweep.document(runs, settings)
    with open(args.save, "w") as out:
        json.dump(document, out, indent=2)
    sweep.plot(document, args.plot)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_sweep(document, args)
    if before is not None:
        _print_comparison(*sweep.compare(before, document), args.compare)
    return 0


def _start(command, env, ready=True):
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL,
                               env=env, text=True, start_new_session=True)
    if ready:
        _await_ready(process)
    return process


def _mark(processes):
    for process in processes:
        process.stdin.write("mark\n")
        process.stdin.flush()


def _await_ready(process):
    line = process.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"an emulator process did not start ({process.poll()})")


def _wait_http(url, process, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the collector exited")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the collector did not become ready")


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _watch_queues(watcher, seconds):
    """Max ready messages on the control plane's queues while measuring."""
    from commlens.emulator import scale

    depth = {scale.CONDUCTOR: 0, scale.PLUGIN: 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if watcher.poll():
            for queue in depth:
                ready = watcher.queues().get(queue, {}).get("ready", 0)
                depth[queue] = max(depth[queue], ready)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return depth if watcher.up else None


def _cost(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return {"cpu_seconds": cpu, "rss_mib": rss / 1024}


def _stop(processes, parse=True):
    for process in processes:
        if process.poll() is None:
            process.terminate()
    results = []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        if parse:
            for line in (out or "").splitlines():
                if line.startswith("{"):
                    results.append(json.loads(line))
    return results


def _quantile(q, buckets, bounds):
    total = sum(buckets)
    if not total:
        return None
    running = 0
    for count, bound in zip(buckets, list(bounds) + [float("inf")], strict=True):
        running += count
        if running >= q * total:
            return bound
    return None


def _report(args, fleet, results, depth, metrics_text, collector_cost, startup):
    control = next((r for r in results if r["role"] == "control"), None)
    agents = [r for r in results if r["role"] == "agents"]
    seconds = (control or {}).get("window_seconds") or args.duration
    handled = sum((control or {"counts": {}})["counts"].get(k, 0)
                  for k in ("compute_node_update", "report_state"))
    counts = {}
    buckets = None
    for result in agents:
        for key, value in result["counts"].items():
            counts[key] = counts.get(key, 0) + value
        buckets = result["buckets"] if buckets is None else [
            a + b for a, b in zip(buckets, result["buckets"], strict=True)]
    bounds = agents[0]["bounds"] if agents else []
    series = [line for line in metrics_text.splitlines() if line and not line.startswith("#")]
    return {
        "agents": fleet, "processes": args.processes, "interval": args.interval,
        "commlens": not args.without_commlens, "startup_seconds": round(startup, 1),
        "window_seconds": round(seconds, 1),
        "control_plane_rpc_per_second": handled / seconds if seconds else 0.0,
        "agents_seen_by_control_plane": (control or {}).get("hosts", 0),
        "reports_ok": counts.get("report_ok", 0),
        "report_timeouts": counts.get("report_timeout", 0),
        "report_errors": counts.get("report_error", 0),
        "reports_skipped": counts.get("report_skipped", 0),
        "reply_wait_p50_seconds": _quantile(0.5, buckets or [], bounds),
        "reply_wait_p99_seconds": _quantile(0.99, buckets or [], bounds),
        "max_queue_ready": depth,
        "conductor_pool": (control or {}).get("conductor_pool"),
        "agent_cpu_seconds": round(sum(r["cpu_seconds"] for r in agents), 1),
        "collector": collector_cost,
        "prometheus_series": len(series) if metrics_text else None,
        "series_with_host_labels": sum(1 for line in series if "host-" in line),
    }


def _print(report, transport):
    from rich.console import Console
    from rich.table import Table

    from commlens.cli import advise

    table = Table(title=f"commlens emulate: {report['agents']} agents over "
                        f"{report['processes']} processes on {transport}, "
                        f"commlens {'on' if report['commlens'] else 'off'}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if key == "advice":
            continue
        if isinstance(value, float):
            value = f"{value:,.3f}"
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)
    advise.show_findings(Console(), report.get("advice") or [], "Advice")


def _print_sweep(document, args):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from commlens.dashboards import formatting
    from commlens.emulator import sweep

    console = Console()
    table = Table(title=f"commlens emulate --sweep: {args.processes} processes, reports "
                        f"every {args.interval:g}s, {args.duration:g}s measured per size")
    for column in ("agents", "rpc/s", "p50", "p99", "timeouts", "skipped", "pool peak",
                   "queue", "broker files", "findings"):
        table.add_column(column, justify="right")
    for run in document["runs"]:
        used = sweep.utilisation(run)
        files = run.get("broker_open_files")
        table.add_row(
            str(run["agents"]), formatting.number(run["control_plane_rpc_per_second"]),
            formatting.duration(run["reply_wait_p50_seconds"]),
            formatting.duration(run["reply_wait_p99_seconds"]),
            str(run["report_timeouts"]), str(run["reports_skipped"]),
            "-" if used["conductor pool"] is None else formatting.percent(used["conductor pool"]),
            str(max((run.get("max_queue_ready") or {}).values(), default="-")),
            f"{files['used']}/{files['total']}" if files else "-", str(len(run["advice"])))
    console.print(table)
    for run in document["runs"]:
        for finding in run["advice"]:
            console.print(escape(f"at {run['agents']} agents, {finding['severity']} "
                                 f"{finding['rule']}: {finding['finding']}; change "
                                 f"{finding['option'] or '-'} "
                                 f"on {', '.join(finding['set_on']) or '-'}"))
    console.print(sweep.describe(document["verdict"]) + f". Saved to {args.save}, plot in "
                  f"{args.plot}.")


def _print_comparison(rows, before, after, path):
    from rich.console import Console
    from rich.table import Table

    from commlens.dashboards import formatting
    from commlens.emulator import sweep

    console = Console()
    table = Table(title=f"Compared with {path}")
    for column in ("agents", "figure", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "figure" else "right")

    def shown(value):
        return "-" if value is None else formatting.number(value)
    for agents, label, old, new, change in rows:
        table.add_row(str(agents), label, shown(old), shown(new),
                      "-" if change is None else ("+" if change > 0 else "") + shown(change))
    console.print(table)
    console.print(f"before: {sweep.describe(before or {})}")
    console.print(f"after:  {sweep.describe(after or {})}")
