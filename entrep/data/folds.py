"""Stratified, grouped folds: every image of an i2i-linked component lands in one fold."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from entrep.io import atomic_write_csv
from entrep.errors import EntrepError


class FoldError(EntrepError):
    pass


def link_groups(df: pd.DataFrame) -> np.ndarray:
    """Connected components of the i2i links (chains a->b->c included), one id per row."""
    pos = {name: i for i, name in enumerate(df["image"])}
    rows, cols = [], []
    for i, partners in enumerate(df["partners"]):
        for p in partners:
            if p in pos:
                rows.append(i)
                cols.append(pos[p])
    n = len(df)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def make_folds(df: pd.DataFrame, n_splits: int, seed: int) -> pd.DataFrame:
    """`image, label, group, fold`. Unlabelled images follow their component; lone ones are spread."""
    groups = link_groups(df)
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
    return pd.DataFrame({"image": df["image"], "label": df["label"].fillna(""), "group": groups, "fold": fold})


def load_or_make_folds(path: Path, df: pd.DataFrame, n_splits: int, seed: int) -> pd.DataFrame:
    """Reuse `folds.csv` when it exists (frozen folds), else make and save it."""
    if path.is_file():
        folds = pd.read_csv(path, keep_default_na=False)
        if set(folds["image"]) != set(df["image"]):
            extra = sorted(set(df["image"]) - set(folds["image"]))[:3]
            gone = sorted(set(folds["image"]) - set(df["image"]))[:3]
            raise FoldError(f"{path} does not match the data (new: {extra}, gone: {gone}); "
                            f"use a new --name or delete the file to refold")
        if folds["fold"].max() + 1 != n_splits:
            raise FoldError(f"{path} has {folds['fold'].max() + 1} folds but cv.n_splits={n_splits}")
        return folds.set_index("image").loc[df["image"]].reset_index()
    folds = make_folds(df, n_splits, seed)
    atomic_write_csv(path, folds)
    return folds
