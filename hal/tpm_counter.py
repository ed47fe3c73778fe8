"""The anti-rollback counter in a TPM NV counter index (TPM2_NT_COUNTER), via tpm2-pytss.

A counter index can only be incremented: a write cannot lower it, and undefining and
redefining it does not reset it (a new counter starts at the highest value any counter on this
TPM ever had). So the security version is stored as an offset:

    security_version = counter - baseline

where `baseline` is the counter's value right after its first increment, recorded once in a
small file next to the firmware state. `raise_to(n)` increments until counter >= baseline + n.

The index is defined on first use (owner authorization), OWNERWRITE only (so an unprivileged
process cannot raise it and lock updates out), AUTHREAD with an empty auth (anyone may read),
NO_DA. An index found at the configured handle that is not a counter is refused: an ordinary
NV index could be written lower. If the baseline file is lost while the index exists, the agent
refuses to guess: re-provisioning (undefine the index with owner auth) can only raise the
counter, so it never opens a downgrade.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hal.errors import StorageError
from hal.storage import atomic_write, read_bytes
from hal.tpm import _pytss, open_esapi

log = logging.getLogger(__name__)

DEFAULT_INDEX = 0x01500100
MAX_STEPS = 1 << 16  # one TPM command per step; bounded like the manifest's security_version


class TpmCounter:
    kind = "tpm"
    hardware_backed = True

    def __init__(
        self, *, tcti: str, baseline_path: Path, index: int = DEFAULT_INDEX, owner_auth: bytes = b""
    ) -> None:
        self.tcti = tcti
        self.index = index
        self.baseline_path = baseline_path
        self.owner_auth = owner_auth

    def _fail(self, what: str) -> StorageError:
        return StorageError(f"TPM anti-rollback counter {self.index:#010x}: {what}")

    def _baseline(self) -> int | None:
        if not self.baseline_path.exists():
            return None
        try:
            record = json.loads(read_bytes(self.baseline_path, limit=4096))
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
        public, _name = ectx.nv_read_public(handle)
        attrs = int(public.nvPublic.attributes)
        nt = (attrs & int(tss.constants.TPMA_NV.TPM2_NT_MASK)) >> int(
            tss.constants.TPMA_NV.TPM2_NT_SHIFT
        )
        if nt != int(tss.constants.TPM2_NT.COUNTER):
            raise self._fail("the index exists but is not a TPM2_NT_COUNTER; refusing to use it")
        return handle

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
        nv = tss.constants.TPMA_NV
        attrs = (
            nv.OWNERWRITE
            | nv.AUTHREAD
            | nv.NO_DA
            | (tss.constants.TPM2_NT.COUNTER << nv.TPM2_NT_SHIFT)
        )
        public = tss.types.TPM2B_NV_PUBLIC(
            nvPublic=tss.types.TPMS_NV_PUBLIC(
                nvIndex=self.index,
                nameAlg=tss.constants.TPM2_ALG.SHA256,
                attributes=attrs,
                authPolicy=b"",
                dataSize=8,
            )
        )
        handle = ectx.nv_define_space(tss.types.TPM2B_AUTH(b""), public, self._owner(ectx))
        log.info("defined TPM NV counter index %#010x", self.index)
        return handle

    def read(self) -> int:
        try:
            with open_esapi(self.tcti) as ectx:
                handle = self._handle(ectx)
                written = handle is not None and self._written(ectx, handle)
                raw = self._raw(ectx, handle) if written else None
        except StorageError:
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
                    atomic_write(
                        self.baseline_path,
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
        except StorageError:
            raise
        except Exception as e:
            raise self._fail(str(e)) from e
        log.info("anti-rollback counter (TPM) at security version %d", raw - baseline)
        return raw - baseline
