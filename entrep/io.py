"""Atomic writes (every file the kit writes goes to a temp file in the same folder, then os.replace;
every multi-file output is written as one unit), reading back what the kit wrote, and one writer per
run directory."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from entrep.errors import EntrepError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what open() and mkdir() would give


def naming(e: OSError, path: str | Path) -> OSError:
    """`e` naming `path`, the file the user asked for: a failed write raises with no file name
    (ENOSPC from write()) or with a temp file's random name."""
    return OSError(e.errno, e.strerror or str(e), str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed. An
    OSError (a full disk, a read-only folder) comes out naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; give the file the mode open() would
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)  # again: a writer that recreates the file (safetensors) leaves 0600
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise naming(e, path) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(p) -> None:
    if p is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _normal_modes(folder: Path) -> None:
    """Every file and folder under `folder` with the modes open() and mkdir() give: mkdtemp makes
    0700 and some writers (peft's save_pretrained, safetensors) 0600, unlike the kit's other files."""
    os.chmod(folder, DIR_MODE)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), DIR_MODE)
        for f in files:
            os.chmod(os.path.join(root, f), FILE_MODE)


def check_replaceable(path: str | Path, holds: set[str] | None = None) -> None:
    """What atomic_dir refuses, checked on its own before the work that fills it (infer.py's --out before
    the embedding, not after): a file, the current folder, or a folder holding files not the output's."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EntrepError(f"{path} is a file; give a folder")
    with contextlib.suppress(OSError):  # the swap would pull the folder from under the process
        here = Path.cwd().resolve()
        if path.resolve() == here or path.resolve() in here.parents:
            raise EntrepError(f"{path} is the current folder or holds it; give a folder of its own for the output")
    if holds is not None and path.is_dir():
        if foreign := sorted(p.name for p in path.iterdir() if p.name not in holds and not p.name.startswith(".")):
            raise EntrepError(f"{path} holds files that are not this output's ({', '.join(foreign[:5])}); it is "
                              f"replaced as a whole, so give an empty folder or one of its own")


@contextlib.contextmanager
def atomic_dir(path: str | Path, holds: set[str] | None = None):
    """A multi-file output written as one unit: yield an empty temp folder beside `path`; on success
    the old `path` is renamed aside, the new one renamed in and the old one removed; on any error the
    temp folder is removed and `path` is left as it was (complete old set, never a mix).

    `holds`: the names the output consists of. An existing `path` holding anything else is refused
    (it is not the kit's alone, and the swap would delete it)."""
    path = Path(path)
    if path.is_symlink():  # a linked output folder (a shared drive): swap the folder it names, keep the link
        path = path.resolve()
    check_replaceable(path, holds)
    tmp = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        _normal_modes(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the old set back
                old = None
            raise
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, path) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | Path) -> None:
    """Raise the OSError a write of `path` (a file or an atomic_dir folder) would meet, before hours of
    work are spent on what cannot be saved: a temp folder is made beside it and removed."""
    path = Path(path).absolute()
    where = path.parent
    while not where.exists() and where != where.parent:  # creates nothing: the first folder that exists
        where = where.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=where))
    except OSError as e:
        raise naming(e, path) from e


