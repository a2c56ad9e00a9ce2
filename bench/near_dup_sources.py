"""Five image sources for measuring the near-duplicate grouping, none of them the one it was tuned on.

Each source makes `n` unrelated base images of a few classes, and for any of them a moved copy:
shift 3-10% of the frame (camera motion: the content moves, a field-of-view mask stays), rotation
up to 5 degrees, scale 0.9-1.1, brightness x0.8-1.2, JPEG quality 60 (the `jitter` source adds
colour jitter and a harder re-encoding). `make(source, n, seed)` -> `Source`.

- `demo`: entrep.demo's ENT-like renders, 7 classes (each case its own vessels and mucosal folds);
- `photos`: scikit-image's bundled photographs, each seen as an endoscopy frame (a window of the
  photo inside a circular field of view); the class is the photo, the bases of one photo are views
  at least half a frame apart;
- `scans`: low-texture greyscale scans, 64 px, no mask: a 10 x 10 class pattern (7 classes, every
  image of a class shares it) plus each image's own noise at the pattern's cell size and at the
  pixel, upscaled; this is what chained 840 images into one group;
- `textures`: procedural fields (smoothed noise at a class's scale, with a class's orientation and
  stripes), 6 classes, inside a circular mask;
- `jitter`: colour photographs and colour textures, copies re-encoded at JPEG 35 after a 0.6x
  down-and-up resize, with colour jitter: saturation and contrast x0.8-1.2 (`white_balance=True`
  adds a per-channel gain of x0.94-1.06, a shift of tint the pass reads as another patient).
Scenes are drawn larger than the frame so that a shift shows new content at the edge.

Used by bench/near_duplicates.py (the table in docs/figures.md) and tests/test_near_dup.py (a
small version of each source).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

SOURCES = ("demo", "photos", "scans", "textures", "jitter")
FRAME = 160  # px of a frame (scans: 64)
SCENE = 1.6  # scene side / frame side: room for a 10% shift, a 5 degree turn and a 0.9 zoom


@dataclass(frozen=True)
class Source:
    name: str
    images: list  # (H, W, 3) uint8 base images
    labels: list  # class of each
    copy: Callable  # copy(index, rng) -> a moved copy of images[index]


@dataclass(frozen=True)
class Move:
    """One moved copy's draw: shift (fraction of the frame, any direction), rotation, scale, gain."""
    dx: float
    dy: float
    rot: float
    scale: float
    gain: float

    @staticmethod
    def draw(rng) -> "Move":
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.10)
        return Move(r * np.cos(a), r * np.sin(a), rng.uniform(-5, 5), rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.2))


IDENTITY = Move(0.0, 0.0, 0.0, 1.0, 1.0)


def jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(q))
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


@lru_cache(maxsize=8)
def circle(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) <= (0.48 * min(h, w)) ** 2


def view(scene: np.ndarray, side: int, m: Move, cx: float | None = None, cy: float | None = None,
         zoom: float = 1.0) -> np.ndarray:
    """A side x side frame of `scene` around (cx, cy) (default: its centre), `zoom` scene px per frame
    px, moved by m (a camera: shift, turn, zoom), re-exposed by m.gain."""
    src = Image.fromarray(scene)
    cx = src.width / 2 if cx is None else cx
    cy = src.height / 2 if cy is None else cy
    z = zoom / m.scale
    a = np.radians(m.rot)
    ca, sa = np.cos(a) * z, np.sin(a) * z
    cx, cy = cx + m.dx * side * zoom, cy + m.dy * side * zoom
    coeffs = (ca, -sa, cx - ca * side / 2 + sa * side / 2, sa, ca, cy - sa * side / 2 - ca * side / 2)
    img = np.asarray(src.transform((side, side), Image.AFFINE, coeffs, Image.BICUBIC)).astype(np.float32)
    return (img * m.gain).clip(0, 255).astype(np.uint8)


