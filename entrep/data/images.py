"""Decode each image once, resized to a working size, into one uint8 array held in memory.

PNG decoding (640x480) costs more than a tiny model's step, so the training loop must never wait
for it: every epoch's augmentations start from these decoded pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from entrep.errors import EntrepError
from entrep.io import atomic_write_text

log = logging.getLogger("entrep.data")


class ImageDecodeError(EntrepError):
    pass


def open_rgb(im: Image.Image) -> Image.Image:
    """An opened image as RGB: grayscale, palette, RGBA (on black) and 16-bit images are converted."""
    im.load()
    if im.mode.startswith("I"):  # 16/32-bit grayscale
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 257.0 if arr.max() > 255 else arr
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        bg = Image.new("RGB", im.size, (0, 0, 0))  # endoscopy background is black
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        im = bg
    return im.convert("RGB")


def refuse_bomb(im: Image.Image) -> Image.Image:
    """An opened image whose header claims more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS, 89 M) is
    refused before it is decoded: PIL only warns up to twice that, and decodes gigabytes. Checked on the
    header, so it holds in the decoding threads, where a warnings filter would not."""
    if im.width * im.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, more than {Image.MAX_IMAGE_PIXELS:,}: "
                                           f"a decompression bomb, or no endoscopy frame")
    return im


def decode_image(path: str | Path, size: int, data: bytes | None = None) -> np.ndarray:
    """(size, size, 3) uint8 RGB of the file at `path` (or of its bytes `data`, already read).
    Grayscale, palette, RGBA and 16-bit files are converted."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im = open_rgb(refuse_bomb(im)).resize((size, size), Image.Resampling.BICUBIC)
            return np.array(im, dtype=np.uint8)  # writable: torch.from_numpy needs it
    except Exception as e:  # PIL raises many types for bad files
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_all(paths: list[str], size: int, workers: int = 4, desc: str = "decoding images",
               sha1: list[str] | None = None) -> np.ndarray:
    """(N, size, size, 3) uint8, decoded in a thread pool (PIL releases the GIL while decoding).
    With `sha1`, each file's bytes must still hash to it: the pixels are decoded from the very bytes
    that were hashed, so a file rewritten since it was hashed is an error, never wrong pixels."""
    from rich.progress import Progress

    def one(i: int) -> np.ndarray:
        if sha1 is None:
            return decode_image(paths[i], size)
        data = Path(paths[i]).read_bytes()
        if hashlib.sha1(data).hexdigest() != sha1[i]:
            raise ImageDecodeError(f"{paths[i]}: changed on disk since it was read (its content hash differs); "
                                   f"run the command again on a release that is not being written to")
        return decode_image(paths[i], size, data)

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool, Progress(transient=True) as progress:
        task = progress.add_task(desc, total=len(paths))
        for i, arr in enumerate(pool.map(one, range(len(paths)))):
            out[i] = arr
            progress.advance(task)
    return out


class CachedPixels:
    """Rows of memory-mapped uint8 segments, in dataset order; indexing with an array gives a view."""

    def __init__(self, stores: list[np.ndarray], seg: np.ndarray, row: np.ndarray, size: int):
        self.stores, self.seg, self.row, self.size = stores, np.asarray(seg), np.asarray(row), size

    def __len__(self) -> int:
        return len(self.seg)

    def __getitem__(self, idx):
        if np.isscalar(idx) or isinstance(idx, (int, np.integer)):
            return np.array(self.stores[self.seg[idx]][self.row[idx]])  # a private, writable copy of one image
        return CachedPixels(self.stores, self.seg[idx], self.row[idx], self.size)

    def __array__(self, dtype=None, copy=None):
        out = np.empty((len(self), self.size, self.size, 3), dtype=np.uint8)
        for s, store in enumerate(self.stores):
            if (m := self.seg == s).any():
                out[m] = store[self.row[m]]
        return out.astype(dtype) if dtype is not None else out


