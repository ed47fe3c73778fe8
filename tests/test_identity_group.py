"""`paths.identity_group`: other local services read the identity's certificates, never its key.

A real group (groupadd, removed afterwards) and real forked children that become other uids: one
in the group reads cert.pem, chain.pem and fullchain.pem through `identity/current/` and can
neither read the key nor write anything; one outside the group reads nothing. The mode rule of
hal.secure_dir and doctor's judgement are tested as the pure functions they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import wiring
from agent.cli import EXIT_CONFIG, main
from agent.cli.doctor_cmd import mode_problem
from agent.config import load_config
from agent.errors import ConfigError, StorageError
from agent.identity import IdentityStore
from hal.interfaces import KeyAlgorithm
from hal.secure_dir import DirStore, private_dir_fix
from hal.softkeys import SoftwareKeyStore
from hal.storage import ensure_private_dir
from tests.support.ca import TestCA

READER = 4243  # a web server in the identity group
STRANGER = 4244  # any other local user
OUTSIDER_SERVICE = 4245  # a service user that is not a member of the group

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="groupadd and other uids need root")


# -- the rule, pure ------------------------------------------------------------------------------

G, OTHER = 1234, 999


@pytest.mark.parametrize(
    ("mode", "gid", "group", "want"),
    [
        (0o700, OTHER, None, (None, None)),
        (0o755, OTHER, None, (0o700, None)),  # no group configured: tightened, as always
        (0o750, G, None, (0o700, None)),  # shared before, option now off: private again
        (0o750, G, G, (None, None)),  # shared with exactly the group: left as it is
        (0o710, G, G, (None, None)),
        (0o750, OTHER, G, (0o700, None)),  # another group's read: never kept
        (0o770, G, G, (0o700, None)),  # group-writable: never
        (0o751, G, G, (0o700, None)),  # open to others: never
        (0o740, G, G, (0o700, None)),  # nothing else is relaxed
        (0o2750, G, G, (None, None)),  # a setgid bit is not a permission to others
    ],
)
def test_private_dir_rule(mode: int, gid: int, group: int | None, want: tuple) -> None:
    assert private_dir_fix(mode, gid, group=group) == want


def test_sharing_sets_the_group_and_exactly_the_mode() -> None:
    assert private_dir_fix(0o700, OTHER, group=G, shared_mode=0o750) == (0o750, G)
    assert private_dir_fix(0o777, G, group=G, shared_mode=0o710) == (0o710, None)
    assert private_dir_fix(0o750, G, group=G, shared_mode=0o750) == (None, None)
    for bad in (0o770, 0o755, 0o700):
        with pytest.raises(ValueError):
            private_dir_fix(0o700, G, group=G, shared_mode=bad)
    with pytest.raises(ValueError):
        private_dir_fix(0o700, G, group=None, shared_mode=0o750)


@pytest.mark.parametrize(
    ("mode", "gid", "directory", "shareable", "group", "ok"),
    [
        (0o700, OTHER, True, True, None, True),
        (0o600, OTHER, False, False, None, True),
        (0o640, G, False, True, G, True),  # a certificate shared with the group
        (0o750, G, True, True, G, True),
        (0o710, G, True, True, G, True),
        (0o640, G, False, False, G, False),  # the key readable by the group
        (0o660, G, False, True, G, False),  # a certificate the group may write
        (0o770, G, True, True, G, False),  # a directory the group may write
        (0o644, G, False, True, G, False),  # open to others
        (0o640, OTHER, False, True, G, False),  # another group
        (0o640, G, False, True, None, False),  # shared, but the option is unset
        (0o740, G, True, True, G, False),  # a directory mode the rule does not allow
    ],
)
def test_doctor_mode_judgement(
    mode: int, gid: int, directory: bool, shareable: bool, group: int | None, ok: bool
) -> None:
    problem = mode_problem(mode, gid, directory=directory, shareable=shareable, group=group)
    assert (problem is None) is ok, problem


# -- config --------------------------------------------------------------------------------------


def _config(path: Path, state: Path, group: str) -> Path:
    path.write_text(
        f'[device]\nid = "gw-1"\n[paths]\nstate_dir = "{state}"\nidentity_group = "{group}"\n'
        '[keys]\nstore = "software"\n'
    )
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_a_malformed_group_name_is_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path / "c.toml", tmp_path / "s", "web server")
    code, _, err = run_cli("--config", str(config), "config", "check")
    assert code == EXIT_CONFIG
    assert "paths.identity_group: expected a group name" in err and err.count("\n") == 1


def test_a_missing_group_is_refused_by_config_check_and_by_the_commands(tmp_path: Path) -> None:
    config = _config(tmp_path / "c.toml", tmp_path / "s", "no-such-group-devid")
    code, _, err = run_cli("--config", str(config), "config", "check")
    assert code == EXIT_CONFIG
    assert err == (
        f"devid-agent: {config}: paths.identity_group: there is no group 'no-such-group-devid' "
        'on this system; create it (groupadd no-such-group-devid) or set ""\n'
    )
    with pytest.raises(ConfigError, match=r"paths\.identity_group"):
        wiring.identity_store(load_config(config))
    assert not (tmp_path / "s").exists()  # nothing was written


# -- a real group, real uids ---------------------------------------------------------------------


@pytest.fixture
def group() -> Iterator[tuple[str, int]]:
    """A fresh system group, removed afterwards."""
    name = f"devid-t{os.getpid() % 100000}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        import grp

        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=True, capture_output=True)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every uid can enter (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="devid-group-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def as_user(uid: int, groups: list[int], fn: Callable[[], object]) -> int:
    """Run `fn` in a forked child that has become `uid` with these supplementary groups (no
    exec); its exit status: 0 when `fn` returned, 1 when it raised (printed)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgroups(groups)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def enroll(store: IdentityStore, subject: str = "gw-1") -> None:
    keys = SoftwareKeyStore()
    blob = keys.generate(KeyAlgorithm.EC_P256)
    ca = TestCA()
    store.install(
        key_blob=blob,
        key_file_name=keys.key_file_name,
        certificate=ca.issue(keys.public_key(blob), subject=subject),
        chain=[ca.cert],
        ca_certs=[ca.cert],
    )


