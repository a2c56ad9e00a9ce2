"""A procedural ENT-endoscopy-like dataset in the real ENTRep release layouts
(`python -m entrep.demo`, entrep/commands/demo.py).

OUT_DIR/train/{cls,i2i,t2i}.json + imgs/      the training layout (UUID names)
OUT_DIR/public/data.json + images/            the public-sample layout (`_imageNN` listed, `_ImageNN` on disk)
OUT_DIR/test/imgs/ + cls.csv, i2i.csv, t2i.csv the test layout (header-less query lists)
OUT_DIR/truth/track{1,2,3}_*.json             test ground truth, so the demo can score itself (Track 3:
                                              one target per caption), one file per track
OUT_DIR/truth/any_carrier/track3_t2i.json     Track 3 with every carrier, for the easier any-carrier figure

Each class has its own structure (ear: membrane + angled handle; nose: asymmetric septum and
turbinates; vocal cords: an open or closed V; throat: an arch). Every left image is the exact mirror
of the right image with the same parameters, so a horizontal flip really swaps the label.
Findings change the picture visibly and each has an English and a Vietnamese caption line.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from entrep.io import atomic_write_json, atomic_write_text
from entrep.labels import ENTREP_CLASSES

# (English, Vietnamese) location phrase per class: captions name the side, so a flip must swap it.
PLACES = {
    "nose-right": ("in the right nasal cavity", "hốc mũi phải"),
    "nose-left": ("in the left nasal cavity", "hốc mũi trái"),
    "ear-right": ("on the right eardrum", "màng nhĩ phải"),
    "ear-left": ("on the left eardrum", "màng nhĩ trái"),
    "vc-open": ("on the vocal cords", "dây thanh"),
    "vc-closed": ("on the vocal cords", "dây thanh"),
    "throat": ("on the posterior pharyngeal wall", "thành sau họng"),
}
FINDINGS = {
    "erythema": ("erythema", "sung huyết"),
    "polyp": ("a polyp", "polyp"),
    "discharge": ("white discharge", "đọng dịch trắng"),
    "clot": ("a dark blood clot", "cục máu đông"),
}


def caption(label: str, finding: str) -> tuple[str, str]:
    (en, vi), (pen, pvi) = FINDINGS[finding], PLACES[label]
    return f"{en} {pen}", f"{vi} {pvi}"


def _right_side(label: str) -> str:
    return label.replace("-left", "-right")


def render(label: str, params: dict, size: int) -> np.ndarray:
    """Draw one image. Left classes are drawn as their right twin, then mirrored exactly."""
    img = _render_right(_right_side(label), params, size)
    return img[:, ::-1].copy() if label.endswith("-left") else img


def _render_right(label: str, p: dict, size: int) -> np.ndarray:
    s = size
    rng = np.random.default_rng(p["seed"])
    yy, xx = np.mgrid[0:s, 0:s] / s
    base = np.array(p["tone"], dtype=np.float32)
    shade = 1.0 - 0.35 * ((xx - 0.5 - p["dx"]) ** 2 + (yy - 0.5 - p["dy"]) ** 2) * 4  # vignetting
    arr = base[None, None] * shade[..., None] + rng.normal(0, 6, (s, s, 3))
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    cx, cy = s * (0.5 + p["dx"]), s * (0.5 + p["dy"])
    a = p["angle"]
    k = s * p.get("scale", 1.0)  # the case's own anatomy: its structures' size
    if label == "ear-right":
        r = k * 0.28
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(196, 188, 178))
        hx, hy = cx + r * 0.8 * np.cos(np.radians(55 + a)), cy - r * 0.8 * np.sin(np.radians(55 + a))
        d.line([cx, cy, hx, hy], fill=(245, 235, 205), width=max(2, s // 28))
        d.polygon([(cx, cy + 2), (cx + r * 0.55, cy + r * 0.6), (cx + r * 0.25, cy + r * 0.75)], fill=(250, 250, 240))
    elif label == "nose-right":
        sx = cx - k * 0.22
        d.polygon([(sx - k * 0.05, 0), (sx + k * 0.07, 0), (sx + k * 0.11 + a / 4, s), (sx - k * 0.02, s)], fill=(222, 150, 150))
        d.ellipse([cx + k * 0.02, cy - k * 0.18, cx + k * 0.42, cy + k * 0.30], fill=(190, 95, 95))
        d.ellipse([cx - k * 0.08, cy - k * 0.05, cx + k * 0.06, cy + k * 0.35], fill=(40, 15, 15))
    elif label in ("vc-open", "vc-closed"):
        spread = (0.24 if label == "vc-open" else 0.025) * s
        top, bot = (cx, cy - k * 0.3), cy + k * 0.3
        d.polygon([top, (cx - spread, bot), (cx + spread, bot)], fill=(25, 10, 10))
        for side in (-1, 1):
            d.line([top, (cx + side * (spread + k * 0.04), bot)], fill=(240, 235, 225), width=max(3, s // 16))
    elif label == "throat":
        r = k * 0.34
        d.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=(70, 20, 25))
        d.ellipse([cx - k * 0.05, cy - r * 0.55, cx + k * 0.05, cy - r * 0.1], fill=(215, 120, 120))
    _vessels(d, p, s, cx, cy)  # over the structures too: a drum, a fold or a cord shows its own vessels
    for f in p["findings"]:
        fx, fy = s * f["x"], s * f["y"]
        if f["kind"] == "erythema":
            over = Image.new("RGB", im.size, (235, 25, 25))
            mask = Image.new("L", im.size, 0)
            ImageDraw.Draw(mask).ellipse([fx - s * 0.3, fy - s * 0.3, fx + s * 0.3, fy + s * 0.3], fill=150)
            im = Image.composite(over, im, mask.filter(ImageFilter.GaussianBlur(s / 16)))
            d = ImageDraw.Draw(im)
        elif f["kind"] == "polyp":
            r = s * 0.09
            d.ellipse([fx - r, fy - r, fx + r, fy + r * 1.3], fill=(235, 215, 160), outline=(180, 150, 110))
        elif f["kind"] == "discharge":  # the case's own drops, in every shot of it
            drops = np.random.default_rng(p["anatomy"] + 2) if "anatomy" in p else rng
            for _ in range(6):
                ox, oy = drops.normal(0, s * 0.07, 2)
                r = s * 0.025
                d.ellipse([fx + ox - r, fy + oy - r, fx + ox + r, fy + oy + r], fill=(252, 252, 250))
        elif f["kind"] == "clot":
            r = s * 0.07
            d.ellipse([fx - r, fy - r * 0.8, fx + r, fy + r * 0.8], fill=(70, 0, 5))
    arr = np.asarray(im).astype(np.float32) * p["gain"] * _folds(p, xx, yy)[..., None]
    fov = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) <= 0.47 ** 2  # circular field of view on black
    arr[~fov] = 0
    return arr.clip(0, 255).astype(np.uint8)


def _folds(p: dict, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """The case's own mucosal folds and lighting: soft brighter and darker patches, fixed for the case and
    moving with the view (1 everywhere for a case without an `anatomy` seed)."""
    if "anatomy" not in p:
        return np.ones_like(xx)
    rng = np.random.default_rng(p["anatomy"] + 1)
    out = np.ones_like(xx)
    for _ in range(int(rng.integers(6, 10))):
        (u, v), r, amp = rng.uniform(-0.4, 0.4, 2), rng.uniform(0.04, 0.1), rng.choice([-1, 1]) * rng.uniform(0.15, 0.3)
        out += amp * np.exp(-((xx - 0.5 - p["dx"] - u) ** 2 + (yy - 0.5 - p["dy"] - v) ** 2) / (2 * r * r))
    return out


def _vessels(d: ImageDraw.ImageDraw, p: dict, s: int, cx: float, cy: float) -> None:
    """The case's own vessel pattern on the mucosa, fixed for the case (its `anatomy` seed) and moving with
    the view: what tells two patients' frames of one site apart, as it does in real endoscopy."""
    if "anatomy" not in p:
        return
    rng = np.random.default_rng(p["anatomy"])
    colour = tuple(int(v * 0.8) for v in p["tone"])
    for _ in range(int(rng.integers(3, 6))):
        pts = [(cx + s * u, cy + s * v) for u, v in rng.uniform(-0.45, 0.45, (3, 2))]
        d.line(pts, fill=colour, width=max(1, s // 45), joint="curve")


def _case(rng: np.random.Generator, label: str) -> dict:
    n = rng.choice([0, 1, 1, 2])
    kinds = rng.choice(list(FINDINGS), size=n, replace=False)
    return {
        "label": label,
        "seed": int(rng.integers(1 << 31)),
        "tone": [float(v) for v in rng.normal([200, 110, 105], [12, 10, 10])],
        "dx": float(rng.uniform(-0.05, 0.05)), "dy": float(rng.uniform(-0.05, 0.05)),
        "angle": float(rng.uniform(-10, 10)), "gain": float(rng.uniform(0.85, 1.1)),
        "anatomy": int(rng.integers(1 << 31)), "scale": float(rng.uniform(0.85, 1.15)),
        "findings": [{"kind": str(k), "x": float(rng.uniform(0.3, 0.7)), "y": float(rng.uniform(0.3, 0.7))}
                     for k in kinds],
    }


def _view(rng: np.random.Generator, case: dict) -> dict:
    """A second rendering of the same case: the same findings, a slightly different shot."""
    v = json.loads(json.dumps(case))
    v["seed"] = int(rng.integers(1 << 31))
    v["dx"] += float(rng.uniform(-0.02, 0.02))
    v["dy"] += float(rng.uniform(-0.02, 0.02))
    v["gain"] *= float(rng.uniform(0.95, 1.05))
    return v


def _uuid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4)) + ".png"


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")


