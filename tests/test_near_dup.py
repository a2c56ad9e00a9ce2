"""Near-duplicates that moved: shifted, rotated, rescaled and re-exposed frames share a fold."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from entrep.data import near_dup
from entrep.data.folds import fold_groups, make_folds
from entrep.data.release import load_release
from entrep.labels import ENTREP_CLASSES

W, H = 200, 150  # small 4:3 frames, like the release's 640x480


def _scene(seed: int, side: int = 400) -> Image.Image:
    """A large smooth random texture with a few blobs: what an endoscope looks at, in one tint."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = sum(gaussian_filter(rng.normal(0, 1, (side, side)), s) * s for s in (4, 10, 25))
    base = (base - base.min()) / np.ptp(base)
    tint = np.array([0.95, 0.5, 0.45]) + rng.uniform(-0.04, 0.04, 3)
    im = Image.fromarray((40 + 200 * base[..., None] * tint).clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y, r = *rng.uniform(60, side - 60, 2), rng.uniform(8, 20)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(150, 255, 3)))
    return im


def _frame(scene: Image.Image, dx: float = 0.0, dy: float = 0.0, angle: float = 0.0, zoom: float = 1.0,
           gain: float = 1.0) -> np.ndarray:
    """A W x H frame of the scene's centre moved by (dx, dy) of the frame's width, rotated, zoomed
    and re-exposed, inside a circular field of view on black (the circle stays where it is)."""
    c = scene.width / 2
    a = np.radians(angle)
    z = 1.6 / zoom  # scene px per frame px
    ca, sa = np.cos(a) * z, np.sin(a) * z
    cx, cy = c + dx * W * 1.6, c + dy * W * 1.6
    coeffs = (ca, -sa, cx - ca * W / 2 + sa * H / 2, sa, ca, cy - sa * W / 2 - ca * H / 2)
    img = np.asarray(scene.transform((W, H), Image.AFFINE, coeffs, Image.BICUBIC)).astype(np.float32) * gain
    yy, xx = np.mgrid[0:H, 0:W]
    img[(xx - W / 2) ** 2 + (yy - H / 2) ** 2 > (0.52 * H) ** 2] = 0
    return img.clip(0, 255).astype(np.uint8)


COPIES = {"shift3": dict(dx=0.03), "shift6": dict(dx=-0.04, dy=0.045), "rot4": dict(angle=4.0),
          "zoom10": dict(zoom=1.1, gain=1.12)}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """12 unrelated frames of 3 classes (a fourth of them in one class), and 4 moved copies."""
    root = tmp_path_factory.mktemp("nd")
    (root / "imgs").mkdir()
    cls = {}
    for k in range(12):
        name = f"orig{k:02d}.png"
        Image.fromarray(_frame(_scene(k))).save(root / "imgs" / name)
        cls[name] = ENTREP_CLASSES[k % 3]
    for k, (tag, kw) in enumerate(COPIES.items()):
        Image.fromarray(_frame(_scene(k), **kw)).save(root / "imgs" / f"copy-{tag}.png")
        cls[f"copy-{tag}.png"] = cls[f"orig{k:02d}.png"]
    (root / "cls.json").write_text(json.dumps(cls))
    return root


def test_moved_copies_share_a_fold_with_their_source_and_unrelated_frames_do_not(release):
    df = load_release(release, ENTREP_CLASSES)[0]
    sig = near_dup.file_signatures(df["path"].tolist())
    folds = make_folds(df, 3, seed=0, signatures=sig).set_index("image")
    for k, tag in enumerate(COPIES):
        assert folds.loc[f"copy-{tag}.png", "fold_group"] == folds.loc[f"orig{k:02d}.png", "fold_group"], tag
        assert folds.loc[f"copy-{tag}.png", "fold"] == folds.loc[f"orig{k:02d}.png", "fold"], tag
    originals = folds[folds.index.str.startswith("orig")]
    assert originals["fold_group"].nunique() == 12  # no two unrelated frames joined
    assert (make_folds(df, 3, seed=0)["fold_group"].nunique()) == len(df)  # no signatures: no content pass


