"""The device channel as a daemon Component: paho-mqtt driven by the daemon's one loop (I/O).

No thread and no `loop_start`/`loop_forever`: the daemon selects on paho's socket (writable
only while paho has bytes to send) and gives the channel turns, in which it calls `loop_read`,
`loop_write` and `loop_misc`, connects when the reconnect plan says so (agent/mqtt/backoff.py),
publishes the status when it is due and the queued events. A connect blocks at most
`mqtt.connect_timeout_seconds` for TCP and as long again for the TLS handshake.

Each connection is a new paho Client with its own SSLContext on the current identity (paho
refuses a second context on a Client). MQTT v5 `clean_start=False` with a Session Expiry
Interval (3.1.1: `clean_session=False`) keeps the subscription and the QoS 1 messages queued
for us across reconnects and the hot swap; our own events stay in the offline queue until the
broker acknowledges them (agent/mqtt/queue.py).

Events from the daemon: `enrolled`/`rotated` move the channel to the new identity (hot swap: the
new context is made while the old connection still lives, 1 + 2 TPM slots, then the old one is
closed cleanly and the new one connects); `attempt_started` lets go of the TPM context when the
attempt needs more slots than would be free (docs/tpm.md), `attempt_finished` reconnects and
answers a `renew` command; `channel_reconnect_requested` reconnects now.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import select
import ssl
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.clock import Clock
from agent.components import Event, EventKind, Host, Scalar
from agent.identity import Identity
from agent.mqtt import messages
from agent.mqtt.backoff import ReconnectPlan, ReconnectPolicy
from agent.mqtt.commands import ACTIONS, Accepted, CommandVerifier, Refused
from agent.mqtt.queue import EventQueue
from agent.mqtt.rejection import Rejection, from_connack, from_tls_reason, untrusted_broker
from agent.mqtt.topics import Topics

__all__ = ["Broker", "ChannelSettings", "MqttChannel", "parse_broker"]

log = logging.getLogger(__name__)

#: events that go out on the events topic (the rest are requests between parts, or noise)
NOT_PUBLISHED = frozenset(
    {
        EventKind.ATTEMPT_STARTED,
        EventKind.ATTEMPT_FINISHED,
        EventKind.CHANNEL_RECONNECT_REQUESTED,
        EventKind.CACERTS_REFRESH_REQUESTED,
    }
)
#: events after which the status is published again (what it shows has changed)
STATUS_CHANGES = frozenset(
    {
        EventKind.ATTEMPT_FINISHED,
        EventKind.ENROLLED,
        EventKind.ROTATED,
        EventKind.ROTATION_FAILED,
        EventKind.RELOADED,
        EventKind.CA_CHANGED,
        EventKind.CHANNEL_REJECTED,
    }
)


@dataclass(frozen=True)
class Broker:
    host: str
    port: int

    def __str__(self) -> str:
        return f"mqtts://{self.host}:{self.port}"


def parse_broker(url: str) -> Broker:
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise ValueError(f"not an mqtts:// URL: {url!r}")
    return Broker(parts.hostname, parts.port or 8883)


@dataclass(frozen=True)
class ChannelSettings:
    brokers: Sequence[Broker]
    topics: Topics
    client_id: str
    keepalive_seconds: int = 60
    reconnect_min_seconds: float = 1.0
    reconnect_max_seconds: float = 120.0
    qos: int = 1
    protocol: str = "5"
    status_interval_seconds: float = 300.0
    max_payload_bytes: int = 64 * 1024
    session_expiry_seconds: int = 3600
    offline_queue_events: int = 100
    connect_timeout_seconds: float = 10.0
    #: let go of the TPM context while an attempt runs (it needs more slots than are free)
    release_for_attempts: bool = False
    #: make no new TLS context (a TPM object) while an attempt runs, keeping the connection
    #: (a TPM without a resource manager: the attempt's process may need every other slot)
    hold_during_attempts: bool = False
    extra_status: Mapping[str, Scalar] = field(default_factory=dict)


#: OpenSSL reasons meaning no protocol version both sides accept
_VERSION_REASONS = (
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "WRONG_SSL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
    "VERSION_TOO_LOW",
)


class IdentitySource(Protocol):
    def current(self) -> Identity | None: ...


ContextFactory = Callable[[Identity], ssl.SSLContext]


def _recording_socket_class(
    sink: list[tuple[str | None, str]], clock: Clock
) -> type[ssl.SSLSocket]:
    """An SSLSocket that keeps the TLS errors it meets, as (reason, text): in TLS 1.3 the
    broker's alert about our certificate arrives on the first read after the handshake, and paho
    reports only "Unspecified error"; the recorded reason names the alert. (Not the exception
    itself: its traceback would keep the socket and the context, and so a TPM object, alive.)"""

    def recording(name: str) -> Callable[..., Any]:
        method = getattr(ssl.SSLSocket, name)
        if name == "do_handshake":

            def method(sock: ssl.SSLSocket, *args: Any, **kwargs: Any) -> None:
                _handshake_within_timeout(sock, clock)

        def call(self: ssl.SSLSocket, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as e:
                sink.append((e.reason, str(e)))
                if name == "do_handshake":  # paho drops a socket whose handshake failed unclosed
                    self.close()
                raise
            except OSError:
                if name == "do_handshake":
                    self.close()
                raise

        return call

    names = ("do_handshake", "recv", "recv_into", "read", "send", "sendall", "write")
    return type("RecordingSSLSocket", (ssl.SSLSocket,), {n: recording(n) for n in names})


def _handshake_within_timeout(sock: ssl.SSLSocket, clock: Clock) -> None:
    """The handshake within the socket's timeout as a whole (paho sets it to
    mqtt.connect_timeout_seconds), not per read: a server that drips its handshake a byte a
    second would otherwise keep each read under the timeout, and the daemon's loop for hours."""
    timeout = sock.gettimeout()
    if not timeout:  # blocking without a limit, or not blocking: as asked
        ssl.SSLSocket.do_handshake(sock)
        return
    end = clock.monotonic() + timeout
    sock.settimeout(0.0)
    try:
        while True:
            try:
                ssl.SSLSocket.do_handshake(sock)
                return
            except ssl.SSLWantReadError:
                readers, writers = [sock], []
            except ssl.SSLWantWriteError:
                readers, writers = [], [sock]
            left = end - clock.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"TLS handshake not done within {timeout:g} s (mqtt.connect_timeout_seconds)"
                )
            select.select(readers, writers, [], left)
    finally:
        if sock.fileno() >= 0:
            sock.settimeout(timeout)