def _cases(rng, n: int) -> list[dict]:
    weights = np.array([325, 290, 156, 133, 159, 147, 81], dtype=float)  # the real release's class mix
    labels = rng.choice(ENTREP_CLASSES, size=n, p=weights / weights.sum())
    return [_case(rng, str(lab)) for lab in labels]


def make_demo(out: str | Path, seed: int = 0, size: int = 80, cases: int = 220, test_cases: int = 60,
              public_cases: int = 50) -> Path:
    out = Path(out)
    rng = np.random.default_rng(seed)

    # training layout: a third of the cases come as i2i pairs, a few as chains a->b->c
    cls, i2i, t2i = {}, {}, {}
    for j, case in enumerate(_cases(rng, cases)):
        n_views = 1 + (j % 3 == 0) + (j % 15 == 0)
        names = [_uuid(rng) for _ in range(n_views)]
        for v, name in enumerate(names):
            _save(render(case["label"], case if v == 0 else _view(rng, case), size), out / "train/imgs" / name)
        cls[names[0]] = case["label"]
        if j % 23 != 6:  # otherwise the partners stay unlabelled, as 68 images of the real release do
            cls.update({n: case["label"] for n in names[1:]})
        for a, b in zip(names, names[1:]):
            i2i[a] = b
            if n_views == 2:
                i2i[b] = a
        for f in case["findings"]:
            t2i.setdefault(caption(case["label"], f["kind"])[0], names[0])
    atomic_write_json(out / "train/cls.json", cls)
    atomic_write_json(out / "train/i2i.json", i2i)
    atomic_write_json(out / "train/t2i.json", t2i)

    # public-sample layout: records with captions; Path says `_imageNN`, the file is `_ImageNN`
    records = []
    for j, case in enumerate(_cases(rng, public_cases)):
        stem = f"{17000000 + j}_{231004112419923831 + j}_{j}"
        _save(render(case["label"], case, size), out / "public/images" / f"{stem}_Image{j % 100:02d}.png")
        caps = [caption(case["label"], f["kind"]) for f in case["findings"]]
        records.append({"Path": f"{stem}_image{j % 100:02d}.png", "Classification": case["label"],
                        "Type": "abnormal" if caps else "",
                        "Description": "\r\n".join(c[1] for c in caps),
                        "DescriptionEN": "\r\n".join(c[0] for c in caps)})
    atomic_write_json(out / "public/data.json", records)

    _test_layout(out, rng, size, test_cases)
    return out


