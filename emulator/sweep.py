"""A capacity sweep: ``commlens emulate --sweep 100,250,500,1000`` read as a whole.

Each size is one ``commlens emulate`` run (cli/emulate.py); this module says
what the runs mean together:

- where reply waits start to grow: the first size whose p99 reply wait is
  ``GROWTH_FACTOR`` times the smallest size's and ``MIN_GROWTH_SECONDS``
  longer, or whose state reports time out or are skipped;
- which part saturates first, and at which size: the conductor's executor
  pool (its peak handlers in flight against its size), its queue (the most
  messages ready, as seconds of the offered load) or the broker (its open
  files against their limit); if none does, the one closest to it;
- the advice at each step (exporters/advice_rules.py, and the run
  collector's ``/api/advice``).

A sweep is kept as one JSON document (``SWEEP_FORMAT``) and drawn as a PNG
(matplotlib, the ``plot`` extra); ``compare`` prints how a second sweep (after
a tuning change) differs from a first.
"""

import json

SWEEP_FORMAT = "commlens.sweep/1"
GROWTH_FACTOR = 2.0
# The emulator's percentiles are bucket bounds (emulator/scale.py): one
# bucket up is not growth.
MIN_GROWTH_SECONDS = 0.2
# A part is saturated from this share of its capacity.
SATURATED = 0.9
# The conductor's queue: more than this many seconds of offered reports ready.
QUEUE_BACKLOG_SECONDS = 1.0
PARTS = ("conductor pool", "conductor queue", "broker files")


def utilisation(run):
    """{part: share of its capacity used, 0..} of one run; None where unknown."""
    pool = run.get("conductor_pool") or {}
    queues = run.get("max_queue_ready")
    files = run.get("broker_open_files")
    offered = run["agents"] / run["interval"] if run["interval"] else 0.0
    queue = None
    if queues is not None and offered:
        backlog = max(queues.values(), default=0) / offered
        queue = backlog / QUEUE_BACKLOG_SECONDS * SATURATED
    return {
        "conductor pool": (pool["peak_in_flight"] / pool["size"]) if pool.get("size") else None,
        "conductor queue": queue,
        "broker files": (files["used"] / files["total"]) if files else None,
    }


def analyse(runs):
    """The verdicts of a sweep: {"waits_grow_at", "saturates_first", "closest"}."""
    runs = sorted(runs, key=lambda r: r["agents"])
    verdict = {"waits_grow_at": None, "saturates_first": None, "closest": None}
    if not runs:
        return verdict
    first = runs[0].get("reply_wait_p99_seconds")
    for run in runs:
        p99 = run.get("reply_wait_p99_seconds")
        late = run.get("report_timeouts", 0) + run.get("reports_skipped", 0)
        grew = (first is not None and p99 is not None and p99 >= GROWTH_FACTOR * first
                and p99 - first >= MIN_GROWTH_SECONDS)
        if grew or late:
            verdict["waits_grow_at"] = run["agents"]
            break
    for run in runs:
        used = utilisation(run)
        full = [part for part in PARTS if used[part] is not None and used[part] >= SATURATED]
        if full:
            part = max(full, key=lambda p: used[p])
            verdict["saturates_first"] = {"part": part, "agents": run["agents"],
                                          "utilisation": used[part]}
            break
    used = utilisation(runs[-1])
    known = [part for part in PARTS if used[part] is not None]
    if known:
        part = max(known, key=lambda p: used[p])
        verdict["closest"] = {"part": part, "agents": runs[-1]["agents"],
                              "utilisation": used[part]}
    return verdict


def document(runs, settings):
    """The JSON kept of a sweep: its settings, every size's run, the verdicts."""
    runs = sorted(runs, key=lambda r: r["agents"])
    return {"format": SWEEP_FORMAT, "settings": settings, "runs": runs,
            "verdict": analyse(runs)}


def load(path):
    with open(path) as source:
        data = json.load(source)
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path}: not a sweep saved by commlens emulate --sweep")
    return data


# Figures compared between two sweeps, size by size: (key, label, better when lower).
COMPARED = (("control_plane_rpc_per_second", "rpc/s", False),
            ("reply_wait_p50_seconds", "p50 wait s", True),
            ("reply_wait_p99_seconds", "p99 wait s", True),
            ("report_timeouts", "timeouts", True),
            ("reports_skipped", "skipped", True))


def compare(before, after):
    """Rows of (agents, label, before, after, change) for the sizes both swept,
    and the two verdicts."""
    earlier = {run["agents"]: run for run in before["runs"]}
    rows = []
    for run in after["runs"]:
        old = earlier.get(run["agents"])
        if old is None:
            continue
        for key, label, _lower in COMPARED:
            a, b = old.get(key), run.get(key)
            change = None if a is None or b is None else b - a
            rows.append((run["agents"], label, a, b, change))
        a, b = (utilisation(old)["conductor pool"], utilisation(run)["conductor pool"])
        rows.append((run["agents"], "pool peak", a, b,
                     None if a is None or b is None else b - a))
    return rows, before.get("verdict"), after.get("verdict")


def describe(verdict):
    """One sentence of a sweep's verdicts."""
    grow = verdict.get("waits_grow_at")
    first = verdict.get("saturates_first")
    closest = verdict.get("closest")
    text = (f"reply waits start to grow at {grow} agents" if grow
            else "reply waits do not grow over the sizes swept")
    if first:
        text += (f"; the {first['part']} saturates first, at {first['agents']} agents "
                 f"({first['utilisation']:.0%})")
    elif closest:
        text += (f"; nothing saturates: the closest is the {closest['part']} "
                 f"({closest['utilisation']:.0%} at {closest['agents']} agents)")
    return text


def plot(sweep, path):
    """A PNG of the sweep: reply waits and the parts' utilisation by size."""
    import logging

    import matplotlib
    matplotlib.use("Agg")  # no display: a file
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from matplotlib import pyplot

    runs = sweep["runs"]
    agents = [run["agents"] for run in runs]
    figure, (waits, used) = pyplot.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, label in (("reply_wait_p50_seconds", "p50"), ("reply_wait_p99_seconds", "p99")):
        waits.plot(agents, [run.get(key) or 0.0 for run in runs], marker="o", label=label)
    waits.set_ylabel("state report reply wait (s)")
    waits.set_title("commlens emulate --sweep: " + describe(sweep["verdict"]), fontsize=9,
                    wrap=True)
    waits.legend()
    waits.grid(alpha=0.3)
    for part in PARTS:
        values = [utilisation(run)[part] for run in runs]
        if any(v is not None for v in values):
            used.plot(agents, [100 * (v or 0.0) for v in values], marker="o", label=part)
    used.axhline(100 * SATURATED, color="grey", linestyle="--", linewidth=1)
    used.set_ylabel("share of capacity used (%)")
    used.set_xlabel("emulated agents")
    used.legend()
    used.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
