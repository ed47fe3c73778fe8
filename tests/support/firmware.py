"""Firmware test helpers: a vendor PKI, bundles in memory, and a device rig with file-backed
slots, a real bootloader environment (fw_setenv / grub-editenv / file), a kernel command line
file, and a `reboot()` that applies RAUC's boot-script logic to the environment."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.firmware.manifest import Manifest
from agent.firmware.sign import Signer, signed_header
from tests.support.ca import TestCA, key_pem, pem, utcnow

COMPATIBLE = "acme-gw-imx8"
SLOT_BYTES = 256 * 1024
ENV_BYTES = 0x4000


def new_key(kind: str = "ec-p256") -> CertificateIssuerPrivateKeyTypes:
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    raise ValueError(kind)


def intermediate(
    root: TestCA,
    name: str = "firmware intermediate",
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> TestCA:
    """A TestCA whose certificate is issued by `root` (ca=True), EKU-constrained if `eku`."""
    ca = TestCA.__new__(TestCA)
    ca.name = name
    ca.key = ec.generate_private_key(ec.SECP256R1())
    ca.cert = root.issue(
        ca.key.public_key(), subject=name, ca=True, eku=eku, lifetime=dt.timedelta(days=3650)
    )
    return ca


@dataclass
class Vendor:
    """A firmware PKI: root (the device's trust anchor) -> intermediate -> code signer."""

    root: TestCA = field(default_factory=lambda: TestCA(name="firmware root"))
    inter: TestCA = field(init=False)
    signer: Signer = field(init=False)

    def __post_init__(self) -> None:
        self.inter = intermediate(self.root)
        self.signer = self.make_signer()

    def make_signer(
        self,
        kind: str = "ec-p256",
        *,
        eku: list[x509.ObjectIdentifier] | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        issuer: TestCA | None = None,
    ) -> Signer:
        key = new_key(kind)
        ca = issuer or self.inter
        cert = ca.issue(
            key.public_key(),
            subject=f"firmware signer {kind}",
            eku=[ExtendedKeyUsageOID.CODE_SIGNING] if eku is None else eku,
            not_before=not_before,
            not_after=not_after,
            lifetime=dt.timedelta(days=365),
        )
        chain = (cert, ca.cert) if ca is not self.root else (cert,)
        return Signer(key=key, certs=chain)

    def write_files(self, directory: Path) -> dict[str, Path]:
        """Anchor, signer key/cert and chain as PEM files (for the CLI)."""
        paths = {
            "anchor": directory / "firmware-ca.pem",
            "key": directory / "signer.key",
            "cert": directory / "signer.pem",
            "chain": directory / "chain.pem",
        }
        paths["anchor"].write_bytes(pem(self.root.cert))
        paths["key"].write_bytes(key_pem(self.signer.key))  # type: ignore[arg-type]
        paths["cert"].write_bytes(pem(self.signer.certs[0]))
        paths["chain"].write_bytes(b"".join(pem(c) for c in self.signer.certs[1:]))
        return paths


def manifest_for(
    payload: bytes,
    *,
    compatible: str = COMPATIBLE,
    version: str = "1.0.0",
    security_version: int = 1,
    hash_algorithm: str = "sha256",
    size: int | None = None,
) -> Manifest:
    return Manifest(
        compatible=compatible,
        version=version,
        security_version=security_version,
        created=utcnow().replace(microsecond=0),
        payload_size=len(payload) if size is None else size,
        hash_algorithm=hash_algorithm,
        digest=hashlib.new(hash_algorithm, payload).digest(),
    )


def make_bundle(
    payload: bytes, signers: list[Signer], manifest: Manifest | None = None, **kw: object
) -> bytes:
    manifest = manifest or manifest_for(payload, **kw)  # type: ignore[arg-type]
    return signed_header(manifest, signers) + payload


def image(size: int = 64 * 1024, seed: int = 1) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# ---------------------------------------------------------------------------------------------
# The device rig


def uboot_env(path: Path, variables: dict[str, str]) -> None:
    text = "".join(f"{k}={v}\n" for k, v in variables.items())
    src = path.with_suffix(".txt")
    src.write_text(text)
    subprocess.run(
        ["mkenvimage", "-s", hex(ENV_BYTES), "-r", "-o", str(path), str(src)], check=True
    )


def read_uboot(config: Path) -> dict[str, str]:
    out = subprocess.run(
        ["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def write_uboot(config: Path, changes: dict[str, str]) -> None:
    script = "".join(f"{k}={v}\n" for k, v in changes.items())
    subprocess.run(["fw_setenv", "-c", str(config), "-s", "-"], input=script, text=True, check=True)


def read_grub(path: Path) -> dict[str, str]:
    out = subprocess.run(
        ["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def write_grub(path: Path, changes: dict[str, str]) -> None:
    subprocess.run(
        ["grub-editenv", str(path), "set", *(f"{k}={v}" for k, v in changes.items())], check=True
    )


def uboot_boot_script(env: dict[str, str], max_tries: int = 3) -> tuple[str | None, dict[str, str]]:
    """RAUC's U-Boot boot script: first slot of BOOT_ORDER with BOOT_x_LEFT > 0, decrement it.
    No slot left: reset all tries (RAUC's script then resets the board)."""
    order = env.get("BOOT_ORDER", "A B").split()
    changes: dict[str, str] = {}
    for slot in order:
        left = int(env.get(f"BOOT_{slot}_LEFT", format(max_tries, "x")), 16)  # 0x${...}
        if left > 0:
            changes[f"BOOT_{slot}_LEFT"] = format(left - 1, "x")  # setexpr: hex
            return slot, changes
    return None, {"BOOT_A_LEFT": format(max_tries, "x"), "BOOT_B_LEFT": format(max_tries, "x")}


def grub_boot_script(env: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """RAUC's grub.cfg (A_OK=0 B_OK=0 before load_env): first slot of ORDER with OK=1 and
    TRY=0; set its TRY=1 and boot it."""
    for slot in env.get("ORDER", "A B").split():
        if env.get(f"{slot}_OK", "0") == "1" and env.get(f"{slot}_TRY", "0") == "0":
            return slot, {f"{slot}_TRY": "1"}
    return None, {}


@dataclass
class Rig:
    """A device in a directory: slots A/B as files, a boot env, /proc/cmdline as a file."""

    root: Path
    bootloader: str = "uboot"  # "uboot", "grub" or "file"
    counter: str = "file"
    tcti: str = ""
    compatible: str = COMPATIBLE
    booted: str = "A"
    crl_files: tuple[Path, ...] = ()
    vendor: Vendor = field(default_factory=Vendor)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.slot = {name: self.root / f"slot-{name.lower()}.img" for name in ("A", "B")}
        for name, path in self.slot.items():
            path.write_bytes(image(SLOT_BYTES, seed=ord(name)))
        self.cmdline = self.root / "cmdline"
        self.state_dir = self.root / "fwstate"
        self.status_snapshot = self.root / "fwpublic" / "status.json"
        self.files = self.vendor.write_files(self.root)
        self.env_files: list[Path] = []
        if self.bootloader == "uboot":
            env0, env1 = self.root / "uboot-env0", self.root / "uboot-env1"
            uboot_env(env0, {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"})
            env1.write_bytes(env0.read_bytes())
            self.fw_env_config = self.root / "fw_env.config"
            self.fw_env_config.write_text(
                f"{env0} 0x0 {hex(ENV_BYTES)}\n{env1} 0x0 {hex(ENV_BYTES)}\n"
            )
            self.env_files = [env0, env1]
        elif self.bootloader == "grub":
            self.grubenv = self.root / "grubenv"
            subprocess.run(["grub-editenv", str(self.grubenv), "create"], check=True)
            write_grub(self.grubenv, {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0",
                                      "B_TRY": "0"})  # fmt: skip
            self.env_files = [self.grubenv]
        else:
            self.file_env = self.root / "bootenv"
            self.env_files = [self.file_env]
        self.set_booted(self.booted)
        self.write_config()

    def write_config(self, **overrides: str) -> None:
        lines = [
            "[device]",
            'id = "gw-test"',
            "[tpm]",
            f'tcti = "{self.tcti or "device:/dev/tpmrm0"}"',
            "[firmware]",
            f'compatible = "{self.compatible}"',
            f'trust_anchors = "{self.files["anchor"]}"',
            "crl_files = [" + ", ".join(f'"{p}"' for p in self.crl_files) + "]",
            f'state_dir = "{self.state_dir}"',
            f'crl_dir = "{self.root / "fwcrl"}"',
            f'status_snapshot = "{self.status_snapshot}"',
            f'bootloader = "{self.bootloader}"',
            f'slot_a = "{overrides.get("slot_a", self.slot["A"])}"',
            f'slot_b = "{overrides.get("slot_b", self.slot["B"])}"',
            f'cmdline = "{self.cmdline}"',
            f'counter = "{self.counter}"',
            "buffer_kib = 16",
        ]
        if "check_slot_at_commit" in overrides:
            lines.append(f"check_slot_at_commit = {overrides['check_slot_at_commit']}")
        if self.bootloader == "uboot":
            lines.append(f'uboot_env_config = "{self.fw_env_config}"')
        elif self.bootloader == "grub":
            lines.append(f'grub_env = "{self.grubenv}"')
        else:
            lines.append(f'file_env = "{self.file_env}"')
        self.config = self.root / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")

    def set_booted(self, slot: str) -> None:
        self.booted = slot
        self.cmdline.write_text(f"console=ttyS0 root=/dev/slot{slot} rauc.slot={slot} quiet\n")

    def env(self) -> dict[str, str]:
        if self.bootloader == "uboot":
            return read_uboot(self.fw_env_config)
        if self.bootloader == "grub":
            return read_grub(self.grubenv)
        from hal.bootloader.file import FileBootControl

        return FileBootControl(path=self.file_env)._read_env()

    def reboot(self) -> str | None:
        """Power-cycle: the bootloader applies RAUC's logic, the kernel gets rauc.slot=X."""
        env = self.env()
        if self.bootloader == "grub":
            slot, changes = grub_boot_script(env)
            if changes:
                write_grub(self.grubenv, changes)
        else:
            slot, changes = uboot_boot_script(env)
            if self.bootloader == "uboot":
                write_uboot(self.fw_env_config, changes)
            else:
                from hal.bootloader.file import FileBootControl

                FileBootControl(path=self.file_env)._write_env(changes)
        if slot is not None:
            self.set_booted(slot)
        return slot

    def snapshot(self) -> dict[str, bytes]:
        """Every byte the device's firmware state consists of."""
        paths = [*self.slot.values(), *self.env_files]
        if self.state_dir.exists():
            paths += sorted(
                p
                for p in self.state_dir.iterdir()
                if p.name != "lock" and not p.name.startswith("audit.")  # audit records attempts
            )
        return {str(p): p.read_bytes() for p in paths if p.exists()}

    def write_bundle(self, data: bytes, name: str = "bundle.fw") -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


def stream(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run `devid-agent --config CONFIG firmware ARGS` in this process: (status, stdout, stderr)."""
    import contextlib

    from agent.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(config), "firmware", *args])
    return code, out.getvalue(), err.getvalue()
