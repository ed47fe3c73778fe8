"""Load the tpm2 OpenSSL provider into this process, so TLS can sign with a TPM key.

Python's `ssl` module uses the system libcrypto; a provider loaded into it through ctypes makes
`SSLContext.load_cert_chain(cert, "key.tss2.pem")` decode the TSS2 key and sign in the TPM.
Only tpm2-openssl >= 1.2 works: older versions hand the key to OpenSSL as if exportable and the
handshake fails with "missing private key" (Debian 12 ships 1.1.1).

Must run before the first TLS context that uses a TPM key. Loading is once per process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from hal.errors import ProviderError

log = logging.getLogger(__name__)

MINIMUM_VERSION = (1, 2)
_OPENSSL_INFO_MODULES_DIR = 1003  # openssl/crypto.h: OPENSSL_INFO_MODULES_DIR
_OSSL_PARAM_UTF8_PTR = 6
_INSTALL_HINT = (
    "install tpm2-openssl >= 1.2 (Debian 13's package works on Debian 12; `make setup` unpacks it "
    "into .deps/) and name its tpm2.so in tpm.openssl_provider"
)


@dataclass(frozen=True)
class ProviderInfo:
    path: str
    version: str
    tcti: str


class _OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


_lock = threading.Lock()
_loaded: ProviderInfo | None = None


def _libcrypto() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcrypto.so.3")  # the one Python's ssl module is linked against
    except OSError as e:
        raise ProviderError(f"cannot load libcrypto.so.3 (OpenSSL 3 is required): {e}") from e
    lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
    lib.OSSL_PROVIDER_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.OSSL_PROVIDER_unload.restype = ctypes.c_int
    lib.OSSL_PROVIDER_unload.argtypes = [ctypes.c_void_p]
    lib.OSSL_PROVIDER_get_params.restype = ctypes.c_int
    lib.OSSL_PROVIDER_get_params.argtypes = [ctypes.c_void_p, ctypes.POINTER(_OsslParam)]
    lib.OPENSSL_info.restype = ctypes.c_char_p
    lib.OPENSSL_info.argtypes = [ctypes.c_int]
    lib.ERR_get_error.restype = ctypes.c_ulong
    lib.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def default_provider_path() -> str:
    """tpm2.so in the system OpenSSL's modules directory (e.g. /usr/lib/<arch>/ossl-modules)."""
    modules_dir = _libcrypto().OPENSSL_info(_OPENSSL_INFO_MODULES_DIR)
    return str(Path((modules_dir or b"").decode()) / "tpm2.so")


def parse_version(text: str) -> tuple[int, ...]:
    """The leading dotted release numbers: "1.3.0" -> (1, 3, 0), "1.2.0-rc1" -> (1, 2, 0),
    "1.1rc2" -> (1, 1); () when there are none ("unknown")."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def version_problem(version: str, path: str) -> str | None:
    """Why the provider `version` found at `path` cannot be used, or None when it can.

    A provider that does not report a version is refused like an old one: 1.2 and newer report
    theirs, and guessing wrong means TLS that fails at the first handshake.
    """
    parsed = parse_version(version)
    if parsed >= MINIMUM_VERSION:
        return None
    found = (
        f"found tpm2 OpenSSL provider {version} at {path}"
        if parsed
        else f"the OpenSSL provider at {path} does not report a version ({version!r}), so it is "
        "treated as older than 1.2"
    )
    return (
        f"{found}; versions before 1.2 cannot sign TLS handshakes with a TPM key (OpenSSL "
        "reports 'missing private key'); " + _INSTALL_HINT
    )


def _openssl_errors(lib: ctypes.CDLL) -> str:
    messages = []
    buf = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buf, len(buf))
        messages.append(buf.value.decode(errors="replace"))
    return "; ".join(messages) or "no OpenSSL error recorded"


def _provider_version(lib: ctypes.CDLL, provider: int) -> str:
    value = ctypes.c_char_p()
    params = (_OsslParam * 2)()
    params[0] = _OsslParam(b"version", _OSSL_PARAM_UTF8_PTR, ctypes.addressof(value), 0, 0)
    if lib.OSSL_PROVIDER_get_params(provider, params) != 1 or value.value is None:
        return "unknown"
    return value.value.decode(errors="replace")


def load_tpm2_provider(path: str | None, *, tcti: str) -> ProviderInfo:
    """Load OpenSSL's default provider and the tpm2 provider at `path` (None: the system's).

    Raises ProviderError with one line saying what was found and what to install.
    """
    global _loaded
    with _lock:
        resolved = os.path.abspath(path) if path else default_provider_path()
        if _loaded is not None:
            if _loaded.tcti != tcti or _loaded.path != resolved:
                raise ProviderError(
                    f"the tpm2 provider {_loaded.path} is already loaded for TCTI "
                    f"{_loaded.tcti!r} in this process; cannot switch to {resolved} with TCTI "
                    f"{tcti!r} (one provider and one TPM per process)"
                )
            return _loaded
        if not os.path.isfile(resolved):
            raise ProviderError(
                f"TPM-backed TLS needs the tpm2 OpenSSL provider, not found at {resolved}; "
                + _INSTALL_HINT
            )
        lib = _libcrypto()
        # The provider reads its TCTI from the environment when it is initialised; the config's
        # TCTI wins over one inherited from the environment.
        previous_tcti = os.environ.get("TPM2OPENSSL_TCTI")
        os.environ["TPM2OPENSSL_TCTI"] = tcti
        # The provider's libtss2 would print its own WARNING:esys/ERROR:esys lines; we report
        # every failure in one line of our own. TSS2_LOG set by the user is kept.
        os.environ.setdefault("TSS2_LOG", "all+none")
        try:
            if not lib.OSSL_PROVIDER_load(None, b"default"):
                raise ProviderError(
                    f"cannot load OpenSSL's default provider: {_openssl_errors(lib)}"
                )
            provider = lib.OSSL_PROVIDER_load(None, resolved.encode())
            if not provider:
                raise ProviderError(
                    f"the tpm2 OpenSSL provider at {resolved} failed to load (is the TPM at "
                    f"{tcti!r} reachable?): {_openssl_errors(lib)}"
                )
            version = _provider_version(lib, provider)
            problem = version_problem(version, resolved)
            if problem is not None:
                # Unload it: left in the process, its decoders would still claim TPM key files.
                lib.OSSL_PROVIDER_unload(provider)
                raise ProviderError(problem)
        except ProviderError:
            if previous_tcti is None:
                os.environ.pop("TPM2OPENSSL_TCTI", None)
            else:
                os.environ["TPM2OPENSSL_TCTI"] = previous_tcti
            raise
        _loaded = ProviderInfo(path=resolved, version=version, tcti=tcti)
        log.info("loaded tpm2 OpenSSL provider %s from %s", version, resolved)
        return _loaded


def loaded_provider() -> ProviderInfo | None:
    """The tpm2 provider loaded into this process, if any."""
    return _loaded


def object_slot_shortage() -> str:
    """If the TPM behind the loaded provider lacks the two free object slots a key load needs,
    a sentence saying so and what to do (for a failed TLS key load); else ""."""
    from hal.tpm import OBJECT_MEMORY_HINT, transient_objects

    info = loaded_provider()
    if info is None:
        return ""
    try:
        loaded, slots = transient_objects(info.tcti)
    except Exception:  # a diagnosis must not replace the error it explains
        return ""
    if loaded + 2 <= slots:
        return ""
    return f"; {loaded} of the TPM's {slots} object slots are taken{OBJECT_MEMORY_HINT}"
