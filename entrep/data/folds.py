"""Stratified, grouped folds: images that are alike land in one fold.

Alike means linked by i2i annotations (chains included), taken from one patient (public-sample
names are `<patient>_<session>_<n>_imageNN`), or near-duplicate frames found by content
(entrep.data.near_dup: aligned correlation that survives motion; the training set's UUID names
hide the patient, so frames of one exam can only be found by content).
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
from entrep.data.near_dup import THRESHOLD as NEAR_DUP_THRESHOLD
from entrep.data.near_dup import file_signatures, near_duplicate_pairs  # noqa: F401  (the fold code's API)
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


PATIENT = re.compile(r"^(\d+)_\d+_\d+_image\d+\.\w+$", re.IGNORECASE)


def patient_id(name: str) -> str | None:
    """The patient (exam) id of a public-sample name, None for the training set's UUID names."""
    m = PATIENT.match(name)
    return m.group(1) if m else None


def fold_groups(df: pd.DataFrame, signatures=None, threshold: float = NEAR_DUP_THRESHOLD) -> np.ndarray:
    """Connected components of the union of i2i links, same-patient pairs and near-duplicate pairs
    (`signatures`: entrep.data.near_dup.Signatures of df's images, in order; None = no content pass)."""
    pairs = link_pairs(df)
    first_of: dict[str, int] = {}
    for i, name in enumerate(df["image"]):
        if (pid := patient_id(name)) is not None:
            pairs.append((first_of.setdefault(pid, i), i))
    if signatures is not None:
        pairs += near_duplicate_pairs(signatures, threshold=threshold)
    return components(len(df), pairs)


def make_folds(df: pd.DataFrame, n_splits: int, seed: int, signatures=None,
               near_dup_threshold: float = NEAR_DUP_THRESHOLD) -> pd.DataFrame:
    """`image, label, group, fold_group, fold`. `group` is the i2i component (the contrastive loss's
    positives); `fold_group` adds patients and near-duplicates and is what folds keep together.
    Unlabelled images follow their fold group; lone ones are spread."""
    link = link_groups(df)
    groups = fold_groups(df, signatures, near_dup_threshold)
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


def load_or_make_folds(path: Path, df: pd.DataFrame, n_splits: int, seed: int, signatures=None,
                       near_dup_threshold: float = NEAR_DUP_THRESHOLD, source: str | Path = "") -> pd.DataFrame:
    """The run's folds: its `folds.csv` when it exists (frozen folds); else another run's folds
    (`source`, cv.folds_from: a run directory or a folds.csv), copied in; else made and saved.
    `signatures`: near-duplicate signatures (entrep.data.near_dup), or a function that computes them
    (called only when folds are made), or None for no near-duplicate pass."""
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
    folds = make_folds(df, n_splits, seed, signatures() if callable(signatures) else signatures, near_dup_threshold)
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
