"""Directories reached without trusting anyone but root and ourselves, used by descriptor.

A path is only as safe as every directory on the way to it: whoever can write an ancestor can
rename what lies below and put a symlink or a directory of their own in its place. So a
directory is opened by walking from `/` one component at a time with `O_NOFOLLOW` (a symlink
anywhere on the way is refused), and each directory passed through must be owned by root or by
this process's user and be writable by no one else, unless it is sticky and the entry below it is
ours (`/tmp`'s rule: nobody else may rename our entry there). The last directory must be ours;
a private one is tightened to 0700 through its descriptor. Everything inside is then opened,
created, renamed and fsynced relative to that descriptor (`openat`, `renameat`, `fchmod`), with
`O_NOFOLLOW | O_NONBLOCK` and a regular-file check, so a planted symlink or FIFO is refused
instead of followed or waited on. Nothing is chmodded or opened by path.

One group may share a private directory (`paths.identity_group`: other local services read the
identity's certificates). Given that group, a private directory may also be 0750 (the group
lists and enters it) or 0710 (the group only enters it) with exactly that group; never group-
writable, never open to others, and nothing else is relaxed: any other mode is tightened to
0700 as before. Asked to share (`shared_mode`), the directory is first tightened to 0700, then
given that group and that mode, all through its descriptor.

`untrusted_ancestor(path)` is the same rule as a check, for files that other tools open by path
(the GRUB env, slot devices): `config check` and root's firmware commands refuse what it names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from hal import faults
from hal.errors import Busy, StorageError

FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
#: what a private directory may be with its one sharing group: entered and listed, or entered
SHARED_PRIVATE_DIR_MODES = (0o750, 0o710)
SHARED_DIR_MODE = 0o755  # for directories created on the way, and readable shared ones
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_CHUNK = 1024 * 1024


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _why_untrusted(st: os.stat_result, child: os.stat_result | None) -> str | None:
    """Why a directory with status `st` (holding `child`) lets someone else change what it holds."""
    if st.st_uid not in _trusted_owners():
        return f"is owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        sticky_and_ours = bool(st.st_mode & stat.S_ISVTX) and (
            child is not None and child.st_uid in _trusted_owners()
        )
        if not sticky_and_ours:
            return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir_fix(
    mode: int, gid: int, *, group: int | None, shared_mode: int | None = None
) -> tuple[int | None, int | None]:
    """What a private directory of `mode` and group `gid` needs: (the mode to set, the group to
    set), None for what is right already. Pure: the rule of the module's opening comment."""
    if shared_mode is not None:
        if group is None or shared_mode not in SHARED_PRIVATE_DIR_MODES:
            raise ValueError(f"cannot share a private directory as {shared_mode:04o}")
        return (None if mode == shared_mode else shared_mode), (None if gid == group else group)
    if not mode & 0o077:
        return None, None
    if group is not None and gid == group and mode & 0o777 in SHARED_PRIVATE_DIR_MODES:
        return None, None
    return PRIVATE_DIR_MODE, None


def _refused_ancestor(path: Path, ancestor: Path, why: str) -> StorageError:
    return StorageError(
        f"refusing {path}: its ancestor {ancestor} {why}, so another user could replace what "
        "it holds; use a path whose every directory belongs to root (or to this user)"
    )


def _components(path: Path) -> list[str]:
    if not path.is_absolute():
        raise StorageError(f"{path} is not an absolute path")
    return [part for part in path.parts[1:] if part not in ("", ".")]


def _make_private(
    fd: int, st: os.stat_result, path: Path, *, group: int | None, shared_mode: int | None
) -> None:
    mode, gid = private_dir_fix(
        stat.S_IMODE(st.st_mode), st.st_gid, group=group, shared_mode=shared_mode
    )
    if gid is not None:  # only when sharing: then shared_mode is set
        os.fchmod(fd, PRIVATE_DIR_MODE)  # no member of the old group keeps a way in meanwhile
        try:
            os.fchown(fd, -1, gid)
        except PermissionError as e:
            raise not_in_group(path, gid) from e
        mode = shared_mode
    if mode is not None:
        os.fchmod(fd, mode)


def not_in_group(path: Path, gid: int) -> StorageError:
    return StorageError(
        f"cannot give {path} to group {gid} (paths.identity_group): this process's user "
        f"(uid {os.geteuid()}) is not a member of that group; add it (usermod -aG)"
    )


