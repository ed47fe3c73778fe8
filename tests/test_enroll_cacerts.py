"""What enrollment keeps of a /cacerts answer: judged as the CA refresh judges it
(agent/ca_refresh.py `judge`) before it is used or stored, on the first enrollment and on the
fallback when the stored set does not validate the issued certificate. Our real HTTPS EST
server, software keys, in-process; one case through the real CLI for its exit code.

The rule and why a first enrollment differs: docs/est.md, "What a fetched CA set may become"."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent import wiring
from agent.ca_service import CaRefresher
from agent.cli import exit_code_for
from agent.clock import ManualClock
from agent.config import load_config, parse_config
from agent.enroll import Enroller
from agent.errors import ChainValidationError
from agent.est.memory import FILE_NAME as MEMORY_FILE
from agent.est.memory import ca_set_sha256
from hal.softkeys import SoftwareKeyStore
from tests.support.ca import TestCA, pem
from tests.support.device import Device
from tests.support.enroll_env import config_text, snapshot, write_config
from tests.support.est_server import EstOptions, EstServer, Pki


class Env:
    def __init__(self, tmp_path: Path, est: EstServer) -> None:
        self.tmp_path, self.est = tmp_path, est
        self.state_dir = tmp_path / "state"
        self.clock = ManualClock(datetime.now(timezone.utc))

    def enroller(self, **est_keys: Any) -> Enroller:
        text = config_text(state_dir=self.state_dir, est=self.est, store="software", **est_keys)
        config = parse_config(text, source=self.tmp_path / "config.toml")
        return wiring.enroller(config, key_store=SoftwareKeyStore(), clock=self.clock)

    def stored(self) -> set[x509.Certificate]:
        """The stored set (in the order the PKCS#7 answer carried it, DER-sorted on the wire)."""
        return set(x509.load_pem_x509_certificates((self.state_dir / "cacerts.pem").read_bytes()))

    def remembered(self) -> str:
        return str(json.loads((self.state_dir / MEMORY_FILE).read_text())["cacerts_sha256"])

    def operations(self) -> list[str]:
        ops = self.est.operations()
        self.est.records.clear()
        return ops


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _two_level() -> Pki:
    return Pki(issuing=TestCA(name="issuing CA", parent=TestCA(name="device root")))


def _tls_under_another_root() -> Pki:
    """An EST server whose TLS certificate comes from another PKI than the one that issues
    (RFC 7030 3.6.1: the explicit anchor authenticates the server; /cacerts is what issues)."""
    devices = TestCA(name="device CA", parent=TestCA(name="device root"))
    servers = TestCA(name="TLS server CA", parent=TestCA(name="TLS root"))
    return Pki(issuing=devices, tls_issuer=servers)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with EstServer(tmp_path / "est", EstOptions(), pki=_two_level()) as est:
        yield Env(tmp_path, est)


@pytest.fixture
def split(tmp_path: Path) -> Iterator[Env]:
    with EstServer(tmp_path / "est", EstOptions(), pki=_tls_under_another_root()) as est:
        assert est.tls_root is not est.root
        yield Env(tmp_path, est)


def _refused(error: pytest.ExceptionInfo[ChainValidationError]) -> str:
    """The one line the CLI would print, checked to be a trust failure (exit 65)."""
    assert exit_code_for(error.value) == 65
    line = str(error.value)
    assert "\n" not in line
    return line


def _not_kept(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "not kept from /cacerts" in r.getMessage()]  # fmt: skip


# -- the first enrollment ----------------------------------------------------------------------


def test_a_set_that_chains_to_the_anchor_is_adopted(env: Env) -> None:
    result = env.enroller().enroll()
    assert env.stored() == set(env.est.ca.chain())
    assert env.remembered() == ca_set_sha256(env.est.ca.chain())
    chain = x509.load_pem_x509_certificates(result.identity.chain_file.read_bytes())
    assert chain == env.est.ca.chain()
    assert env.operations() == ["cacerts", "csrattrs", "simpleenroll"]
    env.enroller().renew()  # the stored set serves: /cacerts not asked
    assert env.operations() == ["simplereenroll"]


def test_an_unrelated_root_in_the_answer_is_dropped_with_a_warning(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = TestCA(name="unrelated root")
    env.est.cacerts_answer = [*env.est.ca.chain(), stranger.cert]
    with caplog.at_level(logging.WARNING):
        env.enroller().enroll()
    assert env.stored() == set(env.est.ca.chain())
    assert pem(stranger.cert) not in (env.state_dir / "cacerts.pem").read_bytes()
    assert env.remembered() == ca_set_sha256(env.est.ca.chain())  # the set kept, not the answer
    assert _not_kept(caplog) == [
        "EST: not kept from /cacerts: 'CN=unrelated root': does not chain to the trust anchor"
    ]


def test_a_set_with_nothing_chaining_is_refused_and_nothing_is_stored(env: Env) -> None:
    env.est.cacerts_answer = [TestCA(name="unrelated root").cert]
    with pytest.raises(ChainValidationError) as info:
        env.enroller().enroll()
    line = _refused(info)
    assert line.startswith("/cacerts: none of the 1 certificate(s) chains to the trust anchor")
    assert line.endswith("; no CA set is stored")
    assert snapshot(env.state_dir) == {}


def test_an_intermediate_as_the_anchor_keeps_itself_and_not_the_root_above_it(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A fingerprint bootstrap (or est.trust_anchor) naming the issuing CA, not the root: the
    anchor is kept as itself; the root above it would trust more than the anchor does."""
    fingerprint = hashlib.sha256(_der(env.est.ca.cert)).hexdigest()
    with caplog.at_level(logging.WARNING):
        result = env.enroller(trust_anchor="", bootstrap_fingerprint_sha256=fingerprint).enroll()
    assert env.stored() == {env.est.ca.cert}
    chain = x509.load_pem_x509_certificates(result.identity.chain_file.read_bytes())
    assert chain == [env.est.ca.cert]
    assert _not_kept(caplog) == [
        "EST: not kept from /cacerts: 'CN=device root': does not chain to the trust anchor"
    ]


# -- later: the stored set is trust too ---------------------------------------------------------


def test_with_a_stored_set_nothing_chaining_is_refused_before_enrolling(
    env: Env, tmp_path: Path
) -> None:
    env.enroller().enroll()
    before = snapshot(env.state_dir)
    env.operations()
    # another copy of the anchor file: the memory (keyed by the anchor's digest) no longer
    # vouches for the stored set, so /cacerts is fetched, and judged against the stored set
    anchor = tmp_path / "anchor-copy.pem"
    anchor.write_bytes(env.est.ca_file.read_bytes() + b"\n")
    env.est.cacerts_answer = [TestCA(name="device root").cert]  # the same name, another key
    with pytest.raises(ChainValidationError) as info:
        env.enroller(trust_anchor=str(anchor)).enroll(force=True)
    line = _refused(info)
    assert line.startswith(
        "/cacerts: none of the 1 certificate(s) chains to the trust anchor or the stored CA set"
    )
    assert line.endswith("; the stored CA set is kept")
    assert env.operations() == ["cacerts"]  # refused before a CSR went out
    assert snapshot(env.state_dir) == before  # identity, CA set and memory, byte for byte
    # the same answer with the real chain in it: the stranger dropped, the rest adopted
    env.est.cacerts_answer = [*env.est.ca.chain(), TestCA(name="device root").cert]
    env.enroller(trust_anchor=str(anchor)).enroll(force=True)
    assert env.stored() == set(env.est.ca.chain())


def test_the_fallback_refuses_a_set_from_another_ca_and_changes_nothing(env: Env) -> None:
    """The server starts issuing under a CA of its own: the stored set does not validate the
    certificate, /cacerts is asked once (a rollover would be seen there), and what it sends
    chains neither to the anchor nor to the stored set."""
    env.enroller().enroll()
    before = snapshot(env.state_dir)
    env.operations()
    env.est.switch_ca(TestCA(name="issuing CA"))  # a root of its own, the old issuing name
    with pytest.raises(ChainValidationError) as info:
        env.enroller().renew()
    line = _refused(info)
    assert "chains to the trust anchor or the stored CA set" in line
    assert env.operations() == ["simplereenroll", "cacerts"]
    assert snapshot(env.state_dir) == before


def test_the_fallback_adopts_a_root_key_update_through_new_with_old(tmp_path: Path) -> None:
    with EstServer(tmp_path / "est", EstOptions()) as est:  # the root issues: it can roll
        env = Env(tmp_path, est)
        env.enroller().enroll()
        env.operations()
        new_root, new_with_old, old_with_new = est.rollover()
        result = env.enroller().renew()
        assert result.identity.certificate.issuer == new_root.subject
        assert env.operations() == ["simplereenroll", "cacerts"]
        assert env.stored() == {new_root, new_with_old, old_with_new, est.root.cert}


def test_the_fallback_drops_a_stranger_beside_the_new_issuing_ca(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.enroller().enroll()
    env.operations()
    env.est.switch_ca(TestCA(name="issuing CA 2", parent=env.est.root))  # under the root
    stranger = TestCA(name="stranger")
    env.est.cacerts_answer = [*env.est.ca.chain(), stranger.cert]
    with caplog.at_level(logging.WARNING):
        env.enroller().renew()
    assert env.operations() == ["simplereenroll", "cacerts"]
    assert env.stored() == set(env.est.ca.chain())
    assert _not_kept(caplog) == [
        "EST: not kept from /cacerts: 'CN=stranger': does not chain to the trust anchor"
    ]


# -- an EST server authenticated by another CA than the one that issues ------------------------


def test_a_tls_anchor_from_another_pki_still_enrolls_and_renews(
    split: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The first enrollment adopts what chains to the root that issued the device's
    certificate (and drops the rest); from then on the stored set is trust, as for the
    refresh."""
    stranger = TestCA(name="stranger")
    split.est.cacerts_answer = [*split.est.ca.chain(), stranger.cert]
    with caplog.at_level(logging.WARNING):
        first = split.enroller().enroll()
    assert first.identity.certificate.issuer == split.est.ca.cert.subject
    assert split.stored() == set(split.est.ca.chain())  # device CA, device root; not the stranger
    assert _not_kept(caplog) == [
        "EST: not kept from /cacerts: 'CN=stranger': does not chain to the trust anchor"
    ]
    split.operations()
    split.enroller().renew()
    assert split.operations() == ["simplereenroll"]
    # the scheduled refresh judges the same answer against the anchor and the stored set
    path = split.tmp_path / "config.toml"
    write_config(path, state_dir=split.state_dir, est=split.est, store="software",
                 cacerts_refresh_seconds=3600)  # fmt: skip
    config = load_config(path)
    refresher = wiring.ca_refresher(config, wiring.ca_source(config))
    assert isinstance(refresher, CaRefresher)
    refresher.refresh(split.clock.now())
    assert refresher.status()["last_result"] == "same"


def test_a_tls_anchor_from_another_pki_refuses_a_set_that_did_not_issue(split: Env) -> None:
    split.est.cacerts_answer = [TestCA(name="stranger").cert]
    with pytest.raises(ChainValidationError) as info:
        split.enroller().enroll()
    line = _refused(info)
    assert line.startswith(
        "/cacerts: none of the 1 certificate(s) chains to the trust anchor, and the issued "
        "certificate validates under none of their roots ("
    )
    assert "no issuer 'CN=device CA' among the CA certificates" in line
    assert snapshot(split.state_dir) == {}


# -- the CLI: one line, exit 65, the state as it was ---------------------------------------------


def test_the_cli_refuses_with_exit_65_and_leaves_the_state_alone(device: Device) -> None:
    assert device.run("enroll").code == 0
    before = snapshot(device.state_dir)
    # the server now issues under a root of its own and says so in /cacerts
    device.est.switch_ca(TestCA(name="devid test EST CA"))
    result = device.run("renew")
    assert result.code == 65, result.err
    assert result.err.count("\n") == 1
    assert "chains to the trust anchor or the stored CA set" in result.err
    assert snapshot(device.state_dir) == before
