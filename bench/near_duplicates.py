"""Near-duplicate detection: recall per transform and false joins, pHash@12 (before) vs aligned correlation (now).

    python bench/near_duplicates.py [--quick] [--timing-only] [--no-timing] [--markdown FILE]

Two sets of images, each made of base images and copies of them:

- demo renders (entrep.demo, 256 px): each case's base render and, as copies, the demo's own second
  shot of the case (`_view`: anatomy moved by up to 2%, new noise, gain), the case re-rendered with
  all of it moved by 2/5/10% of the frame under the fixed field of view (camera motion), the whole
  frame shifted (a cropped copy: the black circle moves too), rotated about the centre, zoomed in
  (camera) and out (a resized copy: a black ring), re-encoded, re-exposed, and all at once.
  Unrelated pairs: images of two different cases of one class.
- real photographs (skimage.data: 8 colour photos, and 8 grey ones given one ENT-like tint, so that
  colour cannot tell them apart), seen as 640x480 endoscopy frames: a view is a rotated, zoomed
  window of the photo inside a circular field of view on black. Copies move the window (camera
  motion: the circle stays), rotate or zoom it, re-encode and re-expose it; "shift (copy)" moves
  the whole frame, circle included. Unrelated pairs: views of two different photos of one group
  (colour or tinted grey), and views of one photo whose centres are at least half a frame's width
  apart (reported apart for the three photos of a repeating pattern: coins, bricks, lines of text).

Recall counts (base, copy) pairs that the method joins directly, each kind on its own (all base
images and that kind's copies, so a copy must be found among all the look-alikes, and never
through another copy of its base). False joins: every image of the set at once.
A pair is joined by pHash when the 256-bit hashes of the two images decoded at 128 px lie at most
12 bits apart (cv.near_dup_bits=12 before), and by the new method when `near_duplicate_pairs`
(coarse candidates, then the aligned correlation >= cv.near_dup_threshold and the colour check)
returns it, run on the whole set at once. Timing: 1,925 synthetic 640x480 PNG frames on this machine.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entrep.data import near_dup  # noqa: E402

W, H = 640, 480
DEMO_SIZE = 256

# kind -> (shift of the frame width, rotation in degrees, zoom, brightness, contrast, JPEG quality)
KINDS = {
    "JPEG q50-90": dict(jpeg=True),
    "brightness+contrast x0.8-1.2": dict(photo=True),
    "resize 1.5x + JPEG + brighter": dict(resize=1.5, jpeg=90, bright=1.05),
    "shift 2% (camera)": dict(shift=0.02),
    "shift 5% (camera)": dict(shift=0.05),
    "shift 10% (camera)": dict(shift=0.10),
    "shift 10% (copy: circle moves)": dict(frame_shift=0.10),
    "rotate 5 deg": dict(rot=5.0),
    "zoom 0.85": dict(zoom=0.85),
    "zoom 1.15": dict(zoom=1.15),
    "all: 5%, 3 deg, 1.08, JPEG, 0.9": dict(shift=0.05, rot=3.0, zoom=1.08, jpeg=80, bright=0.9),
    "all at max: 10%, 5 deg, 1.15, JPEG, b+c": dict(shift=0.10, rot=5.0, zoom=1.15, jpeg=70, photo=True),
}
DEMO_VIEW = "second shot (demo `_view`)"


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(q))
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


def _photometric(img: np.ndarray, rng, k: dict) -> np.ndarray:
    im = Image.fromarray(img)
    if k.get("photo"):
        im = ImageEnhance.Brightness(im).enhance(rng.choice([-1, 1]) * rng.uniform(0.1, 0.2) + 1)
        im = ImageEnhance.Contrast(im).enhance(rng.choice([-1, 1]) * rng.uniform(0.1, 0.2) + 1)
    if k.get("bright"):
        im = ImageEnhance.Brightness(im).enhance(k["bright"])
    return np.asarray(im)


def _finish(img: np.ndarray, rng, k: dict) -> np.ndarray:
    """The file-level steps: resize up and back (by the decoder), JPEG."""
    if k.get("resize"):
        im = Image.fromarray(img)
        img = np.asarray(im.resize((int(im.width * k["resize"]), int(im.height * k["resize"])), Image.BICUBIC))
    if k.get("jpeg"):
        img = _jpeg(img, k["jpeg"] if k["jpeg"] is not True else rng.integers(50, 91))
    return img


def _frame_shift(img: np.ndarray, frac: float, rng) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    dx, dy = (np.array([np.cos(a), np.sin(a)]) * frac * img.shape[1]).round().astype(int)
    out = np.zeros_like(img)
    h, w = img.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0),
                                                                    max(-dx, 0):w + min(-dx, 0)]
    return out


# ------------------------------------------------------------------------------------------ demo renders

@lru_cache(maxsize=8)
def _circle(h: int, w: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) <= r ** 2


def _demo_copy(case: dict, k: dict, rng) -> np.ndarray:
    from entrep.data.demo import render

    s = DEMO_SIZE
    p = dict(case, findings=[dict(f) for f in case["findings"]])
    if k.get("shift"):
        a = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(a), np.sin(a)]) * k["shift"]
        d[0] *= -1 if case["label"].endswith("-left") else 1  # left images are mirrored renders
        p["dx"] += d[0]
        p["dy"] += d[1]
        for f in p["findings"]:
            f["x"] += d[0]
            f["y"] += d[1]
    img = render(case["label"], p, s)
    img = _photometric(img, rng, k)
    if k.get("rot") or k.get("zoom"):
        ang = k.get("rot", 0.0) * rng.choice([-1, 1])
        z = k.get("zoom", 1.0)
        im = Image.fromarray(img).rotate(ang, Image.BICUBIC)
        if z != 1.0:
            n = int(round(s * z))
            im = im.resize((n, n), Image.BICUBIC)
            canvas = Image.new("RGB", (max(n, s), max(n, s)))
            canvas.paste(im, ((max(n, s) - n) // 2,) * 2)
            c0 = (max(n, s) - s) // 2
            im = canvas.crop((c0, c0, c0 + s, c0 + s))
        img = np.array(im)
        img[~_circle(s, s, 0.47 * s)] = 0
    if k.get("frame_shift"):
        img = _frame_shift(img, k["frame_shift"], rng)
    return _finish(img, rng, k)


def demo_set(n_cases: int, seed: int = 0):
    """Images and their (group, case, kind) rows: each case's base render and one copy per kind."""
    from entrep.data.demo import _cases, _view, render

    rng = np.random.default_rng(seed)
    images, rows = [], []
    for c, case in enumerate(_cases(rng, n_cases)):
        images.append(render(case["label"], case, DEMO_SIZE))
        rows.append((case["label"], c, "base"))
        images.append(render(case["label"], _view(rng, case), DEMO_SIZE))
        rows.append((case["label"], c, DEMO_VIEW))
        for kind, k in KINDS.items():
            images.append(_demo_copy(case, k, rng))
            rows.append((case["label"], c, kind))
    return images, rows


