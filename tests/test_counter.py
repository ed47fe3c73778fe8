"""Anti-rollback counters: the TPM NV counter index on a real swtpm, and the file counter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import EXIT_TRUST
from agent.errors import StorageError, TrustError
from hal.file_counter import FileCounter
from hal.secure_dir import DirStore
from hal.tpm_counter import BASELINE_FILE, TpmCounter
from tests.support.firmware import Rig, cli, image, make_bundle
from tests.support.swtpm import Swtpm


def test_file_counter(tmp_path: Path) -> None:
    counter = FileCounter(store=DirStore(tmp_path), name="sv")
    assert counter.read() == 0 and not counter.hardware_backed
    assert counter.raise_to(4) == 4
    assert counter.raise_to(2) == 4
    assert counter.read() == 4
    assert (tmp_path / "sv").stat().st_mode & 0o777 == 0o600
    (tmp_path / "sv").write_text("four\n")
    with pytest.raises(StorageError, match="is corrupt"):
        counter.read()


def tpm_counter(swtpm: Swtpm, directory: Path) -> TpmCounter:
    return TpmCounter(tcti=swtpm.tcti, store=DirStore(directory))


def test_tpm_counter_rises_survives_restarts_and_never_lowers(swtpm: Swtpm, tmp_path: Path) -> None:
    baseline = tmp_path / BASELINE_FILE
    counter = tpm_counter(swtpm, tmp_path)
    assert counter.read() == 0 and not baseline.exists()  # nothing defined yet
    assert counter.raise_to(0) == 0 and baseline.exists()
    assert counter.raise_to(3) == 3
    assert counter.raise_to(1) == 3
    swtpm.restart()
    counter = tpm_counter(swtpm, tmp_path)
    assert counter.read() == 3 and counter.hardware_backed


def test_tpm_counter_baseline_tampering_cannot_lower_it_silently(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    baseline = tmp_path / BASELINE_FILE
    counter = tpm_counter(swtpm, tmp_path)
    counter.raise_to(2)
    baseline.unlink()
    with pytest.raises(StorageError, match=r"baseline file .* is missing"):
        counter.read()
    with pytest.raises(StorageError, match="is missing"):
        counter.raise_to(5)
    baseline.write_text(json.dumps({"index": 0x01500101, "baseline": 1}))
    with pytest.raises(StorageError, match="corrupt"):
        counter.read()


def test_redefined_index_only_goes_up(swtpm: Swtpm, tmp_path: Path) -> None:
    """Undefining and redefining the index (owner auth) cannot reset it: the new counter
    starts at the highest value any counter had, so security versions only rise."""
    from hal.tpm import open_esapi

    baseline = tmp_path / BASELINE_FILE
    counter = tpm_counter(swtpm, tmp_path)
    counter.raise_to(4)
    with open_esapi(swtpm.tcti) as ectx:
        from tpm2_pytss.constants import ESYS_TR

        ectx.nv_undefine_space(ectx.tr_from_tpmpublic(counter.index), ESYS_TR.OWNER)
    with pytest.raises(StorageError, match="the index is gone"):
        counter.read()
    old_baseline = json.loads(baseline.read_text())["baseline"]
    baseline.unlink()  # re-provision
    fresh = tpm_counter(swtpm, tmp_path)
    assert fresh.raise_to(0) == 0
    # the new counter starts at least where the old one ended (old baseline + 4)
    assert json.loads(baseline.read_text())["baseline"] >= old_baseline + 4


def test_an_ordinary_nv_index_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_AUTH, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    from hal.tpm import open_esapi

    with open_esapi(swtpm.tcti) as ectx:
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=0x01500100,
                nameAlg=TPM2_ALG.SHA256,
                attributes=TPMA_NV.OWNERWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
                authPolicy=b"",
                dataSize=8,
            )
        )
        ectx.nv_define_space(TPM2B_AUTH(b""), public, ESYS_TR.OWNER)
    counter = tpm_counter(swtpm, tmp_path)
    with pytest.raises(TrustError, match="not the one devid-agent defines"):
        counter.raise_to(1)


def test_full_cycle_with_the_tpm_counter(swtpm: Swtpm, tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="uboot", counter="tpm", tcti=swtpm.tcti)
    v3 = rig.write_bundle(make_bundle(image(8192, 3), [rig.vendor.signer], security_version=3))
    assert cli(rig.config, "install", str(v3))[0] == 0
    assert tpm_counter(swtpm, tmp_path / "elsewhere").read() == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    swtpm.restart()
    rig.tcti = swtpm.tcti
    rig.write_config()
    old = rig.write_bundle(
        make_bundle(image(8192, 2), [rig.vendor.signer], security_version=2), "old.fw"
    )
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(old))
    assert code == EXIT_TRUST and "below the committed security version 3" in err
    assert rig.snapshot() == before
    code, out, _err = cli(rig.config, "status")
    assert "committed security version: 3 (tpm counter)" in out
