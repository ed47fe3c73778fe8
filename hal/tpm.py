"""Keys generated inside the TPM, through tpm2-pytss (imported lazily).

Keys are ordinary (non-primary) signing keys under the owner hierarchy's standard ECC storage
primary, stored as `TSS2 PRIVATE KEY` PEM (the format of tpm2-openssl and tpm2-tss-engine), so
the same file works for CSR signing here and for TLS through the tpm2 OpenSSL provider. The PEM
holds the private part wrapped by the TPM's storage key: only this TPM can load it.

Attributes: fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign (| noDA, so a
dictionary-attack lockout triggered elsewhere cannot lock the device out of its own identity; the
auth value is empty, so there is nothing to guess). No decrypt, no duplication: the key can sign
and do nothing else, and cannot leave this TPM.

The TPM is opened per operation and every loaded context is flushed: swtpm has 3 transient slots
and no resource manager, and on a device other processes (the TLS provider) share the TPM.

The object budget (measured on swtpm, docs/tpm.md): loading a key takes two object slots for the
length of the load (its parent and the key; a persistent parent is brought into a slot for the
command too, so a persistent SRK saves time, not slots) and one while it stays loaded. Callers
order their work so that no load happens while two other objects are held.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)

from hal.errors import KeyStoreError
from hal.interfaces import KeyAlgorithm

log = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"


def _pytss() -> Any:
    # libtss2 logs its own errors to stderr ("ERROR:tcti:...") unless told otherwise: we report
    # each failure in one line of our own. TSS2_LOG set by the user (for debugging) is kept.
    os.environ.setdefault("TSS2_LOG", "all+none")
    try:
        import tpm2_pytss
        import tpm2_pytss.constants
        import tpm2_pytss.cryptography
        import tpm2_pytss.tsskey
        import tpm2_pytss.types
    except ImportError as e:  # no libtss2 on this device
        raise KeyStoreError(
            f"the TPM key store needs tpm2-pytss and libtss2, which cannot be imported ({e}); "
            'install them, or set keys.store = "software"'
        ) from e
    return tpm2_pytss


@contextmanager
def open_esapi(tcti: str) -> Iterator[Any]:
    """An ESAPI connection to the TPM for the length of the block."""
    tss = _pytss()
    try:
        ectx = tss.ESAPI(tcti)
    except Exception as e:
        raise KeyStoreError(f"cannot open the TPM at {tcti!r}: {e}") from e
    try:
        yield ectx
    finally:
        ectx.close()


def describe_tpm(tcti: str) -> dict[str, str]:
    """Who made the TPM at `tcti` and which spec revision it implements (proves it answers)."""
    tss = _pytss()
    pt = tss.constants.TPM2_PT
    with open_esapi(tcti) as ectx:
        try:
            _, data = ectx.get_capability(tss.constants.TPM2_CAP.TPM_PROPERTIES, pt.MANUFACTURER, 1)
            _, rev = ectx.get_capability(tss.constants.TPM2_CAP.TPM_PROPERTIES, pt.REVISION, 1)
        except Exception as e:
            raise KeyStoreError(f"the TPM at {tcti!r} does not answer: {e}") from e
    manufacturer = int(data.data.tpmProperties.tpmProperty[0].value).to_bytes(4, "big")
    revision = int(rev.data.tpmProperties.tpmProperty[0].value)
    return {
        "manufacturer": manufacturer.decode("ascii", "replace").strip("\x00 "),
        "revision": f"{revision // 100}.{revision % 100:02d}",
    }


def owner_auth_set(tcti: str) -> bool:
    """Whether the TPM's owner hierarchy has an auth value (TPMA_PERMANENT.ownerAuthSet)."""
    tss = _pytss()
    with open_esapi(tcti) as ectx:
        try:
            _, data = ectx.get_capability(
                tss.constants.TPM2_CAP.TPM_PROPERTIES, tss.constants.TPM2_PT.PERMANENT, 1
            )
        except Exception as e:
            raise KeyStoreError(f"the TPM at {tcti!r} does not answer: {e}") from e
    permanent = int(data.data.tpmProperties.tpmProperty[0].value)
    return bool(permanent & int(tss.constants.TPMA_PERMANENT.OWNERAUTHSET))


