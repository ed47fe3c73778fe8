"""TPM key store against a real swtpm: create, sign, reload after a TPM restart, non-exportable."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.errors import KeyStoreError
from hal.interfaces import KeyAlgorithm, KeyStore
from hal.tpm import TpmKeyStore, open_esapi
from tests.support.swtpm import Swtpm

MESSAGE = b"devid-agent signs inside the TPM"


def sign_and_verify(store: TpmKeyStore, blob: bytes) -> None:
    public = store.public_key(blob)
    with store.signer(blob) as key:
        if isinstance(public, rsa.RSAPublicKey):
            signature = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]
            public.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            signature = key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
            public.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_create_sign_and_reload_after_tpm_restart(swtpm: Swtpm, algorithm: KeyAlgorithm) -> None:
    store = TpmKeyStore(tcti=swtpm.tcti)
    assert isinstance(store, KeyStore)
    blob = store.generate(algorithm)
    assert blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    public = store.public_key(blob)
    if algorithm.is_rsa:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == int(algorithm.value.split("-")[1])
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert (
            public.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[algorithm.value]
        )
    sign_and_verify(store, blob)

    swtpm.restart()  # power cycle: new process, same TPM state, new port
    store = TpmKeyStore(tcti=swtpm.tcti)
    sign_and_verify(store, blob)


def test_keys_are_bound_to_their_tpm(
    swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    blob = TpmKeyStore(tcti=swtpm.tcti).generate(KeyAlgorithm.EC_P256)
    other = Swtpm(tmp_path_factory.mktemp("other-tpm")).start()
    try:
        with (
            pytest.raises(KeyStoreError, match="cannot load this key"),
            TpmKeyStore(tcti=other.tcti).signer(blob),
        ):
            pass
    finally:
        other.stop()


def test_key_attributes_forbid_export(swtpm: Swtpm) -> None:
    from tpm2_pytss.types import TPMA_OBJECT

    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)
    attrs = store.object_attributes(blob)
    for required in (
        "FIXEDTPM",
        "FIXEDPARENT",
        "SENSITIVEDATAORIGIN",
        "USERWITHAUTH",
        "SIGN_ENCRYPT",
    ):
        assert attrs & getattr(TPMA_OBJECT, required), required
    for forbidden in ("DECRYPT", "RESTRICTED", "ENCRYPTEDDUPLICATION"):
        assert not attrs & getattr(TPMA_OBJECT, forbidden), forbidden
    # The blob is no private key anything but this TPM can use.
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(blob, password=None)


def test_attributes_as_the_tpm_reports_them(swtpm: Swtpm) -> None:
    """Ask the TPM itself (ReadPublic on the loaded object), not the blob: the TPM binds the
    attributes to the key's name, so they are what it enforces."""
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import TPMA_OBJECT

    blob = TpmKeyStore(tcti=swtpm.tcti).generate(KeyAlgorithm.EC_P256)
    with open_esapi(swtpm.tcti) as ectx:
        handle = TSSPrivKey.from_pem(blob).load(ectx)
        try:
            public, _, _ = ectx.read_public(handle)
        finally:
            ectx.flush_context(handle)
    attrs = public.publicArea.objectAttributes
    assert attrs & TPMA_OBJECT.FIXEDTPM and attrs & TPMA_OBJECT.FIXEDPARENT
    assert attrs & TPMA_OBJECT.SENSITIVEDATAORIGIN
    assert not attrs & TPMA_OBJECT.DECRYPT


