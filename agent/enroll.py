"""Enrollment and renewal: the EST client, the key store and the identity store put together.

The order is what makes failures harmless: everything that can fail (network, server, response
checks) happens before the first byte is written, so a refused or garbled answer leaves the
identity store as it was. The only writes before success are the bootstrap anchor (after it was
verified) and the pending request of a 202. A fetched /cacerts answer is judged as the CA
refresh judges it (agent/ca_refresh.py `judge`) before it validates anything or is stored.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from cryptography import x509

from agent.ca_refresh import Verdict, judge
from agent.clock import Clock
from agent.config import Config, ProofOfPossession, check_cross_keys
from agent.errors import (
    AgentError,
    ChainValidationError,
    ConfigError,
    EnrollmentError,
    EnrollmentPending,
    IdentityExpired,
    NotEnrolled,
    StateConflict,
    StorageError,
    TransportError,
)
from agent.est import trust
from agent.est.auth import BasicCredentials
from agent.est.ca_source import server_name
from agent.est.client import CsrFactory, EstClient
from agent.est.csr import make_csr, rebind, subject_of
from agent.est.csrattrs import CsrAttrsHints, CsrPlan, parse_csrattrs, plan_csr
from agent.est.memory import MemoryStore, ServerMemory, ca_set_sha256
from agent.est.pending import PendingRequest, PendingStore
from agent.est.response import IssuedCertificate, ca_roots, validate_ca_certs, validate_issued
from agent.est.transport import ClientIdentity, Transport
from agent.est.wire import clamp_retry_after, parse_retry_after
from agent.firmware.pem import load_certificates
from agent.identity import Identity, IdentityStore, Repair
from agent.layout import PENDING_FILE_NAME  # noqa: F401 - re-exported
from agent.pki import SubjectSpec
from agent.tls import is_tpm_key_file
from agent.validity import State, Validity, validity
from hal.interfaces import KeyStore

log = logging.getLogger(__name__)


#: a transport that trusts the given anchor file (None: only provisional connections)
TransportFactory = Callable[[Path | None], Transport]


@dataclass(frozen=True)
class EnrollTimings:
    """Seconds spent in each step of the last attempt (for `bench/bench_enroll.py`)."""

    keygen: float = 0.0
    csr: float = 0.0  # building and signing the CSR (inside the TPM for TPM keys)
    handshake: float = 0.0  # TLS handshake of the enrollment connection
    server: float = 0.0  # enrollment request sent -> response read
    total: float = 0.0


@dataclass(frozen=True)
class EnrollResult:
    identity: Identity
    #: False when `enroll` found a valid identity and left it alone
    changed: bool
    key_store: str
    new_key: bool = False
    proof_of_possession: bool = False
    tls_version: str = ""
    timings: EnrollTimings = EnrollTimings()
    #: what was found damaged in the identity store and done about it, if anything
    repair: Repair | None = None


@dataclass(frozen=True)
class _FirstContact:
    """A /cacerts answer fetched with no stored set, judged against the explicit anchor alone
    (`verdict`: None when nothing in it chains to the anchor)."""

    fetched: list[x509.Certificate]
    anchors: list[x509.Certificate]
    verdict: Verdict | None


def _signed_ahead(factory: CsrFactory) -> CsrFactory:
    """Sign the CSR without a challengePassword while no connection with a TPM client key is open.

    A TPM without a resource manager (swtpm, /dev/tpm0: 3 object slots) cannot load the CSR's key
    (2 slots while loading) beside the EST connection's client key (1) and a long-lived TLS
    context such as the MQTT channel's (1). So the caller closes a kept-alive connection that
    holds a TPM client key (after /cacerts or /csrattrs), this signs, and the enrollment opens a
    new one: every renewal stays within 3. Only a proof-of-possession CSR, bound to the very
    connection's tls-unique, is signed inside it (docs/tpm.md)."""
    ahead = factory(None)

    def sign(challenge: str | None) -> bytes:
        return ahead if challenge is None else factory(challenge)

    return sign


def check_est_config(config: Config) -> None:
    """EST must be configured; and the cross-key rules (the config layer's) hold."""
    if not config.est.url:
        raise ConfigError(f"{config.source}: est.url: not set, so EST enrollment is not configured")
    check_cross_keys(config)


