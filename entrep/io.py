"""Atomic writes (every file the kit writes goes to a temp file in the same folder, then os.replace),
reading back what the kit wrote, and one writer per run directory."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from entrep.errors import EntrepError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # again: a writer that recreates the file (safetensors) leaves 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_csv(path: str | Path, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_json(path: str | Path):
    """A JSON file the kit wrote (tuned.json, report.json, blend.json, ...); a missing, truncated or
    hand-broken one is one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EntrepError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EntrepError(f"{path}: unreadable ({type(e).__name__}: {e}); re-create it with the command that "
                          f"wrote it") from None


@contextlib.contextmanager
def exclusive_run(run_dir: Path, what: str):
    """Hold `run_dir` for one writer: a second train.py (or ablation) on the same run is refused
    with one line. An OS lock (filelock), so a killed holder leaves nothing that blocks later runs."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(run_dir / ".lock"), run_dir / ".lock.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:  # the holder may finish (and remove its owner file) meanwhile
            held = json.loads(owner.read_text())
        except (OSError, ValueError):
            held = {}
        raise EntrepError(f"{run_dir} is in use by another {held.get('what', 'process')} (pid {held.get('pid', '?')} "
                          f"on {held.get('host', '?')}, since {held.get('since', '?')}); wait for it, or use "
                          f"another --name") from None
    try:
        atomic_write_json(owner, {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv})
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
