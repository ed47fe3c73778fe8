"""The Debian package (`make deb`, scripts/build-deb.sh), built from this tree and looked at as
dpkg sees it: control fields, the file list with modes and owners, the conffile, the maintainer
scripts, the units inside, the wheels that make the venv, and that two builds are the same bytes.
Installing it on a fresh Debian 12 is `make deb-check` (scripts/deb-check.sh), not this test."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                      check=True).stdout.strip()  # fmt: skip
PROVIDER = "/opt/devid-agent/lib/ossl-modules/tpm2.so"


@dataclass(frozen=True)
class Entry:
    mode: str
    owner: str
    path: str
    target: str | None
    mtime: str


@dataclass(frozen=True)
class Built:
    deb: Path
    again: Path
    tree: Path  # dpkg-deb -x
    control: Path  # dpkg-deb -e


def build(out: Path, epoch: str) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-deb.sh"), str(out)],
                          capture_output=True, text=True, env=env, check=False, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.name == f"devid-agent_{VERSION}_{ARCH}.deb"
    return deb


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("deb")
    epoch = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    deb = build(base / "one", epoch)
    again = build(base / "two", epoch)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(base / "tree")], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(base / "control")], check=True)
    return Built(deb, again, base / "tree", base / "control")


def entries(deb: Path) -> dict[str, Entry]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    found: dict[str, Entry] = {}
    for line in listing.splitlines():
        mode, owner, _size, day, time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        found[path.removeprefix(".").rstrip("/") or "/"] = Entry(
            mode, owner, path, target or None, f"{day} {time}"
        )
    return found


def control_fields(built: Built) -> dict[str, str]:
    text = (built.control / "control").read_text()
    fields: dict[str, str] = {}
    for match in re.finditer(r"^(\S+): (.*(?:\n .*)*)", text, re.M):
        fields[match[1]] = match[2]
    return fields


def depends(built: Built) -> dict[str, str]:
    """Depends as {package: constraints} ("" when unversioned; alternatives kept whole)."""
    found: dict[str, str] = {}
    for item in control_fields(built)["Depends"].split(","):
        name, _, rest = item.strip().partition(" ")
        found[name] = (found.get(name, "") + " " + rest).strip()
    return found


def test_two_builds_of_the_same_tree_are_the_same_bytes(built: Built) -> None:
    assert built.deb.read_bytes() == built.again.read_bytes()


def test_control_fields(built: Built) -> None:
    fields = control_fields(built)
    assert fields["Package"] == "devid-agent"
    assert fields["Version"] == VERSION
    assert fields["Architecture"] == ARCH
    assert fields["Section"] == "admin" and fields["Priority"] == "optional"
    assert re.fullmatch(r".+ <[^@\s]+@[^@\s]+>", fields["Maintainer"])
    assert int(fields["Installed-Size"]) > 1000  # KiB: the wheels
    assert all(len(line) <= 80 for line in fields["Description"].splitlines())
    deps = depends(built)
    assert deps["python3"] == "(>= 3.11) (<< 3.12)"  # the compiled wheels are cp311
    for name in ("python3-venv", "systemd", "procps", "libtss2-tcti-device0", "libc6",
                 "libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-rc0", "libtss2-mu0"):  # fmt: skip
        assert name in deps, name
    assert not any("swtpm" in d or "tpm2-openssl" in d for d in deps)  # bundled, not required


def test_file_list_modes_and_owners(built: Built) -> None:
    files = entries(built.deb)
    assert {e.owner for e in files.values()} == {"root/root"}
    assert len({e.mtime for e in files.values()}) == 1  # SOURCE_DATE_EPOCH
    assert {p.split("/")[1] for p in files if p != "/"} == {"etc", "lib", "opt", "usr"}
    expect = {
        "/etc/devid-agent/config.toml": "-rw-r-----",
        "/lib/systemd/system/devid-agent.service": "-rw-r--r--",
        "/lib/systemd/system/devid-agent-enroll.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/devid-agent.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/devid-agent.conf": "-rw-r--r--",
        PROVIDER: "-rw-r--r--",
        "/usr/share/doc/devid-agent/copyright": "-rw-r--r--",
        "/usr/share/doc/devid-agent/changelog.gz": "-rw-r--r--",
        "/usr/share/doc/devid-agent/README.md": "-rw-r--r--",  # the units' Documentation=
        "/usr/share/doc/devid-agent/config.example.toml": "-rw-r--r--",
        "/usr/share/doc/devid-agent/docs/security.md": "-rw-r--r--",
        "/usr/share/man/man1/devid-agent.1.gz": "-rw-r--r--",
        "/usr/share/lintian/overrides/devid-agent": "-rw-r--r--",
    }
    for path, mode in expect.items():
        assert files[path].mode == mode, (path, files[path].mode)
    launcher = files["/usr/bin/devid-agent"]
    assert (launcher.mode[0], launcher.target) == ("l", "/opt/devid-agent/venv/bin/devid-agent")
    for path, entry in files.items():
        assert entry.mode[0] in "-dl", path
        if entry.mode[0] != "l":  # a symlink's mode is always lrwxrwxrwx
            assert not re.search(r"[sStT]", entry.mode) and entry.mode[8] != "w", path
        if entry.mode[0] == "d":
            assert entry.mode == "drwxr-xr-x", path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path
    # the venv is postinst's: dpkg ships only what it is made from
    assert not any(p.startswith("/opt/devid-agent/venv") for p in files)


def test_wheels_are_the_pins_and_this_tree(built: Built) -> None:
    wheels = {p.name for p in (built.tree / "opt" / "devid-agent" / "wheels").iterdir()}
    pins = [
        line.split("==")[0]
        for line in (ROOT / "packaging" / "deb" / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    assert sorted(norm(w.split("-")[0]) for w in wheels) == sorted(
        [norm(p) for p in pins] + ["devid_agent"]
    )
    ours = built.tree / "opt" / "devid-agent" / "wheels" / f"devid_agent-{VERSION}-py3-none-any.whl"
    names = set(zipfile.ZipFile(ours).namelist())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "agent", "hal"],
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    sources = {p for p in tracked if p.endswith((".py", "py.typed")) and (ROOT / p).is_file()}
    assert sources and sources <= names
    assert not any(n.startswith("tests/") for n in names)


def test_conffile_is_the_example_pointing_at_the_bundled_provider(built: Built) -> None:
    assert (built.control / "conffiles").read_text().split() == ["/etc/devid-agent/config.toml"]
    shipped = (built.tree / "etc" / "devid-agent" / "config.toml").read_text().splitlines()
    example = (ROOT / "config.example.toml").read_text().splitlines()
    changed = [line for line in shipped if line not in example]
    assert changed[-1] == f'openssl_provider = "{PROVIDER}"' and len(changed) == 2
    assert changed[0].startswith("# ")
    assert [line for line in example if line not in shipped] == ['openssl_provider = ""']
    assert (built.tree / PROVIDER.lstrip("/")).is_file()
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "devid-agent"), "--config",
                           str(built.tree / "etc" / "devid-agent" / "config.toml"), "config",
                           "check"], capture_output=True, text=True, check=False)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "OK"), done.stderr


def test_md5sums_cover_every_file(built: Built) -> None:
    listed = {}
    for line in (built.control / "md5sums").read_text().splitlines():
        digest, path = line.split("  ", 1)
        listed[path] = digest
    on_disk = {
        str(p.relative_to(built.tree)): hashlib.md5(p.read_bytes()).hexdigest()  # noqa: S324
        for p in built.tree.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert listed == on_disk


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts_parse_and_are_executable(built: Built, script: str) -> None:
    path = built.control / script
    assert path.stat().st_mode & 0o777 == 0o755
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n") and "set -e" in text
    assert "#VERSION#" not in text
    done = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def test_maintainer_scripts_keep_state_until_purge_and_enable_nothing(built: Built) -> None:
    postinst = (built.control / "postinst").read_text()
    assert f'"devid-agent[tpm]=={VERSION}"' in postinst and "--no-index" in postinst
    code = [line for line in postinst.splitlines() if not line.lstrip().startswith("#")]
    assert not any("enable" in line or re.search(r"\bstart\b", line) for line in code)
    prerm = (built.control / "prerm").read_text()
    postrm = (built.control / "postrm").read_text()
    assert "/var/lib" not in "\n".join(
        line for line in prerm.splitlines() if not line.lstrip().startswith("#")
    )
    remove, purge = postrm.split("    purge)")
    assert "rm -rf /var/lib" not in remove
    assert "rm -rf /var/lib/devid-agent /var/lib/devid-agent-firmware" in purge


def test_units_inside_are_the_trees_and_verify(built: Built, tmp_path: Path) -> None:
    agent = ROOT / ".venv" / "bin" / "devid-agent"
    inside = sorted((built.tree / "lib" / "systemd" / "system").iterdir())
    assert [u.name for u in inside] == ["devid-agent-enroll.service", "devid-agent.service"]
    for unit in inside:
        assert unit.read_bytes() == (ROOT / "systemd" / unit.name).read_bytes()
        copy = tmp_path / unit.name  # as installed, with this checkout's agent as the binary
        copy.write_text(unit.read_text().replace("/usr/bin/devid-agent", str(agent)))
        done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert (done.returncode, done.stderr) == (0, ""), unit.name
    for kind in ("sysusers.d", "tmpfiles.d"):
        shipped = built.tree / "usr" / "lib" / kind / "devid-agent.conf"
        assert shipped.read_bytes() == (ROOT / "systemd" / kind / "devid-agent.conf").read_bytes()
