"""The anti-rollback counter in a TPM NV counter index (TPM2_NT_COUNTER), via tpm2-pytss.

A counter index can only be incremented: a write cannot lower it, and undefining and
redefining it does not reset it (a new counter starts at the highest value any counter on this
TPM ever had). So the security version is stored as an offset:

    security_version = counter - baseline

where `baseline` is the counter's value right after its first increment, recorded once in a
small file next to the firmware state. `raise_to(n)` increments until counter >= baseline + n.

The index is defined on first use (owner authorization), OWNERWRITE only (so an unprivileged
process cannot raise it and lock updates out), AUTHREAD with an empty auth (anyone may read),
NO_DA. An index found at the configured handle is used only if its public area is exactly the
one the agent defines (its NV name is compared): anyone who can define NV space (with an empty
owner auth, any TPM user) could otherwise define it first, say with AUTHWRITE, and raise it at
will (locking every update out), or as an ordinary index that can be written lower. If the
baseline file is lost while the index exists, the agent refuses to guess: re-provisioning
(undefine the index with owner auth) can only raise the counter, so it never opens a downgrade.
The baseline lives in root's firmware state directory, reached through hal.secure_dir.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hal.errors import StorageError, TrustError
from hal.interfaces import FileStore
from hal.tpm import _pytss, open_esapi

log = logging.getLogger(__name__)

DEFAULT_INDEX = 0x01500100
BASELINE_FILE = "tpm-counter-baseline.json"
MAX_STEPS = 1 << 16  # one TPM command per step; bounded like the manifest's security_version


class TpmCounter:
    kind = "tpm"
    hardware_backed = True

    def __init__(
        self,
        *,
        tcti: str,
        store: FileStore,
        baseline_name: str = BASELINE_FILE,
        index: int = DEFAULT_INDEX,
        owner_auth: bytes = b"",
    ) -> None:
        self.tcti = tcti
        self.index = index
        self.store = store
        self.baseline_name = baseline_name
        self.baseline_path = store.path(baseline_name)
        self.owner_auth = owner_auth

    def _fail(self, what: str) -> StorageError:
        return StorageError(f"TPM anti-rollback counter {self.index:#010x}: {what}")

    def _baseline(self) -> int | None:
        data = self.store.read(self.baseline_name, limit=4096)
        if data is None:
            return None
        try:
            record = json.loads(data)
            if type(record["index"]) is not int or type(record["baseline"]) is not int:
                raise ValueError("not integers")
            if record["index"] != self.index:
                raise ValueError(f"recorded for index {record['index']:#x}")
            return int(record["baseline"])
        except (ValueError, KeyError, TypeError) as e:
            raise self._fail(f"baseline file {self.baseline_path} is corrupt ({e})") from e

    def _handle(self, ectx: Any) -> Any | None:
        """The index's ESYS handle, or None if no index is defined there."""
        tss = _pytss()
        _more, data = ectx.get_capability(tss.constants.TPM2_CAP.HANDLES, self.index, 1)
        if self.index not in list(data.data.handles):
            return None
        handle = ectx.tr_from_tpmpublic(self.index)
        public, name = ectx.nv_read_public(handle)
        written = int(public.nvPublic.attributes) & int(tss.constants.TPMA_NV.WRITTEN)
        expected = self._public(extra_attributes=written)
        if bytes(name) != bytes(expected.get_name()):
            raise self._squatted(public.nvPublic)
        return handle

    def _squatted(self, found: Any) -> TrustError:
        """The index is someone else's: a security event, never used, never 'fixed' by us."""
        tss = _pytss()
        attrs = int(found.attributes) & ~int(tss.constants.TPMA_NV.WRITTEN)
        return TrustError(
            f"TPM anti-rollback counter {self.index:#010x}: the NV index there is not the one "
            f"devid-agent defines (attributes {attrs:#010x}, want {self._attributes():#010x}; "
            f"name algorithm {int(found.nameAlg):#06x}; authPolicy {len(bytes(found.authPolicy))} "
            f"bytes; size {int(found.dataSize)}): someone who can define NV space put it there, "
            "and may control it; refusing to trust it. Check who defined it, undefine it with "
            "owner auth (tpm2_nvundefine), set an owner password (tpm2_changeauth -c owner) and "
            "name it in firmware.counter_owner_auth_file"
        )

    def _attributes(self) -> int:
        tss = _pytss()
        nv = tss.constants.TPMA_NV
        return int(
            nv.OWNERWRITE
            | nv.AUTHREAD
            | nv.NO_DA
            | (tss.constants.TPM2_NT.COUNTER << nv.TPM2_NT_SHIFT)
        )

    def _public(self, *, extra_attributes: int = 0) -> Any:
        tss = _pytss()
        return tss.types.TPM2B_NV_PUBLIC(
            nvPublic=tss.types.TPMS_NV_PUBLIC(
                nvIndex=self.index,
                nameAlg=tss.constants.TPM2_ALG.SHA256,
                attributes=self._attributes() | extra_attributes,
                authPolicy=b"",
                dataSize=8,
            )
        )

    def _written(self, ectx: Any, handle: Any) -> bool:
        public, _name = ectx.nv_read_public(handle)
        return bool(int(public.nvPublic.attributes) & int(_pytss().constants.TPMA_NV.WRITTEN))

    def _raw(self, ectx: Any, handle: Any) -> int:
        return int.from_bytes(bytes(ectx.nv_read(handle, 8, 0, auth_handle=handle)), "big")

    def _owner(self, ectx: Any) -> Any:
        tss = _pytss()
        if self.owner_auth:
            ectx.tr_set_auth(tss.constants.ESYS_TR.OWNER, self.owner_auth)
        return tss.constants.ESYS_TR.OWNER

    def _define(self, ectx: Any) -> Any:
        tss = _pytss()
        handle = ectx.nv_define_space(tss.types.TPM2B_AUTH(b""), self._public(), self._owner(ectx))
        log.info("defined TPM NV counter index %#010x", self.index)
        return handle

    def read(self) -> int:
        try:
            with open_esapi(self.tcti) as ectx:
                handle = self._handle(ectx)
                written = handle is not None and self._written(ectx, handle)
                raw = self._raw(ectx, handle) if written else None
        except (StorageError, TrustError):
            raise
        except Exception as e:
            raise self._fail(str(e)) from e
        baseline = self._baseline()
        if raw is None:
            if baseline is not None:
                raise self._fail(
                    f"the index is gone but {self.baseline_path} records a baseline; "
                    "was the TPM cleared? refusing to report version 0"
                )
            return 0
        if baseline is None:
            raise self._fail(
                f"the index exists but its baseline file {self.baseline_path} is missing; "
                "re-provision the counter (undefine the index with owner auth)"
            )
        return raw - baseline

    def raise_to(self, value: int) -> int:
        baseline = self._baseline()
        try:
            with open_esapi(self.tcti) as ectx:
                handle = self._handle(ectx)
                if handle is None or not self._written(ectx, handle):
                    if baseline is not None:
                        raise self._fail(f"the index is gone but {self.baseline_path} exists")
                    if handle is None:
                        handle = self._define(ectx)
                    ectx.nv_increment(handle, auth_handle=self._owner(ectx))
                    baseline = self._raw(ectx, handle)
                    self.store.write(
                        self.baseline_name,
                        json.dumps({"index": self.index, "baseline": baseline}).encode(),
                    )
                elif baseline is None:
                    raise self._fail(f"baseline file {self.baseline_path} is missing")
                raw = self._raw(ectx, handle)
                target = baseline + value
                if target - raw > MAX_STEPS:
                    raise self._fail(f"refusing to raise by more than {MAX_STEPS} steps at once")
                while raw < target:
                    ectx.nv_increment(handle, auth_handle=self._owner(ectx))
                    raw = self._raw(ectx, handle)
        except (StorageError, TrustError):
            raise
        except Exception as e:
            raise self._fail(str(e)) from e
        log.info("anti-rollback counter (TPM) at security version %d", raw - baseline)
        return raw - baseline