def mode_and_group(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


CERTS = ("cert.pem", "chain.pem", "fullchain.pem")


@needs_root
def test_the_group_reads_the_certificates_and_nothing_else(
    world: Path, group: tuple[str, int]
) -> None:
    name, gid = group
    state = world / "state"
    config = load_config(_config(world / "c.toml", state, name))
    enroll(wiring.identity_store(config))
    current = state / "identity" / "current"
    generation = state / "identity" / "gen-1"
    assert mode_and_group(state) == (0o710, gid)
    assert mode_and_group(state / "identity") == (0o750, gid)
    assert mode_and_group(generation) == (0o750, gid)
    assert os.lstat(current).st_gid == gid
    for cert in CERTS:
        assert mode_and_group(generation / cert) == (0o640, gid)
    key_mode, key_gid = mode_and_group(generation / "key.pem")
    assert key_mode == 0o600 and key_gid != gid
    assert stat.S_IMODE(os.stat(state / "cacerts.pem").st_mode) == 0o600

    expected = {cert: (current / cert).read_bytes() for cert in CERTS}

    def reads_certificates_only() -> None:
        for cert, data in expected.items():
            assert (current / cert).read_bytes() == data
        assert sorted(os.listdir(current)) == ["cert.pem", "chain.pem", "fullchain.pem", "key.pem"]
        with pytest.raises(PermissionError):
            (current / "key.pem").read_bytes()
        with pytest.raises(PermissionError):
            os.listdir(state)  # enters state_dir, never lists it
        for target in (state / "x", state / "identity" / "x", generation / "x"):
            with pytest.raises(PermissionError):
                target.write_bytes(b"planted")
        with pytest.raises(PermissionError):
            (current / "cert.pem").write_bytes(b"forged")
        for private in ("cacerts.pem", "enroll.lock"):
            with pytest.raises((PermissionError, FileNotFoundError)):
                (state / private).read_bytes()

    def reads_nothing() -> None:
        for cert in (*CERTS, "key.pem"):
            with pytest.raises(PermissionError):
                (current / cert).read_bytes()

    assert as_user(READER, [gid], reads_certificates_only) == 0
    assert as_user(STRANGER, [], reads_nothing) == 0


@needs_root
def test_the_sharing_survives_the_other_writers_of_state_dir(
    world: Path, group: tuple[str, int]
) -> None:
    """The pending request, the scheduler state, the audit trail and the enrollment lock keep
    state_dir as the identity left it (0710 with the group); a config without the group
    makes it private again at the next write (the rule has no memory)."""
    name, gid = group
    state = world / "state"
    config = load_config(_config(world / "c.toml", state, name))
    store = wiring.identity_store(config)
    enroll(store)
    with store.exclusive():
        pass
    wiring.scheduler_state_store(config).store.write("probe", b"{}")
    DirStore(state, group=gid).read("probe", limit=10)
    ensure_private_dir(state, group=gid)
    assert mode_and_group(state) == (0o710, gid)
    ensure_private_dir(state)  # no group: private again
    assert mode_and_group(state)[0] == 0o700
    assert stat.S_IMODE(os.stat(state / "identity").st_mode) == 0o750  # untouched


@needs_root
def test_an_older_generation_keeps_its_modes_and_doctor_says_what_is_shared(
    world: Path, group: tuple[str, int]
) -> None:
    name, gid = group
    state = world / "state"
    private_config = _config(world / "private.toml", state, "")
    enroll(wiring.identity_store(load_config(private_config)))
    shared_config = _config(world / "shared.toml", state, name)

    def doctor_says() -> tuple[str, str]:
        _, out, _ = run_cli("--config", str(shared_config), "doctor", "--json")
        findings = {f["check"]: f for f in json.loads(out)}
        return findings["identity_files"]["status"], findings["identity_files"]["detail"]

    status, detail = doctor_says()
    assert status == "warning" and f"group {name!r} cannot read" in detail, detail
    enroll(wiring.identity_store(load_config(shared_config)))  # the next rotation
    assert mode_and_group(state / "identity" / "gen-1")[0] == 0o700  # old one untouched
    assert mode_and_group(state / "identity" / "gen-2" / "cert.pem") == (0o640, gid)
    assert doctor_says() == ("ok", f"the current certificates are readable by group {name!r}")

    os.chmod(state / "identity" / "gen-2" / "key.pem", 0o640)
    os.chown(state / "identity" / "gen-2" / "key.pem", -1, gid)
    status, detail = doctor_says()
    assert status == "error" and "key.pem is readable by its group" in detail, detail
    os.chmod(state / "identity" / "gen-2" / "key.pem", 0o600)
    os.chmod(state / "identity" / "gen-2", 0o770)
    status, detail = doctor_says()
    assert status == "error" and "gen-2 is writable by its group" in detail, detail
    os.chmod(state / "identity" / "gen-2", 0o750)
    _, out, _ = run_cli("--config", str(private_config), "doctor", "--json")
    findings = {f["check"]: f for f in json.loads(out)}
    assert findings["identity_files"]["status"] == "error"  # shared, but the option is off
    assert "paths.identity_group is unset" in findings["identity_files"]["detail"]


@needs_root
def test_a_service_user_outside_the_group_gets_one_line_and_no_current(
    world: Path, group: tuple[str, int]
) -> None:
    name, gid = group
    state = world / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OUTSIDER_SERVICE, OUTSIDER_SERVICE)
    config = load_config(_config(world / "c.toml", state, name))

    def enroll_as_outsider() -> None:
        with pytest.raises(StorageError) as raised:
            enroll(wiring.identity_store(config))
        message = str(raised.value)
        assert f"cannot give {state} to group {gid}" in message, message
        assert "not a member of that group" in message and "\n" not in message
        assert not (state / "identity" / "current").exists()

    assert as_user(OUTSIDER_SERVICE, [], enroll_as_outsider) == 0

    def enroll_as_member() -> None:  # the service user added to the group: it works
        enroll(wiring.identity_store(config))

    assert as_user(OUTSIDER_SERVICE, [gid], enroll_as_member) == 0
    assert mode_and_group(state / "identity" / "current" / "cert.pem") == (0o640, gid)
