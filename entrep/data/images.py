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
            return np.asarray(im, dtype=np.uint8)
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
