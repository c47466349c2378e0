"""The journal: hop messages a collector took, kept on disk until every
trace they fed is stored in the history.

The intake acknowledges a delivery to the broker only once its message is
here (docs/architecture.md, "A hop is acknowledged once it is durable"), so
a collector killed with traces still open in its window (SIGKILL, the OOM
killer) reads them back at its next start instead of losing them.

Messages are appended to segment files in a directory beside the history
(``<history>.journal/``), many in one write, without fsync: a write is in
the operating system's hands when it returns, so it outlives the process,
not the machine. A record is a header (the message's number, its length)
and the message as received; a record cut short (a write the process died
in, a full disk) ends its segment. A segment is deleted once none of its
messages is needed any more; a new one starts past ``segment_bytes``, and
at each start, so a segment is only ever appended to by one process.

Numbers are the collector's, increasing across restarts (``next_number``).
Not thread-safe: the collector calls it under its journal lock.
"""

import os
import struct

SEGMENT_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct("<QI")  # the message's number, its body's length
_SUFFIX = ".hops"


class JournalError(Exception):
    """The journal's directory cannot be used; the message says which and why."""


class Journal:

    def __init__(self, directory, segment_bytes=SEGMENT_BYTES):
        self.directory = directory
        self.segment_bytes = segment_bytes
        try:
            os.makedirs(directory, exist_ok=True)
            self._found = self._segment_indexes()
            self.next_number = 1 + max(
                (number for index in self._found for number, _ in self._records(index)),
                default=0)
        except OSError as exc:
            raise JournalError(f"journal {directory!r}: {exc}") from None
        self._next_index = self._found[-1] + 1 if self._found else 1
        self._live = {}  # segment index -> how many of its messages are still needed
        self._where = {}  # message number -> its segment index
        self._current = None  # (index, file) being appended to
        self._current_size = 0

    def read(self):
        """(number, body) of every message the journal held at start, in the
        order they were written; each is needed until ``forget``."""
        for index in self._found:
            for number, body in self._records(index, bodies=True):
                self._where[number] = index
                self._live[index] = self._live.get(index, 0) + 1
                yield number, body
            if index not in self._live:
                self._unlink(index)
        self._found = []

    def append(self, messages):
        """Write [(number, body)] in one write. OSError if it fails; the
        segment is then closed, so whatever part was written ends it."""
        if not messages:
            return
        if self._current is None or self._current_size >= self.segment_bytes:
            self._close_current()
            index = self._next_index
            self._next_index += 1
            self._current = (index, open(self._path(index), "ab", buffering=0))
            self._current_size = 0
        index, file = self._current
        chunks = []
        for number, body in messages:
            if isinstance(body, str):
                body = body.encode()
            chunks += (_HEADER.pack(number, len(body)), body)
        payload = b"".join(chunks)
        unwritten = memoryview(payload)
        try:
            while unwritten:
                unwritten = unwritten[file.write(unwritten):]
        except OSError:
            self._close_current()
            raise
        self._current_size += len(payload)
        for number, _ in messages:
            self._where[number] = index
        self._live[index] = self._live.get(index, 0) + len(messages)

    def forget(self, numbers):
        """Messages no longer needed: a segment left with none is deleted."""
        for number in numbers:
            index = self._where.pop(number, None)
            if index is None:
                continue
            left = self._live[index] - 1
            if left:
                self._live[index] = left
                continue
            del self._live[index]
            if self._current is not None and self._current[0] == index:
                self._close_current()
            self._unlink(index)

    def __len__(self):
        """Messages still needed."""
        return len(self._where)

    def close(self):
        self._close_current()

    def _close_current(self):
        if self._current is not None:
            self._current[1].close()
            self._current = None

    def _path(self, index):
        return os.path.join(self.directory, "%010d%s" % (index, _SUFFIX))

    def _unlink(self, index):
        try:
            os.unlink(self._path(index))
        except FileNotFoundError:
            pass

    def _segment_indexes(self):
        return sorted(int(name[:-len(_SUFFIX)]) for name in os.listdir(self.directory)
                      if name.endswith(_SUFFIX) and name[:-len(_SUFFIX)].isdigit())

    def _records(self, index, bodies=False):
        """(number, body or None) of a segment's whole records."""
        with open(self._path(index), "rb") as file:
            while True:
                header = file.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return
                number, length = _HEADER.unpack(header)
                if bodies:
                    body = file.read(length)
                    if len(body) < length:
                        return
                else:
                    if file.seek(length, os.SEEK_CUR) > os.fstat(file.fileno()).st_size:
                        return
                    body = None
                yield number, body
