"""The control socket's wire format and permission decision (pure): every refusal is a
ProtocolError naming its code, in one line; who may ask what."""

from __future__ import annotations

import json

import pytest

from agent.control import protocol
from agent.control.permission import Peer, Policy, groups_from_proc_status, refusal
from agent.control.protocol import ProtocolError, parse_request


def test_a_request_parses() -> None:
    r = parse_request(b'{"v":1,"id":"a","op":"status"}\n')
    assert (r.op, r.id, r.v) == ("status", "a", 1)
    assert parse_request(b'{"v":1,"op":"ping"}').id is None
    assert parse_request(b'{"v":1,"id":7,"op":"renew"}\r\n').id == 7


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", protocol.BAD_REQUEST),
        (b"not json", protocol.BAD_REQUEST),
        (b"[1]", protocol.BAD_REQUEST),
        (b'"status"', protocol.BAD_REQUEST),
        (b'{"v":1,"op":"status","op":"renew"}', protocol.BAD_REQUEST),  # duplicate key
        (b'{"v":1,"op":"status","x":1}', protocol.BAD_REQUEST),  # unknown key
        (b'{"v":NaN,"op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":true,"op":"status"}', protocol.BAD_REQUEST),
        (b'{"op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":2,"op":"status"}', protocol.UNSUPPORTED_VERSION),
        (b'{"v":1,"op":"reboot"}', protocol.UNKNOWN_OP),
        (b'{"v":1,"op":7}', protocol.BAD_REQUEST),
        (b'{"v":1,"id":[1],"op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":1,"id":true,"op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":1,"id":' + b"9" * 30 + b',"op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":1,"id":"' + b"x" * 200 + b'","op":"status"}', protocol.BAD_REQUEST),
        (b'{"v":1,"op":"st\xffatus"}', protocol.BAD_REQUEST),
        (b"[" * 3000 + b"]" * 3000, protocol.TOO_LARGE),
        (b"[" * 2000 + b"]" * 2000, protocol.BAD_REQUEST),  # nested: refused before json
        (b'{"a":{"b":{"c":{"d":{"e":1}}}}}', protocol.BAD_REQUEST),
        (b'{"v":1,"op":"' + b"s" * 5000 + b'"}', protocol.TOO_LARGE),
    ],
)
def test_bad_requests_are_refused_with_a_code(line: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.code == code
    assert "\n" not in str(caught.value) and str(caught.value)


def test_strings_with_brackets_do_not_count_as_nesting() -> None:
    assert parse_request(b'{"v":1,"id":"[[[[[[{{{{\\"","op":"ping"}').id == '[[[[[[{{{{"'


def test_the_id_is_echoed_in_errors_once_known() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(b'{"v":1,"id":"q","op":"nope"}')
    assert caught.value.request_id == "q"


def test_responses_are_one_json_line() -> None:
    ok = protocol.ok_response(3, {"a": 1})
    err = protocol.error_response("x", protocol.FORBIDDEN, "no", disposition="d")
    assert ok.endswith(b"\n") and ok.count(b"\n") == 1
    assert json.loads(ok) == {"v": 1, "id": 3, "ok": True, "result": {"a": 1}}
    assert json.loads(err)["error"] == {"code": "forbidden", "message": "no", "disposition": "d"}


SERVICE, READERS = 4243, 100
POLICY = Policy(service_uid=SERVICE, readers_gid=READERS)


@pytest.mark.parametrize(
    ("peer", "read", "act"),
    [
        (Peer(1, 0, 0), True, True),  # root
        (Peer(1, SERVICE, SERVICE), True, True),  # the service user
        (Peer(1, 5000, READERS), True, False),  # readers_group as primary group
        (Peer(1, 5000, 5000, frozenset({READERS})), True, False),  # as supplementary group
        (Peer(1, 5000, SERVICE), False, False),  # the service's group is not enough
        (Peer(1, 5000, 5000, frozenset({1, 2})), False, False),
    ],
)
def test_who_may_ask_what(peer: Peer, read: bool, act: bool) -> None:
    for op in protocol.READ_ONLY:
        assert (refusal(POLICY, peer, op) is None) is read
    for op in protocol.ACTING:
        assert (refusal(POLICY, peer, op) is None) is act


def test_without_readers_group_only_root_and_the_service_user() -> None:
    policy = Policy(service_uid=SERVICE)
    assert refusal(policy, Peer(1, 5000, 5000, frozenset({READERS})), "status") is not None
    assert refusal(policy, Peer(1, SERVICE, 1), "renew") is None


def test_groups_from_proc_status() -> None:
    text = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 100 \nNgid:\t0\n"
    assert groups_from_proc_status(text) == {4, 24, 100}
    assert groups_from_proc_status("Groups:\t\n") == frozenset()
    assert groups_from_proc_status("Groups:\tx\n") == frozenset()
    assert groups_from_proc_status("") == frozenset()