def test_every_context_is_flushed(swtpm: Swtpm) -> None:
    """swtpm has 3 transient slots: many operations in a row work only if each one flushes."""
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)
    for _ in range(5):
        sign_and_verify(store, blob)
        store.generate(KeyAlgorithm.EC_P256)
    with open_esapi(swtpm.tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
        assert list(data.data.handles) == []


def test_unreachable_tpm_is_a_clear_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.support.procs import free_port

    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    with pytest.raises(KeyStoreError, match=r"cannot open the TPM at 'swtpm:host=127\.0\.0\.1"):
        TpmKeyStore(tcti=tcti).generate(KeyAlgorithm.EC_P256)


def test_garbage_blob(swtpm: Swtpm) -> None:
    with pytest.raises(KeyStoreError, match="not a TSS2 PRIVATE KEY PEM"):
        TpmKeyStore(tcti=swtpm.tcti).public_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")


def transient_handles(tcti: str) -> list[int]:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

    with open_esapi(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
        return list(data.data.handles)


def test_contexts_are_flushed_when_the_caller_fails(swtpm: Swtpm) -> None:
    """An exception inside `with signer(...)` still flushes the key; the caller's own exception
    comes out unchanged."""
    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)
    for _ in range(4):  # 3 transient slots: a leak per failure would fill them
        with pytest.raises(ZeroDivisionError), store.signer(blob):
            raise ZeroDivisionError
    assert transient_handles(swtpm.tcti) == []
    sign_and_verify(store, blob)


def test_primary_is_flushed_when_loading_fails(
    swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """tsskey creates the storage primary per operation (`with phandle`): a key the TPM refuses
    must not leave that primary behind."""
    blob = TpmKeyStore(tcti=swtpm.tcti).generate(KeyAlgorithm.EC_P256)
    other = Swtpm(tmp_path_factory.mktemp("other-tpm")).start()
    try:
        for _ in range(4):
            with pytest.raises(KeyStoreError), TpmKeyStore(tcti=other.tcti).signer(blob):
                pass
        assert transient_handles(other.tcti) == []
    finally:
        other.stop()


def test_tpm_busy_or_locked_out_is_a_clear_keystore_error(
    swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the TPM answers in the field (after the TSS's own resubmissions): one clear line that
    says what to do, and nothing left loaded. The fault is injected at the ESAPI edge."""
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import TPM2_RC

    store = TpmKeyStore(tcti=swtpm.tcti)
    blob = store.generate(KeyAlgorithm.EC_P256)

    def busy(self: object, *args: object, **kwargs: object) -> None:
        raise TSS2_Exception(TPM2_RC.RETRY)

    monkeypatch.setattr(ESAPI, "create", busy)
    with pytest.raises(KeyStoreError, match=r"could not create a ec-p256 key: .*try again shortly"):
        store.generate(KeyAlgorithm.EC_P256)
    assert transient_handles(swtpm.tcti) == []  # the primary made for `create` was flushed

    def locked_out(self: object, *args: object, **kwargs: object) -> None:
        raise TSS2_Exception(TPM2_RC.LOCKOUT)

    monkeypatch.setattr(ESAPI, "sign", locked_out)
    with pytest.raises(KeyStoreError) as info, store.signer(blob) as key:
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    assert str(info.value).startswith(f"the TPM at {swtpm.tcti!r} could not sign: ")
    assert "dictionary-attack lockout" in str(info.value) and "\n" not in str(info.value)
    assert transient_handles(swtpm.tcti) == []


def test_swtpm_that_never_listens_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture's start() used to leave the process running when the readiness poll failed."""
    import os

    from tests.support import procs

    started: list[int] = []
    real_start = procs.start

    def recording_start(args: list[str], **kwargs: object) -> object:
        proc = real_start(args, **kwargs)
        started.append(proc.pid)
        return proc

    def never_ready(port: int, **kwargs: object) -> None:
        raise TimeoutError(f"nothing listened on 127.0.0.1:{port}")

    monkeypatch.setattr(procs, "start", recording_start)
    monkeypatch.setattr(procs, "wait_for_port", never_ready)
    tpm = Swtpm(tmp_path / "tpm")
    with pytest.raises(TimeoutError):
        tpm.start()
    assert tpm.proc is None and len(started) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)  # reaped: the PID is gone