class FileSet:
    """The files of one `atomic_files` unit: `path(name)` is where to write `name`; `remove(name)`
    takes `name` out of the folder with the others."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.temps: dict[str, Path] = {}
        self.removed: set[str] = set()

    def path(self, name: str) -> Path:
        if name not in self.temps:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
            os.close(fd)
            self.temps[name] = Path(tmp)
        return self.temps[name]

    def remove(self, name: str) -> None:
        self.removed.add(name)

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def write_json(self, name: str, obj, indent: int | None = 2) -> None:
        self.write_text(name, json_text(obj, name, indent))

    def write_csv(self, name: str, df) -> None:
        df.to_csv(self.path(name), index=False)


@contextlib.contextmanager
def atomic_files(folder: str | Path):
    """Several files of a shared folder (a run directory's report set) replaced together: each is
    written to a temp file; then every old file is renamed aside and every new one renamed in. Any
    error before or during that undoes what was renamed, so the folder holds the complete old set or
    the complete new set. (A kill during the renames themselves, microseconds, can still leave a mix.)"""
    folder = Path(folder)
    files = None
    moved: list[tuple[Path, Path | None, bool]] = []  # (target, its old copy aside, new one in place)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files = FileSet(folder)
        yield files
        tag = uuid.uuid4().hex[:8]
        for name in [*files.temps, *sorted(files.removed - set(files.temps))]:
            target = folder / name
            aside = folder / f".{name}.old-{tag}" if os.path.lexists(target) else None
            if aside is not None:
                os.rename(target, aside)
            moved.append((target, aside, False))
            if name in files.temps:
                os.chmod(files.temps[name], FILE_MODE)
                os.rename(files.temps[name], target)
                moved[-1] = (target, aside, True)
    except BaseException as e:
        for target, aside, placed in reversed(moved):
            with contextlib.suppress(OSError):
                if placed:
                    os.unlink(target)
                if aside is not None:
                    os.rename(aside, target)
        for tmp in (files.temps.values() if files else ()):
            _remove(tmp)
        if isinstance(e, OSError):
            raise naming(e, getattr(e, "filename", None) or folder) from e
        raise
    for _, aside, _ in moved:
        _remove(aside)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json_text(obj, path, indent))


def json_text(obj, path, indent: int | None = 2) -> str:
    """JSON as every reader takes it: NaN and infinity are not JSON, and a figure that is one is a bug
    upstream, refused here in one line naming the file rather than written."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as e:
        raise EntrepError(f"{path}: not written: it would hold a value that is not a finite number ({e})") from None


def atomic_write_csv(path: str | Path, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def load_json_text(path: str | Path, encoding: str = "utf-8"):
    """JSON from a file; OSError (missing, unreadable) passes, anything wrong with the content
    (not text in `encoding`, malformed, nested too deep, an integer too long) is one ValueError."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode(encoding))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not {encoding} text ({e})") from None


WHOLE_FILE = 64 << 20  # bytes up to which a fingerprint hashes the whole file
ENDS = 4 << 20         # above it: the size and the first and last ENDS bytes


def fingerprint(path: str | Path) -> str | None:
    """What a derived file records of a file it was made from (issue 31.2): the sha1 of its bytes, or
    for a file over WHOLE_FILE (base weights of GBs) of its size and its first and last ENDS bytes, so
    inference does not hash gigabytes; None for a missing file."""
    import hashlib
    import stat

    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO, /dev/zero: never read, never equal to a file's
            return f"not a file: {stat.filemode(st.st_mode)}"
        size = st.st_size
        h = hashlib.sha1()
        with open(path, "rb") as f:
            if size <= WHOLE_FILE:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(str(size).encode())
                h.update(f.read(ENDS))
                f.seek(size - ENDS)
                h.update(f.read(ENDS))
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in a hand-edited name
        return None
    return h.hexdigest()


def fingerprints(root: str | Path, paths) -> dict[str, str | None]:
    """{path: fingerprint} of the files a derived file was made from. A path under the folder holding
    `root` (the run or blend, and a blend's member runs beside it in runs/) is kept relative to `root`
    (`tuned.json`, `../a/tuned.json`), so a moved runs/ folder still compares; others (base weights
    elsewhere) absolute."""
    root = Path(root).resolve()  # a run reached through a symlink and its members resolved: one frame
    out = {}
    for p in map(Path, paths):
        p = p.resolve()
        out[os.path.relpath(p, root) if p.is_relative_to(root.parent) else str(p)] = fingerprint(p)
    return out


def changed_since(root: str | Path, recorded: dict[str, str | None], kit: str | Path | None = None) -> list[str]:
    """The recorded files (`fingerprints`, as `kit`, the file holding the record, stores them) whose
    content is not what it was, or that are gone; a record of another shape is one line naming `kit`."""
    with kit_file(kit or root):
        if not isinstance(recorded, dict) or not all(isinstance(p, str) for p in recorded):
            raise TypeError(f"the record of what it was made from is {recorded!r}, not an object of file names")
    root = Path(root).resolve()
    return [p for p, fp in recorded.items() if fingerprint(root / p) != fp]


@contextlib.contextmanager
def folder_snapshot(folder: str | Path):
    """Read the files of a folder written as one unit (atomic_dir) as one unit: each is opened relative
    to the folder as it was when this opened, so a writer that swaps a new folder in meanwhile cannot
    mix its set with this one (a file of the old set removed under us is a FileNotFoundError, never a
    file of the new set). Yields `path(name)`: where to read `name` from (a /proc/self/fd path on Linux)."""
    folder = Path(folder)
    flags = getattr(os, "O_DIRECTORY", None)
    proc = Path("/proc/self/fd")
    if flags is None or not proc.is_dir():  # no directory handles: plain paths (the race stays open there)
        yield lambda name: folder / name
        return
    fd = os.open(folder, os.O_RDONLY | flags)
    handle = str(proc / str(fd))
    try:
        yield lambda name: Path(handle) / name
    except EntrepError as e:  # a one-line error names the folder, not the handle it was read through
        if handle not in str(e):
            raise
        raise type(e)(str(e).replace(handle, str(folder))) from None
    except OSError as e:  # a file of the set gone: named in the folder
        if e.filename and str(e.filename).startswith(handle):
            e.filename = str(folder) + str(e.filename)[len(handle):]
        raise
    finally:
        os.close(fd)


def read_json(path: str | Path, expect: type | None = dict):
    """A JSON file the kit wrote (tuned.json, report.json, blend.json, meta.json, ...); a missing,
    truncated or hand-broken one, or one whose top level is not `expect`, is one line naming it."""
    path = Path(path)
    try:
        data = load_json_text(path, "utf-8-sig")  # a hand edit in Notepad adds a BOM
    except FileNotFoundError:
        raise EntrepError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise EntrepError(f"{path}: unreadable ({type(e).__name__}: {e}); re-create it with the command that "
                          f"wrote it") from None
    if expect is not None and not isinstance(data, expect):
        kind = {dict: "object", list: "array", str: "string", type(None): "null"}
        raise EntrepError(f"{path}: expected a JSON {kind.get(expect, expect.__name__)}, found "
                          f"{kind.get(type(data), type(data).__name__)}; re-create it with the command that wrote it")
    return data


@contextlib.contextmanager
def kit_file(path: str | Path):
    """Around the code that reads the fields of a kit file (tuned.json, meta.json, ...): a field that is
    missing or of another type (a hand edit, another version of the kit) is one line naming the file."""
    try:
        yield
    except EntrepError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise EntrepError(f"{path}: unexpected content ({type(e).__name__}: {e}); re-create it with the command "
                          f"that wrote it") from None


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, busy: str, fix: str, wait: float = 0.0):
    """Hold the OS lock at `lock_path` (filelock: a killed holder leaves nothing that blocks) for one
    writer; `lock_path`.owner says who holds it. Busy after `wait` seconds: one line, `busy`, the holder
    (what, pid, host, since), then `fix`."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(lock_path), lock_path.with_name(lock_path.name + ".owner")
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        try:  # the holder may finish (and remove its owner file) meanwhile
            held = json.loads(owner.read_text())
        except (OSError, ValueError):
            held = {}
        if not isinstance(held, dict):
            held = {}
        raise EntrepError(f"{busy} another {held.get('what', 'process')} (pid {held.get('pid', '?')} on "
                          f"{held.get('host', '?')}, since {held.get('since', '?')}); {fix}") from None
    try:
        atomic_write_json(owner, {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv})
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def exclusive_run(run_dir: Path, what: str, wait: float = 0.0):
    """Hold `run_dir` for one writer (a blend's folder; a run's run-level files): a second one is refused
    in one line, or waits up to `wait` seconds."""
    with exclusive(Path(run_dir) / ".lock", what, f"{run_dir} is in use by", "wait for it, or use another --name",
                   wait):
        yield


def shown(path: str | Path) -> str:
    """A path for a log line: as given when relative; relative to the current folder when under it
    (a blend's members are held resolved); else as it is."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    with contextlib.suppress(ValueError, OSError):
        return str(p.relative_to(Path.cwd().resolve())) or "."
    return str(p)


WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the path and the fix."""
    path = e.filename if e.filename is not None else "a file"
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: {what}; free space there or choose another folder (output_dir=..., --out ...)"
    if e.errno in WRITE_ERRNOS:
        return f"cannot write {path}: {what}; choose a folder you can write to (output_dir=..., --out ...)"
    other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{path}{other}: {what}"