# ------------------------------------------------------------------------------------------ photographs

COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "motorcycle")
GREY_PHOTOS = ("camera", "coins", "moon", "page", "grass", "gravel", "brick", "clock")
VIEW = 0.4  # a frame's height as a share of the photo's shorter side
REPEATING = ("coins", "brick", "page")  # two parts of these look alike: near-duplicates of each other
TINT = np.array([1.0, 0.62, 0.55])  # one ENT-like tint for every grey photo


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = (np.repeat(img[..., None], 3, -1) * TINT).clip(0, 255)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _view(src: Image.Image, cx: float, cy: float, z: float, ang: float) -> np.ndarray:
    """A 640x480 frame: the photo around (cx, cy), z source px per frame px, rotated by ang degrees,
    inside a circular field of view (diameter 1.04 x the height, clipped at top and bottom) on black."""
    a = np.radians(ang)
    ca, sa = np.cos(a) * z, np.sin(a) * z
    # frame (x, y) -> source: centre + z R (x - W/2, y - H/2)
    coeffs = (ca, -sa, cx - ca * W / 2 + sa * H / 2, sa, ca, cy - sa * W / 2 - ca * H / 2)
    img = np.array(src.transform((W, H), Image.AFFINE, coeffs, Image.BICUBIC))
    img[~_circle(H, W, 0.52 * H)] = 0
    return img