class Enroller:
    """Enroll and renew. Every collaborator comes in (`agent.wiring.enroller` builds them from
    the config; tests pass their own); none is built here."""

    def __init__(
        self,
        *,
        config: Config,
        key_store: KeyStore,
        clock: Clock,
        store: IdentityStore,
        pending: PendingStore,
        memory: MemoryStore,
        transport_factory: TransportFactory,
        tls_setup: Callable[[Path], None],
        credentials: BasicCredentials | None,
        prove_rotation: bool = False,
        more_proofs: Sequence[Callable[[Identity], None]] = (),
    ) -> None:
        check_est_config(config)
        self._config = config
        self._est = config.est
        self._keys = key_store
        self._clock = clock
        self._transport_factory = transport_factory
        self._tls_setup = tls_setup
        self._credentials = credentials
        self._prove_rotation = prove_rotation
        self._more_proofs = tuple(more_proofs)
        self._prefix = urlsplit(self._est.url).path.rstrip("/")
        self.store = store
        self.pending = pending
        self.memory = memory
        #: (requests, TLS connections) of the last successful enroll or renew
        self.last_counts = (0, 0)

    # -- commands ------------------------------------------------------------------------------

    def enroll(self, *, force: bool = False) -> EnrollResult:
        """First enrollment. With a valid identity in place and no `force`, does nothing."""
        with self.store.exclusive():
            current, repair = self.store.usable(self._check_identity)
            if current is not None and not force and self._valid_now(current):
                return EnrollResult(
                    identity=current, changed=False, key_store=self._kind(current), repair=repair
                )
            identity = None
            if self._est.idevid_cert is not None and self._est.idevid_key is not None:
                identity = ClientIdentity(self._est.idevid_cert, self._est.idevid_key)
            result = self._run(
                reenroll=False, client_identity=identity, current=None, reuse_key=False
            )
            return dataclasses.replace(result, repair=repair)

    def renew(self, *, reuse_key: bool = False) -> EnrollResult:
        """One re-enrollment now, authenticated with the current identity (mutual TLS)."""
        with self.store.exclusive():
            current, repair = self.store.usable(self._check_identity)
            if current is None:
                raise NotEnrolled(
                    f"no identity to renew under {self.store.root}; run `devid-agent enroll` first"
                )
            if self._expired(current):
                end = current.certificate.not_valid_after_utc
                raise IdentityExpired(
                    f"{current.cert_file}: the identity expired at "
                    f"{end.isoformat(timespec='seconds')} and cannot authenticate a renewal; "
                    "run `devid-agent enroll` (bootstrap credentials)"
                )
            identity = ClientIdentity(current.cert_file, current.key_file)
            result = self._run(
                reenroll=True, client_identity=identity, current=current, reuse_key=reuse_key
            )
            return dataclasses.replace(result, repair=repair)

    # -- the flow ------------------------------------------------------------------------------

    def _run(
        self,
        *,
        reenroll: bool,
        client_identity: ClientIdentity | None,
        current: Identity | None,
        reuse_key: bool,
    ) -> EnrollResult:
        started = self._clock.monotonic()
        operation = "simplereenroll" if reenroll else "simpleenroll"
        pending = self.pending.load()
        if pending is not None:
            self._check_pending(pending, operation)
        if client_identity is not None:
            self._tls_setup(client_identity.key_file)
        anchor = self._anchor()
        memory = self.memory.load(
            server=self._server_name(), anchor_sha256=self.memory.file_sha256(anchor)
        )
        upfront = self._est.send_credentials_upfront
        if memory.basic and self._credentials is not None and not upfront:
            log.info("EST: this server demanded HTTP Basic before: sending the credentials with "
                     "the first request (verified TLS only)")  # fmt: skip
            upfront = True
        skew = timedelta(seconds=self._est.clock_skew_seconds)
        pop = self._est.proof_of_possession
        if pending is not None:
            # as it was sent: with proof-of-possession (so on TLS 1.2, whose tls-unique the CSR
            # is rebound to; on TLS 1.3 the stale challengePassword would go out), or exactly
            # the CSR that was sent
            pop = (
                ProofOfPossession.ALWAYS if pending.proof_of_possession else ProofOfPossession.NEVER
            )
        # one connection for the whole operation: its TLS version must suit the enrollment
        max_tls = "1.2" if pop is ProofOfPossession.ALWAYS else None
        client = self._client(anchor, client_identity, upfront=upfront, max_tls_version=max_tls)
        with client:
            ca_certs = self._stored_ca_certs(skew, memory)
            fetched_ca = ca_certs is None
            #: a first enrollment's answer in which the anchor alone may not decide (see below)
            first: _FirstContact | None = None
            if ca_certs is None:
                ca_certs, first = self._judge_fetched(client.cacerts(), anchor, skew)
            provisional = ca_set_sha256(ca_certs)
            keygen = 0.0
            if pending is not None:
                key_blob = pending.key_blob
                new_key = not pending.reused_key
                csr_factory = self._resubmission(pending)
            else:
                plan, memory = self._plan(client, current, memory, provisional)
                new_key = not reuse_key
                if current is not None and reuse_key:
                    key_blob = self.store.key_blob(current)
                else:
                    t = self._clock.monotonic()
                    key_blob = self._keys.generate(plan.algorithm)
                    keygen = self._clock.monotonic() - t
                csr_factory = self._fresh(key_blob, plan)
            if pop is not ProofOfPossession.ALWAYS:
                if client_identity is not None and is_tpm_key_file(client_identity.key_file):
                    client.close_connection()  # its TPM client key holds a slot: see below
                csr_factory = _signed_ahead(csr_factory)
            try:
                outcome = client.enroll(csr_factory, reenroll=reenroll, proof_of_possession=pop)
            except EnrollmentError as e:
                if pending is not None and e.status is not None and 400 <= e.status < 500:
                    log.warning("the EST server refused the pending request; it is dropped")
                    self.pending.clear()
                raise
            if outcome.pending:
                self._park(pending, operation, key_blob, outcome.csr_der,
                           outcome.proof_of_possession, reused_key=not new_key,
                           retry_after=outcome.retry_after)  # fmt: skip

            def validate(ca_certs: list[x509.Certificate]) -> IssuedCertificate:
                return validate_issued(
                    outcome.certificates,
                    requested_key=self._keys.public_key(key_blob),
                    ca_certs=ca_certs,
                    now=self._clock.now(),
                    clock_skew=skew,
                )

            try:
                issued, ca_certs = self._validated(validate, ca_certs, first, skew)
            except ChainValidationError as e:
                if fetched_ca:
                    raise
                # the stored CA set may be out of date (a CA rollover): ask the server once
                log.info("EST: the stored CA certificates do not validate the issued one (%s); "
                         "fetching /cacerts", e)  # fmt: skip
                ca_certs, first = self._judge_fetched(client.cacerts(), anchor, skew)
                issued, ca_certs = self._validated(validate, ca_certs, first, skew)
            if first is not None and memory.ca_set_sha256 == provisional:
                # /csrattrs was fetched under this answer: remember it under the set kept of it
                memory = replace(memory, ca_set_sha256=ca_set_sha256(ca_certs))
        saved = "" if fetched_ca else "; /cacerts not fetched (stored CA set)"
        log.info("EST: %d request(s) over %d TLS connection(s)%s", client.requests,
                 client.connections, saved)  # fmt: skip
        installed = self.store.install(
            key_blob=key_blob,
            key_file_name=self._keys.key_file_name,
            certificate=issued.certificate,
            chain=issued.chain,
            ca_certs=ca_certs,
            prove=self._prove if (self._prove_rotation and reenroll) else None,
        )
        self.pending.clear()
        memory = replace(
            memory,
            basic=memory.basic or client.basic_demanded,
            cacerts_sha256=ca_set_sha256(ca_certs),
        )
        try:
            self.memory.save(memory)
        except AgentError as e:  # it only saves round trips
            log.warning("could not remember the EST server's answers: %s", e)
        self.last_counts = (client.requests, client.connections)
        return EnrollResult(
            identity=installed,
            changed=True,
            key_store=self._keys.kind,
            new_key=new_key,
            proof_of_possession=outcome.proof_of_possession,
            tls_version=outcome.tls_version,
            timings=EnrollTimings(
                keygen=keygen,
                csr=outcome.csr_seconds,
                handshake=outcome.handshake_seconds,
                server=outcome.server_seconds,
                total=self._clock.monotonic() - started,
            ),
        )

    # -- pieces --------------------------------------------------------------------------------

    def _check_identity(self, identity: Identity) -> None:
        """Whether a generation can serve: its key file is a key of our store whose public key
        is the certificate's (raises AgentError naming the fault; an expired one still serves
        as a renewal credential to report, so validity is not checked here)."""
        blob = self.store.key_blob(identity)
        if not blob.strip():
            raise StorageError(f"{identity.key_file} is empty")
        if self._keys.public_key(blob) != identity.certificate.public_key():
            raise StorageError(f"{identity.key_file} does not hold the key of {identity.cert_file}")

    def _validity(self, identity: Identity) -> Validity:
        skew = timedelta(seconds=self._est.clock_skew_seconds)
        return validity(identity.certificate, self._clock.now(), skew)

    def _valid_now(self, identity: Identity) -> bool:
        return self._validity(identity).valid

    def _expired(self, identity: Identity) -> bool:
        return self._validity(identity).state is State.EXPIRED

    def _kind(self, identity: Identity) -> str:
        return "tpm" if identity.key_in_tpm else "software"

    def _anchor(self) -> Path:
        state_dir = self._config.paths.state_dir
        anchor = trust.configured_anchor(
            trust_anchor=self._est.trust_anchor,
            state_dir=state_dir,
            fingerprint=self._est.bootstrap_fingerprint_sha256,
        )
        if anchor is not None:
            return anchor
        return trust.bootstrap(
            make_client=lambda a: self._client(a, None),
            fingerprint=self._est.bootstrap_fingerprint_sha256,
            state_dir=state_dir,
            group=self.pending.group,
        )

    def _prove(self, identity: Identity) -> None:
        """Verified rotation: before a new identity becomes current, it must carry a real
        mutual-TLS exchange with the EST server (a /cacerts request over a connection
        authenticated with the new key and certificate; on TLS 1.3 a rejection comes with the
        first read). The enrollment's own connection is closed by now, so the TPM budget holds."""
        self._tls_setup(identity.key_file)
        client = self._client(self._anchor(), ClientIdentity(identity.cert_file, identity.key_file))
        with client:
            client.cacerts()
        del client  # its TLS context (a TPM object) goes before the next proof makes one
        for proof in self._more_proofs:  # e.g. the MQTT broker takes it (agent/wiring.py)
            proof(identity)
        log.info("the new identity (generation %d) proved itself over mutual TLS",
                 identity.generation)  # fmt: skip

    def _client(
        self,
        anchor: Path | None,
        identity: ClientIdentity | None,
        *,
        upfront: bool | None = None,
        max_tls_version: str | None = None,
    ) -> EstClient:
        return EstClient(
            transport=self._transport_factory(anchor),
            prefix=self._prefix,
            label=self._est.label,
            credentials=self._credentials,
            send_credentials_upfront=(
                self._est.send_credentials_upfront if upfront is None else upfront
            ),
            client_identity=identity,
            max_tls_version=max_tls_version,
            clock=self._clock,
        )

    def _server_name(self) -> str:
        return server_name(self._config)

    def _stored_ca_certs(
        self, skew: timedelta, memory: ServerMemory
    ) -> list[x509.Certificate] | None:
        """The EST CA certificates a successful enrollment with this server and anchor stored
        (fetched over verified TLS), valid now; None otherwise (then /cacerts is fetched)."""
        path = self.store.cacerts_file
        try:
            stored = self.store.cacerts_pem() if memory.cacerts_sha256 else None
            if stored is None:
                return None
            certs = x509.load_pem_x509_certificates(stored)
            if ca_set_sha256(certs) != memory.cacerts_sha256:
                log.info("EST: %s is not the CA set this server sent: fetching /cacerts", path)
                return None
            return validate_ca_certs(certs, now=self._clock.now(), clock_skew=skew)
        except (AgentError, ValueError, OSError) as e:
            log.info("EST: not using %s (%s); fetching /cacerts", path, e)
            return None

    def _stored_trust(self) -> list[x509.Certificate]:
        """The stored EST CA set as trust for judging a fetched one (empty: none stored, or
        unreadable, which is logged: then the answer is judged as on a first enrollment)."""
        try:
            pem = self.store.cacerts_pem()
            return x509.load_pem_x509_certificates(pem) if pem else []
        except (AgentError, ValueError, x509.InvalidVersion, OSError) as e:
            log.warning("EST: %s cannot be read as certificates (%s): judging /cacerts as on a "
                        "first enrollment", self.store.cacerts_file, e)  # fmt: skip
            return []

    def _judge_fetched(
        self, fetched: list[x509.Certificate], anchor: Path, skew: timedelta
    ) -> tuple[list[x509.Certificate], _FirstContact | None]:
        """A /cacerts answer judged (agent/ca_refresh.py `judge`, as the scheduled refresh does)
        against the explicit anchor and the stored set, before anything uses it: what may be
        used and stored, and, on a first enrollment (no stored set), what `_first_contact`
        decides with the issued certificate. Raises ChainValidationError when a stored set
        exists and nothing in the answer chains to it or to the anchor."""
        anchors = load_certificates(anchor)
        stored = self._stored_trust()
        try:
            verdict: Verdict | None = judge(
                fetched, anchors=anchors, current=stored, now=self._clock.now(), skew=skew
            )
        except ChainValidationError:
            if stored:
                raise
            log.info("EST: nothing in /cacerts chains to the trust anchor; first enrollment: "
                     "the root under which the issued certificate validates decides")  # fmt: skip
            verdict = None
        if stored and verdict is not None:
            self._report_dropped(verdict)
            return list(verdict.certificates), None
        # a first enrollment: until the issued certificate decides (`_validated`), these are
        # only a fingerprint for /csrattrs; nothing unjudged is ever used
        first = _FirstContact(fetched=fetched, anchors=anchors, verdict=verdict)
        return (list(verdict.certificates) if verdict else []), first

    def _validated(
        self,
        validate: Callable[[list[x509.Certificate]], IssuedCertificate],
        ca_certs: list[x509.Certificate],
        first: _FirstContact | None,
        skew: timedelta,
    ) -> tuple[IssuedCertificate, list[x509.Certificate]]:
        """The issued certificate validated, and the CA set to store beside it."""
        if first is None:
            return validate(ca_certs), ca_certs
        return self._first_contact(first, validate, skew)

    def _first_contact(
        self,
        first: _FirstContact,
        validate: Callable[[list[x509.Certificate]], IssuedCertificate],
        skew: timedelta,
    ) -> tuple[IssuedCertificate, list[x509.Certificate]]:
        """A first enrollment's CA set: what chains to the explicit anchor when that validates
        the issued certificate; else what chains to the anchor or to the root of the answer
        under which the issued certificate validates (an EST server authenticated by another
        CA than the one that issues: docs/est.md). The issued certificate is only ever validated
        against sets `judge` returned. Raises ChainValidationError when none validates it."""
        refusal: ChainValidationError | None = None
        if first.verdict is not None:
            certs = list(first.verdict.certificates)
            try:
                issued = validate(certs)
            except ChainValidationError as e:
                refusal = e
            else:
                self._report_dropped(first.verdict)
                return issued, certs
        for root in ca_roots(first.fetched):
            try:
                verdict = judge(first.fetched, anchors=[*first.anchors, root], current=[],
                                now=self._clock.now(), skew=skew)  # fmt: skip
                issued = validate(list(verdict.certificates))
            except ChainValidationError as e:
                refusal = refusal or e
                continue
            log.info("EST: first enrollment: adopting the CA set under %r, which issued this "
                     "device's certificate (not under the TLS trust anchor)",
                     root.subject.rfc4514_string())  # fmt: skip
            self._report_dropped(verdict)
            return issued, list(verdict.certificates)
        if first.verdict is not None and refusal is not None:
            raise refusal  # the usual "does not chain to the EST CA certificates"
        raise ChainValidationError(
            f"/cacerts: none of the {len(first.fetched)} certificate(s) chains to the trust "
            f"anchor, and the issued certificate validates under none of their roots ({refusal}); "
            "no CA set is stored"
        )

    def _report_dropped(self, verdict: Verdict) -> None:
        for line in verdict.dropped:
            log.warning("EST: not kept from /cacerts: %s", line)

    def _plan(
        self,
        client: EstClient,
        current: Identity | None,
        memory: ServerMemory,
        ca_fingerprint: str,
    ) -> tuple[CsrPlan, ServerMemory]:
        subject: SubjectSpec = (
            subject_of(current.certificate)
            if current is not None
            else SubjectSpec.from_config(self._config.device.id, self._config.subject)
        )
        hints = CsrAttrsHints()
        if self._est.use_csrattrs:
            now = self._clock.now()
            cached = memory.csrattrs_for(
                ca_set_sha256=ca_fingerprint,
                now=now,
                max_age=timedelta(seconds=self._est.csrattrs_max_age_seconds),
            )
            try:
                if cached is not None:
                    log.info("/csrattrs: reusing the answer fetched at %s (not older than "
                             "est.csrattrs_max_age_seconds, same CA set)",
                             memory.csrattrs_fetched)  # fmt: skip
                    der: bytes | None = cached
                else:
                    der = client.csrattrs()
                    memory = replace(memory, csrattrs=der or b"", csrattrs_fetched=now,
                                     ca_set_sha256=ca_fingerprint)  # fmt: skip
                hints = parse_csrattrs(der) if der else hints
            except EnrollmentError as e:
                if e.status is not None and 400 <= e.status < 500:
                    raise  # the server refused us: enrolling would be refused too
                log.warning("ignoring unusable /csrattrs: %s", e)
            except TransportError as e:
                if e.status is None:
                    raise  # the network is down: so is enrollment
                log.warning("ignoring /csrattrs: %s", e)  # optional (RFC 7030 4.5)
        plan = plan_csr(hints, self._config.keys.algorithm, subject)
        if current is not None:
            plan = CsrPlan(algorithm=plan.algorithm, subject=subject, hash_name=plan.hash_name,
                           ignored=plan.ignored)  # fmt: skip
        if plan.algorithm is not self._config.keys.algorithm:
            log.info("/csrattrs asks for %s keys; using that", plan.algorithm.value)
        if plan.ignored:
            log.warning("/csrattrs: ignoring what the agent cannot honour: %s",
                        "; ".join(plan.ignored))  # fmt: skip
        return plan, memory

    def _fresh(self, key_blob: bytes, plan: CsrPlan) -> CsrFactory:
        def factory(challenge: str | None) -> bytes:
            with self._keys.signer(key_blob) as key:
                return make_csr(
                    key, plan.subject, challenge_password=challenge, hash_name=plan.hash_name
                )

        return factory

    def _resubmission(self, pending: PendingRequest) -> CsrFactory:
        def factory(challenge: str | None) -> bytes:
            if challenge is None:
                return pending.csr_der
            with self._keys.signer(pending.key_blob) as key:
                return rebind(pending.csr_der, key, challenge)

        return factory

    def _check_pending(self, pending: PendingRequest, operation: str) -> None:
        if pending.key_store != self._keys.kind:
            raise ConfigError(
                f"{self.pending.path}: the pending request's key is in the {pending.key_store} "
                f"key store, but keys.store is {self._keys.kind!r}; delete the file to start over"
            )
        now = self._clock.now()
        if now < pending.retry_at:
            wait = (pending.retry_at - now).total_seconds()
            raise EnrollmentPending(
                f"/{pending.operation} request pending at the EST server; next attempt after "
                f"{pending.retry_at.isoformat(timespec='seconds')} (in {wait:.0f} s), not "
                "contacting the server before then",
                retry_after=wait,
            )
        if pending.operation != operation:
            command = "enroll" if pending.operation == "simpleenroll" else "renew"
            raise StateConflict(
                f"a /{pending.operation} request is pending; finish it with `devid-agent "
                f"{command}` or delete {self.pending.path} to start over"
            )

    def _park(
        self,
        previous: PendingRequest | None,
        operation: str,
        key_blob: bytes,
        csr_der: bytes,
        proof_of_possession: bool,
        *,
        reused_key: bool,
        retry_after: str | None,
    ) -> NoReturn:
        now = self._clock.now()
        wait = clamp_retry_after(
            parse_retry_after(retry_after, now),
            minimum=self._est.retry_after_min_seconds,
            maximum=self._est.retry_after_max_seconds,
            default=self._est.retry_after_default_seconds,
        )
        retry_at = now + timedelta(seconds=wait)
        request = PendingRequest(
            operation=operation,
            key_store=self._keys.kind,
            key_blob=key_blob,
            reused_key=reused_key,
            # the original CSR: a proof-of-possession rebind is redone for each connection
            csr_der=previous.csr_der if previous is not None else csr_der,
            proof_of_possession=proof_of_possession,
            created=previous.created if previous is not None else now,
            retry_at=retry_at,
            attempts=(previous.attempts if previous is not None else 0) + 1,
        )
        self.pending.save(request)
        raise EnrollmentPending(
            f"the EST server accepted the /{operation} request for approval (HTTP 202); run "
            f"again after {retry_at.isoformat(timespec='seconds')} (in {wait:.0f} s), "
            f"the request is kept in {self.pending.path}",
            retry_after=wait,
        )