class SecureDir:
    """An open, checked directory. Use as a context manager; `open()` makes one."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        create: bool = False,
        private: bool = True,
        group: int | None = None,
        shared_mode: int | None = None,
    ) -> SecureDir | None:
        """Walk to `path` safely; None if it does not exist and `create` is false.

        Directories created on the way are 0755 (writable only by us), the last one 0700 when
        `private`. The last one must belong to this process's user; when `private`, a looser mode
        is tightened to 0700 through its descriptor, unless it is shared with `group` as the
        opening comment says; with `shared_mode` (0750 or 0710) it is given `group` and that mode.
        """
        parts = _components(path)
        if ".." in parts:
            raise StorageError(f"{path}: '..' is not allowed in a state path")
        fd = os.open("/", _DIR_FLAGS)
        here = Path("/")
        try:
            st = os.fstat(fd)
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                child_path = here / name
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    mode = PRIVATE_DIR_MODE if (last and private) else SHARED_DIR_MODE
                    # Never create inside a directory someone else may change; in a sticky one
                    # the new entry is ours (the check after opening it makes sure it is).
                    why = _why_untrusted(st, _ours())
                    if why is not None:
                        raise _refused_ancestor(path, here, why) from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, mode, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, mode)  # mkdir's mode is filtered by the umask
                child_st = os.fstat(child)
                why = _why_untrusted(st, child_st)
                os.close(fd)
                fd, st, here = child, child_st, child_path
                if why is not None:
                    raise _refused_ancestor(path, here.parent, why)
            euid = os.geteuid()
            if not private and st.st_uid in _trusted_owners():
                pass  # a shared directory root (or we) keeps for readers
            elif st.st_uid != euid:
                raise StorageError(
                    f"{path} belongs to uid {st.st_uid}, not to this process's user (uid {euid}); "
                    "run devid-agent as the directory's owner, or chown the directory to this user"
                )
            if private:
                _make_private(fd, st, path, group=group, shared_mode=shared_mode)
            elif not private and st.st_mode & 0o022:
                raise StorageError(f"{path} is writable by group or others; want 0755")
            return cls(fd, path)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StorageError(
                    f"refusing {path}: a component at or below {here} is a symlink or not a "
                    "directory; name the real path"
                ) from e
            raise StorageError(f"cannot open directory {path}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SecureDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files inside --------------------------------------------------------------------------

    def _open_regular(self, name: str, flags: int, what: str) -> int:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StorageError(f"{self.path / name} is not a regular file; refusing to {what} it")
        return fd

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(f"cannot stat {self.path / name}: {e.strerror}") from e
        return True

    def names(self) -> list[str]:
        """The names of the entries in the directory, sorted (read through its descriptor)."""
        try:
            return sorted(os.listdir(self.fd))
        except OSError as e:
            raise StorageError(f"cannot list {self.path}: {e.strerror}") from e

    def read(self, name: str, *, limit: int) -> bytes | None:
        """The whole file (at most `limit` bytes), or None if it does not exist."""
        try:
            fd = self._open_regular(name, os.O_RDONLY, "read")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._refused(name, e) from e
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= limit and (chunk := os.read(fd, min(_READ_CHUNK, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
        except OSError as e:
            raise StorageError(f"cannot read {self.path / name}: {e.strerror}") from e
        finally:
            os.close(fd)
        if size > limit:
            raise StorageError(f"{self.path / name} is larger than {limit} bytes")
        return b"".join(chunks)

    def write(self, name: str, data: bytes, *, mode: int = FILE_MODE) -> None:
        """Replace `name` with `data` atomically and durably (temp, fsync, renameat, fsync dir)."""
        tmp = f".{name}.tmp-{os.getpid()}-{os.urandom(8).hex()}"
        created = False
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=self.fd,
            )
            created = True
            try:
                os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; be exact
                view = memoryview(data)
                while view:
                    faults.point(f"write {self.path / name}")
                    view = view[os.write(fd, view) :]
                faults.point(f"fsync {self.path / name}")
                os.fsync(fd)
            finally:
                os.close(fd)
            faults.point(f"rename {self.path / name}")
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            created = False
            faults.point(f"fsync dir of {self.path / name}")
            os.fsync(self.fd)
            faults.point(f"written {self.path / name}")
        except OSError as e:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self.fd)
            raise StorageError(f"cannot write {self.path / name}: {e.strerror}") from e

    def append(self, name: str, data: bytes, *, mode: int = FILE_MODE) -> int:
        """Append `data` in one O_APPEND write (created `mode` if missing), fsync; the new size."""
        try:
            fd = self._open_regular(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "append to")
        except OSError as e:
            raise self._refused(name, e) from e
        try:
            created = os.fstat(fd).st_size == 0
            if created:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                faults.point(f"append {self.path / name}")
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            size = os.fstat(fd).st_size
            if created:
                os.fsync(self.fd)
            return size
        except OSError as e:
            raise StorageError(f"cannot append to {self.path / name}: {e.strerror}") from e
        finally:
            os.close(fd)

    def tail(self, name: str, *, max_bytes: int) -> tuple[int, bytes] | None:
        """(the file's size, its last `max_bytes` bytes at most), or None if it does not exist."""
        try:
            fd = self._open_regular(name, os.O_RDONLY, "read")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._refused(name, e) from e
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - max_bytes)
            return size, os.pread(fd, size - start, start)
        except OSError as e:
            raise StorageError(f"cannot read {self.path / name}: {e.strerror}") from e
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> bool:
        """Rename `src` to `dst` (replacing it) and fsync the directory; False if `src` is
        missing. Neither name is followed if it is a symlink (renameat moves the entry)."""
        try:
            os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            os.fsync(self.fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(f"cannot rename {self.path / src}: {e.strerror}") from e
        return True

    @contextlib.contextmanager
    def lock(
        self, name: str, *, wait: bool = True, holder: str = "another process"
    ) -> Iterator[None]:
        """Hold an exclusive flock on `name` (created 0600 if missing) for the block."""
        try:
            fd = self._open_regular(name, os.O_RDWR | os.O_CREAT, "lock")
            os.fchmod(fd, FILE_MODE)
        except OSError as e:
            raise self._refused(name, e) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise Busy(
                    f"{holder} (it holds {self.path / name}); try again when it is done"
                ) from e
            except OSError as e:
                raise StorageError(f"cannot lock {self.path / name}: {e.strerror}") from e
            yield
        finally:
            os.close(fd)  # releases the lock

    def _refused(self, name: str, e: OSError) -> StorageError:
        if e.errno == errno.ELOOP:
            return StorageError(f"{self.path / name} is a symlink; refusing to follow it")
        return StorageError(f"cannot open {self.path / name}: {e.strerror}")


class DirStore:
    """Small files in one directory, each operation through a fresh checked walk (`SecureDir`).

    What the firmware state, the counters' files and their lock use: nothing is kept open
    between operations, and nothing inside is ever reached by path.
    """

    def __init__(self, directory: Path, *, private: bool = True, group: int | None = None) -> None:
        self.directory = directory
        self.private = private
        #: the one group the directory may be shared with (left as it is, never applied here)
        self.group = group

    def path(self, name: str) -> Path:
        """For messages only: files are never opened by this path."""
        return self.directory / name

    def read(self, name: str, *, limit: int) -> bytes | None:
        """The file's bytes, or None if the file (or the directory) does not exist."""
        sd = SecureDir.open(self.directory, create=False, private=self.private, group=self.group)
        if sd is None:
            return None
        with sd:
            return sd.read(name, limit=limit)

    def names(self) -> list[str]:
        """The entries of the directory, sorted; [] if it does not exist."""
        sd = SecureDir.open(self.directory, create=False, private=self.private, group=self.group)
        if sd is None:
            return []
        with sd:
            return sd.names()

    def write(self, name: str, data: bytes, *, mode: int = FILE_MODE) -> None:
        with self._open() as sd:
            sd.write(name, data, mode=mode)

    @contextlib.contextmanager
    def lock(
        self, name: str, *, wait: bool = True, holder: str = "another process"
    ) -> Iterator[None]:
        with self._open() as sd, sd.lock(name, wait=wait, holder=holder):
            yield

    def append(self, name: str, data: bytes, *, mode: int = FILE_MODE) -> int:
        with self._open() as sd:
            return sd.append(name, data, mode=mode)

    def tail(self, name: str, *, max_bytes: int) -> tuple[int, bytes] | None:
        sd = SecureDir.open(self.directory, create=False, private=self.private, group=self.group)
        if sd is None:
            return None
        with sd:
            return sd.tail(name, max_bytes=max_bytes)

    def rename(self, src: str, dst: str) -> bool:
        with self._open() as sd:
            return sd.rename(src, dst)

    def _open(self) -> SecureDir:
        sd = SecureDir.open(self.directory, create=True, private=self.private, group=self.group)
        assert sd is not None  # create=True never returns None
        return sd


def untrusted_ancestor(path: Path) -> str | None:
    """Why someone other than root (or us) could replace `path`, or None if no one can.

    Checks every directory above `path` as written and as resolved (a symlink on the way is
    fine when root placed it: its own directory is checked too), by lstat from `/`. What does not
    exist yet is judged by the directory it would be created in.
    """
    for chain in (path, Path(os.path.realpath(path))):
        parts = _components(chain)
        here = Path("/")
        try:
            st = os.lstat(here)
            for i, name in enumerate(parts):
                try:
                    child: os.stat_result | None = os.lstat(here / name)
                except FileNotFoundError:
                    child = None
                why = _why_untrusted(st, child or _ours())
                if why is not None:
                    return f"{here} {why}"
                if child is None or stat.S_ISLNK(child.st_mode) or i == len(parts) - 1:
                    break  # created by us later / the resolved chain covers it / the file itself
                st, here = child, here / name
        except OSError as e:
            return f"{here} cannot be checked ({e.strerror})"
    return None


def _ours() -> os.stat_result:
    """The status an entry we create would have (owned by us), for judging its directory."""
    return os.stat_result((0, 0, 0, 0, os.geteuid(), 0, 0, 0, 0, 0))