def _masked(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[~circle(*img.shape[:2])] = 0
    return out


# ---------------------------------------------------------------------------------------------- sources

def _demo(n: int, seed: int) -> Source:
    from entrep.data.synthetic import _cases, render

    rng = np.random.default_rng(seed)
    cases = _cases(rng, n)
    images = [render(c["label"], c, FRAME) for c in cases]

    def copy(i: int, r) -> np.ndarray:
        m = Move.draw(r)
        c = dict(cases[i], findings=[dict(f) for f in cases[i]["findings"]])
        sx = -1 if c["label"].endswith("-left") else 1  # left images are mirrored renders
        c["dx"] += sx * m.dx
        c["dy"] += m.dy
        for f in c["findings"]:
            f["x"] += sx * m.dx
            f["y"] += m.dy
        img = render(c["label"], c, FRAME)  # the anatomy moved under the fixed field of view
        im = Image.fromarray(img).rotate(m.rot, Image.BICUBIC)
        k = int(round(FRAME * m.scale))
        big = Image.new("RGB", (max(k, FRAME),) * 2)
        big.paste(im.resize((k, k), Image.BICUBIC), ((max(k, FRAME) - k) // 2,) * 2)
        c0 = (max(k, FRAME) - FRAME) // 2
        img = np.asarray(big.crop((c0, c0, c0 + FRAME, c0 + FRAME))).astype(np.float32) * m.gain
        return jpeg(_masked(img.clip(0, 255).astype(np.uint8)), 60)

    return Source("demo", images, [c["label"] for c in cases], copy)


# textured all over: a view of sky (rocket), of a wall (clock) or of black (retina, moon's night) is
# textureless, and the pass never joins a textureless frame (near_dup.MIN_TEXTURE)
PHOTOS = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "motorcycle", "camera", "grass", "gravel")
TINT = np.array([1.0, 0.62, 0.55])  # one ENT-like tint for every grey photo


@lru_cache(maxsize=16)
def photo(name: str) -> np.ndarray:
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = (np.repeat(img[..., None], 3, -1) * TINT).clip(0, 255)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _photo_views(n: int, seed: int, names=PHOTOS):
    """n (photo, centre, zoom) views, spread over the photos, centres of one photo >= half a frame apart."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        name = names[k % len(names)]
        arr = photo(name)
        ph, pw = arr.shape[:2]
        z = 0.3 * min(ph, pw) / FRAME  # a frame shows 30% of the photo's shorter side
        lo = 0.85 * FRAME * z  # room for the moves
        taken = [c for nm, c, _ in out if nm == name]
        for _ in range(200):
            c = (rng.uniform(lo, pw - lo), rng.uniform(lo, ph - lo))
            if all(np.hypot(c[0] - t[0], c[1] - t[1]) >= 0.5 * FRAME * z for t in taken):
                break
        else:
            continue  # the photo is full: fewer views of it
        out.append((name, c, z))
    return out


def _photos(n: int, seed: int) -> Source:
    views = _photo_views(n, seed)
    images = [_masked(view(photo(nm), FRAME, IDENTITY, *c, zoom=z)) for nm, c, z in views]

    def copy(i: int, r) -> np.ndarray:
        nm, c, z = views[i]
        return jpeg(_masked(view(photo(nm), FRAME, Move.draw(r), *c, zoom=z)), 60)

    return Source("photos", images, [v[0] for v in views], copy)


SCAN = 64  # px of a scan
SCAN_CELLS = 10  # the class pattern's cells across the frame


def _scan_scene(pattern: np.ndarray, rng) -> np.ndarray:
    """A low-texture greyscale scene: the class pattern, the image's own cell noise, upscaled, and a
    little pixel noise, around mid-grey."""
    side = int(SCAN * SCENE)
    cells = pattern + rng.normal(0, 0.35, pattern.shape)
    up = np.asarray(Image.fromarray(cells.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR))
    img = 128 + 22 * up + rng.normal(0, 3.0, (side, side))
    return np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, -1)


def _scans(n: int, seed: int) -> Source:
    rng = np.random.default_rng(seed)
    cells = int(round(SCAN_CELLS * SCENE))
    patterns = [rng.normal(0, 1, (cells, cells)) for _ in range(7)]
    labels = [k % 7 for k in range(n)]
    scenes = [_scan_scene(patterns[c], rng) for c in labels]
    images = [view(s, SCAN, IDENTITY) for s in scenes]

    def copy(i: int, r) -> np.ndarray:
        return jpeg(view(scenes[i], SCAN, Move.draw(r)), 60)

    return Source("scans", images, labels, copy)


def texture(cls: int, rng, side: int, colour: bool = False) -> np.ndarray:
    """A procedural field of class `cls`: smoothed noise at the class's scale, stretched along its
    orientation, with faint stripes for odd classes; RGB from one class tint (or a random one)."""
    from scipy.ndimage import gaussian_filter, rotate

    sigma = (1.5, 2.5, 4.0)[cls % 3]
    f = gaussian_filter(rng.normal(0, 1, (side, side)), (sigma, sigma * (1 + cls % 2 * 1.5)))
    f = rotate(f, 30.0 * cls, reshape=False, mode="reflect")
    if cls % 2:
        yy = np.mgrid[0:side, 0:side][0]
        f = f / f.std() + 0.6 * np.sin(yy * (0.2 + 0.05 * cls))
    f = (f - f.mean()) / f.std()
    tint = rng.uniform(0.5, 1.0, 3) if colour else np.array([1.0, 0.75, 0.7]) - 0.04 * (cls % 3)
    return (110 + 40 * f[..., None] * tint + 30 * tint).clip(0, 255).astype(np.uint8)


def _textures(n: int, seed: int) -> Source:
    rng = np.random.default_rng(seed)
    labels = [k % 6 for k in range(n)]
    scenes = [texture(c, rng, int(FRAME * SCENE)) for c in labels]
    images = [_masked(view(s, FRAME, IDENTITY)) for s in scenes]

    def copy(i: int, r) -> np.ndarray:
        return jpeg(_masked(view(scenes[i], FRAME, Move.draw(r))), 60)

    return Source("textures", images, labels, copy)


def _jitter(n: int, seed: int, white_balance: bool = False) -> Source:
    rng = np.random.default_rng(seed)
    colour = PHOTOS[:6]
    views = _photo_views((n + 1) // 2, seed, colour)
    scenes = [("photo", nm, c, z) for nm, c, z in views]
    scenes += [("texture", texture(k % 6, rng, int(FRAME * SCENE), colour=True), None, 1.0)
               for k in range(n - len(scenes))]
    labels = [s[1] if s[0] == "photo" else f"texture{k % 6}" for k, s in enumerate(scenes)]

    def frame(s, m: Move) -> np.ndarray:
        kind, src, c, z = s
        return _masked(view(photo(src), FRAME, m, *c, zoom=z) if kind == "photo" else view(src, FRAME, m))

    images = [frame(s, IDENTITY) for s in scenes]

    def copy(i: int, r) -> np.ndarray:
        img = frame(scenes[i], Move.draw(r))
        im = ImageEnhance.Color(Image.fromarray(img)).enhance(r.uniform(0.8, 1.2))
        img = np.asarray(ImageEnhance.Contrast(im).enhance(r.uniform(0.8, 1.2))).astype(np.float32)
        if white_balance:
            img = img * r.uniform(0.94, 1.06, 3)
        img = _masked(img.clip(0, 255).astype(np.uint8))
        small = Image.fromarray(img).resize((int(FRAME * 0.6),) * 2, Image.BILINEAR)
        return jpeg(np.asarray(small.resize((FRAME, FRAME), Image.BILINEAR)), 35)

    return Source("jitter", images, labels, copy)


def make(name: str, n: int, seed: int = 0) -> Source:
    if name == "jitter+wb":
        return _jitter(n, seed, white_balance=True)
    return {"demo": _demo, "photos": _photos, "scans": _scans, "textures": _textures, "jitter": _jitter}[name](n, seed)
