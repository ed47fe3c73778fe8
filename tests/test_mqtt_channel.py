"""The device channel against a real mosquitto, with `devid-agent run` as a real process (its
own tpm2 provider, swtpm, our EST server): round trips over TLS 1.2 and 1.3 with TPM keys, the
retained status and the last will seen by a second client, the hot swap after a rotation with
the old certificate revoked at the broker, broker restarts, each rejection reason, failover.

Waits poll observable facts (messages the observer received, files, the TPM's object count)
with a generous deadline; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from hal.tpm import transient_objects
from tests.support.device import Device
from tests.support.est_server import EstOptions, EstServer
from tests.support.mosquitto import Mosquitto, Observer
from tests.support.service import Notifications, Service, configure, current, generations, wait_for
from tests.support.swtpm import Swtpm

LIFETIME = 105
DEVICE = "gw-0001"
STATUS = f"devid/{DEVICE}/status"
EVENTS = f"devid/{DEVICE}/events"
COMMANDS = f"devid/{DEVICE}/commands"
RESPONSES = f"devid/{DEVICE}/commands/response"


@pytest.fixture
def est(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", EstOptions(cert_lifetime_seconds=3600)) as server:
        yield server


@pytest.fixture
def device(tmp_path: Path, swtpm: Swtpm, est: EstServer) -> Device:
    d = Device(tmp_path, swtpm, est)
    d.basic()
    return d


@pytest.fixture
def observers() -> Iterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for o in made:
        o.close()


def broker(tmp_path: Path, est: EstServer, name: str = "broker", **kw: Any) -> Mosquitto:
    return Mosquitto(tmp_path / name, device_ca=est.ca, **kw)


def with_mqtt(device: Device, *brokers: Mosquitto | str, **keys: Any) -> None:
    urls = [b if isinstance(b, str) else b.url for b in brokers]
    first = next(b for b in brokers if isinstance(b, Mosquitto))
    settings = {"brokers": urls, "ca_file": str(first.ca_file), "reconnect_min_seconds": 0.2,
                "reconnect_max_seconds": 1.0, "connect_timeout_seconds": 5.0, **keys}  # fmt: skip
    text = device.config.read_text() + "[mqtt]\n"
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    device.config.write_text(text)


def observe(broker: Mosquitto, observers: list[Observer], **kw: Any) -> Observer:
    o = Observer(broker, **kw)
    observers.append(o)
    assert o.connected.wait(30), broker.log_text()[-2000:]
    return o


def online(o: Observer, generation: int | None = None) -> Callable[[], bool]:
    def check() -> bool:
        got = o.payloads(STATUS)
        if not got or not got[-1]["online"]:
            return False
        channel: Any = got[-1]["channel"]
        return generation is None or channel.get("generation") == generation

    return check


def event_kinds(o: Observer) -> list[str]:
    return [str(p["event"]) for p in o.payloads(EVENTS)]


def until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """For facts after the daemon stopped (wait_for needs it running)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("tls12", "protocol"),
    [(False, "5"), (True, "5"), (False, "3.1.1")],
    ids=["tls1.3", "tls1.2", "mqtt3.1.1"],
)
def test_round_trip_with_the_tpm_key_status_retained_command_answered_and_a_clean_stop(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
    tls12: bool,
    protocol: str,
) -> None:
    with broker(tmp_path, est, tls12_only=tls12) as mosquitto:
        with_mqtt(device, mosquitto, protocol=protocol)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "the retained online status", service)
        status: Any = watcher.payloads(STATUS)[-1]
        assert status["schema_version"] == 1 and status["device"] == DEVICE
        assert status["status"]["identity"]["generation"] == 1
        assert status["status"]["service"]["next_action"] == "renew"
        assert status["channel"]["broker"] == mosquitto.url.replace("localhost", "localhost")
        assert transient_objects(device.tpm.tcti)[0] == 1  # the channel's context: 1 slot
        late = observe(mosquitto, observers, topic=STATUS)  # a new subscriber gets it retained
        wait_for(lambda: bool(late.messages) and late.messages[0][2], "the retained one", service)
        wait_for(lambda: "enrolled" in event_kinds(watcher), "the enrolled event", service)
        watcher.publish(COMMANDS, b'{"v":1}')
        wait_for(lambda: bool(watcher.payloads(RESPONSES)), "a command response", service)
        reply: Any = watcher.payloads(RESPONSES)[-1]
        assert reply["ok"] is False and reply["code"] == "not_configured"
        wait_for(lambda: "command_refused" in event_kinds(watcher), "the refusal event", service)
        assert service.stop() == 0
        until(lambda: not watcher.payloads(STATUS)[-1]["online"], "the offline status")
        assert watcher.payloads(STATUS)[-1]["reason"] == "stopped"
        assert f"u'{DEVICE}'" in mosquitto.log_text()  # the broker saw our certificate's CN
        assert transient_objects(device.tpm.tcti)[0] == 0


