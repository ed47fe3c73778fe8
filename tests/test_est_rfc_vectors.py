"""Published EST examples parse as the RFC says they should (interoperability beyond our server)."""

from __future__ import annotations

import base64

from agent.est.csrattrs import parse_csrattrs, plan_csr
from agent.pki import SubjectSpec
from hal.interfaces import KeyAlgorithm

# RFC 7030 section 4.5.2: the server asks for challengePassword (proof-of-possession), an EC key
# on secp384r1, the macAddress extension (1.3.6.1.1.1.1.22) and ecdsa-with-SHA384.
RFC7030_CSRATTRS = (
    "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
)


def test_rfc7030_csrattrs_example() -> None:
    hints = parse_csrattrs(base64.b64decode(RFC7030_CSRATTRS))
    assert hints.pop_requested is True
    assert hints.key_type == "ec"
    assert hints.key_algorithm is KeyAlgorithm.EC_P384
    assert hints.hash_name == "sha384"
    # a MAC address extension is something the agent cannot vouch for: ignored, and said so
    assert hints.ignored == ("extensionRequest for macAddress (1.3.6.1.1.1.1.22)",)
    plan = plan_csr(hints, KeyAlgorithm.EC_P256, SubjectSpec(common_name="gw-1"))
    assert (plan.algorithm, plan.hash_name) == (KeyAlgorithm.EC_P384, "sha384")


def test_rfc7030_csrattrs_example_with_trailing_garbage() -> None:
    """Deployed servers append bytes after the DER (DESIGN.md); the attributes still count."""
    der = base64.b64decode(RFC7030_CSRATTRS) + b"\x00\x00garbage"
    assert parse_csrattrs(der).key_algorithm is KeyAlgorithm.EC_P384