def photo_set(views_per_photo: int, seed: int = 0):
    """Images and their (group, photo, view, kind, centre) rows."""
    rng = np.random.default_rng(seed)
    images, rows = [], []
    for group, names in (("colour", COLOUR_PHOTOS), ("grey", GREY_PHOTOS)):
        for name in names:
            arr = _photo(name)
            src = Image.fromarray(arr)
            ph, pw = arr.shape[:2]
            z = VIEW * min(ph, pw) / H  # a view shows 40% of the photo's shorter side in height
            margin = 0.32 * min(ph, pw)  # room for the field of view, a 10% shift and a zoom out
            for v in range(views_per_photo):
                cx, cy = rng.uniform(margin, pw - margin), rng.uniform(margin, ph - margin)
                base = _view(src, cx, cy, z, 0.0)
                images.append(base)
                rows.append((group, name, v, "base", (cx, cy, z)))
                for kind, k in KINDS.items():
                    a = rng.uniform(0, 2 * np.pi)
                    d = np.array([np.cos(a), np.sin(a)]) * k.get("shift", 0.0) * W * z
                    ang = k.get("rot", 0.0) * rng.choice([-1, 1])
                    img = _view(src, cx + d[0], cy + d[1], z / k.get("zoom", 1.0), ang)
                    if k.get("photo") or k.get("bright"):  # the camera's exposure: the black stays black
                        img = _photometric(img, rng, k) * _circle(H, W, 0.52 * H)[..., None]
                    if k.get("frame_shift"):
                        img = _frame_shift(img, k["frame_shift"], rng)
                    images.append(_finish(img.astype(np.uint8), rng, k))
                    rows.append((group, name, v, kind, (cx, cy, z)))
    return images, rows


# ------------------------------------------------------------------------------------------ methods

def phash_pairs(images, max_bits: int = 12) -> set[tuple[int, int]]:
    """Before: pHash of each image decoded at 128 px (as entrep.data.images.decode_image squashes it)."""
    import imagehash

    hashes = np.stack([imagehash.phash(Image.fromarray(im).resize((128, 128), Image.BICUBIC), hash_size=16).hash.ravel()
                       for im in images])
    packed = np.packbits(hashes, axis=1)
    out = set()
    for s in range(0, len(packed), 256):
        d = np.bitwise_count(packed[s:s + 256, None] ^ packed[None]).sum(-1)
        for i, j in zip(*np.nonzero(d <= max_bits)):
            if s + i < j:
                out.add((int(s + i), int(j)))
    return out


def new_pairs(images, threshold: float) -> set[tuple[int, int]]:
    sig = near_dup.signatures([near_dup.letterbox(Image.fromarray(im)) for im in images])
    return {(i, j) for i, j, _ in near_dup.near_duplicate_pairs(sig, threshold=threshold)}


def evaluate(joined: set[tuple[int, int]], base_of: dict, negatives: dict) -> dict:
    """Recall per kind of (base, copy) pairs, and false joins per family of unrelated pairs."""
    out = {}
    by_kind: dict[str, list[bool]] = {}
    for i, (b, kind) in base_of.items():
        by_kind.setdefault(kind, []).append((min(i, b), max(i, b)) in joined)
    for kind, hits in by_kind.items():
        out[kind] = (sum(hits), len(hits))
    for name, (count, test) in negatives.items():
        out[name] = (sum(1 for p in joined if test(*p)), count)
    return out


def per_kind(images, base_of: dict, method) -> dict:
    """Recall per kind, each kind on its own: every base image with that kind's copies only, so a
    copy is found directly (not through another copy of its base) among all the look-alikes."""
    bases = sorted({b for b, _ in base_of.values()})
    out = {}
    for kind in dict.fromkeys(k for _, k in base_of.values()):
        copies = sorted(i for i, (_, k) in base_of.items() if k == kind)
        idx = bases + copies
        joined = {(idx[a], idx[b]) for a, b in method([images[g] for g in idx])}
        joined = {(min(p), max(p)) for p in joined}
        out |= evaluate(joined, {i: base_of[i] for i in copies}, {})
    return out


