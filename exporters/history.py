"""The collector's searchable history: closed traces and their chains, in SQLite.

Embedded, one file, bounded by age and by number of traces, and it survives
a collector restart. ``:memory:`` keeps it in memory (tests, the demo).

Only the collector's own thread touches the connection (the sweeper writes,
API requests read under the same lock): SQLite's own locking is not needed
and a single connection keeps writes batched in one transaction.
"""

import json
import logging
import os
import sqlite3
import threading
import time

from commlens.exporters import chains as chains_mod

LOG = logging.getLogger(__name__)

DEFAULT_MAX_AGE_SECONDS = 24 * 3600
DEFAULT_MAX_TRACES = 200000
EXAMPLES_PER_CHAIN = 3
# A request id joins at most this many traces (the most recent ones).
MAX_JOINED_TRACES = 64
# A stored chain's time: when its error happened, else when its trace closed.
_CHAIN_AT = "coalesce(tc.at, tc.seen)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    seen REAL NOT NULL,            -- collector's wall clock when it (re)closed
    start REAL, duration REAL,
    entry_service TEXT, entry_operation TEXT,
    failed INTEGER NOT NULL,
    hops TEXT NOT NULL             -- JSON list of hops
);
CREATE INDEX IF NOT EXISTS traces_seen ON traces (seen);
CREATE TABLE IF NOT EXISTS request_ids (
    request_id TEXT NOT NULL, trace_id TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (request_id, trace_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS request_ids_seen ON request_ids (seen);
CREATE TABLE IF NOT EXISTS chains (
    chain_key TEXT PRIMARY KEY,
    chain TEXT NOT NULL            -- JSON of the chain's shape (first example)
);
CREATE TABLE IF NOT EXISTS trace_chains (
    trace_id TEXT NOT NULL, chain_key TEXT NOT NULL, seen REAL NOT NULL,
    request_id TEXT,
    at REAL,                       -- when the error happened: the origin hop's end
    PRIMARY KEY (trace_id, chain_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trace_chains_key_seen ON trace_chains (chain_key, seen);
CREATE INDEX IF NOT EXISTS trace_chains_seen ON trace_chains (seen);
"""


class HistoryError(Exception):
    """The history file cannot be opened; the message says which and why."""


class History:

    def __init__(self, path=":memory:", max_age_seconds=DEFAULT_MAX_AGE_SECONDS,
                 max_traces=DEFAULT_MAX_TRACES, clock=time.time):
        self.path = path
        self.max_age_seconds = max_age_seconds
        self.max_traces = max_traces
        self._clock = clock
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _add_missing_columns(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise HistoryError(f"history {path!r}: {exc}") from None

    def close(self):
        with self._lock:
            self._db.close()

    # -- writing (the collector's sweeper) --------------------------------

    def load(self, trace_ids):
        """{trace_id: hops} of the given traces already in the history."""
        found = {}
        ids = list(trace_ids)
        with self._lock:
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                rows = self._db.execute(
                    "SELECT trace_id, hops FROM traces WHERE trace_id IN (%s)"
                    % ",".join("?" * len(batch)), batch)
                for trace_id, hops in rows:
                    found[trace_id] = json.loads(hops)
        return found

    def save(self, records):
        """Store closed traces: [(trace_id, hops, chains)], replacing earlier versions."""
        if not records:
            return
        now = self._clock()
        trace_rows, request_rows, chain_rows, trace_chain_rows = [], [], [], []
        for trace_id, hops, chains in records:
            entry = _entry_hop(hops)
            starts = [h["start"] for h in hops if isinstance(h.get("start"), (int, float))]
            ends = [h["start"] + (h.get("duration") or 0) for h in hops
                    if isinstance(h.get("start"), (int, float))]
            start = min(starts) if starts else None
            trace_rows.append((
                trace_id, now, start, (max(ends) - start) if starts else None,
                entry.get("service") if entry else None,
                entry.get("operation") if entry else None,
                1 if any(h.get("error") is not None for h in hops) else 0,
                _encode(hops)))
            for request_id in {h.get(k) for h in hops
                               for k in ("request_id", "global_request_id")} - {None}:
                request_rows.append((request_id, trace_id, now))
            for chain in chains:
                chain_rows.append((chain["key"], _encode(chain)))
                trace_chain_rows.append((trace_id, chain["key"], now,
                                         _entry_request_id(chain), _chain_time(chain)))
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                db.executemany("DELETE FROM trace_chains WHERE trace_id = ?",
                               [(r[0],) for r in trace_rows])
                db.executemany("INSERT OR REPLACE INTO traces VALUES (?,?,?,?,?,?,?,?)",
                               trace_rows)
                db.executemany("INSERT OR REPLACE INTO request_ids VALUES (?,?,?)",
                               request_rows)
                db.executemany("INSERT OR IGNORE INTO chains VALUES (?,?)", chain_rows)
                db.executemany("INSERT OR REPLACE INTO trace_chains "
                               "(trace_id, chain_key, seen, request_id, at) VALUES (?,?,?,?,?)",
                               trace_chain_rows)
                db.execute("COMMIT")
            except sqlite3.Error:
                db.execute("ROLLBACK")
                raise

    def prune(self):
        """Forget traces older than max_age or beyond max_traces; returns how many."""
        with self._lock:
            db = self._db
            cutoff = self._clock() - self.max_age_seconds
            (count,) = db.execute("SELECT count(*) FROM traces").fetchone()
            if count > self.max_traces:
                (nth,) = db.execute("SELECT seen FROM traces ORDER BY seen DESC "
                                    "LIMIT 1 OFFSET ?", (self.max_traces,)).fetchone()
                cutoff = max(cutoff, nth)
            db.execute("BEGIN")
            removed = db.execute("DELETE FROM traces WHERE seen <= ?", (cutoff,)).rowcount
            db.execute("DELETE FROM request_ids WHERE seen <= ?", (cutoff,))
            db.execute("DELETE FROM trace_chains WHERE seen <= ?", (cutoff,))
            db.execute("DELETE FROM chains WHERE chain_key NOT IN "
                       "(SELECT DISTINCT chain_key FROM trace_chains)")
            db.execute("COMMIT")
        return removed

    # -- reading (the API) -------------------------------------------------

    def trace(self, trace_or_request_id):
        """A trace by its id; by a request id, the whole request: every trace
        that carries it (as request_id or global_request_id), joined.

        Work a service does for a request continues its trace
        (tracer/propagation.py), but a request can still span traces: a
        caller commlens does not see, a hop that started before the agent
        was enabled, work handed over in a way not patched. The request id
        is what those traces share. Hops come entry first (the earliest hop
        with no parent among them: nova-api's REST request), then by start
        time; ``trace_id`` is the entry's trace, ``trace_ids`` all of them
        in the same order. Ties are broken by ids, so the answer does not
        depend on the order traces closed in.
        """
        with self._lock:
            row = self._db.execute("SELECT trace_id FROM traces WHERE trace_id = ?",
                                   (trace_or_request_id,)).fetchone()
            if row is not None:
                trace_ids, request_id = [row[0]], None
            else:
                request_id = trace_or_request_id
                trace_ids = [t for (t,) in self._db.execute(
                    "SELECT trace_id FROM request_ids WHERE request_id = ? "
                    "ORDER BY seen DESC, trace_id LIMIT ?", (request_id, MAX_JOINED_TRACES))]
            marks = ",".join("?" * len(trace_ids))
            rows = self._db.execute(
                "SELECT trace_id, seen, hops FROM traces WHERE trace_id IN (%s)" % marks,
                trace_ids).fetchall()
            if not rows:
                return None
            keys = {}  # chain key -> the traces that have it
            for t, k in self._db.execute(
                    "SELECT trace_id, chain_key FROM trace_chains WHERE trace_id IN (%s)"
                    % marks, trace_ids):
                keys.setdefault(k, []).append(t)
            stored = {k: json.loads(c) for k, c in self._db.execute(
                "SELECT chain_key, chain FROM chains WHERE chain_key IN (%s)"
                % ",".join("?" * len(keys)), list(keys))}
        # Each trace's chains with its own hops (the stored shape holds the
        # hops of the first trace that had it: another request's).
        by_trace = {t: json.loads(encoded) for t, _, encoded in rows}
        chains = {}
        for t, trace_hops in sorted(by_trace.items()):
            for chain in chains_mod.derive(trace_hops):
                if t in keys.get(chain["key"], ()):
                    chains.setdefault(chain["key"], chain)
        for key, chain in stored.items():
            # Stored by an earlier release whose shapes differ: as stored.
            chains.setdefault(key, chain)
        hops = [h for trace_hops in by_trace.values() for h in trace_hops]
        found = join(hops, max(seen for _, seen, _ in rows), [t for t, _, _ in rows])
        rank = {t: i for i, t in enumerate(found["trace_ids"])}
        found["chains"] = [shape(chains[k]) for k in sorted(
            chains, key=lambda k: (min(rank.get(t, len(rank)) for t in keys[k]), k))]
        if request_id is not None:
            found["request_id"] = request_id
        return found

    def chains(self, since_seconds=900, limit=50, absorbed=None):
        """Chains of the last ``since_seconds``, grouped by shape, most frequent first.

        A chain's time is when its error happened (the end of its origin
        hop, as the hop's own process clocked it), not when the collector
        closed its trace, several seconds later; the collector's time
        stands in for chains stored before hops' times were kept.
        """
        since = self._clock() - since_seconds
        with self._lock:
            rows = self._db.execute(
                "SELECT tc.chain_key, count(*), min(%(at)s), max(%(at)s), c.chain "
                "FROM trace_chains tc JOIN chains c ON c.chain_key = tc.chain_key "
                "WHERE %(at)s >= ? GROUP BY tc.chain_key "
                "ORDER BY count(*) DESC, max(%(at)s) DESC" % {"at": _CHAIN_AT},
                (since,)).fetchall()
            groups = []
            for key, count, first, last, chain in rows:
                chain = shape(json.loads(chain))
                if absorbed is not None and chain["absorbed"] != absorbed:
                    continue
                examples = self._db.execute(
                    "SELECT trace_id, request_id FROM trace_chains tc "
                    "WHERE chain_key = ? AND %(at)s >= ? ORDER BY %(at)s DESC LIMIT ?"
                    % {"at": _CHAIN_AT}, (key, since, EXAMPLES_PER_CHAIN)).fetchall()
                chain.update(count=count, first_seen=first, last_seen=last,
                             examples=[{"trace_id": t, "request_id": r} for t, r in examples])
                groups.append(chain)
                if len(groups) >= limit:
                    break
        return groups

    def now(self):
        """The history's clock: chains' times are on it."""
        return self._clock()

    def size(self):
        with self._lock:
            return self._db.execute("SELECT count(*) FROM traces").fetchone()[0]


_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _number(value):
    return value if isinstance(value, (int, float)) else 0.0


def join(hops, seen, trace_ids):
    """The answer for hops of one or more traces (``History.trace``, and
    replicas' answers joined, exporters/fleet.py), without its chains:
    hops entry first, then by start time, ties broken by ids; ``trace_ids``
    in the order their first hop comes, then those with no hop."""
    entry = _entry_hop(hops)
    hops = sorted(hops, key=lambda h: (h is not entry, _number(h.get("start")),
                                       str(h.get("trace_id")), str(h.get("span_id"))))
    order = []  # trace ids, in the order their first hop comes
    for hop in hops:
        if hop.get("trace_id") not in order:
            order.append(hop.get("trace_id"))
    order += sorted(t for t in trace_ids if t not in order)
    starts = [h["start"] for h in hops if isinstance(h.get("start"), (int, float))]
    ends = [h["start"] + _number(h.get("duration")) for h in hops
            if isinstance(h.get("start"), (int, float))]
    return {"trace_id": order[0], "trace_ids": order, "seen": seen,
            # The request the entry served: what the trace is about.
            "entry_request_id": (entry.get("request_id") or entry.get("global_request_id")
                                 if entry else None),
            "start": min(starts) if starts else None,
            "duration": (max(ends) - min(starts)) if starts else None,
            "hops": hops, "chains": []}


def _entry_hop(hops):
    """The hop with no parent among ``hops`` (the earliest such, a server's
    before a client's at the same time, then the longest), if any."""
    spans = {h.get("span_id") for h in hops}
    roots = [h for h in hops if h.get("parent_id") not in spans]
    return min(roots, default=None, key=lambda h: (
        _number(h.get("start")), h.get("side") != "server", -_number(h.get("duration")),
        str(h.get("trace_id")), str(h.get("span_id"))))


def _chain_time(chain):
    """When the chain's error happened: the end of its origin hop, or None."""
    origin = chain["hops"][0] if chain.get("hops") else {}
    start = origin.get("start")
    if not isinstance(start, (int, float)):
        return None
    return start + _number(origin.get("duration"))


def _add_missing_columns(db):
    """A history file written by an earlier release: add what it lacks."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(trace_chains)")}
    if "at" not in columns:
        db.execute("ALTER TABLE trace_chains ADD COLUMN at REAL")


def _entry_request_id(chain):
    for step in reversed(chain["hops"]):
        if step.get("request_id"):
            return step["request_id"]
    return None


def shape(chain):
    """A chain as stored: its shape, and the hops (durations, request ids) of
    the first trace that had it; every trace keeps its own in ``trace()``."""
    return {"key": chain["key"], "origin": chain["origin"], "entry": chain["entry"],
            "absorbed": chain["absorbed"], "hops": chain["hops"]}
