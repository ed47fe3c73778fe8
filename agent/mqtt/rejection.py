"""What a broker's refusal says about our identity, and what the channel does about it (pure).

From the TLS layer: the alert the broker sent, as OpenSSL names it in the `ssl.SSLError`
reason (in TLS 1.2 at the handshake; in TLS 1.3 on the first read after it, which paho reports
only as "Unspecified error": the channel records it from the socket). From MQTT: the CONNACK
reason code (MQTT v5 codes; paho maps the 3.1.1 return codes onto them).

- expired, revoked: our certificate is the problem, and a new one fixes it: a renewal is
  requested (once per identity generation), and the channel waits for the new identity.
- unknown CA: the broker does not trust our issuer. A renewal from the same CA would be refused
  the same way, so none is requested; it is reported (status, event) and retried slowly: an
  operator must fix the broker's CA file (or our EST CA changed: the CA refresh's job).
- bad certificate, certificate required, not authorized, bad user name, banned: reported and
  retried slowly; not ours to repair.
- our own check of the broker failing (`broker_untrusted`: another host name, expired, another
  CA's chain) is not a rejection of us but a security event (a man in the middle, or a broken
  broker): said in one line naming which check failed, and retried slowly, never at the lower
  bound.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rejection", "from_connack", "from_tls_reason", "untrusted_broker"]


@dataclass(frozen=True)
class Rejection:
    #: stable name: unknown_ca, certificate_expired, certificate_revoked, bad_certificate, ...
    reason: str
    message: str
    #: the broker refused our identity (False: we refused the broker)
    identity: bool = True
    #: a new certificate would fix it: ask the scheduler for a renewal
    renew: bool = False
    #: a security event (we cannot trust the broker): logged as an error, retried slowly
    security: bool = False


_TLS = {
    # alert names as OpenSSL 3 reports them (ssl.SSLError.reason)
    "TLSV1_ALERT_UNKNOWN_CA": ("unknown_ca", False),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ("certificate_expired", True),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": ("certificate_revoked", True),
    "SSLV3_ALERT_BAD_CERTIFICATE": ("bad_certificate", False),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": ("bad_certificate", False),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ("bad_certificate", False),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": ("certificate_required", False),
    "TLSV1_ALERT_ACCESS_DENIED": ("access_denied", False),
}
_OURS = {"CERTIFICATE_VERIFY_FAILED": "broker_untrusted"}

_CONNACK = {
    0x85: "client_id_not_valid",
    0x86: "bad_username_or_password",
    0x87: "not_authorized",
    0x8A: "banned",
    0x8C: "bad_authentication_method",
}


def from_tls_reason(reason: str | None, message: str) -> Rejection | None:
    """A TLS error's reason -> a Rejection, or None when it says nothing about identities."""
    if reason is None:
        return None
    if reason in _TLS:
        name, renew = _TLS[reason]
        return Rejection(
            name, f"the broker refused our certificate: {name} ({message})", renew=renew
        )
    if reason in _OURS:
        return Rejection(
            _OURS[reason], f"the broker's certificate: {message}", identity=False, security=True
        )
    return None


_OTHER_CA = "(another CA: a man in the middle, or the wrong mqtt.ca_file)"
#: OpenSSL verify codes (X509_V_ERR_*) for the broker's certificate, in words
_UNTRUSTED = {
    2: f"its certificate's issuer is not in mqtt.ca_file {_OTHER_CA}",
    18: f"its certificate is self-signed and not in mqtt.ca_file {_OTHER_CA}",
    19: f"its chain ends in a root that is not in mqtt.ca_file {_OTHER_CA}",
    20: f"its certificate does not chain to mqtt.ca_file {_OTHER_CA}",
    21: f"its certificate does not chain to mqtt.ca_file {_OTHER_CA}",
    9: "its certificate is not valid yet (or this device's clock is behind)",
    10: "its certificate has expired (or this device's clock is ahead)",
    62: "its certificate is for another host name",  # X509_V_ERR_HOSTNAME_MISMATCH
    64: "its certificate is for another address",  # X509_V_ERR_IP_ADDRESS_MISMATCH
}


def untrusted_broker(where: str, verify_code: int | None, detail: str) -> Rejection:
    """Our check of the broker's certificate failed (OpenSSL's verify code and message): one
    line naming the check, OpenSSL's words after it."""
    words = _UNTRUSTED.get(verify_code or 0, "its certificate was refused")
    return Rejection(
        "broker_untrusted",
        f"broker {where} is not trusted: {words} ({detail})",
        identity=False,
        security=True,
    )


def from_connack(code: int, name: str) -> Rejection | None:
    """A failed CONNACK's reason code -> a Rejection of our identity, or None (busy, moved,
    unavailable, quota: try again or elsewhere)."""
    if code in _CONNACK:
        return Rejection(_CONNACK[code], f"the broker refused the connection: {name} ({code:#x})")
    return None