def demo_truth(rows):
    base = {}
    first = {}
    for i, (label, case, kind) in enumerate(rows):
        if kind == "base":
            first[case] = i
        else:
            base[i] = (first[case], kind)
    label = np.array([r[0] for r in rows])
    case = np.array([r[1] for r in rows])
    same = label[:, None] == label[None]
    other = case[:, None] != case[None]
    m = np.triu(same & other, 1)
    negatives = {"unrelated, same class": (int(m.sum()), lambda i, j: label[i] == label[j] and case[i] != case[j])}
    return base, negatives


def photo_truth(rows):
    base, first = {}, {}
    for i, (group, name, v, kind, c) in enumerate(rows):
        if kind == "base":
            first[(name, v)] = i
        else:
            base[i] = (first[(name, v)], kind)
    group = np.array([r[0] for r in rows])
    name = np.array([r[1] for r in rows])
    view = np.array([r[2] for r in rows])
    cen = np.array([r[4][:2] for r in rows])
    z = np.array([r[4][2] for r in rows])
    far = np.linalg.norm(cen[:, None] - cen[None], axis=-1) >= W * z[:, None] / 2  # half a frame apart
    other_photo = np.triu((group[:, None] == group[None]) & (name[:, None] != name[None]), 1)
    rep = np.isin(name, REPEATING)
    same_far = np.triu((name[:, None] == name[None]) & (view[:, None] != view[None]) & far, 1)
    negatives = {
        "other photo, same group": (int(other_photo.sum()), lambda i, j: group[i] == group[j] and name[i] != name[j]),
        "same photo, >= half a frame apart": (int((same_far & ~rep[:, None]).sum()), lambda i, j: name[i] == name[j]
                                               and view[i] != view[j] and bool(far[i, j]) and not rep[i]),
        "same photo, repeating pattern (coins, brick, page), >= half a frame apart": (
            int((same_far & rep[:, None]).sum()), lambda i, j: name[i] == name[j] and view[i] != view[j]
            and bool(far[i, j]) and rep[i]),
    }
    return base, negatives


def release_rows():
    """The demo release as `python -m entrep.demo` makes it (220 cases, 80 px): its i2i pairs."""
    import json
    import tempfile

    from entrep.data.release import load_release
    from entrep.data.demo import make_demo
    from entrep.labels import ENTREP_CLASSES

    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "d")
        df = load_release(root / "train", ENTREP_CLASSES)[0]
        images = [np.array(Image.open(p).convert("RGB")) for p in df["path"]]
        i2i = json.loads((root / "train/i2i.json").read_text())
    from entrep.data.folds import link_groups

    comp = link_groups(df)
    labels = df["label"].fillna("").to_numpy()
    pos = {n: i for i, n in enumerate(df["image"])}
    pairs = {tuple(sorted((pos[a], pos[b]))) for a, b in i2i.items() if a in pos and b in pos}
    return images, comp, labels, pairs


# ------------------------------------------------------------------------------------------ timing

