"""Decode each image once, resized to a working size, into one uint8 array held in memory.

PNG decoding (640x480) costs more than a tiny model's step, so the training loop must never wait
for it: every epoch's augmentations start from these decoded pixels.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from entrep.errors import EntrepError

log = logging.getLogger("entrep.data")


class ImageDecodeError(EntrepError):
    pass


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB. Grayscale, palette, RGBA and 16-bit files are converted."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16/32-bit grayscale
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / 257.0 if arr.max() > 255 else arr
                im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGB", im.size, (0, 0, 0))  # endoscopy background is black
                bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
                im = bg
            im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.array(im, dtype=np.uint8)  # writable: torch.from_numpy needs it
    except Exception as e:  # PIL raises many types for bad files
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_all(paths: list[str], size: int, workers: int = 4, desc: str = "decoding images") -> np.ndarray:
    """(N, size, size, 3) uint8, decoded in a thread pool (PIL releases the GIL while decoding)."""
    from rich.progress import Progress

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool, Progress(transient=True) as progress:
        task = progress.add_task(desc, total=len(paths))
        for i, arr in enumerate(pool.map(lambda p: decode_image(p, size), paths)):
            out[i] = arr
            progress.advance(task)
    return out


class CachedPixels:
    """Rows of a memory-mapped uint8 store, in dataset order; indexing with an array gives a view."""

    def __init__(self, store: np.ndarray, slots: np.ndarray):
        self.store, self.slots = store, np.asarray(slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, idx):
        if np.isscalar(idx) or isinstance(idx, (int, np.integer)):
            return np.array(self.store[self.slots[idx]])  # a private, writable copy of one image
        return CachedPixels(self.store, self.slots[idx])

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.store[self.slots])
        return out.astype(dtype) if dtype is not None else out


class ImageCache:
    """Decoded images on disk: one memory-mapped uint8 store per working size, keyed by file content.

    `index-<size>.json` maps a content hash to a row of `store-<size>-<generation>.u8`. Only images
    whose content is new are decoded; the store is rewritten to a new generation and the index is
    replaced last, so a crash leaves the previous cache intact.
    """

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        self.index_path = self.folder / f"index-{size}.json"

    def _index(self) -> dict:
        import json

        if self.index_path.is_file():
            idx = json.loads(self.index_path.read_text())
            if (self.folder / idx["store"]).is_file():
                return idx
        return {"store": None, "rows": 0, "generation": 0, "slots": {}}

    def _open(self, name: str, rows: int, mode: str = "r") -> np.memmap:
        return np.memmap(self.folder / name, dtype=np.uint8, mode=mode, shape=(rows, self.size, self.size, 3))

    def pixels(self, paths: list[str], hashes: list[str], workers: int = 4) -> CachedPixels:
        import json
        import os

        from entrep.io import atomic_write_text

        idx = self._index()
        todo = {h: p for h, p in zip(hashes, paths) if h not in idx["slots"]}
        if todo:
            self.folder.mkdir(parents=True, exist_ok=True)
            gen = idx["generation"] + 1
            name, old_rows = f"store-{self.size}-{gen}.u8", idx["rows"]
            rows = old_rows + len(todo)
            tmp = self.folder / f".{name}.tmp"
            new = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(rows, self.size, self.size, 3))
            if old_rows:
                old = self._open(idx["store"], old_rows)
                for s in range(0, old_rows, 256):
                    e = min(s + 256, old_rows)
                    new[s:e] = old[s:e]
                del old
            new[old_rows:] = decode_all(list(todo.values()), self.size, workers,
                                        desc=f"caching {len(todo)} images at {self.size}px")
            new.flush()
            del new
            os.replace(tmp, self.folder / name)
            slots = dict(idx["slots"]) | {h: old_rows + i for i, h in enumerate(todo)}
            previous = idx["store"]
            idx = {"store": name, "rows": rows, "generation": gen, "slots": slots}
            atomic_write_text(self.index_path, json.dumps(idx))
            if previous:
                (self.folder / previous).unlink(missing_ok=True)
            log.info("image cache %s: decoded %d new images (%d cached)", self.folder, len(todo), rows)
        store = self._open(idx["store"], idx["rows"])
        return CachedPixels(store, np.array([idx["slots"][h] for h in hashes], dtype=np.int64))