def _test_layout(out: Path, rng, size: int, test_cases: int) -> None:
    """OUT_DIR/test (images and header-less query lists) and OUT_DIR/truth."""
    truth_cls, truth_i2i, carriers, i2i_queries = {}, {}, {}, []
    for j, case in enumerate(_cases(rng, test_cases)):
        names = [_uuid(rng) for _ in range(1 + (j % 3 == 0))]
        for v, name in enumerate(names):
            _save(render(case["label"], case if v == 0 else _view(rng, case), size), out / "test/imgs" / name)
            truth_cls[name] = ENTREP_CLASSES.index(case["label"])
            for f in case["findings"]:
                carriers.setdefault(caption(case["label"], f["kind"])[0], []).append(name)
        if len(names) == 2:
            truth_i2i[names[0]], truth_i2i[names[1]] = [names[1]], [names[0]]
            i2i_queries += names
    atomic_write_text(out / "test/cls.csv", "\n".join(truth_cls) + "\n")
    atomic_write_text(out / "test/i2i.csv", "\n".join(i2i_queries) + "\n")
    captions = sorted(carriers)
    atomic_write_text(out / "test/t2i.csv", "\n".join(captions) + "\n")
    atomic_write_json(out / "truth/track1_cls.json", truth_cls)
    atomic_write_json(out / "truth/track2_i2i.json", truth_i2i)
    # one target per caption, as the challenge scores Track 3 (a caption of k carriers: one of them, drawn);
    # every carrier beside it, for the easier any-carrier figure
    atomic_write_json(out / "truth/track3_t2i.json", {c: carriers[c][int(rng.integers(len(carriers[c])))]
                                                      for c in captions})
    # in a folder of its own: `entrep.score --truth truth/` takes one truth file per track
    atomic_write_json(out / "truth/any_carrier/track3_t2i.json", {c: carriers[c] for c in captions})
