"""The audit trail's pure part: one security event as one JSON line, and the check of a chain.

Each line is canonical JSON (sorted keys, ASCII, no spaces) ending in "\\n":

    {"event":"renewal","outcome":"ok","prev":"<sha256 hex>","seq":7,"time":"...Z","v":1,...}

`prev` is the SHA-256 of the previous line's bytes (without its newline); the first line ever
carries 64 zeros. `seq` counts up by one. So a removed, reordered, inserted or edited line breaks
the chain at the line after it, and `verify_chain` names that line. Rotation (`audit.jsonl` ->
`audit.jsonl.1` -> ...) keeps the chain: the first line of a new file carries the hash of the
last line of the file before it.

What a chain kept beside the agent cannot prove, and nothing here claims: that the newest lines
were not cut off, that the oldest rotated file was not deleted, or that someone able to write the
directory did not rewrite every line from some point on. `verify` prints the head (seq and
hash); a monitor that keeps it (the journal, the backend) turns those into detectable changes.

Events carry no secrets: values are short scalars, and a field whose name says it holds a
password, key material or a token is refused here (a programming error, raised as ValueError).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

VERSION = 1
GENESIS = "0" * 64
FILE_NAME = "audit.jsonl"
#: longest accepted line (a record is a few hundred bytes; an error message is cut to fit)
MAX_LINE_BYTES = 4096
MAX_TEXT = 400
_RESERVED = frozenset({"v", "seq", "time", "event", "prev"})
_SECRET_WORDS = ("password", "passwd", "secret", "token", "private", "key_blob", "auth_value")

Scalar = str | int | float | bool | None


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one line, without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _clean(name: str, value: Any) -> Scalar:
    lowered = name.lower()
    if name in _RESERVED or any(word in lowered for word in _SECRET_WORDS):
        raise ValueError(f"audit field {name!r} is reserved or names a secret")
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 3] + "..."
    raise ValueError(f"audit field {name!r}: {type(value).__name__} is not a short scalar")


def encode(event: str, fields: Mapping[str, Any], *, now: datetime, seq: int, prev: str) -> bytes:
    """One record as its line (newline included)."""
    record: dict[str, Any] = {k: _clean(k, v) for k, v in fields.items()}
    record.update(
        v=VERSION,
        seq=seq,
        time=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        event=event,
        prev=prev,
    )
    return (
        json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        + b"\n"
    )


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the next record carries `seq + 1` and `hash`."""

    seq: int
    hash: str


EMPTY = Head(seq=0, hash=GENESIS)


def parse(line: bytes) -> dict[str, Any]:
    """One line as a record, or ValueError saying what is wrong with it."""
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"longer than {MAX_LINE_BYTES} bytes")
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError("not a JSON record (torn by a power cut, or edited)") from e
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("v") != VERSION:
        raise ValueError(f"unknown record version {record.get('v')!r}")
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or seq < 1:
        raise ValueError("no valid seq")
    if not isinstance(prev, str) or len(prev) != 64:
        raise ValueError("no valid prev hash")
    if not isinstance(record.get("event"), str):
        raise ValueError("no event name")
    return record


def head_after(last_line: bytes | None) -> Head:
    """The head after `last_line` (None: an empty trail). A last line that is not a record (torn
    by a power cut) still chains: the next record carries its hash and a seq one past it."""
    if last_line is None:
        return EMPTY
    try:
        seq = int(parse(last_line)["seq"])
    except ValueError:
        seq = 0
    return Head(seq=seq, hash=line_hash(last_line))


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based, within `file`
    reason: str

    def describe(self) -> str:
        return f"{self.file}: line {self.line}: {self.reason}"


@dataclass(frozen=True)
class ChainReport:
    lines: int
    head: Head
    problem: Problem | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


def verify_chain(files: Sequence[tuple[str, bytes]]) -> ChainReport:
    """Check the trail: `files` as (name, content), oldest first (`audit.jsonl.N` ..
    `audit.jsonl`). The oldest file's first line may follow a deleted older file, so only the
    trail's very first record (seq 1) must carry the genesis hash."""
    head: Head | None = None
    count = 0
    for name, content in files:
        if content and not content.endswith(b"\n"):
            lines = content.split(b"\n")
            n = len(lines)
            return ChainReport(count, head or EMPTY, Problem(name, n, "torn last line"))
        for number, line in enumerate(content.split(b"\n")[:-1], start=1):
            try:
                record = parse(line)
            except ValueError as e:
                return ChainReport(count, head or EMPTY, Problem(name, number, str(e)))
            seq, prev = record["seq"], record["prev"]
            if head is None:
                if seq == 1 and prev != GENESIS:
                    return ChainReport(
                        count, EMPTY, Problem(name, number, "the first record has no genesis hash")
                    )
            elif prev != head.hash:
                return ChainReport(
                    count,
                    head,
                    Problem(
                        name,
                        number,
                        "prev is not the SHA-256 of the line before it (that line was edited, "
                        "or lines were removed, inserted or reordered here)",
                    ),
                )
            elif seq != head.seq + 1:
                return ChainReport(
                    count, head, Problem(name, number, f"seq {seq} follows seq {head.seq}")
                )
            head = Head(seq=seq, hash=line_hash(line))
            count += 1
    return ChainReport(count, head or EMPTY)
