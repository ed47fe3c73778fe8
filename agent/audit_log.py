"""The audit trail's writer and reader: hash-chained JSON lines (`agent.audit`) in a directory
reached through an `AppendStore` (hal.secure_dir.DirStore: nothing followed, nothing by path).

`AuditLog.record` appends one line with a single O_APPEND write and fsyncs it, under the
directory's `audit.lock` (the daemon, `enroll` and `renew` may write the same file). Before the
file would pass `max_bytes` it is rotated, `audit.jsonl` -> `audit.jsonl.1` -> ... ->
`audit.jsonl.<keep_files>` (the oldest dropped), and the new file's first line carries the hash
of the last line of the one before, so the chain runs across files.

A failing audit write never breaks the operation it records: the operation already happened
(a certificate is installed, a slot written), and failing it afterwards would lie about the
device's state and make an OTA client retry work that was done. The failure is logged once per
process as a warning naming the file, `record` returns False, and the operation's result stands.
Each record also goes to the log at INFO (the journal, for the daemon), as an outside witness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent import audit
from agent.audit import ChainReport, Head, verify_chain

if TYPE_CHECKING:
    from agent.clock import Clock
    from hal.interfaces import AppendStore

log = logging.getLogger(__name__)

LOCK_NAME = "audit.lock"
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_KEEP_FILES = 4


def _last_line(data: bytes) -> tuple[bytes | None, bool]:
    """(the last line of a file's tail, whether it is torn: no newline after it)."""
    if not data:
        return None, False
    if data.endswith(b"\n"):
        return data[:-1].rsplit(b"\n", 1)[-1], False
    return data.rsplit(b"\n", 1)[-1], True


class AuditLog:
    def __init__(
        self,
        *,
        store: AppendStore,
        clock: Clock,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep_files: int = DEFAULT_KEEP_FILES,
        name: str = audit.FILE_NAME,
    ) -> None:
        if keep_files < 1:
            raise ValueError("keep_files must be at least 1")
        self._store = store
        self._clock = clock
        self._max_bytes = max_bytes
        self._keep = keep_files
        self.name = name
        self._warned = False

    @property
    def where(self) -> str:
        return str(self._store.path(self.name))

    def files(self) -> list[str]:
        """The trail's file names, oldest first (those that may exist)."""
        return [f"{self.name}.{k}" for k in range(self._keep, 0, -1)] + [self.name]

    def record(self, event: str, fields: Mapping[str, Any] | None = None) -> bool:
        """Append one event; never raises (see the opening comment). True when written."""
        try:
            with self._store.lock(LOCK_NAME, holder="another devid-agent process writing audit"):
                line = self._append(event, dict(fields or {}))
        except Exception as e:  # the operation's result stands, whatever this is
            if not self._warned:
                self._warned = True
                log.warning("audit trail %s not written (%s); the operation stands", self.where, e)
            else:
                log.debug("audit trail %s not written: %s", self.where, e)
            return False
        log.info("audit: %s", line.decode("ascii").rstrip("\n"))
        return True

    def _head(self) -> tuple[Head, int, bool]:
        """(the chain's head, the current file's size, whether its last line is torn)."""
        window = audit.MAX_LINE_BYTES + 2
        tail = self._store.tail(self.name, max_bytes=window)
        if tail is not None and tail[0] > 0:
            line, torn = _last_line(tail[1])
            return audit.head_after(line), tail[0], torn
        # No current file (first record, or a crash right after a rotation): chain to the last
        # line of the newest rotated file.
        previous = self._store.tail(f"{self.name}.1", max_bytes=window)
        line = _last_line(previous[1])[0] if previous is not None else None
        return audit.head_after(line), 0, False

    def _append(self, event: str, fields: dict[str, Any]) -> bytes:
        head, size, torn = self._head()
        line = audit.encode(event, fields, now=self._clock.now(), seq=head.seq + 1, prev=head.hash)
        prefix = b"\n" if torn else b""  # end a torn line so the new record is a line of its own
        if size > 0 and size + len(prefix) + len(line) > self._max_bytes:
            self._rotate()
            prefix = b""
        self._store.append(self.name, prefix + line)
        return line

    def _rotate(self) -> None:
        for k in range(self._keep, 1, -1):
            self._store.rename(f"{self.name}.{k - 1}", f"{self.name}.{k}")
        self._store.rename(self.name, f"{self.name}.1")

    def verify(self) -> ChainReport:
        """Read every file of the trail (oldest first) and check the chain."""
        limit = max(self._max_bytes, DEFAULT_MAX_BYTES) * 4
        files: list[tuple[str, bytes]] = []
        for name in self.files():
            data = self._store.read(name, limit=limit)
            if data is not None:
                files.append((str(self._store.path(name)), data))
        return verify_chain(files)