def timing(n: int = 1925, seed: int = 1) -> dict:
    import tempfile

    from entrep.data.images import decode_all

    rng = np.random.default_rng(seed)
    srcs = [Image.fromarray(_photo(p)) for p in COLOUR_PHOTOS + GREY_PHOTOS]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):  # views of the photos at random places, a third of them moved copies of another
            src = srcs[i % len(srcs)]
            pw, ph = src.size
            z = VIEW * min(ph, pw) / H
            m = 0.32 * min(ph, pw)
            img = _view(src, rng.uniform(m, pw - m), rng.uniform(m, ph - m), z * rng.uniform(0.9, 1.1),
                        rng.uniform(-5, 5))
            paths.append(str(Path(tmp) / f"{i:05d}.png"))
            Image.fromarray(img).save(paths[-1])
        t = time.perf_counter()
        frames = near_dup.decode_frames(paths)
        out["decode 640x480 PNG -> 64 px letterboxed (2 threads)"] = time.perf_counter() - t
        t = time.perf_counter()
        sig = near_dup.signatures(frames)
        out["signatures"] = time.perf_counter() - t
        t = time.perf_counter()
        pairs = near_dup.near_duplicate_pairs(sig)
        out["pairs (coarse all-pairs + fine candidates)"] = time.perf_counter() - t
        out["total (new)"] = sum(out.values())
        t = time.perf_counter()
        px = decode_all(paths, 128, workers=2)
        t1 = time.perf_counter()
        phash_pairs(list(px))
        t2 = time.perf_counter()
        out["before: decode 128 squashed (2 threads)"] = t1 - t
        out["before: pHash + pairs"] = t2 - t1
        out["total (before)"] = t2 - t
        out["_pairs"] = len(pairs)
    return out


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sets, timing on 200 frames (about a minute)")
    ap.add_argument("--threshold", type=float, default=near_dup.THRESHOLD)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--markdown", help="also write the markdown table here")
    args = ap.parse_args(argv)
    lines = []
    if not args.timing_only:
        sets = []
        imgs, rows = demo_set(30 if args.quick else 120)
        sets.append(("demo renders", imgs, demo_truth(rows)))
        imgs, rows = photo_set(2 if args.quick else 5)
        sets.append(("photos", imgs, photo_truth(rows)))
        results = {}
        for name, imgs, (base, neg) in sets:
            t = time.perf_counter()
            old, new = per_kind(imgs, base, phash_pairs), per_kind(imgs, base, lambda x: new_pairs(x, args.threshold))
            old |= evaluate(phash_pairs(imgs), {}, neg)  # false joins: every image of the set at once
            new |= evaluate(new_pairs(imgs, args.threshold), {}, neg)
            results[name] = (old, new, len(imgs), time.perf_counter() - t)
        rel_imgs, comp, labels, i2i = release_rows()
        old_j, new_j = phash_pairs(rel_imgs), new_pairs(rel_imgs, args.threshold)
        rel = {}
        for tag, j in (("before", old_j), ("now", new_j)):
            unrelated = [p for p in j if comp[p[0]] != comp[p[1]]]
            rel[tag] = (len(i2i & j), len(i2i), sum(labels[a] == labels[b] for a, b in unrelated), len(unrelated))
        lines = table(results, rel, args.threshold)
    if not args.no_timing:
        n = 200 if args.quick else 1925  # 1,925: the size of the ENTRep training release
        tm = timing(n)
        lines += ["", f"Timing, {n:,} synthetic 640x480 PNG frames, this machine ({_cpus()} CPUs):", ""]
        lines += ["| step | seconds |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in tm.items() if not k.startswith("_")]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _pct(hit: int, n: int, digits: int = 0) -> str:
    return f"{100 * hit / n:.{digits}f}% ({hit}/{n})" if n else "-"


def table(results: dict, rel: dict, threshold: float) -> list[str]:
    names = list(results)
    head = ["transform or pair kind"] + [f"{n}: {m}" for n in names for m in ("pHash@12", "new")]
    lines = [f"Near-duplicate recall per transform (base, copy pairs joined) and false joins; new = aligned "
             f"correlation >= {threshold} + tile and colour checks",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" + " ---: |" * (len(head) - 1)]
    kinds = [DEMO_VIEW] + list(KINDS)
    for kind in kinds:
        cells = []
        for n in names:
            old, new, _, _ = results[n]
            cells += [_pct(*old[kind]) if kind in old else "-", _pct(*new[kind]) if kind in new else "-"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    negs = sorted({k for n in names for k in results[n][0] if k not in kinds})
    for neg in negs:
        cells = []
        for n in names:
            old, new, _, _ = results[n]
            cells += [_pct(*old[neg], 3) if neg in old else "-", _pct(*new[neg], 3) if neg in new else "-"]
        lines.append(f"| false joins: {neg} | " + " | ".join(cells) + " |")
    lines += ["", "Demo release as `python -m entrep.demo` makes it (seed 0, 220 cases, 80 px renders):", "",
              "| method | i2i pairs joined | unrelated pairs joined (same class / any) |", "| --- | ---: | ---: |"]
    for tag, (hit, n, same, anyc) in rel.items():
        lines.append(f"| {'pHash@12' if tag == 'before' else 'new'} | {hit}/{n} | {same} / {anyc} |")
    sizes = ", ".join(f"{n}: {results[n][2]} images" for n in names)
    lines += ["", f"({sizes})"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