def rejection_from_tls(
    recorded: Sequence[tuple[str | None, str]], error: BaseException | None
) -> Rejection | None:
    """What the TLS errors a connection met (recorded by `_recording_socket_class`, newest
    last, then `error`) say about an identity, or None when they say nothing about one."""
    candidates = list(recorded)
    if isinstance(error, ssl.SSLError):
        candidates.append((error.reason, str(error)))
    for reason, text in reversed(candidates):
        found = from_tls_reason(reason, text)
        if found is not None:
            return found
    if isinstance(error, ssl.CertificateError):
        return Rejection("broker_untrusted", f"the broker's certificate: {error}", identity=False)
    return None


class MqttChannel:
    """The Component (agent/components.py) named "mqtt"."""

    name = "mqtt"

    def __init__(
        self,
        *,
        settings: ChannelSettings,
        identities: IdentitySource,
        context_for: ContextFactory,
        status_document: Callable[[], Mapping[str, Any]],
        verifier: CommandVerifier,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        if not settings.brokers:
            raise ValueError("no broker")
        self._s = settings
        self._identities = identities
        self._context_for = context_for
        self._status_document = status_document
        self._verify = verifier
        self._clock = clock
        policy = ReconnectPolicy(settings.reconnect_min_seconds, settings.reconnect_max_seconds)
        self._plan = ReconnectPlan(len(settings.brokers), policy, rng or random.SystemRandom())
        self._queue = EventQueue(settings.offline_queue_events)
        self.host: Host | None = None
        self._client: mqtt.Client | None = None
        self._ssl_errors: list[tuple[str | None, str]] = []
        self._connected = False
        self._connect_deadline: datetime | None = None
        self._broker: Broker | None = None
        self._generation: int | None = None  # the identity of the current connection
        self._since: datetime | None = None
        self._held = False  # the TPM context let go for an attempt
        self._swap_to: int | None = None  # a newer identity to move to
        self._status_due: datetime | None = None
        self._status_dirty = False
        self._rejection: Rejection | None = None
        self._rejected_generation: int | None = None
        self._renewal_asked_for: int | None = None
        self._last_rejection: tuple[str, int | None] | None = None
        #: answers that could not go out yet (oldest dropped beyond the queue's size)
        self._replies: deque[dict[str, Any]] = deque(maxlen=settings.offline_queue_events)
        self._renew_commands: list[str] = []
        self._last_error: str | None = None
        self._connects = 0
        self._stopped = False
        self._collect = False

    # -- Component ----------------------------------------------------------------------------

    def start(self, host: Host) -> None:
        self.host = host  # connecting waits for the first turn (the daemon's first snapshot)

    def descriptors(self) -> tuple[Sequence[int], Sequence[int]]:
        sock = self._socket()
        if sock is None:
            return (), ()
        fd = sock.fileno()
        assert self._client is not None
        return [fd], ([fd] if self._client.want_write() else [])

    def next_turn(self) -> datetime | None:
        now = self._clock.now()
        if self._stopped:
            return None
        if self._status_dirty or self._swap_to is not None:
            return now
        times: list[datetime] = []
        if self._client is None:
            if not self._held and self._plan.at is not None:
                times.append(self._plan.at)
            elif not self._held:
                times.append(now)
        else:
            # paho pings from loop_misc: a turn at least four times per keepalive
            times.append(now + timedelta(seconds=self._s.keepalive_seconds / 4))
            if self._connect_deadline is not None:
                times.append(self._connect_deadline)
            if self._status_due is not None:
                times.append(self._status_due)
        return min(times) if times else None

    def turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        try:
            self._turn(now, readable, writable)
        finally:
            self._release_garbage()

    def _release_garbage(self) -> None:
        """A context kept by a reference cycle (paho's client) would keep its TPM object: drop
        it before the daemon goes on (an attempt may need the slot right after this event)."""
        if self._collect:
            self._collect = False
            gc.collect()

    def _turn(self, now: datetime, readable: Collection[int], writable: Collection[int]) -> None:
        client, sock = self._client, self._socket()
        if client is not None and sock is not None:
            fd = sock.fileno()
            if fd in readable:
                client.loop_read()
            if self._client is client and (fd in writable or client.want_write()):
                client.loop_write()
            if self._client is client:
                client.loop_misc()
        deadline = self._connect_deadline
        if self._client is not None and not self._connected and deadline and now >= deadline:
            self._failed(now, f"no CONNACK from {self._broker} in time")
        if self._swap_to is not None and not self._held:
            self._swap(now)
        if self._client is None and not self._held and self._plan.due(now):
            self._connect(now)
        if self._connected and (
            self._status_dirty or (self._status_due and now >= self._status_due)
        ):
            self._publish_status(now)

    def on_event(self, event: Event) -> None:
        try:
            self._on_event(event)
        finally:
            self._release_garbage()

    def _on_event(self, event: Event) -> None:
        now = self._clock.now()
        kind = event.kind
        if kind not in NOT_PUBLISHED:
            self._queue.add(event)
            self._flush_events()
        if kind in STATUS_CHANGES:
            self._status_dirty = True
        if kind in (EventKind.ROTATED, EventKind.ENROLLED):
            generation = event.detail.get("generation")
            if isinstance(generation, int):
                self._new_identity(now, generation)
        elif kind == EventKind.ATTEMPT_STARTED:
            if self._s.release_for_attempts and self._client is not None:
                log.info(
                    "mqtt: letting go of the TPM context for the %s", event.detail.get("action")
                )
                self._close(now, reason="released for a renewal attempt")
                self._held = True
            elif self._s.release_for_attempts or self._s.hold_during_attempts:
                self._held = True  # no new TPM context until the attempt is over
        elif kind == EventKind.ATTEMPT_FINISHED:
            if self._held:
                self._held = False
                self._plan.now(now)
            if event.detail.get("requested"):
                self._answer_renewals(now, event)
        elif kind == EventKind.CHANNEL_RECONNECT_REQUESTED:
            self._close(now, reason="reconnect requested")
            self._plan.now(now)

    def status(self) -> Mapping[str, Scalar]:
        out: dict[str, Scalar] = {
            "connected": self._connected,
            "broker": str(self._broker) if self._broker else None,
            "since": messages.iso(self._since) if self._since and self._connected else None,
            "generation": self._generation if self._connected else None,
            "queued_events": len(self._queue),
            "dropped_events": self._queue.dropped_total,
            "rejected": self._rejection.reason if self._rejection else None,
            # kept after the broker accepts us again: what it said last, about which identity
            "last_rejection": self._last_rejection[0] if self._last_rejection else None,
            "last_rejection_generation": self._last_rejection[1] if self._last_rejection else None,
            "last_error": self._last_error,
            "connects": self._connects,
            "next_attempt": messages.iso(self._plan.at)
            if self._plan.at and not self._connected
            else None,
        }
        out.update(self._s.extra_status)
        return out

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        now = self._clock.now()
        client = self._client
        if client is not None and self._connected:
            offline = messages.offline_status(self._s.topics.device, now, "stopped")
            client.publish(
                self._s.topics.status, messages.encode(offline), self._s.qos, retain=True
            )
            self._pump(client)
        self._close(now, reason="stopped")
        self._release_garbage()

    # -- connecting -----------------------------------------------------------------------------

    def _socket(self) -> Any:
        return None if self._client is None else self._client.socket()

    def _connect(
        self, now: datetime, prepared: tuple[Identity, ssl.SSLContext] | None = None
    ) -> None:
        if prepared is not None:
            self._connect_with(now, *prepared)
            return
        try:
            identity = self._identities.current()
        except Exception as e:  # an AgentError: the daemon's enroller repairs it
            self._last_error = f"the current identity cannot be read: {e}"
            identity = None
        if identity is None:
            self._plan.at = now + timedelta(seconds=self._s.reconnect_max_seconds)
            self._last_error = self._last_error or "no identity yet (waiting for the enrollment)"
            return
        self._broker = self._s.brokers[self._plan.index]
        try:
            ctx = self._context_for(identity)
        except Exception as e:  # a TPM slot shortage, a damaged key: tried again later
            log.warning(
                "mqtt: cannot make a TLS context for identity generation %d: %s",
                identity.generation,
                e,
            )
            self._failed(now, f"TLS context: {e}", slow=True)
            return
        self._connect_with(now, identity, ctx)

    def _connect_with(self, now: datetime, identity: Identity, ctx: ssl.SSLContext) -> None:
        broker = self._broker = self._s.brokers[self._plan.index]
        errors: list[tuple[str | None, str]] = []
        self._ssl_errors = errors
        ctx.sslsocket_class = _recording_socket_class(errors, self._clock)
        client = self._new_client(ctx, now)
        self._client = client
        self._generation = identity.generation
        self._connected = False
        self._connect_deadline = now + timedelta(seconds=self._s.connect_timeout_seconds)
        failure: tuple[str, Rejection | None] | None = None
        try:
            if self._s.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self._s.session_expiry_seconds
                client.connect(
                    broker.host,
                    broker.port,
                    self._s.keepalive_seconds,
                    clean_start=False,
                    properties=props,
                )
            else:
                client.connect(broker.host, broker.port, self._s.keepalive_seconds)
        except (OSError, ValueError) as e:
            failure = self._describe(e), self._classify_tls(e)
        del ctx, client  # only self._client keeps them: _teardown frees the TPM object
        if failure is not None:  # handled after the except block, whose frames hold the context
            if self._client is not None and self._client.on_connect is not None:
                # the backoff counts from the failure: the connect may have blocked for
                # connect_timeout_seconds (a handshake dripped to its deadline)
                self._failed(self._clock.now(), failure[0], rejection=failure[1])
            return
        log.debug("mqtt: connecting to %s as generation %d", broker, identity.generation)

    def _new_client(self, ctx: ssl.SSLContext, now: datetime) -> mqtt.Client:
        v5 = self._s.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._s.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.connect_timeout = self._s.connect_timeout_seconds
        client.tls_set_context(ctx)
        will = messages.offline_status(self._s.topics.device, now, "connection lost")
        client.will_set(self._s.topics.status, messages.encode(will), self._s.qos, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.enable_logger(logging.getLogger("agent.mqtt.paho"))
        return client

    def _describe(self, error: BaseException) -> str:
        text = " ".join(f"{type(error).__name__}: {error}".split())
        reason = (getattr(error, "reason", None) or "") if isinstance(error, ssl.SSLError) else ""
        if isinstance(error, TimeoutError) and str(error).startswith("TLS handshake"):
            return str(error)
        if reason.upper() in _VERSION_REASONS:
            return (
                "TLS handshake failed: the broker offers no TLS version >= 1.2 (TLS 1.0 and 1.1 "
                f"are never used) ({text})"
            )
        if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
            isinstance(error, ConnectionError) and not isinstance(error, ConnectionRefusedError)
        ):
            return f"the broker closed or reset the connection in the TLS handshake ({text})"
        return text

    def _classify_tls(self, error: BaseException | None = None) -> Rejection | None:
        if isinstance(error, ssl.SSLCertVerificationError) and self._broker is not None:
            where = f"{self._broker.host}:{self._broker.port}"
            detail = error.verify_message or str(error)
            return untrusted_broker(where, error.verify_code, detail)
        return rejection_from_tls(self._ssl_errors, error)

    # -- paho callbacks (called inside loop_read/loop_write/connect, in this thread) -----------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if client is not self._client:
            return
        now = self._clock.now()
        if reason.is_failure:
            found = from_connack(int(reason.value), str(reason))
            self._failed(now, f"CONNACK: {reason}", rejection=found)
            return
        self._connected = True
        self._connect_deadline = None
        self._since = now
        self._connects += 1
        self._plan.connected(now)
        self._last_error = None
        if self._rejection is not None:
            log.info(
                "mqtt: %s accepts identity generation %s again", self._broker, self._generation
            )
        self._rejection = None
        log.info("mqtt: connected to %s as identity generation %s", self._broker, self._generation)
        client.subscribe(self._s.topics.commands, self._s.qos)
        self._status_dirty = True
        self._queue.connection_ended()  # what the last connection had in flight goes again
        self._flush_events()
        while self._replies:
            if self._publish(self._s.topics.responses, self._replies[0]) is None:
                break
            self._replies.popleft()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if client is not self._client:
            return  # one we closed ourselves
        now = self._clock.now()
        if not self._connected:
            self._failed(now, f"connection closed: {reason}", rejection=self._classify_tls())
            return
        rejection = self._classify_tls()
        self._teardown()
        self._queue.connection_ended()
        if rejection is not None:  # TLS 1.3: the alert on the first read
            self._rejected(now, rejection)
            return
        self._last_error = f"connection to {self._broker} lost: {reason}"
        log.warning("mqtt: %s", self._last_error)
        self._plan.lost(now)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        if client is self._client:
            self._queue.acknowledged(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if client is not self._client or message.topic != self._s.topics.commands:
            return
        self._command(self._clock.now(), bytes(message.payload))

    # -- failures and rejections ----------------------------------------------------------------

    def _failed(
        self, now: datetime, what: str, *, rejection: Rejection | None = None, slow: bool = False
    ) -> None:
        broker = self._broker
        self._teardown()
        if rejection is not None and rejection.identity:
            self._rejected(now, rejection)
            return
        if rejection is not None and rejection.security:  # we cannot trust it: not hammered
            self._last_error = rejection.message
            log.error("mqtt: security: %s; retrying slowly", self._last_error)
            self._plan.failed(now, slow=True)
            return
        self._last_error = f"{broker}: {rejection.message if rejection else what}"
        log.warning("mqtt: %s", self._last_error)
        self._plan.failed(now, slow=slow)

    def _rejected(self, now: datetime, rejection: Rejection) -> None:
        """The broker refused our identity: say exactly that, hand it to the scheduler, and do
        not hammer the broker with the same certificate."""
        generation = self._generation
        first = (self._rejection, self._rejected_generation) != (rejection, generation)
        self._rejection, self._rejected_generation = rejection, generation
        self._last_rejection = (rejection.reason, generation)
        self._last_error = f"{self._broker}: {rejection.message}"
        log.error("mqtt: %s (identity generation %s)", self._last_error, generation)
        if first and self.host is not None:
            detail: dict[str, Scalar] = {
                "reason": rejection.reason,
                "message": rejection.message,
                "broker": str(self._broker),
                "generation": generation,
                "renewal_requested": rejection.renew and self._renewal_asked_for != generation,
            }
            self.host.emit(Event(EventKind.CHANNEL_REJECTED, now, detail, source=self.name))
        if rejection.renew and self._renewal_asked_for != generation and self.host is not None:
            self._renewal_asked_for = generation  # once per identity generation
            log.warning("mqtt: asking for a renewal: the broker says %s", rejection.reason)
            self.host.request_renewal()
        self._plan.failed(now, slow=True)

    # -- the hot swap ---------------------------------------------------------------------------

    def _new_identity(self, now: datetime, generation: int) -> None:
        if self._client is not None and self._generation == generation:
            return
        if self._client is None:
            self._plan.now(now)  # not connected (waiting, rejected, backing off): try it now
            return
        self._swap_to = generation

    def _swap(self, now: datetime) -> None:
        """Move to the current identity: its context is made while the old connection lives,
        then the old one is closed cleanly (no last will; the broker keeps the session) and the
        new one connects at once with clean_start=False."""
        self._swap_to = None
        identity = self._identities.current()
        if identity is None or identity.generation == self._generation:
            return
        prepared: tuple[Identity, ssl.SSLContext] | None = None
        try:
            prepared = identity, self._context_for(identity)  # 1 slot held + 2 to load = 3
        except Exception as e:
            log.warning("mqtt: hot swap to generation %d: %s; reconnecting", identity.generation, e)
        log.info("mqtt: moving to identity generation %d", identity.generation)
        self._close(now, reason=f"moving to identity generation {identity.generation}")
        self._plan.now(now)
        self._connect(now, prepared)

    # -- closing --------------------------------------------------------------------------------

    def _teardown(self) -> None:
        """Drop the client and its TLS context (and with it the TPM object slot)."""
        client, self._client = self._client, None
        self._connected = False
        self._connect_deadline = None
        if client is not None:
            client.on_connect = client.on_disconnect = None
            client.on_message = client.on_publish = None
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            client._ssl_context = None  # paho keeps it otherwise
            self._collect = True  # at the end of this turn or event, when no frame holds it

    def _close(self, now: datetime, *, reason: str) -> None:
        client = self._client
        if client is None:
            return
        self._client = None  # its callbacks now see a client that is not ours
        if self._connected:
            try:
                client.disconnect()  # DISCONNECT 0: no last will, the session is kept
                self._pump(client)
            except (OSError, ValueError) as e:
                log.debug("mqtt: disconnect: %s", e)
        log.debug("mqtt: closed (%s)", reason)
        self._client = client
        self._queue.connection_ended()
        self._teardown()

    def _pump(self, client: mqtt.Client) -> None:
        """Write what paho has queued (a few small packets; the socket is not blocking)."""
        for _ in range(10):
            if not client.want_write() or client.socket() is None:
                return
            if client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                return

    # -- publishing -----------------------------------------------------------------------------

    def _publish(self, topic: str, message: dict[str, Any], *, retain: bool = False) -> int | None:
        client = self._client
        if client is None or not self._connected:
            return None
        data = messages.bounded(message, self._s.max_payload_bytes)
        info = client.publish(topic, data, self._s.qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.debug("mqtt: publish to %s: %s", topic, mqtt.error_string(info.rc))
            return None
        return info.mid

    def _publish_status(self, now: datetime) -> None:
        self._status_dirty = False
        self._status_due = now + timedelta(seconds=self._s.status_interval_seconds)
        try:
            document = self._status_document()
        except Exception as e:  # the status must go out even when a part of it cannot be read
            log.warning("mqtt: status document: %s", e)
            document = {"errors": [str(e)]}
        channel = {k: v for k, v in self.status().items() if v is not None}
        message = messages.online_status(self._s.topics.device, now, document, channel)
        self._publish(self._s.topics.status, message, retain=True)

    def _flush_events(self) -> None:
        if not self._connected:
            return
        for item in self._queue.unsent():
            dropped = self._queue.drops_for(item)
            message = messages.event_message(self._s.topics.device, item.seq, item.event, dropped)
            mid = self._publish(self._s.topics.events, message)
            if mid is None:
                return
            self._queue.sending(item, mid)

    # -- commands -------------------------------------------------------------------------------

    def _command(self, now: datetime, raw: bytes) -> None:
        if len(raw) > self._s.max_payload_bytes:
            verdict: Accepted | Refused = Refused(
                "oversized",
                f"{len(raw)} bytes is over mqtt.max_payload_bytes ({self._s.max_payload_bytes})",
            )
        else:
            try:
                verdict = self._verify(raw, now)
            except Exception as e:  # a verifier bug must not take the channel down
                log.exception("mqtt: the command verifier failed")
                verdict = Refused("internal_error", f"the command could not be checked: {e}")
        if isinstance(verdict, Refused):
            log.warning(
                "mqtt: command %s refused: %s: %s", verdict.id, verdict.code, verdict.message
            )
            self._respond(now, verdict.id, ok=False, code=verdict.code, detail=verdict.message)
            self._emit(
                now,
                EventKind.COMMAND_REFUSED,
                id=verdict.id,
                code=verdict.code,
                message=verdict.message,
                security=verdict.security,
            )
            return
        self._emit(
            now,
            EventKind.COMMAND_ACCEPTED,
            id=verdict.id,
            command=verdict.command,
            unsigned=verdict.unsigned,
        )
        self._act(now, verdict)

    def _act(self, now: datetime, command: Accepted) -> None:
        assert self.host is not None
        name = command.command
        if name not in ACTIONS:  # the verifier accepted something we cannot do
            message = f"{name!r} is not a command of this agent"
            self._respond(now, command.id, ok=False, code="unknown_command", detail=message)
            return
        detail = {
            "ping": "pong",
            "status": "status published",
            "renew": "renewal requested: a second answer follows when it finished",
            "refresh-cacerts": "the CA certificates refresh is requested",
        }[name]
        self._respond(now, command.id, ok=True, code="accepted", detail=detail)
        if name == "status":
            self._publish_status(now)
        elif name == "renew":
            self._renew_commands.append(command.id)
            self.host.request_renewal()  # answered again at attempt_finished
        elif name == "refresh-cacerts":
            event = Event(
                EventKind.CACERTS_REFRESH_REQUESTED, now, {"command_id": command.id}, self.name
            )
            self.host.emit(event)

    def _answer_renewals(self, now: datetime, event: Event) -> None:
        ids, self._renew_commands = self._renew_commands, []
        ok = bool(event.detail.get("ok"))
        code = "renewed" if ok else str(event.detail.get("disposition") or "failed")
        message = str(event.detail.get("message") or "")
        for command_id in ids:
            self._respond(now, command_id, ok=ok, code=code, detail=message)

    def _respond(
        self, now: datetime, command_id: str | None, *, ok: bool, code: str, detail: str = ""
    ) -> None:
        reply = messages.response_message(
            now, command_id=command_id, ok=ok, code=code, detail=detail
        )
        if self._publish(self._s.topics.responses, reply) is None:
            # not connected (a renew answered while the TPM context was let go): on connect
            self._replies.append(reply)

    def _emit(self, now: datetime, kind: str, **detail: Scalar) -> None:
        if self.host is not None:
            self.host.emit(Event(kind, now, detail, source=self.name))
