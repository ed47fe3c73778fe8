"""One connection to a broker with an identity, to ask "would it take us?" (doctor's check).

Blocking and bounded by `timeout`: TCP, the TLS handshake, MQTT CONNECT, CONNACK, DISCONNECT.
The client id is the device's with a `-probe` suffix, so the probe never takes over the
service's own session (two clients with one id close each other's connection). A rejection is
classified as the channel does it (agent/mqtt/rejection.py), the TLS 1.3 alert on the first read
included.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.clock import Clock
from agent.mqtt.channel import Broker, _recording_socket_class, rejection_from_tls
from agent.mqtt.rejection import from_connack

PROBE_SUFFIX = "-probe"


@dataclass(frozen=True)
class ProbeResult:
    #: "accepted", "rejected" (the broker refused us, or we refused the broker) or "unreachable"
    outcome: str
    detail: str


def probe(
    broker: Broker,
    context: ssl.SSLContext,
    *,
    client_id: str,
    protocol: str,
    timeout: float,
    clock: Clock,
) -> ProbeResult:
    errors: list[tuple[str | None, str]] = []
    context.sslsocket_class = _recording_socket_class(errors, clock)
    v5 = protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id + PROBE_SUFFIX,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    client.connect_timeout = timeout
    client.tls_set_context(context)
    answer: list[ReasonCode] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        answer.append(reason)

    client.on_connect = on_connect
    started = clock.monotonic()
    try:
        try:
            client.connect(broker.host, broker.port, keepalive=max(5, int(timeout) * 2))
        except (OSError, ValueError) as e:
            return _failed(errors, e)
        while not answer:
            if clock.monotonic() - started > timeout:
                return ProbeResult("unreachable", f"no CONNACK within {timeout:g} s")
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS and not answer:
                return _failed(errors, None)
        reason = answer[0]
        if reason.is_failure:
            found = from_connack(int(reason.value), str(reason))
            return ProbeResult("rejected" if found else "unreachable",
                               found.message if found else f"CONNACK: {reason}")  # fmt: skip
        client.disconnect()
        elapsed = (clock.monotonic() - started) * 1e3
        return ProbeResult("accepted", f"CONNACK in {elapsed:.0f} ms")
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()


def probe_in_order(
    brokers: Sequence[Broker],
    make_context: Callable[[], ssl.SSLContext],
    *,
    client_id: str,
    protocol: str,
    timeout: float,
    clock: Clock,
) -> tuple[Broker | None, ProbeResult]:
    """The brokers in order (as the channel fails over) until one answers: the first that
    accepts or refuses, with its result; else (None, "unreachable" naming each broker)."""
    seen = []
    for broker in brokers:
        result = probe(broker, make_context(), client_id=client_id, protocol=protocol,
                       timeout=timeout, clock=clock)  # fmt: skip
        if result.outcome != "unreachable":
            return broker, result
        seen.append(f"{broker}: {result.detail}")
    return None, ProbeResult("unreachable", "; ".join(seen))


def _failed(errors: list[tuple[str | None, str]], error: BaseException | None) -> ProbeResult:
    found = rejection_from_tls(errors, error)
    if found is not None:
        return ProbeResult("rejected", found.message)
    if error is None:
        return ProbeResult("unreachable", "the connection closed before CONNACK")
    return ProbeResult("unreachable", " ".join(f"{type(error).__name__}: {error}".split()))