def rejected_in_log(service: Service, reason: str) -> Callable[[], bool]:
    return lambda: f"the broker refused our certificate: {reason}" in service.text()


def channel_rejections(o: Observer) -> list[tuple[str, Any]]:
    return [
        (str(p["detail"]["reason"]), p["detail"]["generation"])  # type: ignore[index]
        for p in o.payloads(EVENTS)
        if p["event"] == "channel_rejected"
    ]


def test_the_hot_swap_after_a_rotation_survives_the_old_certificate_revoked_at_the_broker(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    est.options.cert_lifetime_seconds = LIFETIME  # due for renewal 3 s after it is issued
    device.configure(proof_of_possession="never")  # the channel keeps its context (docs/tpm.md)
    configure(device)
    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, mosquitto)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online as generation 1", service)
        est.options.cert_lifetime_seconds = 3600  # the next identity lasts
        wait_for(lambda: "rotated" in event_kinds(watcher), "the rotated event", service)
        wait_for(
            lambda: (current(device) or 0) >= 2 and online(watcher, current(device))(),
            "online as the new identity",
            service,
        )
        assert "mqtt: moving to identity generation" in service.text()  # no process restart
        assert "letting go of the TPM context" not in service.text()  # the renewal fit beside it
        assert transient_objects(device.tpm.tcti)[0] == 1  # the old context is gone
        generation = current(device)
        assert generation is not None
        now_serial = x509.load_pem_x509_certificate(
            (device.state_dir / "identity" / "current" / "cert.pem").read_bytes()
        ).serial_number
        old = [c.serial_number for c in est.issued if c.serial_number != now_serial]
        assert old  # generation 1's certificate at least
        connects = watcher.payloads(STATUS)[-1]["channel"]["connects"]  # type: ignore[index]
        mosquitto.write_crl(revoked=old)
        mosquitto.restart()  # reads the CRL; every client must connect again
        wait_for(
            lambda: (
                watcher.payloads(STATUS)[-1]["online"] is True
                and watcher.payloads(STATUS)[-1]["channel"]["connects"] > connects
            ),  # type: ignore[index,operator]
            "the reconnect after the broker restart",
            service,
        )
        assert online(watcher, generation)()  # as the new identity: the old one is revoked
        assert "revoked" not in service.text()
        assert current(device) == generation
        assert service.stop() == 0


def test_subscriptions_and_queued_qos1_commands_outlive_a_disconnection(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, mosquitto)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online", service)
        assert service.stop() == 0  # a clean DISCONNECT: the broker keeps the session
        until(lambda: not watcher.payloads(STATUS)[-1]["online"], "the offline status")
        watcher.publish(COMMANDS, b"queued while away", qos=1)
        again = Service(device, notify, watchdog_usec=None)
        services.append(again)
        wait_for(lambda: bool(watcher.payloads(RESPONSES)), "the queued command answered", again)
        assert "not_configured" in json.dumps(watcher.payloads(RESPONSES)[-1])
        assert again.stop() == 0


def test_the_last_will_says_offline_when_the_process_dies(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, mosquitto)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online", service)
        service.stop(signal.SIGKILL)
        until(lambda: not watcher.payloads(STATUS)[-1]["online"], "the last will")
        will = watcher.payloads(STATUS)[-1]
        assert will["reason"] == "connection lost" and will["schema_version"] == 1
        late = observe(mosquitto, observers, topic=STATUS)
        until(lambda: bool(late.payloads(STATUS)), "the retained last will")
        assert late.payloads(STATUS)[-1]["online"] is False


