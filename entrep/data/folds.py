"""Stratified, grouped folds: images that are alike land in one fold.

Alike means linked by i2i annotations (chains included), taken from one patient (public-sample
names are `<patient>_<session>_<n>_imageNN`), or near-duplicate frames by perceptual hash (the
training set's UUID names hide the patient, so frames of one exam can only be found by content).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from entrep import rundir
from entrep.errors import EntrepError
from entrep.io import atomic_path, atomic_write_csv


class FoldError(EntrepError):
    pass


def components(n: int, pairs) -> np.ndarray:
    """Connected components of n items joined by (i, j, ...) pairs, one id per item."""
    rows, cols = [p[0] for p in pairs], [p[1] for p in pairs]
    return connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)[1]


def link_pairs(df: pd.DataFrame) -> list[tuple[int, int]]:
    pos = {name: i for i, name in enumerate(df["image"])}
    return [(i, pos[p]) for i, partners in enumerate(df["partners"]) for p in partners if p in pos]


def link_groups(df: pd.DataFrame) -> np.ndarray:
    """Connected components of the i2i links (chains a->b->c included), one id per row."""
    return components(len(df), link_pairs(df))


HASH_DECODE = 128  # px: pHash reads a 64x64 grayscale image; one fixed decode size for every model
PATIENT = re.compile(r"^(\d+)_\d+_\d+_image\d+\.\w+$", re.IGNORECASE)
HASH_SIZE = 16  # pHash side: 256 bits (8x8 = 64 bits put unrelated same-class demo frames 2 bits apart)


def patient_id(name: str) -> str | None:
    """The patient (exam) id of a public-sample name, None for the training set's UUID names."""
    m = PATIENT.match(name)
    return m.group(1) if m else None


def perceptual_hashes(pixels) -> np.ndarray:
    """(N, 256) bool pHash (imagehash: DCT of the 64x64 grayscale image, bits above the median) of
    decoded uint8 images. Robust to resizing, re-encoding and mild brightness changes."""
    import imagehash
    from PIL import Image

    return np.stack([imagehash.phash(Image.fromarray(np.asarray(pixels[i])), hash_size=HASH_SIZE).hash.ravel()
                     for i in range(len(pixels))]) if len(pixels) else np.zeros((0, HASH_SIZE ** 2), bool)


def file_hashes(paths: list[str], desc: str = "hashing images") -> np.ndarray:
    """pHash of image files decoded at HASH_DECODE px: the same bits whatever model a run trains, so
    runs with the same data and cv settings get the same folds (and `data check` the same clusters)."""
    from entrep.data.images import decode_all

    return perceptual_hashes(decode_all(paths, HASH_DECODE, desc=desc))


