"""`firmware install` through the CLI on a device rig with a real U-Boot env: every rejection
has its own line and exit status, and leaves slots, env, counter and state byte-for-byte."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import EXIT_CONFIG, EXIT_HAL, EXIT_TRUST
from agent.firmware.sign import Signer
from tests.support.ca import TestCA
from tests.support.firmware import (
    SLOT_BYTES,
    Rig,
    Vendor,
    cli,
    image,
    make_bundle,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.timezone.utc)
PAYLOAD = image(48 * 1024, seed=42)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "dev", bootloader="uboot")


def committed_rig(rig: Rig, security_version: int) -> Rig:
    """Install and commit `security_version` on B, then boot B."""
    bundle = rig.write_bundle(
        make_bundle(PAYLOAD, [rig.vendor.signer], security_version=security_version), "base.fw"
    )
    assert cli(rig.config, "install", str(bundle))[0] == 0
    assert rig.reboot() == "B"
    assert cli(rig.config, "commit")[0] == 0
    return rig


def refused(rig: Rig, bundle: bytes, status: int, message: str, *extra: str) -> None:
    path = rig.write_bundle(bundle, "candidate.fw")
    before = rig.snapshot()
    for command in ("verify", "install"):
        args = [command, str(path)] + (list(extra) if command == "install" else [])
        code, out, err = cli(rig.config, *args)
        assert code == status, (command, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
        assert out == ""
    assert rig.snapshot() == before


def test_install_writes_only_the_inactive_slot(rig: Rig) -> None:
    slot_a = rig.slot["A"].read_bytes()
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer], version="2.0"))
    code, out, err = cli(rig.config, "install", str(path))
    assert code == 0, err
    assert "installed 2.0 into slot B" in out
    assert rig.slot["A"].read_bytes() == slot_a
    data = rig.slot["B"].read_bytes()
    assert data[: len(PAYLOAD)] == PAYLOAD and len(data) == SLOT_BYTES
    env = rig.env()
    assert env["BOOT_ORDER"] == "B A" and env["BOOT_B_LEFT"] == "3"
    assert (rig.state_dir / "state.json").stat().st_mode & 0o777 == 0o600
    assert rig.state_dir.stat().st_mode & 0o777 == 0o700


def test_install_from_stdin(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer])
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", "install",
         "-"],
        input=data, capture_output=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rig.slot["B"].read_bytes()[: len(PAYLOAD)] == PAYLOAD


def test_changed_payload_byte(rig: Rig) -> None:
    data = bytearray(make_bundle(PAYLOAD, [rig.vendor.signer]))
    data[-100] ^= 0x40
    refused(rig, bytes(data), EXIT_TRUST, "payload sha256 does not match the manifest")


def test_changed_manifest_byte(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer], version="1.0.0")
    data = data.replace(b'"version":"1.0.0"', b'"version":"1.0.1"')
    refused(rig, data, EXIT_TRUST, "does not verify over the manifest")


def test_unsigned(rig: Rig) -> None:
    from agent.firmware.bundle import encode_header
    from tests.support.firmware import manifest_for

    data = encode_header(manifest_for(PAYLOAD).to_bytes(), []) + PAYLOAD
    refused(rig, data, EXIT_TRUST, "signature count 0")


def test_unknown_signer(rig: Rig) -> None:
    refused(rig, make_bundle(PAYLOAD, [Vendor().signer]), EXIT_TRUST, "does not chain")


def test_wrong_eku(rig: Rig) -> None:
    signer = rig.vendor.make_signer(eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    refused(rig, make_bundle(PAYLOAD, [signer]), EXIT_TRUST, "lacks the codeSigning")


def test_expired_signer(rig: Rig) -> None:
    signer = rig.vendor.make_signer(
        not_before=NOW - dt.timedelta(days=90), not_after=NOW - dt.timedelta(days=1)
    )
    refused(rig, make_bundle(PAYLOAD, [signer]), EXIT_TRUST, "expired at")


def test_not_yet_valid_signer(rig: Rig) -> None:
    signer = rig.vendor.make_signer(not_before=NOW + dt.timedelta(days=2))
    refused(rig, make_bundle(PAYLOAD, [signer]), EXIT_TRUST, "is not valid before")


def test_revoked_signer(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    vendor = Vendor()
    signer = vendor.make_signer()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(vendor.inter.cert.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(signer.certs[0].serial_number)
            .revocation_date(NOW - dt.timedelta(minutes=1))
            .build()
        )
        .sign(vendor.inter.key, hashes.SHA256())
    )
    crl_path = tmp_path / "inter.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    rig = Rig(tmp_path / "dev", vendor=vendor, crl_files=(crl_path,))
    refused(rig, make_bundle(PAYLOAD, [signer]), EXIT_TRUST, "is revoked")
    assert (
        cli(rig.config, "install", str(rig.write_bundle(make_bundle(PAYLOAD, [vendor.signer]))))[0]
        == 0
    )


def test_downgrade(rig: Rig) -> None:
    committed_rig(rig, 5)
    data = make_bundle(PAYLOAD, [rig.vendor.signer], security_version=4)
    refused(rig, data, EXIT_TRUST, "security_version 4 is below the committed security version 5")


def test_truncated_payload(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer])[:-1]
    refused(rig, data, EXIT_TRUST, "payload is truncated")


def test_over_long_payload(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer]) + b"x"
    refused(rig, data, EXIT_TRUST, "payload is longer than")


def test_payload_larger_than_the_slot(rig: Rig) -> None:
    big = image(SLOT_BYTES + 1)
    path = rig.write_bundle(make_bundle(big, [rig.vendor.signer]))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(path))
    assert code == EXIT_TRUST and "does not fit slot B" in err
    assert rig.snapshot() == before


def test_compatible_mismatch(rig: Rig) -> None:
    data = make_bundle(PAYLOAD, [rig.vendor.signer], compatible="acme-gw-rpi4")
    refused(rig, data, EXIT_TRUST, "bundle is for 'acme-gw-rpi4'")


def test_writing_the_booted_slot_is_refused(rig: Rig) -> None:
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", "--slot", "A", str(path))
    assert code == EXIT_HAL and "refusing to write slot A" in err and "booted slot A" in err
    assert rig.snapshot() == before


def test_slots_on_the_same_device_are_refused(rig: Rig) -> None:
    rig.write_config(slot_b=str(rig.slot["A"]))
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(path))
    assert code == EXIT_HAL and "it is the booted slot A" in err
    assert rig.snapshot() == before


def test_unknown_booted_slot(rig: Rig) -> None:
    rig.cmdline.write_text("console=ttyS0 root=/dev/sda2\n")
    code, _out, err = cli(rig.config, "install", str(rig.write_bundle(make_bundle(PAYLOAD, []))))
    assert code == EXIT_HAL and "names no booted slot (rauc.slot=...)" in err


def test_corrupt_uboot_env(rig: Rig) -> None:
    for env in rig.env_files:  # both redundant copies: no valid environment left
        data = bytearray(env.read_bytes())
        data[10] ^= 0xFF
        env.write_bytes(bytes(data))
    refused_install = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    for command in (["install", str(refused_install)], ["commit"], ["status"], ["rollback"]):
        code, _out, err = cli(rig.config, *command)
        assert code == EXIT_HAL, command
        assert "fw_printenv failed on U-Boot env" in err
    assert rig.snapshot() == before


def test_one_corrupt_uboot_copy_is_survived(rig: Rig) -> None:
    data = bytearray(rig.env_files[0].read_bytes())
    data[10] ^= 0xFF
    rig.env_files[0].write_bytes(bytes(data))
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    assert cli(rig.config, "install", str(path))[0] == 0
    assert rig.env()["BOOT_ORDER"] == "B A"


def test_invalid_env_values_are_corrupt(rig: Rig) -> None:
    from tests.support.firmware import write_uboot

    write_uboot(rig.fw_env_config, {"BOOT_B_LEFT": "lots"})
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(path))
    assert code == EXIT_HAL and "is corrupt: BOOT_B_LEFT='lots'" in err
    assert rig.snapshot() == before


def test_corrupt_grub_env(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "dev", bootloader="grub")
    rig.grubenv.write_bytes(b"# GRUB Environment Blick\n" + b"#" * 999)
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "install", str(path))
    assert code == EXIT_HAL and "GRUB env" in err and "is corrupt" in err
    assert rig.snapshot() == before


def test_missing_trust_anchor_is_a_config_error(rig: Rig) -> None:
    rig.files["anchor"].unlink()
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    code, _out, err = cli(rig.config, "verify", str(path))
    assert code == EXIT_CONFIG and "firmware-ca.pem" in err


def test_sign_command(rig: Rig, tmp_path: Path) -> None:
    img = tmp_path / "rootfs.img"
    img.write_bytes(PAYLOAD)
    out = tmp_path / "signed.fw"
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "firmware", "sign",
         "--key", str(rig.files["key"]), "--cert", str(rig.files["cert"]),
         "--chain", str(rig.files["chain"]), "--compatible", rig.compatible,
         "--version", "3.1.4", "--security-version", "7", str(img), "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    code, text, err = cli(rig.config, "verify", str(out))
    assert code == 0, err
    assert "3.1.4 security_version 7" in text


def test_self_signed_anchor_cannot_sign(rig: Rig) -> None:
    # The root itself (no codeSigning EKU) signing directly is refused.
    signer = Signer(key=rig.vendor.root.key, certs=(rig.vendor.root.cert,))
    refused(rig, make_bundle(PAYLOAD, [signer]), EXIT_TRUST, "lacks the codeSigning")


def test_other_ca_with_the_same_name(rig: Rig) -> None:
    impostor_root = TestCA(name="firmware root")
    impostor = Vendor(root=impostor_root)
    refused(rig, make_bundle(PAYLOAD, [impostor.signer]), EXIT_TRUST, "does not chain")


def test_bad_payload_from_a_pipe_leaves_the_booted_slot_and_its_boot_entry(rig: Rig) -> None:
    """From a pipe the payload can only be checked while it is written: the inactive slot is
    then left marked bad and failed; the booted slot, its env entry and the counter are not
    touched."""
    data = bytearray(make_bundle(PAYLOAD, [rig.vendor.signer]))
    data[-10] ^= 0x01
    slot_a = rig.slot["A"].read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(rig.config), "firmware", "install",
         "-"],
        input=bytes(data), capture_output=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_TRUST
    assert b"payload sha256 does not match the manifest" in done.stderr
    assert rig.slot["A"].read_bytes() == slot_a
    env = rig.env()
    assert env["BOOT_ORDER"] == "A" and env["BOOT_A_LEFT"] == "3" and env["BOOT_B_LEFT"] == "0"
    code, out, _err = cli(rig.config, "status")
    assert code == 0 and "slot B: failed" in out
    assert rig.reboot() == "A"


def test_a_mounted_slot_is_never_written(rig: Rig, tmp_path: Path) -> None:
    from agent.config import load_config
    from agent.errors import BootControlError
    from agent.wiring import firmware_device
    from hal.slots import DeviceSlot

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 ro 0 0\n{rig.slot['B']} /mnt/with\\040space ext4 rw 0 0\n")
    device = firmware_device(load_config(rig.config))
    device.slots["B"] = DeviceSlot(name="B", path=rig.slot["B"], mounts=mounts)
    before = rig.snapshot()
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    with open(path, "rb") as f, pytest.raises(BootControlError, match="mounted at /mnt/with space"):
        device.install(f)
    assert rig.snapshot() == before
    assert DeviceSlot(name="A", path=rig.slot["A"], mounts=mounts).mounted_at() is None


def test_firmware_off_without_compatible(rig: Rig) -> None:
    rig.compatible = ""
    rig.write_config()
    code, _out, err = cli(rig.config, "status")
    assert code == EXIT_CONFIG and "firmware.compatible: not set" in err


def test_sign_with_an_encrypted_key(rig: Rig, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = tmp_path / "enc.key"
    key.write_bytes(
        rig.vendor.signer.key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    (tmp_path / "pass").write_text("s3cret\n")
    img = tmp_path / "img"
    img.write_bytes(PAYLOAD)
    from agent.cli import main

    code = main(["firmware", "sign", "--key", str(key), "--key-password-file",
                 str(tmp_path / "pass"), "--cert", str(rig.files["cert"]), "--chain",
                 str(rig.files["chain"]), "--compatible", rig.compatible, "--version", "1",
                 "--security-version", "0", str(img), "-o", str(tmp_path / "out.fw")])  # fmt: skip
    assert code == 0
    assert cli(rig.config, "verify", str(tmp_path / "out.fw"))[0] == 0


def test_ambiguous_booted_slot_is_refused(rig: Rig) -> None:
    # Found in review: the first rauc.slot= won, so "rauc.slot=B ... rauc.slot=A" on a device
    # booted from B made B (the running system) the install target.
    rig.cmdline.write_text("rauc.slot=B console=ttyS0 rauc.slot=A\n")
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    before = rig.snapshot()
    for command in (["install", str(path)], ["commit"], ["rollback"], ["status"]):
        code, _out, err = cli(rig.config, *command)
        assert code == EXIT_HAL and "names the booted slot ambiguously" in err, command
    assert rig.snapshot() == before


def test_slot_given_as_a_symlink(rig: Rig) -> None:
    # Found in review: open_write used O_NOFOLLOW, so /dev/disk/by-partlabel/... slot paths
    # (symlinks) passed every check and then failed at the first write.
    link = rig.root / "by-partlabel-rootfs-b"
    link.symlink_to(rig.slot["B"])
    rig.write_config(slot_b=str(link))
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer]))
    code, _out, err = cli(rig.config, "install", str(path))
    assert code == 0, err
    assert rig.slot["B"].read_bytes()[: len(PAYLOAD)] == PAYLOAD


def test_slot_write_errors_are_storage_errors(tmp_path: Path) -> None:
    from agent.errors import StorageError
    from hal.slots import DeviceSlot

    slot = DeviceSlot(name="B", path=Path("/dev/full"))  # every write fails with ENOSPC
    with (
        pytest.raises(StorageError, match=r"slot B \(/dev/full\): write: No space left"),
        slot.open_write() as out,
    ):
        out.write(b"x" * 4096)


def test_commit_trusts_the_install_record_by_default(rig: Rig) -> None:
    """A read-write root filesystem changes the slot's bytes after boot: by default commit
    believes the record the install's read-back made, so such devices can still update."""
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer], security_version=7))
    assert cli(rig.config, "install", str(path))[0] == 0
    assert rig.reboot() == "B"
    data = bytearray(rig.slot["B"].read_bytes())
    data[len(PAYLOAD) // 2] ^= 0x01  # the mounted filesystem wrote to its slot
    rig.slot["B"].write_bytes(bytes(data))
    code, out, err = cli(rig.config, "commit")
    assert (code, err) == (0, "")
    assert "committed slot B; security version 7" in out


def test_commit_checks_the_booted_slot_holds_the_recorded_image(rig: Rig) -> None:
    """With check_slot_at_commit (read-only roots), the counter is raised only for the image
    that was installed: a booted slot whose bytes differ from the record is not committed."""
    rig.write_config(check_slot_at_commit="true")
    path = rig.write_bundle(make_bundle(PAYLOAD, [rig.vendor.signer], security_version=7))
    assert cli(rig.config, "install", str(path))[0] == 0
    assert rig.reboot() == "B"
    data = bytearray(rig.slot["B"].read_bytes())
    data[len(PAYLOAD) // 2] ^= 0x01
    rig.slot["B"].write_bytes(bytes(data))
    before = rig.snapshot()
    code, _out, err = cli(rig.config, "commit")
    assert code == EXIT_TRUST and "booted slot B" in err and "not committing" in err
    assert rig.snapshot() == before
    rig.slot["B"].write_bytes(bytes(data[: len(PAYLOAD) // 2]) + PAYLOAD[len(PAYLOAD) // 2 :]
                              + bytes(data[len(PAYLOAD) :]))  # fmt: skip
    code, out, err = cli(rig.config, "commit")
    assert code == 0 and "security version 7" in out, err


@pytest.mark.parametrize(
    "damage",
    [
        {"slots": {"B": {"state": "good", "security_version": "9"}}},
        {"slots": {"B": {"state": "good", "size": None}}},
        {"pending": "B"},
        {"fell_back_from": ["A"]},
        {"slots": []},
    ],
)
def test_corrupt_state_file_is_one_line(rig: Rig, damage: dict[str, object]) -> None:
    """Found in review: field types were not checked, so a corrupt state.json escaped as a
    TypeError or KeyError traceback from commit or rollback."""
    import json

    rig.state_dir.mkdir(mode=0o700)
    table: dict[str, object] = {"format": 1, "slots": {}, "pending": None, "fell_back_from": None}
    (rig.state_dir / "state.json").write_text(json.dumps({**table, **damage}))
    for command in ("commit", "rollback", "status"):
        code, _out, err = cli(rig.config, command)
        assert code == EXIT_HAL, (command, err)
        assert len(err.strip().splitlines()) == 1 and "state.json is corrupt" in err


def test_unreadable_bundle_is_one_line(rig: Rig) -> None:
    """Found in review: an I/O error reading the bundle escaped as an OSError traceback."""
    before = rig.snapshot()
    for command in ("verify", "install"):
        code, _out, err = cli(rig.config, command, "/proc/self/mem")  # reads fail with EIO
        assert code == EXIT_HAL and err.strip().count("\n") == 0, err
        assert "cannot read the bundle: Input/output error" in err
    assert rig.snapshot() == before


def test_sign_refuses_a_key_that_is_not_the_certificates(rig: Rig, tmp_path: Path) -> None:
    from tests.support.ca import key_pem
    from tests.support.firmware import new_key

    other = tmp_path / "other.key"
    other.write_bytes(key_pem(new_key()))  # type: ignore[arg-type]
    img = tmp_path / "rootfs.img"
    img.write_bytes(PAYLOAD)
    code, _out, err = cli(rig.config, "sign", "--key", str(other), "--cert",
                         str(rig.files["cert"]), "--compatible", rig.compatible, "--version",
                         "1", "--security-version", "1", str(img), "-o", str(tmp_path / "x.fw"))  # fmt: skip
    assert code == EXIT_TRUST and "is not the key of the certificate" in err, err
    assert not (tmp_path / "x.fw").exists()


def test_the_root_filesystems_device_counts_as_mounted(tmp_path: Path) -> None:
    """/proc/self/mounts often names the root device /dev/root, which matches no slot path: a
    slot whose device number is the root filesystem's is mounted at / all the same."""
    import os
    import stat

    from hal.slots import DeviceSlot

    node = tmp_path / "rootfs_b"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.stat(tmp_path).st_dev)
    except PermissionError:
        pytest.skip("creating a block device node needs CAP_MKNOD")
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/root / ext4 ro 0 0\n")
    assert DeviceSlot(name="B", path=node, mounts=mounts, root=tmp_path).mounted_at() == str(
        tmp_path
    )
    plain = tmp_path / "slot-file.img"  # a file slot is never "the root device"
    plain.write_bytes(b"\0" * 512)
    assert DeviceSlot(name="B", path=plain, mounts=mounts, root=tmp_path).mounted_at() is None