def test_the_broker_list_fails_over_in_order_when_the_first_is_down(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    from tests.support.procs import free_port

    down = f"mqtts://localhost:{free_port()}"
    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, down, mosquitto)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online through the second broker", service)
        assert watcher.payloads(STATUS)[-1]["channel"]["broker"] == mosquitto.url  # type: ignore[index]
        assert f"{down}: ConnectionRefusedError" in service.text()
        assert service.stop() == 0


@pytest.mark.parametrize(
    ("reason", "tls12"),
    [
        ("certificate_revoked", False),
        ("certificate_revoked", True),
        ("certificate_expired", False),
        ("bad_certificate", False),
        ("unknown_ca", False),
    ],
)
def test_a_broker_that_rejects_the_identity_is_reported_and_handed_to_the_scheduler(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
    reason: str,
    tls12: bool,
) -> None:
    """The broker's refusal (from its CRL or its CA file) in the log, in the retained status
    once connected again, and as an event; expired and revoked ask for a renewal (once per
    generation), the others do not."""
    from tests.support.ca import TestCA, utcnow

    configure(device, window_start_fraction=0.9, window_end_fraction=0.9)  # no renewal by itself
    with broker(tmp_path, est, tls12_only=tls12) as mosquitto:
        with_mqtt(device, mosquitto)
        watcher = observe(mosquitto, observers, tls12=tls12)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online as generation 1", service)
        first = est.issued[0].serial_number
        est.options.fault = "5xx"  # hold renewals back until the observer is connected again
        if reason == "certificate_revoked":
            mosquitto.write_crl(revoked=[first])
        elif reason == "certificate_expired":  # the broker's check says "expired" (its CRL is)
            mosquitto.write_crl(next_update=utcnow() - timedelta(hours=1),
                                last_update=utcnow() - timedelta(days=2))  # fmt: skip
        elif reason == "bad_certificate":  # the broker's CRL is not valid yet
            mosquitto.write_crl(last_update=utcnow() + timedelta(days=1),
                                next_update=utcnow() + timedelta(days=2))  # fmt: skip
        else:
            mosquitto.trust(TestCA(name="some other device CA"))
        mosquitto.restart()
        wait_for(rejected_in_log(service, reason), f"the {reason} rejection", service)
        renews = reason in ("certificate_revoked", "certificate_expired")
        if renews:
            asked = "mqtt: asking for a renewal: the broker says " + reason
            wait_for(lambda: asked in service.text(), "the renewal asked for", service)
            wait_for(lambda: "HTTP 500" in service.text(), "the renewal held back", service)
        if reason == "certificate_revoked":  # the new identity will not be on the CRL
            fresh = observe(mosquitto, observers, tls12=tls12)
            est.options.fault = None
            wait_for(lambda: (current(device) or 0) >= 2, "the renewal", service)
            wait_for(online(fresh, current(device)), "online as the new identity", service)
            wait_for(lambda: bool(channel_rejections(fresh)), "the queued event", service)
            assert channel_rejections(fresh)[0] == (reason, 1)
            last = fresh.payloads(STATUS)[-1]
        else:  # the broker fixed
            est.options.fault = None
            mosquitto.write_crl()
            mosquitto.trust(est.ca)
            mosquitto.restart()
            late = observe(mosquitto, observers, topic=STATUS, tls12=tls12)
            wait_for(lambda: online(late)() and online(late)(), "online again", service)
            wait_for(
                lambda: late.payloads(STATUS)[-1]["channel"].get("last_rejection") is not None,  # type: ignore[union-attr]
                "the status naming the rejection",
                service,
            )
            last = late.payloads(STATUS)[-1]
        channel: Any = last["channel"]
        assert channel["last_rejection"] == reason
        if not renews:
            assert current(device) == 1 and channel["last_rejection_generation"] == 1
            assert "asking for a renewal" not in service.text()
        # refused connects left nothing behind: the channel's one context (a wait, not a
        # snapshot: the count is 0 for a moment whenever the channel reconnects)
        wait_for(lambda: transient_objects(device.tpm.tcti)[0] == 1, "1 TPM object", service)
        assert service.stop() == 0
        assert transient_objects(device.tpm.tcti)[0] == 0