def test_pairs_and_scores_are_deterministic(release):
    paths = sorted(str(p) for p in (release / "imgs").glob("*.png"))
    a, b = near_dup.file_signatures(paths), near_dup.file_signatures(paths)
    for f in near_dup.Signatures.__dataclass_fields__:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    pa, pb = near_dup.near_duplicate_pairs(a), near_dup.near_duplicate_pairs(b)
    assert pa == pb and len(pa) == len(COPIES)
    assert all(0.8 <= s <= 1 for _, _, s in pa)


def test_the_shared_black_circle_is_masked_out_not_matched():
    """Every endoscopy frame has the same circle on black: two unrelated frames must not correlate
    through it, and a caption on the black must not count as field of view."""
    frames = [_frame(_scene(k)) for k in (20, 21)]
    flat = np.zeros((H, W, 3), np.uint8)
    flat[...] = (150, 80, 70)
    yy, xx = np.mgrid[0:H, 0:W]
    flat[(xx - W / 2) ** 2 + (yy - H / 2) ** 2 > (0.52 * H) ** 2] = 0
    captioned = frames[0].copy()
    captioned[3:10, 3:40] = 255  # a caption in the black corner
    flat2 = (flat * 0.7).astype(np.uint8)
    sig = near_dup.signatures(frames + [flat, flat2, captioned])
    fov = near_dup.field_of_view(np.stack([near_dup.letterbox(Image.fromarray(f)) for f in frames + [captioned]]))
    assert not fov[:, :8, :8].any() and fov[:, 24:40, 24:40].all()  # black corners out, the centre in
    assert (fov[0] == fov[2]).all()  # the caption is not field of view
    score = near_dup.pair_scores(sig, None, [(0, 1), (2, 3), (0, 4)])[0]
    assert score[0] < 0.6  # unrelated frames inside one circle
    assert score[1] == 0 and not sig.valid[2:4].any()  # textureless frames: the circle alone joins nothing
    assert score[2] > 0.99  # the captioned copy is the same frame
    assert near_dup.near_duplicate_pairs(sig) == [(0, 4, pytest.approx(score[2], abs=1e-4))]


def test_folds_do_not_depend_on_how_the_model_decodes(release):
    """Signatures decode at one fixed size, whatever the model's input size."""
    paths = sorted(str(p) for p in (release / "imgs").glob("*.png"))
    frames = near_dup.decode_frames(paths)
    assert frames.shape == (len(paths), near_dup.DECODE, near_dup.DECODE, 3)
    df = load_release(release, ENTREP_CLASSES)[0]
    groups = pd.Series(fold_groups(df, near_dup.file_signatures(df["path"].tolist())), index=df["image"])
    assert groups.nunique() == 12


def test_between_two_sets_and_empty_sets(release):
    paths = sorted(str(p) for p in (release / "imgs").glob("orig*.png"))
    train = near_dup.file_signatures(paths)
    test = near_dup.signatures([_frame(_scene(3), dx=0.05), _frame(_scene(99))])
    pairs = near_dup.near_duplicate_pairs(test, train)
    assert [(i, j) for i, j, _ in pairs] == [(0, 3)]
    empty = near_dup.signatures([])
    assert len(empty) == 0 and near_dup.near_duplicate_pairs(empty) == []
    assert near_dup.near_duplicate_pairs(empty, train) == [] and near_dup.near_duplicate_pairs(train, empty) == []


def test_old_runs_config_with_near_dup_bits_still_loads(tmp_path):
    from entrep.config import load_config

    (tmp_path / "config.yaml").write_text("cv:\n  n_splits: 3\n  near_dup_bits: 12\n")
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.cv.n_splits == 3 and cfg.cv.near_dup and cfg.cv.near_dup_threshold == near_dup.THRESHOLD
