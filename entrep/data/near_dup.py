"""Near-duplicate frames that survive motion: aligned correlation of band-passed thumbnails.

A frame and its near-duplicate (the next frame of one video; a re-encoded, resized, shifted,
rotated or re-exposed copy) show the same structure a few percent of the frame apart. Each file is
decoded once, letterboxed into a fixed 64 px square (aspect kept, whatever the model's input size),
and reduced to what survives those changes:

- the field of view: the black surround of an endoscopy frame (dark pixels connected to the border;
  of the rest, the largest region's convex hull) is left out everywhere, so the circle that every
  frame shares never correlates, and a caption on the black does not count;
- band-passed luminance (a difference of two Gaussians, normalised over the field of view, at 32
  and 64 px): brightness, contrast and vignetting drop out, edges and texture stay;
- chroma (two opponent channels), compared only after alignment.

API: `file_signatures(paths)` (or `signatures(frames)`) -> `Signatures`;
`near_duplicate_pairs(sig_a, sig_b=None, threshold)` -> [(i, j, score)]; `joined_pairs` -> the same
with each pair's dissimilarity.

Pairs are found in three steps:

1. candidates: every pair's coarse score (the central half of one image at 16 px against the
   other shifted by up to 12.5% of the frame, both ways, less COLOUR_WEIGHT x the distance of the
   frames' mean colours); each image keeps its CANDIDATES best partners (N x N of one float32 in
   row blocks: memory stays bounded);
2. alignment: the central half of one image at 32 px, resampled at 5 rotations (-5..5 degrees) x 5
   scales (0.87..1.15), correlated with the other at 9 x 9 shifts (up to 12.5% of the frame), both
   ways; the best of the 2025 alignments is refined below the grid by parabolas through its
   neighbours (rotation, scale, shift);
3. verification at that alignment (`_verify`): the score is the normalised cross-correlation at
   64 px, the worst tile mismatch (a lesion in one frame only) and the chroma residual after one
   gain (another tint: another patient), folded into one `dissimilarity` that is 1 at the join
   limit (score = cv.near_dup_threshold, LOCAL_TOLERANCE, COLOUR_TOLERANCE) and 0 for the same pixels;
4. the relative test: a pair is joined when its dissimilarity is at most 1 and at most RATIO x each
   image's ordinary look-alike (the BACKGROUND quantile of its candidates' dissimilarities). A copy
   stands out from the frames that merely resemble it; in a release whose frames all look alike
   (low-texture greyscale scans of one class), no pair does, and none is joined. Without it, one
   loose pair per image chained 814 of 840 such scans into one group.

Pairs are grouped by entrep.data.folds (average linkage, so that A~B~...~Z does not merge frames
that are not alike).

Deterministic: fixed decode, float32 numpy, scores rounded to 1e-4 before ranking and thresholds,
ties broken by index. bench/near_duplicates.py measures recall per transform and false joins
(demo renders and photographs) against the pHash it replaced.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DECODE = 64  # px: the letterboxed square every image is decoded into (aspect kept, black padding)
FINE, COARSE = 32, 16  # grid sides of the fine and the coarse structure images
TEMPLATE = 16  # fine template side: the central half of the frame
SHIFT = 4  # fine shifts: -4..4 px of 32, up to 12.5% of the frame each way
ROTATIONS = (-5.0, -2.5, 0.0, 2.5, 5.0)  # degrees tried in the fine pass
SCALES = (1 / 1.15, 1 / 1.075, 1.0, 1.075, 1.15)
MIN_TEXTURE = 0.5  # band-passed luminance spread (grey levels) below which a frame is textureless, never joined
DARK = 10  # max channel value of the black surround
MIN_VALID = 0.5  # share of a template inside the field of view below which an image is never joined
THRESHOLD = 0.8  # default fine score that joins a pair (cv.near_dup_threshold)
COLOUR_TOLERANCE = 0.2  # colour difference (see `_verify`) beyond which a pair is never joined
LOCAL_TOLERANCE = 0.25  # worst tile mismatch (see `_verify`) beyond which a pair is never joined
RATIO = 0.35  # a pair joins only this much closer (`dissimilarity`) than either image's ordinary look-alikes
BACKGROUND = 0.25  # quantile of an image's other candidates' dissimilarities that stands for its ordinary
# look-alikes: with CANDIDATES partners, the 6th closest other, so a group of up to 7 copies stands out whole
# (tolerances, RATIO and BACKGROUND: bench/near_duplicates.py over five image sources, docs/figures.md)
CANDIDATES = 24  # coarse partners per image that are aligned and verified (and its background)
COLOUR_WEIGHT = 0.5  # what one unit of global colour distance costs in the coarse ranking
COLOUR_FLOOR = 6.0  # chroma RMS (grey levels) below which colour differences count as absolute (dark, grey)
COLOUR_BLUR = 0.7  # Gaussian blur (FINE px) of the chroma compared
COLOUR_TILES = 2  # the compared region's chroma as n x n tile means: 4 x 4 tiles rejected shifted copies of
# a photo for chroma edges a tile apart (bench/near_duplicates.py: photo shifts 86-92% -> 89-96%)
MARGIN = 0.15  # grid scores this far below the threshold are still verified (refinement can raise them)


@dataclass
class Signatures:
    """Per-image arrays for `near_duplicate_pairs`; `len()` images, about 42 KB each."""

    fine: np.ndarray  # (N, FINE, FINE) float32 band-passed luminance, 0 outside the field of view
    fine2: np.ndarray  # (N, 2 FINE, 2 FINE) float32 the same at twice the resolution (verification)
    fmask2: np.ndarray  # (N, 2 FINE, 2 FINE) bool its field of view
    fmask: np.ndarray  # (N, FINE, FINE) bool field of view
    colour: np.ndarray  # (N, 2, FINE, FINE) float16 two chroma channels, slightly blurred
    cmask: np.ndarray  # (N, FINE, FINE) bool where colour is compared: the field of view, not clipped
    templates: np.ndarray  # (N, V, T*T) float32 normalised central templates, one per rotation x scale
    wnorm: np.ndarray  # (N, S) float32 spread of each shifted window of `fine` (the NCC's denominator)
    coarse_t: np.ndarray  # (N, t*t) float32 normalised coarse central template
    coarse_w: np.ndarray  # (N, 25, t*t) float32 normalised coarse windows at 5 x 5 shifts
    gcol: np.ndarray  # (N, 2) float32 mean chroma / luminance spread of the field of view
    valid: np.ndarray  # (N,) bool: enough field of view and texture to compare

    def __len__(self) -> int:
        return len(self.valid)


# ---------------------------------------------------------------------------------------------- decoding

def letterbox(im, side: int = DECODE) -> np.ndarray:
    """(side, side, 3) uint8: a PIL RGB image fitted into a black square, aspect kept (BOX filter)."""
    from PIL import Image

    w, h = im.size
    f = side / max(w, h)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    small = im.resize((nw, nh), Image.Resampling.BOX)
    out = np.zeros((side, side, 3), np.uint8)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = np.asarray(small)
    return out


def decode_letterbox(path: str | Path, side: int = DECODE) -> np.ndarray:
    from PIL import Image

    from entrep.data.images import ImageDecodeError, open_rgb

    try:
        with Image.open(path) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced DCT scale (still >= side)
            return letterbox(open_rgb(im), side)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_frames(paths: list[str], side: int = DECODE, workers: int = 2, desc: str = "decoding images") -> np.ndarray:
    """(N, side, side, 3) uint8 letterboxed frames, decoded in a thread pool."""
    from rich.progress import Progress

    out = np.zeros((len(paths), side, side, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool, Progress(transient=True) as progress:
        task = progress.add_task(desc, total=len(paths))
        for i, arr in enumerate(pool.map(lambda p: decode_letterbox(p, side), paths)):
            out[i] = arr
            progress.advance(task)
    return out


# ---------------------------------------------------------------------------------------------- signatures

def field_of_view(rgb: np.ndarray, dark: int = DARK) -> np.ndarray:
    """(N, H, W) bool: the field of view, without the black surround. Dark pixels connected to the
    frame's border are surround; of the rest each image keeps its largest connected region (captions
    and logos on the black are dropped) and that region's convex hull (dark content that touches the
    rim, e.g. shadows crushed to black by an exposure change, stays inside); the rim is eroded by a
    pixel."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    n, h, w = rgb.shape[:3]
    one = np.zeros((3, 3, 3), bool)
    one[1] = ndimage.generate_binary_structure(2, 1)  # connect within an image, never across images
    lab, _ = ndimage.label(rgb.max(-1) <= dark, structure=one)
    border = np.unique(np.concatenate([lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]], axis=None))
    lut = np.ones(lab.max() + 1, bool)
    lut[border] = False
    lut[0] = True
    lab, k = ndimage.label(lut[lab], structure=one)
    size = np.bincount(lab.ravel(), minlength=k + 1)
    size[0] = 0
    best = np.zeros(n, np.int64)
    for lbl, sl in enumerate(ndimage.find_objects(lab), 1):  # the largest region of each image
        if size[lbl] > size[best[sl[0].start]]:
            best[sl[0].start] = lbl
    fov = np.zeros((n, h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    grid = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    for i in np.flatnonzero(best):
        region = lab[i] == best[i]
        edge = region & ~ndimage.binary_erosion(region)
        pts = np.argwhere(edge).astype(np.float64)
        try:
            eq = ConvexHull(pts).equations
            fov[i] = ((grid @ eq[:, :2].T + eq[:, 2]) <= 0.5).all(1).reshape(h, w)
        except (QhullError, ValueError):  # a line or a few pixels: no hull
            fov[i] = region
    return ndimage.binary_erosion(fov, structure=one, iterations=1, border_value=0)


def _area(x: np.ndarray, f: int) -> np.ndarray:
    n, h, w = x.shape
    return x.reshape(n, h // f, f, w // f, f).mean((2, 4), dtype=np.float32)


def _blur(x: np.ndarray, s: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, (0, s, s), mode="constant")


def _masked_blur(x: np.ndarray, m: np.ndarray, s: float) -> np.ndarray:
    """Normalised convolution: the Gaussian mean of x over the mask."""
    return _blur(x * m, s) / (_blur(m, s) + 1e-6)


def _normalise(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Zero mean over the mask, unit norm, 0 outside; rows of the last axis."""
    n = np.maximum(m.sum(-1, keepdims=True), 1)
    v = (v - (v * m).sum(-1, keepdims=True) / n) * m
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)).astype(np.float32)


def _windows(img: np.ndarray, t: int, r: int) -> np.ndarray:
    """(N, (2r+1)^2, t*t) copies of the central t x t windows shifted by -r..r (row-major shifts)."""
    from numpy.lib.stride_tricks import sliding_window_view

    g = img.shape[-1]
    c0 = (g - t) // 2 - r
    region = img[:, c0:c0 + t + 2 * r, c0:c0 + t + 2 * r]
    return sliding_window_view(region, (t, t), axis=(1, 2)).reshape(len(img), (2 * r + 1) ** 2, t * t)


def _window_sums(img: np.ndarray, t: int, r: int) -> np.ndarray:
    """(N, (2r+1)^2) sums of the windows of `_windows`, by a summed-area table."""
    g = img.shape[-1]
    c0 = (g - t) // 2 - r
    sat = np.zeros((len(img), g + 1, g + 1), np.float64)
    sat[:, 1:, 1:] = img.astype(np.float64).cumsum(1).cumsum(2)
    y = np.arange(2 * r + 1) + c0
    a, b = np.ix_(y, y)
    out = sat[:, a + t, b + t] - sat[:, a, b + t] - sat[:, a + t, b] + sat[:, a, b]
    return out.reshape(len(img), -1)


def _template_coords() -> np.ndarray:
    """(V, 2, T*T) (row, col) points of the central template at each rotation x scale, in FINE px."""
    c = (FINE - 1) / 2
    q = np.arange(TEMPLATE) - (TEMPLATE - 1) / 2
    yy, xx = np.meshgrid(q, q, indexing="ij")
    out = []
    for a in ROTATIONS:
        ca, sa = np.cos(np.radians(a)), np.sin(np.radians(a))
        for s in SCALES:
            out.append(np.stack([c + s * (sa * xx + ca * yy), c + s * (ca * xx - sa * yy)]).reshape(2, -1))
    return np.array(out)


@lru_cache(maxsize=1)
def _sampler():
    """Sparse (V*T*T, FINE*FINE) bilinear interpolation matrix of the template points (0 outside)."""
    from scipy.sparse import csr_matrix

    coords = _template_coords()
    y, x = coords[:, 0].ravel(), coords[:, 1].ravel()
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    rows, cols, vals = [], [], []
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < FINE) & (xx >= 0) & (xx < FINE)
        rows.append(np.flatnonzero(ok))
        cols.append((yy * FINE + xx)[ok])
        vals.append(w[ok])
    return csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(y), FINE * FINE))


def _sample(img: np.ndarray) -> np.ndarray:
    """(N, V, T*T) template samples of (N, FINE, FINE) images."""
    m = _sampler()
    return np.ascontiguousarray((m @ img.reshape(len(img), -1).T).T).reshape(len(img), -1, TEMPLATE ** 2)


def signatures(frames, chunk: int = 512) -> Signatures:
    """Signatures of decoded frames: an (N, DECODE, DECODE, 3) uint8 array of letterboxed frames
    (`decode_frames`), or a sequence of (H, W, 3) uint8 arrays of any size (letterboxed here). Use
    `file_signatures` for files."""
    from PIL import Image

    n = len(frames)
    if n == 0:  # the arrays' shapes, with no rows
        one = _signatures(np.zeros((1, DECODE, DECODE, 3), np.uint8))
        return Signatures(*(getattr(one, f)[:0] for f in Signatures.__dataclass_fields__))
    parts = []
    for s in range(0, n, chunk):
        rgb = np.zeros((min(chunk, n - s), DECODE, DECODE, 3), np.uint8)
        for i in range(len(rgb)):
            a = np.asarray(frames[s + i])
            rgb[i] = a if a.shape == rgb.shape[1:] else letterbox(Image.fromarray(a).convert("RGB"))
        parts.append(_signatures(rgb))
    return Signatures(*(np.concatenate([getattr(p, f) for p in parts]) for f in Signatures.__dataclass_fields__))


def _signatures(rgb: np.ndarray) -> Signatures:
    n = len(rgb)
    fov = field_of_view(rgb).astype(np.float32)
    x = rgb.astype(np.float32)
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    c1, c2 = x[..., 0] - (x[..., 1] + x[..., 2]) / 2, (x[..., 1] - x[..., 2]) * np.float32(3 ** 0.5 / 2)

    f = DECODE // FINE
    fm = (_area(fov, f) > 0.999).astype(np.float32)
    l32 = _area(lum, f)
    fine = ((_masked_blur(l32, fm, 0.7) - _masked_blur(l32, fm, 3.0)) * fm).astype(np.float32)  # band-pass
    colour = np.stack([_masked_blur(v, fm, COLOUR_BLUR) * fm for v in (_area(c1, f), _area(c2, f))], 1)

    t, r = TEMPLATE, SHIFT
    tm = (_sample(fm) > 0.999).astype(np.float32)
    templates = _normalise(_sample(fine), tm)
    texture = np.sqrt((fine * fine).sum((1, 2)) / np.maximum(fm.sum((1, 2)), 1))
    valid = (tm.mean((1, 2)) >= MIN_VALID) & (texture >= MIN_TEXTURE)
    wm = _window_sums(fm, t, r)
    s1, s2 = _window_sums(fine, t, r), _window_sums(fine * fine, t, r)
    wnorm = np.sqrt(np.maximum(s2 - s1 * s1 / np.maximum(wm, 1), 1e-6)).astype(np.float32)

    tc, f = COARSE // 2, DECODE // COARSE
    cm = (_area(fov, f) > 0.999).astype(np.float32)
    cl = _area(lum, f)
    coarse = (_masked_blur(cl, cm, 0.5) - _masked_blur(cl, cm, 1.5)) * cm
    c0 = (COARSE - tc) // 2
    centre = (slice(None), slice(c0, c0 + tc), slice(c0, c0 + tc))
    coarse_t = _normalise(coarse[centre].reshape(n, -1), cm[centre].reshape(n, -1))
    coarse_w = _normalise(_windows(coarse, tc, 2), _windows(cm, tc, 2))

    cnt = np.maximum(fm.sum((1, 2)), 1)
    mu = (l32 * fm).sum((1, 2)) / cnt
    sd = np.sqrt(np.maximum((l32 * l32 * fm).sum((1, 2)) / cnt - mu * mu, 1.0))
    gcol = np.stack([(colour[:, k] * fm).sum((1, 2)) for k in (0, 1)], -1) / (cnt * sd)[:, None]
    fm2 = (fov > 0.5).astype(np.float32)
    fine2 = ((_masked_blur(lum, fm2, 1.0) - _masked_blur(lum, fm2, 6.0)) * fm2).astype(np.float32)
    clipped = _area((rgb.max(-1) >= 250).astype(np.float32), DECODE // FINE) > 0  # a clipped channel shifts the hue
    return Signatures(fine, fine2.astype(np.float16), fm2 > 0, fm > 0, colour.astype(np.float16), (fm > 0) & ~clipped,
                      templates.astype(np.float16), wnorm, coarse_t, coarse_w, gcol.astype(np.float32), valid)


def file_signatures(paths: list[str], desc: str = "near-duplicate signatures") -> Signatures:
    """Signatures of image files, decoded at DECODE px whatever model a run trains: runs with the
    same data and cv settings get the same folds, and `data check` the same clusters."""
    return signatures(decode_frames(paths, desc=desc))


# ---------------------------------------------------------------------------------------------- pairs

def _coarse_candidates(a: Signatures, b: Signatures, k: int, within: bool, block: int = 256) -> np.ndarray:
    """(P, 2) sorted unique (i, j) pairs: j among i's k best coarse partners in b, or i among j's in a
    (within one set: i < j). The coarse score of a pair is the best correlation of one's central
    template with the other's windows, in either direction."""
    ws = a.coarse_w.shape[1]
    found = []
    for src, dst, flip in ((a, b, False), (b, a, True)):
        if within and flip:
            break
        kk = min(k, len(dst) - within)
        if kk <= 0:
            continue
        wd = dst.coarse_w.reshape(-1, dst.coarse_w.shape[-1])
        for s in range(0, len(src), block):
            e = min(s + block, len(src))
            sc = (src.coarse_t[s:e] @ wd.T).reshape(e - s, len(dst), ws).max(-1)
            back = (dst.coarse_t @ src.coarse_w[s:e].reshape(-1, wd.shape[-1]).T).reshape(len(dst), e - s, ws)
            sc = np.maximum(sc, back.max(-1).T)
            if COLOUR_WEIGHT:
                sc -= COLOUR_WEIGHT * np.linalg.norm(src.gcol[s:e, None] - dst.gcol[None], axis=-1)
            sc = np.round(sc, 4)  # ties (and BLAS rounding) broken by index: the same input gives the same pairs
            if within:
                sc[np.arange(e - s), np.arange(s, e)] = -np.inf
            top = np.argsort(-sc, axis=1, kind="stable")[:, :kk]
            i = np.repeat(np.arange(s, e), kk)
            p = np.stack([top.ravel(), i] if flip else [i, top.ravel()], 1)
            found.append(np.sort(p, 1) if within else p)
    if not found:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _gather(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, C, Q) of (P, C, G, G) images at (P, Q) points; 0 outside."""
    g = img.shape[-1]
    flat = img.reshape(img.shape[0], img.shape[1], -1).astype(np.float32)
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - y0).astype(np.float32), (x - x0).astype(np.float32)
    out = np.zeros(flat.shape[:2] + y.shape[1:], np.float32)
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < g) & (xx >= 0) & (xx < g)
        idx = np.where(ok, yy * g + xx, 0)
        out += np.take_along_axis(flat, idx[:, None, :], 2) * (w * ok)[:, None, :]
    return out


def _parabola(fm, f0, fp):
    """Sub-step offset of a peak from three samples (clipped to +-0.5)."""
    den = fm - 2 * f0 + fp
    ok = den < -1e-9
    return np.clip(np.where(ok, 0.5 * (fm - fp) / np.where(ok, den, -1.0), 0.0), -0.5, 0.5)


def _align(a: Signatures, i, b: Signatures, j):
    """Best alignment of image i's templates (a) in image j's windows (b), pair by pair: the best
    correlation over rotation x scale x shift on the grid, and the alignment refined below the grid
    by a parabola through the neighbouring rotations, scales and shifts: (score, rotation in
    degrees, scale, dy, dx, integer shift index)."""
    w = _windows(b.fine[j], TEMPLATE, SHIFT)
    nr, ns, side = len(ROTATIONS), len(SCALES), 2 * SHIFT + 1
    ncc = np.matmul(a.templates[i].astype(np.float32), w.transpose(0, 2, 1)) / b.wnorm[j][:, None, :]
    ncc = ncc.reshape(len(i), nr, ns, side, side)
    ri, si, yi, xi = np.unravel_index(ncc.reshape(len(i), -1).argmax(1), ncc.shape[1:])
    p = np.arange(len(i))
    best = ncc[p, ri, si, yi, xi]

    def step(idx, n, get):
        d = _parabola(get(np.maximum(idx - 1, 0)), best, get(np.minimum(idx + 1, n - 1)))
        return np.where((idx > 0) & (idx < n - 1), d, 0.0)

    dr = step(ri, nr, lambda k: ncc[p, k, si, yi, xi])
    ds = step(si, ns, lambda k: ncc[p, ri, k, yi, xi])
    dy = step(yi, side, lambda k: ncc[p, ri, si, k, xi])
    dx = step(xi, side, lambda k: ncc[p, ri, si, yi, k])
    rot = np.asarray(ROTATIONS)[ri] + dr * (ROTATIONS[1] - ROTATIONS[0])
    scale = np.asarray(SCALES)[si] * (SCALES[1] / SCALES[0]) ** ds
    return best, rot, scale, dy, dx, yi * side + xi


def _footprint(rot, scale, dy, dx, side: int):
    """(P, side^2) row and column points, in FINE px, of the window's side x side pixel centres
    (side = TEMPLATE at FINE px, 2 TEMPLATE at twice that) mapped into the other image."""
    q = (np.arange(side) - (side - 1) / 2) * (TEMPLATE / side)
    yy, xx = (z.ravel()[None] for z in np.meshgrid(q, q, indexing="ij"))
    yy, xx = yy - dy[:, None], xx - dx[:, None]
    ca, sa = np.cos(np.radians(rot))[:, None], np.sin(np.radians(rot))[:, None]
    c = (FINE - 1) / 2
    return c + scale[:, None] * (sa * xx + ca * yy), c + scale[:, None] * (ca * xx - sa * yy)


def _crop(img: np.ndarray, s: np.ndarray, f: int) -> np.ndarray:
    """(P, ..., (f T)^2) the window at shift index s of (P, ..., f FINE, f FINE) images."""
    yi, xi = np.divmod(s, 2 * SHIFT + 1)
    c0 = (FINE - TEMPLATE) // 2 - SHIFT
    k = np.arange(f * TEMPLATE)
    rows = (f * (c0 + yi))[:, None, None] + k[None, :, None] + 0 * k[None, None, :]
    cols = (f * (c0 + xi))[:, None, None] + 0 * k[None, :, None] + k[None, None, :]
    p = np.arange(len(s))[:, None]
    rows, cols = rows.reshape(len(s), -1), cols.reshape(len(s), -1)
    if img.ndim == 4:
        return img[p[:, :, None], np.arange(img.shape[1])[None, None, :], rows[..., None], cols[..., None]].transpose(
            0, 2, 1)
    return img[p, rows, cols]


def _verify(a: Signatures, i, b: Signatures, j, rot, scale, dy, dx, s):
    """(score, local mismatch, colour difference) of image i (a) resampled at the refined alignment
    against image j's window (b):

    - score: normalised cross-correlation of the band-passed luminance over both fields of view,
      at twice the search resolution;
    - local: the worst 16 x 16 tile (of 9, overlapping) of |a - b|^2 / (|a|^2 + |b|^2 + the mean
      tile energy), a and b normalised: 0 where the tiles agree, about 1 where one shows something
      the other lacks (a lesion, an instrument), however well the rest agrees;
    - colour: mean chroma (two opponent channels) of 2 x 2 tiles of the compared region, the other's
      fitted by one gain (which is all a gain, a contrast change or an offset common to the three
      channels does to chroma), RMS residual over the RMS chroma (at least COLOUR_FLOOR grey
      levels); clipped pixels are left out. Another tint, or a red patch in one frame only,
      raises it."""
    i, j, s = (np.asarray(z, np.int64) for z in (i, j, s))
    t2 = 2 * TEMPLATE
    py, px = _footprint(rot, scale, dy, dx, t2)
    smp = _gather(np.stack([a.fine2[i].astype(np.float32), a.fmask2[i]], 1), 2 * py + 0.5, 2 * px + 0.5)
    m = (smp[:, 1] > 0.999) & _crop(b.fmask2[j], s, 2)
    na, nb = _normalise(smp[:, 0], m), _normalise(_crop(b.fine2[j], s, 2).astype(np.float32), m)
    score = (na * nb).sum(1) * (m.mean(1) >= MIN_VALID)
    ta, tb = na.reshape(-1, t2, t2), nb.reshape(-1, t2, t2)
    d, e = [], []
    for y in range(0, t2 - 16 + 1, 8):
        for x in range(0, t2 - 16 + 1, 8):
            pa, pb = ta[:, y:y + 16, x:x + 16], tb[:, y:y + 16, x:x + 16]
            d.append(((pa - pb) ** 2).sum((1, 2)))
            e.append((pa ** 2).sum((1, 2)) + (pb ** 2).sum((1, 2)))
    d, e = np.stack(d, 1), np.stack(e, 1)
    local = (d / (e + e.mean(1, keepdims=True))).max(1)

    py, px = _footprint(rot, scale, dy, dx, TEMPLATE)  # colour at FINE px
    cola = _gather(np.concatenate([a.colour[i].astype(np.float32), a.cmask[i][:, None]], 1), py, px)
    colb = _crop(b.colour[j].astype(np.float32), s, 1)
    mc = (cola[:, 2] > 0.999) & _crop(b.cmask[j], s, 1)
    def tiles(v):  # (P, 2, T*T) -> (P, 2, n*n): sums over n x n tiles of T/n px (misalignment, JPEG chroma drop out)
        n = COLOUR_TILES
        t = TEMPLATE // n
        return v.reshape(len(v), 2, n, t, n, t).sum((3, 5)).reshape(len(v), 2, n * n)

    cnt = tiles(np.repeat(mc[:, None].astype(np.float32), 2, 1))
    ra = tiles(cola[:, :2] * mc[:, None]) / np.maximum(cnt, 1)  # mean chroma per tile, grey levels
    rb = tiles(colb * mc[:, None]) / np.maximum(cnt, 1)
    w = cnt[:, 0] / np.maximum(cnt[:, 0].sum(1, keepdims=True), 1)
    k = ((ra * rb).sum(1) * w).sum(1) / np.maximum(((ra * ra).sum(1) * w).sum(1), 1e-9)  # the gain
    resid = np.sqrt((((rb - k[:, None, None] * ra) ** 2).sum(1) * w).sum(1))
    colour = resid / np.maximum(np.sqrt(((rb ** 2).sum(1) * w).sum(1)), COLOUR_FLOOR)
    return score.astype(np.float32), local.astype(np.float32), colour.astype(np.float32)


def pair_scores(a: Signatures, b: Signatures | None, pairs, threshold: float | None = None,
                block: int = 256) -> np.ndarray:
    """(3, P) score, local mismatch and colour difference of (i, j) pairs, i in a and j in b (or in
    a when b is None); see `_verify`. Each pair is aligned both ways (i's templates in j, j's in i)
    and verified the better way. With `threshold`, the second way is tried only where the first
    reaches threshold - 2 MARGIN, and a pair whose grid score lies more than MARGIN below the
    threshold is not verified (its grid score is returned, local and colour NaN: not measured)."""
    b = a if b is None else b
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((3, len(pairs)), np.float32)
    for s in range(0, len(pairs), block):
        i, j = pairs[s:s + block, 0], pairs[s:s + block, 1]
        one = _align(a, i, b, j)
        back = np.arange(len(i)) if threshold is None else np.flatnonzero(one[0] >= threshold - 2 * MARGIN)
        two = [np.full(len(i), -1.0), np.zeros(len(i)), np.ones(len(i)), np.zeros(len(i)), np.zeros(len(i)),
               np.zeros(len(i), np.int64)]
        if len(back):  # the other way round, where the first way is not hopeless
            for z, v in zip(two, _align(b, j[back], a, i[back])):
                z[back] = v
        flip = two[0] > one[0]
        grid = np.maximum(one[0], two[0])
        res = np.stack([grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)])
        todo = (grid >= threshold - MARGIN) if threshold is not None else np.ones(len(i), bool)
        for f, (x, y, al) in ((False, (a, b, one)), (True, (b, a, two))):
            k = np.flatnonzero(todo & (flip == f))
            if len(k):
                src, dst = (j[k], i[k]) if f else (i[k], j[k])
                res[:, k] = _verify(x, src, y, dst, *(z[k] for z in al[1:]))
        res[0] *= a.valid[i] & b.valid[j]
        out[:, s:s + block] = res
    return np.round(out, 4)


def dissimilarity(scores: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(P,) one number per pair from `pair_scores`' (3, P): the largest of (1 - score) / (1 - threshold),
    local / LOCAL_TOLERANCE and colour / COLOUR_TOLERANCE. 0: the same pixels; 1: the join limit.
    A check that was not measured (NaN: the pair was not verified) does not count."""
    score, local, colour = np.asarray(scores, np.float64)
    d = np.fmax(np.fmax((1 - score) / max(1 - threshold, 1e-6), local / LOCAL_TOLERANCE), colour / COLOUR_TOLERANCE)
    return np.round(d, 4)


def joined_pairs(a: Signatures, b: Signatures | None = None, threshold: float = THRESHOLD,
                 candidates: int = CANDIDATES, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs (P, 2), scores (P,), dissimilarities (P,)) of the joined pairs: within `a` (i < j) or
    from `a` to `b`. Each image's `candidates` best coarse partners are aligned and verified
    (`pair_scores`); a pair joins when its dissimilarity is at most 1 and at most `ratio` x the
    BACKGROUND quantile of each of its two images' candidate dissimilarities (ratio 0: no relative test)."""
    within = b is None
    bb = a if within else b
    if not len(a) or not len(bb):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0)
    cand = _coarse_candidates(a, bb, candidates, within)
    sc = pair_scores(a, bb, cand, threshold=threshold)
    d = dissimilarity(sc, threshold)
    ok = d <= 1
    if ratio:
        ends = np.concatenate([cand[:, 0], cand[:, 1] + (0 if within else len(a))])  # one index space
        bg = _background(ends, np.concatenate([d, d]), len(a) + (0 if within else len(bb))).reshape(2, -1)
        ok &= (d <= ratio * bg[0]) & (d <= ratio * bg[1])
    return cand[ok], sc[0][ok], d[ok]


def _background(item: np.ndarray, value: np.ndarray, n: int, q: float = BACKGROUND) -> np.ndarray:
    """For each (item, value) entry, the q-quantile (the lower value) of the item's other entries'
    values, so that a pair is never its own background; inf for an item with no other entry."""
    order = np.lexsort((value, item))
    count = np.bincount(item, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.empty(len(item), np.int64)
    rank[order] = np.arange(len(item)) - start[item[order]]  # each entry's place in its item's sorted values
    c = count[item]
    k = np.floor(q * np.maximum(c - 2, 0)).astype(np.int64)  # the quantile's place among the c - 1 others
    k = np.where(rank <= k, k + 1, k)  # skip the entry itself
    out = np.full(len(item), np.inf)
    has = c > 1
    out[has] = value[order][start[item[has]] + k[has]]
    return out


def near_duplicate_pairs(a: Signatures, b: Signatures | None = None, threshold: float = THRESHOLD,
                         candidates: int = CANDIDATES) -> list[tuple[int, int, float]]:
    """(i, j, score) of near-duplicate pairs (`joined_pairs`): within `a` (i < j), or from `a` to `b`
    (i in a, j in b)."""
    pairs, score, _ = joined_pairs(a, b, threshold, candidates)
    return [(int(i), int(j), float(x)) for (i, j), x in zip(pairs, score)]
