"""scripts/setup.sh and scripts/fetch-tpm2-openssl.sh: a re-run changes nothing and says nothing;
a failing step (no network: apt-get fails) ends with one clear line and a non-zero status."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

APT_FAILURE = """#!/bin/sh
echo "Ign:1 http://deb.debian.org/debian trixie InRelease"
echo "Err:1 http://deb.debian.org/debian trixie InRelease" >&2
echo "  Temporary failure resolving 'deb.debian.org'" >&2
echo "E: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease  Temporary failure resolving 'deb.debian.org'" >&2
exit 100
"""


def offline_path(tmp_path: Path) -> dict[str, str]:
    """PATH with an apt-get that fails as it does without network, and a dpkg-query that knows no
    tpm2-openssl (so the fetcher must download one); everything else is the real tool."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text(APT_FAILURE)
    real_dpkg_query = shutil.which("dpkg-query")
    (stubs / "dpkg-query").write_text(
        f'#!/bin/sh\ncase "$*" in *tpm2-openssl*) exit 1;; esac\nexec {real_dpkg_query} "$@"\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


def test_setup_rerun_is_quiet_and_changes_nothing() -> None:
    marker = ROOT / ".deps" / "tpm2-provider.path"
    before = marker.read_text()
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert marker.read_text() == before


def test_fetch_without_network_is_one_clear_line(tmp_path: Path) -> None:
    dest = tmp_path / "provider"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-tpm2-openssl.sh"), str(dest)],
        capture_output=True, text=True, timeout=120, check=False, env=offline_path(tmp_path),
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "fetch-tpm2-openssl: apt-get-update failed: E: Failed to fetch http://deb.debian.org"
    )
    assert "no network?" in lines[0]
    kept = Path(lines[0].rsplit("full output: ", 1)[1])
    assert "Temporary failure resolving" in kept.read_text()
    assert not dest.exists()  # nothing half-unpacked


def test_setup_stops_at_the_failing_step_with_one_line(tmp_path: Path) -> None:
    """A copy of the project without .deps/: setup must fetch the provider, which fails."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", project / "scripts")
    shutil.copy(ROOT / "pyproject.toml", project)
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=project, capture_output=True, text=True, timeout=120,
        check=False, env=offline_path(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("fetch-tpm2-openssl: apt-get-update failed: ")
    assert not (project / ".deps" / "tpm2-provider.path").exists()
    assert not (project / ".venv").exists()  # stopped at the failing step
