"""Signed commands (issue 11, item 4): every refusal code with a real signed envelope, the ok
case of each command and scheme, the replay memory on a real private directory (restart,
bound, damage, clock set back), the insecure path, the responses, and the operator's tools
(contrib/sign-command, plain `openssl dgst`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from pytest_mock import MockerFixture

from agent.commands import (
    CODES,
    COMMANDS,
    Command,
    CommandLimits,
    CommandRefused,
    ReplayMemory,
    accepted_event,
    accepted_response,
    refused_event,
    refused_response,
    verify_command,
)
from agent.commands import replay as replay_mod
from agent.commands.signer import COMMAND_SIGNING
from agent.errors import AgentError, StorageError
from hal.secure_dir import DirStore
from tests.conftest import ROOT
from tests.support.ca import TestCA, key_pem, pem, utcnow
from tests.support.command_signer import (
    CommandPki,
    b64,
    payload,
    unsigned_envelope,
)

DEVICE = "gw-0001"
NOW = utcnow().replace(microsecond=0)
SIGN_COMMAND = ROOT / "contrib" / "sign-command"


@pytest.fixture(scope="module")
def pki() -> CommandPki:
    return CommandPki()


@pytest.fixture
def memory(tmp_path: Path) -> ReplayMemory:
    return ReplayMemory(store=DirStore(tmp_path / "state"))


def verify(
    raw: bytes,
    pki: CommandPki,
    memory: ReplayMemory,
    *,
    now: dt.datetime = NOW,
    limits: CommandLimits | None = None,
    insecure_unsigned: bool = False,
) -> Command:
    return verify_command(
        raw,
        device_id=DEVICE,
        anchors=[pki.root.cert],
        now=now,
        replay=memory,
        limits=limits or CommandLimits(),
        insecure_unsigned=insecure_unsigned,
    )


def refused(raw: bytes, pki: CommandPki, memory: ReplayMemory, **kw: object) -> CommandRefused:
    with pytest.raises(CommandRefused) as info:
        verify(raw, pki, memory, **kw)  # type: ignore[arg-type]
    error = info.value
    assert "\n" not in str(error) and error.code in CODES
    return error


def signed(pki: CommandPki, **kw: object) -> bytes:
    fields: dict[str, object] = {"device": DEVICE, "issued_at": NOW, **kw}
    return pki.signer.envelope(payload(**fields))  # type: ignore[arg-type]


# -- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_accepted_when_signed(
    command: str, pki: CommandPki, memory: ReplayMemory
) -> None:
    cmd = verify(signed(pki, command=command, command_id=f"c-{command}"), pki, memory)
    assert (cmd.id, cmd.command, cmd.device, cmd.args) == (f"c-{command}", command, DEVICE, {})
    assert cmd.signer is not None and cmd.signer.subject == "CN=command signer ec-p256"
    assert [c.subject for c in cmd.signer.path][-1] == pki.root.cert.subject
    assert cmd.expires_at - cmd.issued_at == dt.timedelta(minutes=5) and not cmd.unsigned


@pytest.mark.parametrize(("kind", "alg"), [("ec-p384", "ES384"), ("rsa-2048", "PS256"),
                                           ("rsa-2048", "RS256")])  # fmt: skip
def test_every_accepted_scheme(kind: str, alg: str, pki: CommandPki, memory: ReplayMemory) -> None:
    signer = pki.make_signer(kind)
    raw = signer.envelope(payload(device=DEVICE, issued_at=NOW), alg=alg)
    assert verify(raw, pki, memory).signer is not None


def test_a_signer_directly_under_the_root_and_an_anchor_among_several(
    pki: CommandPki, memory: ReplayMemory
) -> None:
    signer = pki.make_signer(issuer=pki.root)
    raw = signer.envelope(payload(device=DEVICE, issued_at=NOW))
    other = TestCA(name="another root")
    cmd = verify_command(raw, device_id=DEVICE, anchors=[other.cert, pki.root.cert], now=NOW,
                         replay=memory)  # fmt: skip
    assert cmd.signer is not None and len(cmd.signer.path) == 2


def test_clock_skew_is_tolerated_both_ways(pki: CommandPki, memory: ReplayMemory) -> None:
    ahead = signed(pki, issued_at=NOW + dt.timedelta(minutes=4))  # the backend's clock is ahead
    assert verify(ahead, pki, memory).id
    late = signed(pki, lifetime=dt.timedelta(minutes=1))  # expired a minute ago, within skew
    assert verify(late, pki, memory, now=NOW + dt.timedelta(minutes=2)).id


# -- refused before parsing, while parsing -----------------------------------------------------


def test_oversized_is_refused_before_parsing(pki: CommandPki, memory: ReplayMemory) -> None:
    limits = CommandLimits(max_envelope_bytes=1024)
    big = signed(pki, command_id="big", args={"x": "y" * 2000})
    error = refused(big, pki, memory, limits=limits)
    assert error.code == "oversized" and error.command_id is None
    assert refused(b"[" * 20000, pki, memory).code == "oversized"  # not even looked at


def test_deep_nesting_is_malformed_not_a_crash(pki: CommandPki, memory: ReplayMemory) -> None:
    assert refused(b"[" * 3000 + b"]" * 3000, pki, memory).code == "malformed"
    deep = pki.signer.envelope(b'{"v":1,"args":' + b"[" * 3000 + b"]" * 3000 + b"}")
    error = refused(deep, pki, memory, limits=CommandLimits(max_payload_bytes=8000,
                                                            max_envelope_bytes=32000))  # fmt: skip
    assert error.code == "malformed" and "nested deeper than 2" in str(error)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v":2,"payload":"e30="}', "version 2 is not supported"),
        (b'{"v":true,"payload":"e30="}', "no integer version"),
        (b'{"v":1,"payload":"e30=","sig":"AA=="}', "has keys"),
        (b'{"v":1,"payload":"e30","x":1}', "has keys"),
        (b'{"v":1,"payload":"e30"}', "not base64"),
        (b'{"v":1,"payload":"e31="}', "not canonical base64"),
        (b'{"v":1,"v":1,"payload":"e30="}', "duplicate key"),
        (b'{"v":1' + b"0" * 40 + b',"payload":"e30="}', "more than 32 characters"),
        (b'{"v":NaN,"payload":"e30="}', "NaN is not a JSON number"),
    ],
)
def test_malformed_envelopes(raw: bytes, why: str, pki: CommandPki, memory: ReplayMemory) -> None:
    error = refused(raw, pki, memory, insecure_unsigned=True)
    assert error.code == "malformed" and why in str(error), str(error)


def test_malformed_signed_parts(pki: CommandPki, memory: ReplayMemory) -> None:
    data = payload(device=DEVICE, issued_at=NOW)
    cases = {
        "alg": pki.signer.envelope(data, alg="ES256K"),
        "chain": pki.signer.envelope(data, chain=[]),
        "chain[0]": pki.signer.envelope(data, chain=[b64(b"\x30\x03\x02\x01\x01")]),
    }
    for what, raw in cases.items():
        error = refused(raw, pki, memory)
        assert error.code == "malformed" and what in str(error), str(error)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"id": "-starts-with-dash"}, "payload id"),
        ({"id": "x" * 65}, "payload id"),
        ({"issued_at": "2026-12-01 12:00:00"}, "issued_at must be a UTC time"),
        ({"expires_at": "2026-13-01T12:00:00Z"}, "not a valid time"),
        ({"device": ""}, "payload device"),
        ({"args": []}, "args must be a JSON object"),
        ({"v": 2}, "version 2"),
        ({"extra": 1}, "has keys"),
    ],
)
def test_malformed_signed_payloads(
    fields: dict[str, object], why: str, pki: CommandPki, memory: ReplayMemory
) -> None:
    table = {**json.loads(payload(device=DEVICE, issued_at=NOW)), **fields}
    raw = pki.signer.envelope(json.dumps(table).encode())
    error = refused(raw, pki, memory)
    assert error.code == "malformed" and why in str(error), str(error)


def test_a_signed_payload_with_a_duplicate_key_is_refused(
    pki: CommandPki, memory: ReplayMemory
) -> None:
    # a backend's parser might keep the first "command", ours the last: neither is believed
    data = payload(device=DEVICE, issued_at=NOW, command="ping")
    data = data[:-1] + b',"command":"renew"}'
    error = refused(pki.signer.envelope(data), pki, memory)
    assert error.code == "malformed" and "duplicate key 'command'" in str(error)


def test_expires_before_issued_is_malformed(pki: CommandPki, memory: ReplayMemory) -> None:
    raw = signed(pki, lifetime=dt.timedelta(0))
    assert "not after issued_at" in str(refused(raw, pki, memory))


# -- unsigned ----------------------------------------------------------------------------------


def test_unsigned_is_refused_without_the_insecure_flag(
    pki: CommandPki, memory: ReplayMemory, caplog: pytest.LogCaptureFixture
) -> None:
    raw = unsigned_envelope(payload(device=DEVICE, issued_at=NOW, command_id="u-1"))
    error = refused(raw, pki, memory)
    assert (error.code, error.command_id, error.security) == ("unsigned", "u-1", True)
    assert memory.load().ids() == frozenset()  # nothing remembered


def test_unsigned_with_the_insecure_flag_warns_each_time(
    pki: CommandPki, memory: ReplayMemory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.commands")
    for n in range(2):
        raw = unsigned_envelope(payload(device=DEVICE, issued_at=NOW, command_id=f"u-{n}"))
        cmd = verify(raw, pki, memory, insecure_unsigned=True)
        assert cmd.unsigned and cmd.signer is None and cmd.id == f"u-{n}"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("INSECURE" in r.getMessage() for r in warnings)
    # the other checks still apply, and so does the replay memory
    again = unsigned_envelope(payload(device=DEVICE, issued_at=NOW, command_id="u-0"))
    assert refused(again, pki, memory, insecure_unsigned=True).code == "replayed"
    other = unsigned_envelope(payload(device="gw-9", issued_at=NOW))
    assert refused(other, pki, memory, insecure_unsigned=True).code == "wrong_device"


def test_the_insecure_flag_never_skips_a_signature_that_is_there(
    pki: CommandPki, memory: ReplayMemory
) -> None:
    data = payload(device=DEVICE, issued_at=NOW)
    raw = pki.signer.envelope(data, signature=b"\x30\x06\x02\x01\x01\x02\x01\x01")
    assert refused(raw, pki, memory, insecure_unsigned=True).code == "bad_signature"


# -- signature and signer ----------------------------------------------------------------------


def test_a_tampered_payload_byte_is_a_bad_signature(pki: CommandPki, memory: ReplayMemory) -> None:
    data = payload(device=DEVICE, issued_at=NOW, command="status", command_id="t-1")
    good = json.loads(pki.signer.envelope(data))
    tampered = data.replace(b'"status"', b'"renew"')
    raw = json.dumps({**good, "payload": b64(tampered)}).encode()
    error = refused(raw, pki, memory)
    assert error.code == "bad_signature" and error.command_id == "t-1"  # the claimed id
    for i in range(len(data)):  # any one byte
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        raw = json.dumps({**good, "payload": b64(flipped)}).encode()
        assert refused(raw, pki, memory).code == "bad_signature"


def test_an_alg_that_does_not_fit_the_key(pki: CommandPki, memory: ReplayMemory) -> None:
    data = payload(device=DEVICE, issued_at=NOW)
    error = refused(pki.signer.envelope(data, alg="ES384"), pki, memory)
    assert error.code == "bad_signature" and "does not fit" in str(error)
    rsa_signer = pki.make_signer("rsa-2048")
    signature = json.loads(rsa_signer.envelope(data, alg="PS256"))["sig"]
    raw = rsa_signer.envelope(data, alg="RS256", signature=base64.b64decode(signature))
    assert refused(raw, pki, memory).code == "bad_signature"  # PSS bytes are not PKCS #1 v1.5


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("code-signing-eku", "lacks the command-signing extended key usage"),
        ("no-eku", "lacks the command-signing extended key usage"),
        ("any-eku", "lacks the command-signing extended key usage"),
        ("no-key-usage", "needs a keyUsage with digitalSignature"),
        ("ca", "is a CA certificate"),
        ("other-ca", "does not chain to a command trust anchor"),
        ("expired", "expired at"),
        ("ed25519", "key type commands may not be signed with"),
        ("rsa-1024", "key type commands may not be signed with"),
        ("eku-limited-intermediate", "restricts its extendedKeyUsage"),
    ],
)
def test_untrusted_signers(case: str, why: str, pki: CommandPki, memory: ReplayMemory) -> None:
    make = pki.make_signer
    signer = {
        "code-signing-eku": lambda: make(eku=[ExtendedKeyUsageOID.CODE_SIGNING]),
        "no-eku": lambda: make(eku=[]),
        "any-eku": lambda: make(eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]),
        "no-key-usage": lambda: make(key_usage=False),
        "ca": lambda: make(ca=True),
        "other-ca": lambda: CommandPki().signer,
        "expired": lambda: make(not_before=NOW - dt.timedelta(days=40)),
        "ed25519": lambda: make("ed25519"),
        "rsa-1024": lambda: make("rsa-1024"),
        "eku-limited-intermediate": lambda: make(issuer=_tls_only_intermediate(pki)),
    }[case]()
    alg = "RS256" if case == "rsa-1024" else "ES256"
    raw = signer.envelope(payload(device=DEVICE, issued_at=NOW, command_id="s-1"), alg=alg)
    error = refused(raw, pki, memory)
    assert error.code == "untrusted_signer" and why in str(error), str(error)
    assert error.command_id == "s-1" and error.security


def _tls_only_intermediate(pki: CommandPki) -> TestCA:
    from tests.support.ca import CaShape

    return TestCA(name="tls only", parent=pki.root,
                  shape=CaShape(eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)))  # fmt: skip


def test_a_signer_not_yet_valid_at_issued_at(pki: CommandPki, memory: ReplayMemory) -> None:
    signer = pki.make_signer(not_before=NOW - dt.timedelta(minutes=1))
    raw = signer.envelope(payload(device=DEVICE, issued_at=NOW - dt.timedelta(minutes=10),
                                  lifetime=dt.timedelta(minutes=30)))  # fmt: skip
    error = refused(raw, pki, memory)
    assert error.code == "untrusted_signer" and "not valid at the command's issued_at" in str(error)


def test_no_anchors_configured(pki: CommandPki, memory: ReplayMemory) -> None:
    with pytest.raises(CommandRefused, match="no command trust anchors"):
        verify_command(signed(pki), device_id=DEVICE, anchors=[], now=NOW, replay=memory)


# -- the claims --------------------------------------------------------------------------------


def test_wrong_device(pki: CommandPki, memory: ReplayMemory) -> None:
    raw = pki.signer.envelope(payload(device="gw-0002", issued_at=NOW, command_id="w-1"))
    error = refused(raw, pki, memory)
    assert (error.code, error.command_id) == ("wrong_device", "w-1")
    assert "'gw-0002', this is 'gw-0001'" in str(error)


def test_expired_not_yet_valid_and_too_long(pki: CommandPki, memory: ReplayMemory) -> None:
    old = signed(pki, issued_at=NOW - dt.timedelta(minutes=20))
    assert refused(old, pki, memory).code == "expired"
    future = signed(pki, issued_at=NOW + dt.timedelta(minutes=6))
    assert refused(future, pki, memory).code == "not_yet_valid"
    long = signed(pki, lifetime=dt.timedelta(hours=1, seconds=1))
    error = refused(long, pki, memory)
    assert error.code == "lifetime_too_long" and "3601 s, more than the maximum of 3600" in str(
        error
    )
    limits = CommandLimits(max_lifetime=dt.timedelta(hours=2))
    assert verify(long, pki, memory, limits=limits).id


def test_unknown_command_and_bad_args(pki: CommandPki, memory: ReplayMemory) -> None:
    error = refused(signed(pki, command="reboot"), pki, memory)
    assert error.code == "unknown_command" and "'reboot'" in str(error)
    error = refused(signed(pki, command="renew", args={"force": True}), pki, memory)
    assert error.code == "bad_args" and "renew takes no args; got 'force'" in str(error)


# -- the replay memory -------------------------------------------------------------------------


def test_replayed_across_a_restart_of_the_store(
    pki: CommandPki, memory: ReplayMemory, tmp_path: Path
) -> None:
    raw = signed(pki, command_id="r-1")
    verify(raw, pki, memory)
    assert refused(raw, pki, memory).code == "replayed"
    restarted = ReplayMemory(store=DirStore(tmp_path / "state"))  # a new process, same file
    error = refused(raw, pki, restarted, now=NOW + dt.timedelta(minutes=3))
    assert (error.code, error.command_id) == ("replayed", "r-1")
    assert (tmp_path / "state" / replay_mod.STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_ids_are_forgotten_only_once_their_command_expired(
    pki: CommandPki, memory: ReplayMemory
) -> None:
    raw = signed(pki, command_id="f-1")
    verify(raw, pki, memory)
    verify(signed(pki, issued_at=NOW + dt.timedelta(minutes=9)), pki, memory,
           now=NOW + dt.timedelta(minutes=9))  # fmt: skip
    ids = memory.load().ids()
    assert "f-1" in ids and len(ids) == 2
    later = NOW + dt.timedelta(minutes=11)  # f-1 expired (5 min) + skew (5 min) ago
    verify(signed(pki, issued_at=later), pki, memory, now=later)
    assert "f-1" not in memory.load().ids()
    assert refused(raw, pki, memory, now=later).code == "expired"


def test_a_full_memory_refuses_rather_than_forgets(pki: CommandPki, tmp_path: Path) -> None:
    memory = ReplayMemory(store=DirStore(tmp_path / "state"), capacity=2)
    verify(signed(pki, command_id="b-1"), pki, memory)
    verify(signed(pki, command_id="b-2"), pki, memory)
    error = refused(signed(pki, command_id="b-3"), pki, memory)
    assert (error.code, error.command_id) == ("busy", "b-3") and not error.security
    assert memory.load().ids() == {"b-1", "b-2"}
    later = NOW + dt.timedelta(minutes=11)
    assert verify(signed(pki, command_id="b-3", issued_at=later), pki, memory, now=later).id


def test_the_clock_set_back_does_not_reopen_a_forgotten_id(
    pki: CommandPki, memory: ReplayMemory
) -> None:
    first = signed(pki, command_id="k-1")
    verify(first, pki, memory)
    later = NOW + dt.timedelta(minutes=30)
    verify(signed(pki, issued_at=later), pki, memory, now=later)  # k-1 is dropped here
    assert "k-1" not in memory.load().ids()
    error = refused(first, pki, memory, now=NOW + dt.timedelta(minutes=1))  # clock set back
    assert error.code == "expired" and "its clock was set back" in str(error)


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"{not json",
        b'{"format":1,"floor":null,"ids":[["x","y"]]}\n',
        b"\x00" * 100,
        b'{"format":1,"floor":null,"ids":[]}',
    ],  # fmt: skip  (the last: no newline, not ours)
)
def test_a_damaged_memory_refuses_everything_until_repaired(
    damage: bytes, pki: CommandPki, memory: ReplayMemory, tmp_path: Path
) -> None:
    state = tmp_path / "state" / replay_mod.STATE_FILE
    verify(signed(pki), pki, memory)  # creates the directory and file
    state.write_bytes(damage)
    for _ in range(2):
        error = refused(signed(pki, command_id="d-1"), pki, memory)
        assert error.code == "state_damaged" and str(state) in str(error)
        assert state.read_bytes() == damage  # never reset
    with pytest.raises(StorageError, match="is damaged"):
        memory.load()
    state.rename(state.with_suffix(".damaged"))  # the operator's repair (docs/commands.md)
    assert verify(signed(pki, command_id="d-1"), pki, memory).id == "d-1"


def test_a_write_failure_refuses_the_command(
    pki: CommandPki, memory: ReplayMemory, mocker: MockerFixture
) -> None:
    before = memory.load()
    mocker.patch.object(
        memory.store, "write", side_effect=StorageError("cannot write state: No space left")
    )
    error = refused(signed(pki, command_id="n-1"), pki, memory)
    assert error.code == "state_unavailable" and "No space left" in str(error)
    assert memory.load() == before


def test_the_state_file_round_trips_and_is_strict() -> None:
    t = NOW.replace(microsecond=0)
    state = replay_mod.ReplayState(entries=((t, "a"), (t, "b")), floor=t)
    assert replay_mod.parse_state(replay_mod.encode_state(state), "x") == state
    with pytest.raises(replay_mod.ReplayStateDamaged, match="listed twice"):
        raw = replay_mod.encode_state(replay_mod.ReplayState(entries=((t, "a"), (t, "a"))))
        replay_mod.parse_state(raw, "x")


# -- responses and events ----------------------------------------------------------------------


def test_responses_and_events(pki: CommandPki, memory: ReplayMemory) -> None:
    cmd = verify(signed(pki, command="renew", command_id="e-1"), pki, memory)
    ok = json.loads(accepted_response(cmd, at=NOW))
    assert ok == {"v": 1, "id": "e-1", "ok": True, "code": "accepted", "detail": "renew accepted",
                  "at": NOW.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    event = accepted_event(cmd, at=NOW)
    assert event["event"] == "command_accepted" and event["signer"] == "CN=command signer ec-p256"
    error = refused(signed(pki, command_id="e-1"), pki, memory)
    no = json.loads(refused_response(error, at=NOW))
    assert (no["id"], no["ok"], no["code"]) == ("e-1", False, "replayed")
    bad = refused(b"\xff" * 10, pki, memory)
    no = json.loads(refused_response(bad, at=NOW))
    assert no["id"] is None and no["code"] == "malformed"
    long = CommandRefused("bad_args", "x\n" * 1000, command_id="e-2")
    assert len(json.loads(refused_response(long, at=NOW))["detail"]) <= 300
    assert refused_event(long, at=NOW)["security"] is False
    assert isinstance(long, AgentError)


# -- the operator's tools ----------------------------------------------------------------------


def _signer_files(pki: CommandPki, directory: Path) -> dict[str, Path]:
    files = {"key": directory / "signer.key", "cert": directory / "signer.pem",
             "chain": directory / "chain.pem"}  # fmt: skip
    files["key"].write_bytes(pki.signer.key_pem())
    files["cert"].write_bytes(pem(pki.signer.certs[0]))
    files["chain"].write_bytes(b"".join(pem(c) for c in pki.signer.certs[1:]))
    return files


def test_contrib_sign_command(pki: CommandPki, memory: ReplayMemory, tmp_path: Path) -> None:
    files = _signer_files(pki, tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            str(SIGN_COMMAND),
            "--key",
            files["key"],
            "--cert",
            files["cert"],
            "--chain",
            files["chain"],
            "--device",
            DEVICE,
            "--command",
            "refresh-cacerts",
            "--id",
            "op-1",
            "--lifetime",
            "120",
        ],
        capture_output=True,
        check=True,
    ).stdout
    cmd = verify(out.strip(), pki, memory, now=utcnow())
    assert (cmd.id, cmd.command) == ("op-1", "refresh-cacerts")
    assert cmd.expires_at - cmd.issued_at == dt.timedelta(seconds=120)
    rsa_signer = pki.make_signer("rsa-2048")
    (tmp_path / "rsa.key").write_bytes(key_pem(rsa_signer.key))
    (tmp_path / "rsa.pem").write_bytes(b"".join(pem(c) for c in rsa_signer.certs))
    out = subprocess.run(
        [
            sys.executable,
            str(SIGN_COMMAND),
            "--key",
            tmp_path / "rsa.key",
            "--cert",
            tmp_path / "rsa.pem",
            "--device",
            DEVICE,
            "--command",
            "ping",
            "--alg",
            "RS256",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert json.loads(out)["alg"] == "RS256"
    assert verify(out, pki, memory, now=utcnow()).command == "ping"


def test_contrib_sign_command_refuses_bad_input(tmp_path: Path, pki: CommandPki) -> None:
    files = _signer_files(pki, tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            str(SIGN_COMMAND),
            "--key",
            files["key"],
            "--cert",
            files["cert"],
            "--device",
            DEVICE,
            "--command",
            "ping",
            "--lifetime",
            "7200",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "lifetime" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_envelope_signed_with_plain_openssl(
    pki: CommandPki, memory: ReplayMemory, tmp_path: Path
) -> None:
    """The format needs nothing but a signature over the payload bytes (docs/commands.md)."""
    files = _signer_files(pki, tmp_path)
    data = payload(device=DEVICE, issued_at=NOW, command="status")
    (tmp_path / "payload.json").write_bytes(data)
    sig = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", files["key"], tmp_path / "payload.json"],
        capture_output=True,
        check=True,
    ).stdout
    raw = pki.signer.envelope(data, signature=sig)
    assert verify(raw, pki, memory).command == "status"


def test_the_eku_is_fixed() -> None:
    assert COMMAND_SIGNING.dotted_string == "2.25.41675102310052449604932628050312790778"
    assert (
        "2.25.41675102310052449604932628050312790778" in (ROOT / "docs" / "commands.md").read_text()
    )


def test_anchors_from_pem_and_the_error_tree(pki: CommandPki) -> None:
    from agent.commands import parse_anchors
    from agent.errors import ConfigError

    both = pem(pki.root.cert) + pem(TestCA(name="second").cert)
    anchors = parse_anchors(both, "a.pem")
    assert len(anchors) == 2 and anchors[0].subject == pki.root.cert.subject
    with pytest.raises(ConfigError, match=r"^x\.pem: no valid PEM certificates"):
        parse_anchors(b"junk", "x.pem")
    with pytest.raises(ValueError, match="unknown refusal code"):
        CommandRefused("nope", "x")
    assert (
        json.loads(refused_response(CommandRefused("busy", "x", command_id="a b"), at=NOW))["id"]
        is None
    )  # an id that is not an id is never echoed