def signing_key_template(algorithm: KeyAlgorithm) -> Any:
    """A TPMT_PUBLIC for a sign-only, non-duplicable key of `algorithm`."""
    tss = _pytss()
    types = tss.types
    attrs = (
        types.TPMA_OBJECT.FIXEDTPM
        | types.TPMA_OBJECT.FIXEDPARENT
        | types.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | types.TPMA_OBJECT.USERWITHAUTH
        | types.TPMA_OBJECT.SIGN_ENCRYPT
        | types.TPMA_OBJECT.NODA
    )
    alg = tss.constants.TPM2_ALG
    if algorithm.is_rsa:
        bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
        return types.TPMT_PUBLIC(
            type=alg.RSA,
            nameAlg=alg.SHA256,
            objectAttributes=attrs,
            authPolicy=b"",
            parameters=types.TPMU_PUBLIC_PARMS(
                rsaDetail=types.TPMS_RSA_PARMS(
                    symmetric=types.TPMT_SYM_DEF_OBJECT(algorithm=alg.NULL),
                    scheme=types.TPMT_RSA_SCHEME(scheme=alg.NULL),
                    keyBits=bits,
                    exponent=0,
                ),
            ),
        )
    curve = (
        tss.constants.TPM2_ECC.NIST_P256
        if algorithm is KeyAlgorithm.EC_P256
        else tss.constants.TPM2_ECC.NIST_P384
    )
    return types.TPMT_PUBLIC(
        type=alg.ECC,
        nameAlg=alg.SHA256,
        objectAttributes=attrs,
        authPolicy=b"",
        parameters=types.TPMU_PUBLIC_PARMS(
            eccDetail=types.TPMS_ECC_PARMS(
                symmetric=types.TPMT_SYM_DEF_OBJECT(algorithm=alg.NULL),
                scheme=types.TPMT_ECC_SCHEME(scheme=alg.NULL),
                curveID=curve,
                kdf=types.TPMT_KDF_SCHEME(scheme=alg.NULL),
            ),
        ),
    )


def _tpm_error(tss: Any, e: BaseException, what: str) -> KeyStoreError:
    """A one-line KeyStoreError for `what` failing, saying what to do about the TPM states a
    device meets in the field: dictionary-attack lockout, and busy (retry/yielded/testing) after
    the TSS's own resubmissions ran out."""
    hint = ""
    if isinstance(e, tss.TSS2_Exception):
        rc = tss.constants.TPM2_RC
        code = int(e.rc) & 0xFFFF
        if code == rc.LOCKOUT:
            hint = (
                " (the TPM is in dictionary-attack lockout: wait for its recovery time, or reset "
                "it with the lockout authorization: tpm2_dictionarylockout --clear-lockout)"
            )
        elif code in (rc.RETRY, rc.YIELDED, rc.TESTING, rc.NV_RATE):
            hint = " (the TPM is busy or still running its self-test: try again shortly)"
        elif code == rc.OBJECT_MEMORY:
            hint = OBJECT_MEMORY_HINT
    return KeyStoreError(f"{what}: {e}{hint}")


OBJECT_MEMORY_HINT = (
    " (the TPM has no free object slot: other processes hold its transient objects, or a process "
    "killed while it held some left them behind, which on swtpm and /dev/tpm0 lasts until the TPM "
    "restarts. Use /dev/tpmrm0, whose resource manager flushes a dead process's objects; on swtpm "
    "restart it, or when no other process uses the TPM run `tpm2_flushcontext -t`)"
)


