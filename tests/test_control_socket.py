"""The control socket of a real `devid-agent run` (the CLI's `run`, as the service user, uid
4243, in a forked child; tests/support/control.py), asked by peers of other uids: root, the
service user, a member of control.readers_group, a member of the service's group only, and a
user of neither; a stale socket replaced, a symlinked or foreign socket path refused, an
oversized request, a silent client dropped while another is served, `status` from the service and
from the disk, `renew` through the service, `reload` and `reconnect`.

Waits poll for a condition with a generous deadline; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import EXIT_NOT_ENROLLED
from agent.cli.doctor_cmd import Context, check_service
from agent.config import load_config
from agent.status_codes import SERVICE_NOT_RUNNING
from tests.support.control import (
    OTHER_UID,
    READER_UID,
    SERVICE_UID,
    ServiceUnderTest,
    as_peer,
    audit_lines,
    cli_as,
    raw,
    readers_group,
    request,
    world,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays other uids against the service")

READERS_GID = readers_group()[1]


@pytest.fixture
def base() -> Iterator[Path]:
    with world() as b:
        yield b


@pytest.fixture
def service(base: Path) -> Iterator[ServiceUnderTest]:
    s = ServiceUnderTest(base)
    yield s
    s.close()


def serving(s: ServiceUnderTest) -> ServiceUnderTest:
    s.start()
    s.wait_serving()
    s.wait_enrolled()
    return s


def refusals(s: ServiceUnderTest) -> list[dict[str, object]]:
    return [line for line in audit_lines(s.state_dir) if line["event"] == "control_peer_refused"]


def test_the_socket_is_0660_with_the_readers_group_and_each_peer_gets_what_it_may(
    service: ServiceUnderTest,
) -> None:
    s = serving(service)
    st = s.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (SERVICE_UID, READERS_GID)

    def ask(op: str) -> object:
        return lambda: request(s.socket, op)

    # root and the service user: everything read-only, and acting requests
    assert request(s.socket, "ping")["result"]["pong"] is True
    found = check_service(Context(load_config(s.config)))
    assert (found.status, found.check) == ("ok", "service") and "answers" in found.detail
    assert as_peer(SERVICE_UID, SERVICE_UID, [], ask("status"))["ok"] is True
    assert as_peer(SERVICE_UID, SERVICE_UID, [], ask("reconnect"))["result"] == {"requested": True}
    # a member of readers_group (a supplementary group): read-only requests only
    reader = (READER_UID, READER_UID, [READERS_GID])
    assert as_peer(*reader, ask("status"))["ok"] is True
    assert as_peer(*reader, ask("ping"))["ok"] is True
    assert refusals(s) == []
    for op in ("renew", "reload", "reconnect"):
        answer = as_peer(*reader, ask(op))
        assert answer["ok"] is False and answer["error"]["code"] == "forbidden", answer
        assert "only root and the service user" in answer["error"]["message"]
    assert [(r["op"], r["uid"], r["outcome"]) for r in refusals(s)] == [
        ("renew", READER_UID, "refused"), ("reload", READER_UID, "refused"),
        ("reconnect", READER_UID, "refused"),
    ]  # fmt: skip
    # a user of neither group: the socket's mode keeps it out before any request
    other = as_peer(OTHER_UID, OTHER_UID, [], ask("status"))
    assert other == {"exception": "PermissionError: [Errno 13] Permission denied"}
    # and its `status` says so, without calling the service not running
    done = cli_as(OTHER_UID, OTHER_UID, [], s.config, "status")
    assert "service:   running (this user may not connect to" in done["out"], done
    assert done["code"] != SERVICE_NOT_RUNNING
    # the refusals are in the audit trail, whose chain holds
    assert cli_as(SERVICE_UID, SERVICE_UID, [], s.config, "audit", "verify")["code"] == 0
    assert "control: refused renew from pid" in s.text()


def test_a_member_of_the_services_group_only_is_refused_by_its_credentials(
    service: ServiceUnderTest,
) -> None:
    service.write_config(readers=False)  # the socket's group is then the service's own
    s = serving(service)
    assert s.socket.lstat().st_gid == SERVICE_UID
    # passes the socket's mode (group rw), but its uid and groups are not allowed
    answer = as_peer(
        OTHER_UID, SERVICE_UID, [], lambda: request(s.socket, "status", request_id="x")
    )
    assert answer["ok"] is False and answer["id"] == "x", answer
    assert answer["error"]["code"] == "forbidden"
    assert "control.readers_group" in answer["error"]["message"]
    [line] = refusals(s)
    assert (line["op"], line["uid"], line["gid"]) == ("status", OTHER_UID, SERVICE_UID)
    # the former reader is now refused too: readers_group is unset
    reader = as_peer(READER_UID, SERVICE_UID, [READERS_GID], lambda: request(s.socket, "status"))
    assert reader["error"]["code"] == "forbidden"


def test_status_from_the_service_then_from_the_disk_when_it_stops(
    service: ServiceUnderTest,
) -> None:
    s = serving(service)
    done = cli_as(0, 0, [], s.config, "status", "--json")
    assert done["code"] == 0, done
    model = json.loads(done["out"])
    assert model["schema_version"] == 1
    svc = model["service"]
    assert svc["running"] is True and svc["clock_trusted"] is True, svc
    assert svc["next_action"] == "renew" and svc["reason"].startswith("scheduled")
    assert svc["consecutive_failures"] == 0 and svc["last_disposition"] in ("", "ok")
    assert svc["components"]["control"]["socket"] == str(s.socket)
    assert model["identity"]["state"] == "valid" and model["identity"]["key_usable"] is True
    text = cli_as(READER_UID, READER_UID, [READERS_GID], s.config, "status")
    assert text["code"] == 0 and "service:   running since" in text["out"], text
    assert "next:    renew at" in text["out"]
    # the service stops: `status` reads the disk (as the service user, its owner) and says so
    assert s.stop() == 0
    assert not s.socket.exists()  # removed at stop
    owner = (SERVICE_UID, SERVICE_UID, [])
    done = cli_as(*owner, s.config, "status")
    assert done["code"] == SERVICE_NOT_RUNNING == 87, done
    assert "service:   not running (no control socket at" in done["out"]
    assert "identity:  valid" in done["out"]
    as_json = json.loads(cli_as(*owner, s.config, "status", "--json")["out"])
    assert as_json["service"]["running"] is False and as_json["service"]["expected"] is True
    # a device without the service (control.enabled = false) is healthy without it
    s.write_config(control={"enabled": False})
    done = cli_as(*owner, s.config, "status", "--json")
    assert done["code"] == 0 and json.loads(done["out"])["service"] is None, done


def test_status_exit_code_comes_from_the_service_not_enrolled(base: Path) -> None:
    s = ServiceUnderTest(base, est_url="https://127.0.0.1:9/.well-known/est")
    try:
        s.start()
        s.wait_serving()
        s.wait_for(lambda: "enroll failed" in s.text(), "a failed enrollment")
        done = cli_as(0, 0, [], s.config, "status", "--json")
        assert done["code"] == EXIT_NOT_ENROLLED == 81, done
        svc = json.loads(done["out"])["service"]
        assert svc["running"] is True and svc["consecutive_failures"] >= 1
        assert svc["last_disposition"] == "retry_later"
    finally:
        s.close()


def test_renew_goes_through_the_service_and_works_alone_when_it_does_not_run(
    service: ServiceUnderTest,
) -> None:
    s = serving(service)
    current = s.state_dir / "identity" / "current"
    assert os.readlink(current) == "gen-1"
    done = cli_as(0, 0, [], s.config, "renew")
    assert done["code"] == 0, done
    assert "renewed through the running service" in done["out"]
    assert os.readlink(current) == "gen-2"
    assert "renew: requested" in s.text() or "renew requested now" in s.text()
    accepted = [a for a in audit_lines(s.state_dir) if a["event"] == "control_command"]
    assert [(a["op"], a["uid"]) for a in accepted] == [("renew", 0)]
    # a reader may not
    reader = cli_as(READER_UID, READER_UID, [READERS_GID], s.config, "renew")
    assert reader["code"] == 77 and "may not renew" in reader["err"], reader
    # the service stops: renew works alone (as the service user, who owns the state)
    assert s.stop() == 0
    alone = cli_as(SERVICE_UID, SERVICE_UID, [], s.config, "renew")
    assert alone["code"] == 0 and "renewed:" in alone["out"], alone
    assert os.readlink(current) == "gen-3"


def test_status_answers_while_a_renewal_hangs_and_the_renew_gets_its_outcome(
    service: ServiceUnderTest,
) -> None:
    """The attempt works in its own process: the loop serves the socket meanwhile."""
    s = serving(service)
    s.est.options.fault = "hang"  # never answers: the attempt fails at the read timeout (5 s)
    s.est.options.hang_seconds = 30
    renewing: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: renewing.update(cli_as(0, 0, [], s.config, "renew")), daemon=True
    )
    thread.start()
    assert s.est.hang_started.wait(60), "the renewal never reached the server"
    s.est.options.fault = None
    done = cli_as(0, 0, [], s.config, "status", "--json")
    assert done["code"] == 0, done  # answered by the service, not "not running" (87)
    model = json.loads(done["out"])
    assert model["service"]["attempt_in_progress"] == "renew"
    # not checked while the TPM is the attempt's: vouched for by the enrollment seconds ago
    assert model["identity"]["key_usable"] is True
    text = cli_as(READER_UID, READER_UID, [READERS_GID], s.config, "status")
    assert "now:     renew at work" in text["out"], text
    thread.join(90)
    assert renewing.get("code") == 69, renewing  # the outcome of the attempt it asked for
    assert "no complete response within 5 s" in renewing["err"]
    assert os.readlink(s.state_dir / "identity" / "current") == "gen-1"
    again = cli_as(0, 0, [], s.config, "renew")
    assert again["code"] == 0 and "renewed through the running service" in again["out"], again
    assert os.readlink(s.state_dir / "identity" / "current") == "gen-2"


def test_ctl_reload_and_reconnect(service: ServiceUnderTest) -> None:
    s = serving(service)
    done = cli_as(0, 0, [], s.config, "ctl", "reconnect")
    assert done["code"] == 0 and "reconnect requested" in done["out"], done
    s.write_config(readers=False)
    done = cli_as(SERVICE_UID, SERVICE_UID, [], s.config, "ctl", "reload")
    assert done["code"] == 0, done
    s.wait_for(lambda: "configuration reloaded" in s.text(), "the reload")
    s.wait_for(lambda: s.socket.exists() and s.socket.lstat().st_gid == SERVICE_UID, "rebound")
    assert request(s.socket, "ping")["ok"] is True
    s.stop()
    done = cli_as(0, 0, [], s.config, "ctl", "reload")
    assert done["code"] == SERVICE_NOT_RUNNING and "not running" in done["err"], done


def test_a_stale_socket_of_a_dead_daemon_is_replaced(service: ServiceUnderTest) -> None:
    def leave_a_stale_socket() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(service.socket))  # bound, never listening, never removed: a dead daemon
        return True

    assert as_peer(SERVICE_UID, SERVICE_UID, [], leave_a_stale_socket) is True
    assert service.socket.lstat().st_gid == SERVICE_UID  # made with the child's primary group
    s = serving(service)
    assert "replacing the stale socket" in s.text()
    assert s.socket.lstat().st_gid == READERS_GID  # the service's new one
    assert request(s.socket, "ping")["ok"] is True


@pytest.mark.parametrize("what", ["symlink", "foreign", "not_a_socket"])
def test_a_socket_path_that_is_not_ours_is_refused_and_the_service_goes_on(
    service: ServiceUnderTest, what: str
) -> None:
    elsewhere = service.base / "elsewhere.sock"
    if what == "symlink":
        service.socket.symlink_to(elsewhere)
        expected = "it is a symlink"
    elif what == "foreign":  # a socket someone else (root, here) made where ours goes
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(service.socket))
        expected = "it belongs to uid 0"
    else:
        service.socket.write_text("x")
        expected = "it is not a socket"
    before = service.socket.lstat()
    service.start()
    service.wait_enrolled()
    service.wait_for(lambda: "control stopped" in service.text(), "the control refusal")
    assert expected in service.text()
    after = service.socket.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino, before.st_mode, before.st_uid,
    )  # fmt: skip
    assert not elsewhere.exists()  # nothing was made through the symlink
    assert service.running()  # the identity goes on without the socket


def test_an_oversized_request_is_refused_and_the_connection_closed(
    service: ServiceUnderTest,
) -> None:
    s = serving(service)
    answer = json.loads(raw(s.socket, b"x" * 10_000))
    assert answer["ok"] is False and answer["error"]["code"] == "too_large"
    assert json.loads(raw(s.socket, b"{" * 50 + b"\n"))["error"]["code"] == "bad_request"
    assert json.loads(raw(s.socket, b'{"v":9,"op":"status"}\n'))["error"]["code"] == (
        "unsupported_version"
    )
    assert json.loads(raw(s.socket, b'{"v":1,"op":"shutdown"}\n'))["error"]["code"] == (
        "unknown_op"
    )
    assert request(s.socket, "ping")["ok"] is True  # the service is unharmed


def test_a_silent_client_is_dropped_while_another_is_served(service: ServiceUnderTest) -> None:
    s = serving(service)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(s.socket))
        slow.connect(str(s.socket))
        slow.sendall(b'{"v":1,"op":')  # half a request, then nothing
        # others are served at once meanwhile, several times
        for i in range(5):
            assert request(s.socket, "status", request_id=i)["id"] == i
        # the silent and the slow are dropped after control.request_timeout_seconds (1 s)
        for sock in (silent, slow):
            sock.settimeout(30)
            assert sock.recv(100) == b""  # closed by the service, no answer
    finally:
        silent.close()
        slow.close()
    assert request(s.socket, "ping")["ok"] is True


def test_more_clients_than_max_clients_are_told_busy(base: Path) -> None:
    s = ServiceUnderTest(base, control={"max_clients": 2})
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        serving(s)
        for sock in held:
            sock.connect(str(s.socket))
        deadline = time.monotonic() + 30
        while True:  # the two held connections are accepted at the service's next turn
            answer = json.loads(raw(s.socket, b'{"v":1,"op":"ping"}\n'))
            if not answer["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert answer["error"]["code"] == "busy", answer
    finally:
        for sock in held:
            sock.close()
        s.close()
