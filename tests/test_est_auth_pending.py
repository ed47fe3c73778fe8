"""Basic credentials from a private file; the persisted 202 request."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.errors import ConfigError, StorageError
from agent.est.auth import load_basic_credentials
from agent.est.pending import PendingRequest, PendingStore


def password_file(tmp_path: Path, mode: int, text: str = "s3cret\n") -> Path:
    path = tmp_path / "est-password"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_password_file_is_read(tmp_path: Path, mode: int) -> None:
    creds = load_basic_credentials("dev", password_file(tmp_path, mode))
    assert creds is not None
    assert creds.password == "s3cret"
    assert creds.header() == "Basic ZGV2OnMzY3JldA=="
    assert "s3cret" not in repr(creds)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_readable_password_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = password_file(tmp_path, mode)
    with pytest.raises(ConfigError, match=f"est.password_file {path}: mode 0{mode:o}"):
        load_basic_credentials("dev", path)


def test_password_config_mistakes(tmp_path: Path) -> None:
    assert load_basic_credentials("", None) is None
    with pytest.raises(ConfigError, match="set together"):
        load_basic_credentials("dev", None)
    with pytest.raises(ConfigError, match="cannot open"):
        load_basic_credentials("dev", tmp_path / "missing")
    with pytest.raises(ConfigError, match="empty"):
        load_basic_credentials("dev", password_file(tmp_path, 0o600, "\n"))


def test_pending_request_round_trips_in_a_private_file(tmp_path: Path) -> None:
    store = PendingStore(path=tmp_path / "state" / "est-pending.json")
    assert store.load() is None
    request = PendingRequest(
        operation="simpleenroll",
        key_store="tpm",
        key_blob=b"-----BEGIN TSS2 PRIVATE KEY-----\n...",
        reused_key=False,
        csr_der=b"\x30\x00",
        proof_of_possession=True,
        created=datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc),
        retry_at=datetime(2026, 11, 23, 12, 5, tzinfo=timezone.utc),
        attempts=1,
    )
    store.save(request)
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert store.load() == request
    store.clear()
    assert store.load() is None
    store.clear()  # idempotent


def test_corrupt_pending_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "est-pending.json"
    path.write_text("{not json")
    with pytest.raises(StorageError, match=f"{path}: unreadable pending EST request"):
        PendingStore(path=path).load()


GOOD = (
    b'{"format": 1, "operation": "simpleenroll", "key_store": "tpm", "key_blob": "", '
    b'"reused_key": false, "csr": "", "proof_of_possession": false, '
    b'"created": "2026-11-23T12:00:00+00:00", "retry_at": "2026-11-23T12:05:00+00:00", '
    b'"attempts": ATTEMPTS}'
)


@pytest.mark.parametrize(
    "data",
    [
        b"[]",  # JSON, but not an object
        b'"text"',
        b"\xff\xfe",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit
        GOOD.replace(b"ATTEMPTS", b"1e999"),  # infinity: int() overflows
        GOOD.replace(b"ATTEMPTS", b"1").replace(b"simpleenroll", b"simpleenrol"),
        GOOD.replace(b"ATTEMPTS", b"1").replace(b"+00:00", b""),  # no time zone
        GOOD.replace(b"ATTEMPTS", b"1").replace(b'"csr": ""', b'"csr": "***"'),
    ],
)
def test_any_corrupt_pending_file_is_a_storage_error_naming_it(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "est-pending.json"
    path.write_bytes(data)
    with pytest.raises(StorageError, match=f"^{path}: ") as info:
        PendingStore(path=path).load()
    assert "\n" not in str(info.value)
    assert path.read_bytes() == data  # kept for the operator to look at


def test_good_pending_file_for_the_corrupt_variants_loads(tmp_path: Path) -> None:
    path = tmp_path / "est-pending.json"
    path.write_bytes(GOOD.replace(b"ATTEMPTS", b"1"))
    request = PendingStore(path=path).load()
    assert request is not None and request.operation == "simpleenroll"