def near_duplicate_pairs(a: np.ndarray, b: np.ndarray | None = None, max_bits: int = 12,
                         block_bytes: int = 64 * 2**20) -> list[tuple[int, int, int]]:
    """(i, j, distance) for hash pairs at most `max_bits` apart; within `a` (i < j) or from `a` to `b`.
    Hamming distances by XOR + popcount of packed bits, in row blocks of bounded memory."""
    within = b is None
    pa = np.packbits(a, axis=1)
    pb = pa if within else np.packbits(b, axis=1)
    rows = max(1, block_bytes // max(1, pb.shape[0] * pb.shape[1]))
    out = []
    for s in range(0, len(pa), rows):
        d = np.bitwise_count(pa[s:s + rows, None, :] ^ pb[None, :, :]).sum(-1, dtype=np.int32)
        i, j = np.nonzero(d <= max_bits)
        i = i + s
        keep = i < j if within else np.ones(len(i), bool)
        out += [(int(x), int(y), int(d[x - s, y])) for x, y in zip(i[keep], j[keep])]
    return out


def fold_groups(df: pd.DataFrame, hashes: np.ndarray | None = None, max_bits: int = 12) -> np.ndarray:
    """Connected components of the union of i2i links, same-patient pairs and near-duplicate pairs."""
    pairs = link_pairs(df)
    first_of: dict[str, int] = {}
    for i, name in enumerate(df["image"]):
        if (pid := patient_id(name)) is not None:
            pairs.append((first_of.setdefault(pid, i), i))
    if hashes is not None and max_bits > 0:
        pairs += near_duplicate_pairs(hashes, max_bits=max_bits)
    return components(len(df), pairs)


def make_folds(df: pd.DataFrame, n_splits: int, seed: int, hashes: np.ndarray | None = None,
               near_dup_bits: int = 12) -> pd.DataFrame:
    """`image, label, group, fold_group, fold`. `group` is the i2i component (the contrastive loss's
    positives); `fold_group` adds patients and near-duplicates and is what folds keep together.
    Unlabelled images follow their fold group; lone ones are spread."""
    link = link_groups(df)
    groups = fold_groups(df, hashes, near_dup_bits)
    labelled = df["y"].to_numpy() >= 0
    counts = df.loc[labelled, "label"].value_counts()
    if len(counts) and counts.min() < n_splits:
        raise FoldError(f"cv.n_splits={n_splits} but class '{counts.idxmin()}' has only {counts.min()} "
                        f"labelled images; lower cv.n_splits to at most {counts.min()}")
    fold = np.full(len(df), -1)
    if labelled.sum():
        skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        idx = np.flatnonzero(labelled)
        for k, (_, val) in enumerate(skf.split(idx, df["y"].to_numpy()[idx], groups[idx])):
            fold[idx[val]] = k
    group_fold = {g: f for g, f in zip(groups, fold) if f >= 0}
    rng = np.random.default_rng(seed)
    lone = sorted({g for g in groups[~labelled] if g not in group_fold})
    for g, f in zip(lone, rng.permutation(len(lone)) % n_splits):
        group_fold[g] = int(f)
    fold = np.array([group_fold[g] for g in groups])
    return pd.DataFrame({"image": df["image"], "label": df["label"].fillna(""), "group": link,
                         "fold_group": groups, "fold": fold, "sha1": df["sha1"]})  # sha1: infer finds leaks


def load_or_make_folds(path: Path, df: pd.DataFrame, n_splits: int, seed: int, hashes=None, near_dup_bits: int = 12,
                       source: str | Path = "") -> pd.DataFrame:
    """The run's folds: its `folds.csv` when it exists (frozen folds); else another run's folds
    (`source`, cv.folds_from: a run directory or a folds.csv), copied in; else made and saved.
    `hashes`: the pHash array, or a function that computes it (called only when folds are made)."""
    if not path.is_file() and source:
        src = Path(source) / rundir.FOLDS if Path(source).is_dir() else Path(source)
        if not src.is_file():
            raise FoldError(f"cv.folds_from={source}: no folds.csv there (a run directory or a folds.csv file)")
        check_folds(pd.read_csv(src, keep_default_na=False), df, n_splits, src)
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)  # a copy, not a re-serialisation of what pandas read
    if path.is_file():
        folds = pd.read_csv(path, keep_default_na=False)
        check_folds(folds, df, n_splits, path)
        return folds.set_index("image").loc[df["image"]].reset_index()
    folds = make_folds(df, n_splits, seed, hashes() if callable(hashes) else hashes, near_dup_bits)
    atomic_write_csv(path, folds)
    return folds


def check_folds(folds: pd.DataFrame, df: pd.DataFrame, n_splits: int, path: Path) -> None:
    if set(folds["image"]) != set(df["image"]):
        extra = sorted(set(df["image"]) - set(folds["image"]))[:3]
        gone = sorted(set(folds["image"]) - set(df["image"]))[:3]
        raise FoldError(f"{path} does not match the data (new: {extra}, gone: {gone}); "
                        f"use a new --name or delete the file to refold")
    if folds["fold"].max() + 1 != n_splits:
        raise FoldError(f"{path} has {folds['fold'].max() + 1} folds but cv.n_splits={n_splits}")
