"""A small real-image release the kit can build offline: crops of scikit-image's bundled photographs in
the ENTRep training layout, for measuring the recipe on real pixels (the demo's are procedural).

    python bench/photo_release.py OUT_DIR [--cases 150] [--test-cases 40] [--size 96] [--seed 0]
    python -m entrep.ablate --config bench/photos.yaml --data OUT_DIR --recipe --pseudo-data OUT_DIR/test

Seven classes, one per colour photograph (astronaut, coffee, chelsea, rocket, immunohistochemistry,
hubble_deep_field, retina). A case is a window of its photograph (a third to three fifths of its short
side, anywhere in it), rotated up to 10 degrees, seen through an endoscope-style circular mask on black;
a third of the cases come as i2i pairs (a second shot: shifted up to 6% of the window, another gain), and
captions name the window's place ("the upper left of the coffee photograph"), templated like ENTRep's, so
several images carry each caption. The test folder and its truth follow the demo's layout.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
CLASSES = [p.replace("_", "-") for p in PHOTOS]


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _place(cx: float, cy: float) -> str:
    return f"the {'upper' if cy < 0.5 else 'lower'} {'left' if cx < 0.5 else 'right'}"


def _shot(photo: Image.Image, cx: float, cy: float, side: float, angle: float, gain: float, size: int) -> np.ndarray:
    w, h = photo.size
    s = side * min(w, h)
    box = (cx * w - s / 2, cy * h - s / 2, cx * w + s / 2, cy * h + s / 2)
    crop = photo.rotate(angle, center=(cx * w, cy * h), resample=Image.Resampling.BILINEAR).crop(
        tuple(int(round(v)) for v in box)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(crop).astype(np.float32) * gain
    yy, xx = np.mgrid[0:size, 0:size] / size
    arr[((xx - 0.5) ** 2 + (yy - 0.5) ** 2) > 0.47 ** 2] = 0  # the endoscope's circular field of view
    return arr.clip(0, 255).astype(np.uint8)


def _cases(rng, n: int):
    for _ in range(n):
        c = int(rng.integers(len(PHOTOS)))
        side = float(rng.uniform(0.33, 0.6))
        cx, cy = (float(rng.uniform(side / 2, 1 - side / 2)) for _ in range(2))
        yield c, dict(cx=cx, cy=cy, side=side, angle=float(rng.uniform(-10, 10)), gain=float(rng.uniform(0.85, 1.1)))


def _second(rng, p: dict) -> dict:
    q = dict(p)
    q["cx"] += float(rng.uniform(-0.06, 0.06)) * p["side"]
    q["cy"] += float(rng.uniform(-0.06, 0.06)) * p["side"]
    q["gain"] *= float(rng.uniform(0.92, 1.08))
    return q


def make(out: Path, cases: int = 150, test_cases: int = 40, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    photos = {c: _photo(p) for c, p in enumerate(PHOTOS)}

    def save(img, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)

    def name():
        return str(uuid.UUID(bytes=rng.bytes(16), version=4)) + ".png"

    cls, i2i, t2i = {}, {}, {}
    for j, (c, p) in enumerate(_cases(rng, cases)):
        names = [name() for _ in range(1 + (j % 3 == 0))]
        for v, n in enumerate(names):
            save(_shot(photos[c], **(p if v == 0 else _second(rng, p)), size=size), out / "train/imgs" / n)
            cls[n] = CLASSES[c]
        if len(names) == 2:
            i2i[names[0]], i2i[names[1]] = names[1], names[0]
        t2i.setdefault(f"{_place(p['cx'], p['cy'])} of the {PHOTOS[c].replace('_', ' ')} photograph", names[0])
    for f, d in (("cls", cls), ("i2i", i2i), ("t2i", t2i)):
        (out / "train" / f"{f}.json").write_text(json.dumps(d, indent=1))
    truth_cls, truth_i2i, carriers, queries = {}, {}, {}, []
    for j, (c, p) in enumerate(_cases(rng, test_cases)):
        names = [name() for _ in range(1 + (j % 3 == 0))]
        for v, n in enumerate(names):
            save(_shot(photos[c], **(p if v == 0 else _second(rng, p)), size=size), out / "test/imgs" / n)
            truth_cls[n] = c
            carriers.setdefault(f"{_place(p['cx'], p['cy'])} of the {PHOTOS[c].replace('_', ' ')} photograph",
                                []).append(n)
        if len(names) == 2:
            truth_i2i[names[0]], truth_i2i[names[1]] = [names[1]], [names[0]]
            queries += names
    (out / "test/cls.csv").write_text("\n".join(truth_cls) + "\n")
    (out / "test/i2i.csv").write_text("\n".join(queries) + "\n")
    (out / "test/t2i.csv").write_text("\n".join(sorted(carriers)) + "\n")
    (out / "truth").mkdir(parents=True, exist_ok=True)
    (out / "truth/track1_cls.json").write_text(json.dumps(truth_cls))
    (out / "truth/track2_i2i.json").write_text(json.dumps(truth_i2i))
    pick = np.random.default_rng(seed + 1)  # one target per caption, as the challenge scores Track 3
    (out / "truth/track3_t2i.json").write_text(json.dumps({c: carriers[c][int(pick.integers(len(carriers[c])))]
                                                           for c in sorted(carriers)}))
    (out / "truth/any_carrier").mkdir(parents=True, exist_ok=True)
    (out / "truth/any_carrier/track3_t2i.json").write_text(json.dumps({c: carriers[c] for c in sorted(carriers)}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--cases", type=int, default=150)
    ap.add_argument("--test-cases", type=int, default=40)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        print(f"{args.out} exists and is not empty", file=sys.stderr)
        return 2
    out = make(Path(args.out), args.cases, args.test_cases, args.size, args.seed)
    print(f"photo release: {sum(1 for _ in out.rglob('*.png'))} images under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
