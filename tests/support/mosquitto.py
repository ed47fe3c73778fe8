"""A real mosquitto for the channel's tests and bench: TLS only, on a free loopback port.

Generated config: `require_certificate true`, `use_identity_as_username true` (the client
certificate's CN is the user name), ACLs per device (`<prefix>/<CN>/#` only; the observer CN may
read and write everything), a `crlfile` from the device CA, `set_tcp_nodelay true`, `log_dest
file`. `tls12_only` caps the broker at TLS 1.2 through its own OPENSSL_CONF (mosquitto's
`tls_version` is a minimum). Stopped by PID; `restart()` keeps the port.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import ssl
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import procs
from tests.support.ca import TestCA, key_pem, pem, utcnow

OBSERVER = "observer"


def crl_pem(
    ca: TestCA,
    revoked: Iterable[int] = (),
    *,
    last_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
) -> bytes:
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last_update or now - dt.timedelta(minutes=5))
        .next_update(next_update or now + dt.timedelta(days=1))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM)


class Mosquitto:
    def __init__(
        self,
        directory: Path,
        *,
        device_ca: TestCA,
        prefix: str = "devid",
        tls12_only: bool = False,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.device_ca = device_ca
        self.prefix = prefix
        self.tls12_only = tls12_only
        self.server_ca = TestCA(name="devid test broker CA")
        self.ca_file = self.server_ca.write_cert(directory / "broker-ca.pem")
        self.cert_file, self.key_file = self.server_ca.server_identity(directory)
        #: the observer's own CA: always trusted, with a valid CRL, whatever the tests do to the
        #: device CA's trust and CRL
        self.observer_ca = TestCA(name="devid test observer CA")
        self.client_cafile = directory / "client-cas.pem"
        self.trust(device_ca)
        self.crl_file = directory / "crl.pem"
        self.write_crl()
        self.log = directory / "mosquitto.log"
        self.acl = directory / "acl"
        self.acl.write_text(
            f"user {OBSERVER}\ntopic readwrite #\n\npattern readwrite {prefix}/%u/#\n"
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.observer_ca.issue(
            key.public_key(), subject=OBSERVER, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        self.observer_cert = directory / "observer.pem"
        self.observer_key = directory / "observer.key"
        self.observer_cert.write_bytes(pem(cert))
        self.observer_key.write_bytes(key_pem(key))
        self.port = procs.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"

    def trust(self, *cas: TestCA) -> None:
        """The CAs whose client certificates the broker accepts (at its next start)."""
        self.client_cafile.write_bytes(b"".join(pem(ca.cert) for ca in (*cas, self.observer_ca)))

    def write_crl(self, revoked: Sequence[int] = (), **dates: dt.datetime) -> None:
        """The device CA's CRL (read at the broker's next start)."""
        data = crl_pem(self.device_ca, revoked, **dates) + crl_pem(self.observer_ca)
        self.crl_file.write_bytes(data)

    def _config(self) -> Path:
        path = self.directory / "mosquitto.conf"
        path.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    # started as root, mosquitto would become user mosquitto, who cannot write here
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    "allow_anonymous false",
                    # sessions and retained messages outlive a restart (saved at SIGTERM)
                    "persistence true",
                    f"persistence_location {self.directory}/",
                    f"acl_file {self.acl}",
                    f"log_dest file {self.log}",
                    "log_type all",
                    "connection_messages true",
                    f"listener {self.port} 127.0.0.1",
                    f"cafile {self.client_cafile}",
                    f"certfile {self.cert_file}",
                    f"keyfile {self.key_file}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    f"crlfile {self.crl_file}",
                    "tls_version tlsv1.2",
                    "set_tcp_nodelay true",
                    "",
                ]
            )
        )
        return path

    def start(self) -> Mosquitto:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if self.tls12_only:
            conf = self.directory / "openssl-tls12.cnf"
            conf.write_text(
                "openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = sys\n"
                "[sys]\nMaxProtocol = TLSv1.2\n"
            )
            env["OPENSSL_CONF"] = str(conf)
        self.proc = procs.start(
            ["mosquitto", "-c", str(self._config())],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _closing_handshake(self: ssl.SSLSocket, *args: object) -> None:
    try:
        ssl.SSLSocket.do_handshake(self, *args)  # type: ignore[arg-type]
    except OSError:
        self.close()
        raise


_ClosingSocket = type("_ClosingSocket", (ssl.SSLSocket,), {"do_handshake": _closing_handshake})


class Observer:
    """A second client (software key, CN "observer") that records what it receives: the
    retained status, events, command responses. Its own paho thread; waits poll its list."""

    def __init__(self, broker: Mosquitto, topic: str = "#", *, tls12: bool = False) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = threading.Event()
        ctx = ssl.create_default_context(cafile=str(broker.ca_file))
        ctx.load_cert_chain(str(broker.observer_cert), str(broker.observer_key))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.sslsocket_class = _ClosingSocket  # paho leaves a socket whose handshake failed open
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"observer-{id(self)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(1, 1)  # back soon after a broker restart
        self._topic = topic

        def on_connect(client: mqtt.Client, *args: object) -> None:
            client.subscribe(self._topic, 1)
            self.connected.set()

        def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600  # what is published while it reconnects waits for it
        self.client.connect("localhost", broker.port, 30, properties=props)
        self.client.loop_start()

    def payloads(self, topic: str) -> list[dict[str, object]]:
        import json

        return [json.loads(p) for t, p, _ in list(self.messages) if t == topic and p]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