def test_proof_of_possession_over_tls_1_2_lets_go_of_the_channels_tpm_context_and_reconnects(
    tmp_path: Path,
    swtpm: Swtpm,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    """On a bare swtpm, EST's TLS 1.2 context (1) and the CSR signer inside it (2) take all
    three slots: the channel lets go of its context at attempt_started and comes back after
    attempt_finished, as the new identity."""
    options = EstOptions(cert_lifetime_seconds=LIFETIME, pop_required=True, tls12_only=True)
    with EstServer(tmp_path / "est-pop", options) as est:
        device = Device(tmp_path, swtpm, est)
        device.basic()
        device.configure(proof_of_possession="always")
        configure(device)
        with broker(tmp_path, est) as mosquitto:
            with_mqtt(device, mosquitto)
            watcher = observe(mosquitto, observers)
            service = Service(device, notify, watchdog_usec=None)
            services.append(service)
            wait_for(online(watcher, 1), "online as generation 1", service)
            est.options.cert_lifetime_seconds = 3600
            wait_for(lambda: (current(device) or 0) >= 2, "the renewal", service)
            wait_for(online(watcher, current(device)), "online as the new identity", service)
            assert "letting go of the TPM context for the renew" in service.text()
            renewals = [r for r in est.records if r.operation == "simplereenroll"]
            assert renewals and all(r.challenge_password for r in renewals)  # PoP was used
            wait_for(lambda: transient_objects(swtpm.tcti)[0] == 1, "1 TPM object", service)
            assert service.stop() == 0


def test_signed_commands_are_carried_out_and_every_kind_of_bad_one_refused(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    from datetime import datetime, timezone

    from tests.support.command_signer import CommandPki, payload, unsigned_envelope

    pki = CommandPki()
    anchor = tmp_path / "command-anchor.pem"
    pki.root.write_cert(anchor)
    rogue = CommandPki()
    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, mosquitto, command_trust_anchor=str(anchor))
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online", service)
        now = datetime.now(timezone.utc)

        def send(raw: bytes, answers: int = 1) -> list[dict[str, Any]]:
            before = len(watcher.payloads(RESPONSES))
            watcher.publish(COMMANDS, raw)
            wait_for(lambda: len(watcher.payloads(RESPONSES)) >= before + answers,
                     "the answer", service)  # fmt: skip
            return watcher.payloads(RESPONSES)[before:]  # type: ignore[return-value]

        def signed(command: str, **kw: Any) -> bytes:
            data = payload(device=DEVICE, command=command, issued_at=now, **kw)
            return pki.signer.envelope(data)

        assert send(signed("ping", command_id="c-ping"))[0] == {
            "v": 1, "id": "c-ping", "ok": True, "code": "accepted", "detail": "pong",
            "at": watcher.payloads(RESPONSES)[-1]["at"],
        }  # fmt: skip
        statuses = len(watcher.payloads(STATUS))
        assert send(signed("status"))[0]["ok"] is True
        wait_for(lambda: len(watcher.payloads(STATUS)) > statuses, "a status now", service)
        assert send(signed("refresh-cacerts"))[0]["code"] == "accepted"
        accepted, finished = send(signed("renew", command_id="c-renew"), answers=2)
        assert accepted["code"] == "accepted" and finished["id"] == "c-renew"
        assert finished["ok"] is True and finished["code"] == "renewed"
        assert current(device) == 2
        replayed = signed("ping", command_id="c-once")
        assert send(replayed)[0]["ok"] is True
        refusals = {
            "replayed": replayed,
            "unsigned": unsigned_envelope(payload(device=DEVICE, issued_at=now)),
            "expired": pki.signer.envelope(
                payload(
                    device=DEVICE, issued_at=now - timedelta(hours=1), lifetime=timedelta(minutes=5)
                )
            ),
            "wrong_device": pki.signer.envelope(payload(device="gw-9999", issued_at=now)),
            "untrusted_signer": rogue.signer.envelope(payload(device=DEVICE, issued_at=now)),
            "bad_signature": pki.signer.envelope(
                payload(device=DEVICE, issued_at=now), signature=b"\x30\x06\x02\x01\x01\x02\x01\x01"
            ),
            "unknown_command": signed("reboot"),
            "malformed": b'{"v":1,"payload":',
            "oversized": b"x" * (70 * 1024),
        }
        for code, raw in refusals.items():
            answer = send(raw)[0]
            assert (answer["ok"], answer["code"]) == (False, code), answer
        wait_for(
            lambda: (
                sum(1 for p in watcher.payloads(EVENTS) if p["event"] == "command_refused")
                >= len(refusals)
            ),
            "a command_refused event for each",
            service,
        )
        assert service.stop() == 0
    assert (device.state_dir / "command-replay.json").exists()


def test_lab_mode_accepts_unsigned_commands_and_warns_each_time(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    from datetime import datetime, timezone

    from tests.support.command_signer import payload, unsigned_envelope

    with broker(tmp_path, est) as mosquitto:
        with_mqtt(device, mosquitto, insecure_unsigned_commands=True)
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online", service)
        now = datetime.now(timezone.utc)
        for n in range(2):
            data = payload(device=DEVICE, issued_at=now, command_id=f"lab-{n}")
            watcher.publish(COMMANDS, unsigned_envelope(data))
            wait_for(lambda n=n: len(watcher.payloads(RESPONSES)) > n, "the answer", service)
        assert all(r["ok"] for r in watcher.payloads(RESPONSES))
        assert service.text().count("INSECURE: accepting unsigned command") == 2
        assert "INSECURE: mqtt.insecure_unsigned_commands is on" in service.text()
        assert service.stop() == 0


def test_a_new_identity_the_broker_refuses_is_not_rotated_to_while_it_takes_the_old_one(
    tmp_path: Path,
    device: Device,
    est: EstServer,
    notify: Notifications,
    services: list[Service],
    observers: list[Observer],
) -> None:
    """Verified rotation, the broker's part: generation 2's certificate is revoked at the broker
    before it is issued (its serial fixed ahead), so the broker refuses it while it takes
    generation 1: the rotation is refused as a security event, generation 1 stays current and
    connected, and the next renewal (a certificate the broker takes) rotates. The renewals are
    asked for with signed commands once the channel is connected (not by the clock)."""
    from datetime import datetime, timezone

    from tests.support.command_signer import CommandPki, payload

    pki = CommandPki()
    anchor = tmp_path / "command-anchor.pem"
    pki.root.write_cert(anchor)
    refused_serial = x509.random_serial_number()
    est.next_serials = [x509.random_serial_number(), refused_serial]  # generations 1 and 2
    device.configure(proof_of_possession="never")
    mosquitto = broker(tmp_path, est)
    mosquitto.write_crl(revoked=[refused_serial])
    with mosquitto:
        with_mqtt(device, mosquitto, command_trust_anchor=str(anchor))
        watcher = observe(mosquitto, observers)
        service = Service(device, notify, watchdog_usec=None)
        services.append(service)
        wait_for(online(watcher, 1), "online as generation 1", service)

        def renew(command_id: str) -> dict[str, Any]:
            data = payload(device=DEVICE, command="renew", command_id=command_id,
                           issued_at=datetime.now(timezone.utc))  # fmt: skip
            before = len(watcher.payloads(RESPONSES))
            watcher.publish(COMMANDS, pki.signer.envelope(data))
            wait_for(lambda: len(watcher.payloads(RESPONSES)) >= before + 2,
                     "accepted, then finished", service)  # fmt: skip
            return watcher.payloads(RESPONSES)[before + 1]  # type: ignore[return-value]

        refused = renew("c-renew-1")
        assert refused["ok"] is False, refused
        assert "refuses the new identity (generation 2)" in service.text()
        assert "certificate_revoked" in service.text()
        assert current(device) == 1 and 2 in generations(device)  # kept aside, not current
        assert online(watcher, 1)()  # still connected as generation 1
        taken = renew("c-renew-2")
        assert taken["ok"] is True and taken["code"] == "renewed", taken
        assert current(device) == 3 and "takes identity generation 3" in service.text()
        wait_for(online(watcher, 3), "online as generation 3", service)
        assert service.stop() == 0