def transient_objects(tcti: str) -> tuple[int, int]:
    """(transient objects loaded now, the TPM's guaranteed slots TPM2_PT_HR_TRANSIENT_MIN).
    Behind /dev/tpmrm0 the count is this connection's own (the kernel virtualises them)."""
    tss = _pytss()
    with open_esapi(tcti) as ectx:
        try:
            _, handles = ectx.get_capability(
                tss.constants.TPM2_CAP.HANDLES, tss.constants.TPM2_HC.TRANSIENT_FIRST, 64
            )
            _, props = ectx.get_capability(
                tss.constants.TPM2_CAP.TPM_PROPERTIES, tss.constants.TPM2_PT_HR.TRANSIENT_MIN, 1
            )
        except Exception as e:
            raise KeyStoreError(f"the TPM at {tcti!r} does not answer: {e}") from e
    return len(list(handles.data.handles)), int(props.data.tpmProperties.tpmProperty[0].value)


def _flush_quietly(ectx: Any, handle: Any) -> None:
    """Flush a loaded context; if the TPM is gone, say so, but let the original error stand."""
    try:
        ectx.flush_context(handle)
    except Exception as e:
        log.warning("could not flush a TPM context (TPM unreachable?): %s", e)


class TpmKeyStore:
    """A `KeyStore` whose keys live in the TPM named by `tcti`."""

    kind = "tpm"
    hardware_backed = True
    key_file_name = "key.tss2.pem"

    def __init__(self, *, tcti: str = DEFAULT_TCTI) -> None:
        self.tcti = tcti

    def generate(self, algorithm: KeyAlgorithm) -> bytes:
        tss = _pytss()
        with open_esapi(self.tcti) as ectx:
            try:
                key = tss.tsskey.TSSPrivKey.create(ectx, signing_key_template(algorithm))
            except Exception as e:
                raise _tpm_error(
                    tss, e, f"the TPM at {self.tcti!r} could not create a {algorithm.value} key"
                ) from e
        pem: bytes = key.to_pem()
        log.info("created %s key in the TPM", algorithm.value)
        return pem

    def _parse(self, blob: bytes) -> Any:
        tss = _pytss()
        try:
            return tss.tsskey.TSSPrivKey.from_pem(blob)
        except Exception as e:
            raise KeyStoreError(f"not a TSS2 PRIVATE KEY PEM: {e}") from e

    @contextmanager
    def signer(self, blob: bytes) -> Iterator[CertificateIssuerPrivateKeyTypes]:
        tss = _pytss()
        parsed = self._parse(blob)
        with open_esapi(self.tcti) as ectx:
            try:
                handle = parsed.load(ectx)
            except Exception as e:
                raise _tpm_error(
                    tss,
                    e,
                    f"the TPM at {self.tcti!r} cannot load this key (was it made by another "
                    f"TPM, or was the TPM cleared?)",
                ) from e
            try:
                if parsed.public.publicArea.type == tss.constants.TPM2_ALG.RSA:
                    key: CertificateIssuerPrivateKeyTypes = tss.cryptography.tpm_rsa_private_key(
                        ectx, handle
                    )
                else:
                    key = tss.cryptography.tpm_ecc_private_key(ectx, handle)
                try:
                    yield key
                except tss.TSS2_Exception as e:  # the TPM failed while the caller signed
                    raise _tpm_error(tss, e, f"the TPM at {self.tcti!r} could not sign") from e
            finally:
                _flush_quietly(ectx, handle)

    def public_key(self, blob: bytes) -> PublicKeyTypes:
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        parsed = self._parse(blob)
        try:
            der = parsed.public.to_der()
            return load_der_public_key(der)
        except Exception as e:
            raise KeyStoreError(f"cannot read the public key of a TPM key: {e}") from e

    def object_attributes(self, blob: bytes) -> int:
        """The TPMA_OBJECT bits the TPM sealed into the key (they cannot be changed)."""
        return int(self._parse(blob).public.publicArea.objectAttributes)