class ImageCache:
    """Decoded images on disk, keyed by the SHA-1 of the bytes they were decoded from; safe for any
    number of concurrent processes.

    `index-<size>.json` maps a content hash to (segment, row). A segment `seg-<size>-<uuid>.u8` holds
    the images one writer decoded; it is written under a unique temp name, checksummed, renamed into
    place and never modified or deleted afterwards, so a reader can never see it change. Writers
    take `lock-<size>` (filelock: an OS lock, released when its process dies, so a killed writer
    leaves no lock behind), re-read the index, decode only what is still missing and replace the
    index atomically. A segment whose size or checksum does not match the index is damaged: it is
    dropped, with a warning, and its images are decoded again.
    """

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        self.index_path = self.folder / f"index-{size}.json"
        self._verified: set[str] = set()

    def _read_index(self) -> dict:
        """The index, with only well-formed entries; an unreadable one (truncated, hand-edited) is
        rebuilt: its segments are decoded again, with a warning."""
        from entrep.io import load_json_text

        empty = {"segments": {}, "slots": {}}
        if not self.index_path.is_file():
            return empty
        try:
            idx = load_json_text(self.index_path)
            segments = {n: s for n, s in idx["segments"].items() if isinstance(n, str) and isinstance(s, dict)
                        and isinstance(s.get("rows"), int) and isinstance(s.get("blake2b"), str)}
            slots = {h: v for h, v in idx["slots"].items() if isinstance(v, list) and len(v) == 2
                     and v[0] in segments and isinstance(v[1], int) and 0 <= v[1] < segments[v[0]]["rows"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("image cache %s: unreadable index (%s); its images are decoded again", self.index_path,
                        type(e).__name__)
            return empty
        return {"segments": segments, "slots": slots}

    def _damaged(self, idx: dict, names: set[str]) -> list[str]:
        bad = []
        for name in sorted(names - self._verified):
            seg, path = idx["segments"][name], self.folder / name
            expect = seg["rows"] * self.size * self.size * 3
            if not path.is_file() or path.stat().st_size != expect or _checksum(path) != seg["blake2b"]:
                bad.append(name)
            else:
                self._verified.add(name)
        return bad

    def _open(self, name: str, rows: int) -> np.memmap:
        return np.memmap(self.folder / name, dtype=np.uint8, mode="r", shape=(rows, self.size, self.size, 3))

    def pixels(self, paths: list[str], hashes: list[str], workers: int = 4) -> CachedPixels:
        idx = self._read_index()
        missing = [h for h in hashes if h not in idx["slots"]]
        bad = self._damaged(idx, {idx["slots"][h][0] for h in hashes if h in idx["slots"]})
        if missing or bad:
            try:
                idx = self._write({h: p for h, p in zip(hashes, paths)}, workers, bad)
            except OSError as e:  # a read-only run (a Kaggle input dataset), a full disk: decode in memory
                return self._in_memory(idx, bad, paths, hashes, workers, e)
        return self._view(idx, hashes)

    def _view(self, idx: dict, hashes: list[str], extra: dict[str, tuple[np.ndarray, int]] | None = None
              ) -> CachedPixels:
        """The images of `hashes` from the index's segments, or from `extra` (hash -> (array, row))."""
        extra = extra or {}
        names = sorted({idx["slots"][h][0] for h in hashes if h not in extra})
        stores = [self._open(n, idx["segments"][n]["rows"]) for n in names]
        pos = {n: i for i, n in enumerate(names)}
        if extra:
            stores.append(next(iter(extra.values()))[0])
        seg = [len(names) if h in extra else pos[idx["slots"][h][0]] for h in hashes]
        row = [extra[h][1] if h in extra else idx["slots"][h][1] for h in hashes]
        return CachedPixels(stores, np.array(seg, dtype=np.int64), np.array(row, dtype=np.int64), self.size)

    def _in_memory(self, idx: dict, bad: list[str], paths: list[str], hashes: list[str], workers: int,
                   error: OSError) -> CachedPixels:
        """What the cache cannot hold, decoded into memory for this process; said once per folder."""
        usable = {h for h in hashes if h in idx["slots"] and idx["slots"][h][0] not in bad}
        todo = dict.fromkeys(h for h in hashes if h not in usable)
        path_of = dict(zip(hashes, paths))
        if self.folder not in _WARNED:
            _WARNED.add(self.folder)
            log.warning("image cache %s is not writable (%s): decoding %d images in memory instead (data.cache_dir="
                        "DIR names a writable cache)", self.folder, error.strerror or error, len(todo))
        arr = decode_all([path_of[h] for h in todo], self.size, workers, desc=f"decoding {len(todo)} images",
                         sha1=list(todo))
        return self._view(idx, hashes, {h: (arr, i) for i, h in enumerate(todo)})

    def _write(self, wanted: dict[str, str], workers: int, bad: list[str]) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder / f"lock-{self.size}")
        while True:
            try:
                lock.acquire(timeout=60)
                break
            except Timeout:
                log.info("image cache %s: waiting for another process to finish writing", self.folder)
        try:
            idx = self._read_index()  # another writer may have added what we need meanwhile
            bad = sorted(set(bad) | set(self._damaged(idx, {idx["slots"][h][0] for h in wanted if h in idx["slots"]})))
            if bad:
                log.warning("image cache %s: damaged segments %s (size or checksum differs); decoding their "
                            "images again", self.folder, bad)
                idx["segments"] = {n: v for n, v in idx["segments"].items() if n not in bad}
                idx["slots"] = {h: v for h, v in idx["slots"].items() if v[0] not in bad}
            todo = {h: p for h, p in wanted.items() if h not in idx["slots"]}
            if todo:
                name = f"seg-{self.size}-{uuid.uuid4().hex}.u8"
                tmp = self.folder / f".{name}.tmp"
                try:
                    _reserve(tmp, len(todo) * self.size * self.size * 3)
                    new = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(len(todo), self.size, self.size, 3))
                    new[:] = decode_all(list(todo.values()), self.size, workers,
                                        desc=f"caching {len(todo)} images at {self.size}px", sha1=list(todo))
                    new.flush()
                    del new
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    digest = _checksum(tmp)
                    os.replace(tmp, self.folder / name)
                finally:
                    Path(tmp).unlink(missing_ok=True)
                idx["segments"][name] = {"rows": len(todo), "blake2b": digest}
                idx["slots"].update({h: [name, i] for i, h in enumerate(todo)})
                try:
                    atomic_write_text(self.index_path, json.dumps(idx))
                except BaseException:  # no index names the new segment: it would only take up disk
                    (self.folder / name).unlink(missing_ok=True)
                    raise
                self._verified.add(name)
                log.info("image cache %s: decoded %d new images; it now holds %d", self.folder, len(todo),
                         len(idx["slots"]))
            return idx
        finally:
            lock.release()


_WARNED: set[Path] = set()  # cache folders whose in-memory fallback was logged


def _reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated on disk: a memory map over a sparse file that the disk
    cannot fill kills the process with SIGBUS, where this raises ENOSPC, which the caller handles."""
    import errno
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except (AttributeError, OSError) as e:  # no posix_fallocate (macOS), or a filesystem without it
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
