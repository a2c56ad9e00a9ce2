"""Stratified, grouped folds: images that are alike land in one fold.

Alike means linked by i2i annotations (chains included), taken from one patient (public-sample
names are `<patient>_<session>_<n>_imageNN`), or near-duplicate frames found by content
(entrep.data.near_dup: aligned correlation that survives motion; the training set's UUID names
hide the patient, so frames of one exam can only be found by content).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from entrep import rundir
from entrep.data.near_dup import THRESHOLD as NEAR_DUP_THRESHOLD
from entrep.data.near_dup import file_signatures, joined_pairs  # noqa: F401  (the fold code's API)
from entrep.errors import EntrepError
from entrep.io import atomic_path, atomic_write_csv


log = logging.getLogger(__name__)

GROUP_CAP, GROUP_SHARE = 20, 0.02  # the largest near-duplicate group: max(20 images, 2% of the release)
UNJOINED = 4.0  # the dissimilarity of a pair the pass did not join, in the average linkage
STRICTER = (0.5, 0.25, 0.1, 0.02)  # cut heights tried in turn on a group over the cap or across classes; the
# last keeps only what is the same pixels re-exposed or re-encoded (a copy moved by 6% measures 0.04-0.05)


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


def group_cap(n: int) -> int:
    return max(GROUP_CAP, int(GROUP_SHARE * n))


def near_duplicate_groups(signatures, y: np.ndarray, threshold: float = NEAR_DUP_THRESHOLD) -> tuple[np.ndarray, int]:
    """(one group id per image, how many groups a stricter cut split) of near-duplicate frames.

    Pairs come from entrep.data.near_dup (`joined_pairs`: aligned correlation and the relative
    test). Groups are the average linkage of the pairs' dissimilarities (an unjoined pair counts
    UNJOINED), cut at 1, the join limit: a chain A~B~...~Z whose ends are not alike stays apart,
    where connected components (single linkage) merged it whole. A group over `group_cap` or holding
    two labelled classes (y >= 0) is cut again at each STRICTER height; one that still spans classes
    is the same pixels under two labels and is kept (counted by `grouping_shape`); one still over
    the cap is refused."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(y)
    pairs, _, dist = joined_pairs(signatures, threshold=threshold)
    comp = components(n, pairs)
    out = np.arange(n)
    cap, split = group_cap(n), 0
    by_comp: dict[int, list[int]] = {}
    for k, c in enumerate(comp[pairs[:, 0]]):
        by_comp.setdefault(int(c), []).append(k)
    for edges in by_comp.values():
        members = np.unique(pairs[edges])
        pos = np.searchsorted(members, pairs[edges])
        m = np.full((len(members),) * 2, UNJOINED)
        np.fill_diagonal(m, 0.0)
        m[pos[:, 0], pos[:, 1]] = m[pos[:, 1], pos[:, 0]] = dist[edges]
        tree = linkage(squareform(m, checks=False), "average")
        cut = fcluster(tree, 1.0, "distance")
        for height in STRICTER:
            bad = [c for c in np.unique(cut) if (cut == c).sum() > cap or _classes(y[members[cut == c]]) > 1]
            if not bad:
                break
            split += len(bad) if height == STRICTER[0] else 0  # groups, not cuts
            strict = fcluster(tree, height, "distance")
            for c in bad:  # only the bad groups take the stricter cut
                cut[cut == c] = cut.max() + 1 + strict[cut == c]
        if (big := np.bincount(cut).max()) > cap:
            raise FoldError(f"near-duplicate grouping: {big} images stay one group of alike frames even at the "
                            f"strictest cut, over the cap of {cap} (max({GROUP_CAP}, {GROUP_SHARE:.0%} of the "
                            f"{n} images)); raise cv.near_dup_threshold (now {threshold}) or set cv.near_dup=false")
        _, first, cut = np.unique(cut, return_index=True, return_inverse=True)
        out[members] = members[first[cut]]  # each image points at its group's first member
    if split:
        log.warning("near-duplicate grouping: %d groups over the cap of %d images or across classes were split by "
                    "a stricter cut (cv.near_dup_threshold=%s)", split, cap, threshold)
    return out, split


def _classes(y: np.ndarray) -> int:
    return len(set(y[y >= 0].tolist()))


def fold_groups(df: pd.DataFrame, signatures=None, threshold: float = NEAR_DUP_THRESHOLD,
                near: np.ndarray | None = None) -> np.ndarray:
    """Connected components of the union of i2i links, same-patient pairs and near-duplicate groups
    (`signatures`: entrep.data.near_dup.Signatures of df's images, in order; `near`: their group ids,
    already made; neither = no content pass)."""
    pairs = link_pairs(df)
    first_of: dict[str, int] = {}
    for i, name in enumerate(df["image"]):
        if (pid := patient_id(name)) is not None:
            pairs.append((first_of.setdefault(pid, i), i))
    if near is None and signatures is not None:
        near, _ = near_duplicate_groups(signatures, df["y"].to_numpy(), threshold)
    if near is not None:
        pairs += [(int(g), i) for i, g in enumerate(near) if g != i]
    return components(len(df), pairs)


def cached_near_groups(df: pd.DataFrame, signatures, threshold: float, cache_dir: Path | None) -> np.ndarray:
    """`near_duplicate_groups`' ids of df's images, kept in `cache_dir` (beside the image cache) under a key
    of the images' content and labels, the threshold and the pass's code (near_dup.py and this file,
    constants included): the next call on
    the same release (another fold's process, a resume, a second run) does not redo the pass.
    `signatures`: the Signatures, or a function that computes them (called on a miss only)."""
    from entrep.data import near_dup

    code = hashlib.sha1(Path(near_dup.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()  # the pass
    key = hashlib.sha1(json.dumps([list(df["sha1"]), df["y"].tolist(), float(threshold), code]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"near-dup-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.shape == (len(df),):
                return ids
        except (OSError, ValueError):  # a torn or foreign file: made again
            pass
    ids, _ = near_duplicate_groups(signatures() if callable(signatures) else signatures, df["y"].to_numpy(), threshold)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
    return ids


def grouping_shape(folds: pd.DataFrame) -> dict:
    """What the folds were built from: groups of two or more alike images (i2i links, patients,
    near-duplicates), the images in them, the largest, and those holding two labelled classes."""
    sizes = folds["fold_group"].value_counts()
    multi = sizes[sizes > 1]
    labelled = folds[folds["label"] != ""]
    spanning = labelled.groupby("fold_group")["label"].nunique()
    return {"images_per_fold": folds["fold"].value_counts().sort_index().tolist(), "groups": int(len(multi)),
            "images_grouped": int(multi.sum()), "images": int(len(folds)),
            "largest_group": int(sizes.max()) if len(sizes) else 0, "cap": group_cap(len(folds)),
            "groups_spanning_classes": int((spanning > 1).sum())}


def describe_shape(shape: dict) -> str:
    return (f"folds of {'/'.join(map(str, shape['images_per_fold']))} images; {shape['groups']} groups of alike "
            f"images hold {shape['images_grouped']} of {shape['images']}; largest {shape['largest_group']} "
            f"(near-duplicate cap {shape['cap']}); {shape['groups_spanning_classes']} span two classes")


def make_folds(df: pd.DataFrame, n_splits: int, seed: int, signatures=None,
               near_dup_threshold: float = NEAR_DUP_THRESHOLD, groups: np.ndarray | None = None) -> pd.DataFrame:
    """`image, label, group, fold_group, fold`. `group` is the i2i component (the contrastive loss's
    positives); `fold_group` adds patients and near-duplicates and is what folds keep together
    (`groups`: those, when already computed). Unlabelled images follow their fold group; lone ones are
    spread. A class with fewer groups than folds leaves some folds without it: `missing_classes` says
    which."""
    groups = fold_groups(df, signatures, near_dup_threshold) if groups is None else groups
    labelled = df["y"].to_numpy() >= 0
    n_groups = len(set(groups[labelled]))
    if n_groups < n_splits:
        fix = (f"lower cv.n_splits to {n_groups} or fewer" if n_groups >= 2 else
               "there is nothing to cross-validate")
        fix += ("; where near-duplicates joined them (python -m entrep.data check shows the groups), raise "
                "cv.near_dup_threshold or set cv.near_dup=false")
        raise FoldError(f"cv.n_splits={n_splits} but the {int(labelled.sum())} labelled images form only {n_groups} "
                        f"groups of alike images (i2i links, patients, near-duplicates), and a group never spans "
                        f"two folds; {fix}")
    largest = int(df["y"][labelled].value_counts().max()) if labelled.any() else 0
    if 0 < largest < n_splits:  # StratifiedGroupKFold's own check, said in the kit's terms
        raise FoldError(f"cv.n_splits={n_splits} but the largest class has only {largest} labelled images; "
                        f"lower cv.n_splits to {largest} or fewer")
    fold = np.full(len(df), -1)
    if labelled.sum():
        skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        idx = np.flatnonzero(labelled)
        with warnings.catch_warnings():  # a class with fewer members than folds: missing_classes names it
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            for k, (_, val) in enumerate(skf.split(idx, df["y"].to_numpy()[idx], groups[idx])):
                fold[idx[val]] = k
    group_fold = {g: f for g, f in zip(groups, fold) if f >= 0}
    rng = np.random.default_rng(seed)
    lone = sorted({g for g in groups[~labelled] if g not in group_fold})
    for g, f in zip(lone, rng.permutation(len(lone)) % n_splits):
        group_fold[g] = int(f)
    fold = np.array([group_fold[g] for g in groups])
    return pd.DataFrame({"image": df["image"], "label": df["label"].fillna(""), "group": link_groups(df),
                         "fold_group": groups, "fold": fold, "sha1": df["sha1"]})  # sha1: infer finds leaks


def missing_classes(folds: pd.DataFrame, n_splits: int) -> dict[str, list[int]]:
    """class -> the folds whose held-out images hold none of it (a class with fewer groups than folds):
    those folds' models are scored without it, and its images there train no model that is scored on it."""
    labelled = folds[folds["label"] != ""]
    have = labelled.groupby("label")["fold"].apply(set)
    return {c: sorted(set(range(n_splits)) - f) for c, f in have.items() if len(f) < n_splits}


def load_or_make_folds(path: Path, df: pd.DataFrame, n_splits: int, seed: int, signatures=None,
                       near_dup_threshold: float = NEAR_DUP_THRESHOLD, source: str | Path = "",
                       cache_dir: Path | None = None) -> pd.DataFrame:
    """The run's folds: its `folds.csv` when it exists (frozen folds); else another run's folds
    (`source`, cv.folds_from: a run directory or a folds.csv), copied in; else made and saved.
    A frozen or copied file is checked against today's grouping (a file that splits a group is refused),
    and its `group` and `fold_group` columns are recomputed from today's data, never read from the file.
    `signatures`: near-duplicate signatures (entrep.data.near_dup), or a function that computes them,
    or None for no near-duplicate pass; `cache_dir`: where its groups are kept (`cached_near_groups`)."""
    near = cached_near_groups(df, signatures, near_dup_threshold, cache_dir) if signatures is not None else None
    groups = fold_groups(df, None, near_dup_threshold, near=near)
    if not path.is_file() and source:
        src = Path(source) / rundir.FOLDS if Path(source).is_dir() else Path(source)
        if not src.is_file():
            raise FoldError(f"cv.folds_from={source}: no folds.csv there (a run directory or a folds.csv file)")
        check_folds(read_folds(src), df, n_splits, src, groups)
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)  # a copy, not a re-serialisation of what pandas read
    if path.is_file():
        folds = read_folds(path)
        check_folds(folds, df, n_splits, path, groups)
        fold_of = dict(zip(folds["image"], folds["fold"]))
        return pd.DataFrame({"image": df["image"], "label": df["label"].fillna(""), "group": link_groups(df),
                             "fold_group": groups, "fold": [int(fold_of[n]) for n in df["image"]],
                             "sha1": df["sha1"]})
    folds = make_folds(df, n_splits, seed, groups=groups)
    atomic_write_csv(path, folds)
    return folds


FOLD_INTS = ("fold", "group", "fold_group")  # integer columns (group and fold_group: when present)


def read_folds(path: Path) -> pd.DataFrame:
    """A folds.csv (the run's, another run's for cv.folds_from, a blend member's) with the columns and
    types the kit reads: image (unique names) and fold (integers); group and fold_group, when present,
    integers too. A hand edit that breaks any of it is one line naming the file, never an image read
    twice or a fold number read as text."""
    fix = "delete it to refold (a new --name keeps the old run), or restore the file"
    try:
        folds = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise FoldError(f"{path}: not a folds table ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"{fix}") from None
    if missing := [c for c in ("image", "fold") if c not in folds.columns]:
        raise FoldError(f"{path}: no column {missing} (columns: {list(folds.columns)[:8]}); {fix}")
    if (folds["image"].str.strip() == "").any():
        raise FoldError(f"{path}: row {int((folds['image'].str.strip() == '').to_numpy().argmax()) + 2} has no image "
                        f"name; {fix}")
    if folds["image"].duplicated().any():
        raise FoldError(f"{path}: image {folds.loc[folds['image'].duplicated(), 'image'].iloc[0]!r} is listed twice; "
                        f"{fix}")
    for col in (c for c in FOLD_INTS if c in folds.columns):
        values = pd.to_numeric(folds[col].str.strip(), errors="coerce")
        bad = values.isna() | (values != values.round()) | values.abs().gt(2**31)
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise FoldError(f"{path}: {col} of {folds['image'].iloc[i]!r} is {folds[col].iloc[i]!r}, not an integer; "
                            f"{fix}")
        folds[col] = values.astype(np.int64)
    return folds


def check_folds(folds: pd.DataFrame, df: pd.DataFrame, n_splits: int, path: Path, groups: np.ndarray) -> None:
    """A folds file (read_folds) must name exactly the data's images, folds numbered 0..n_splits-1 and
    none empty, and keep every group of alike images (today's i2i links, patients and
    near-duplicates) in one fold."""
    if set(folds["image"]) != set(df["image"]):
        extra = sorted(set(df["image"]) - set(folds["image"]))[:3]
        gone = sorted(set(folds["image"]) - set(df["image"]))[:3]
        raise FoldError(f"{path} does not match the data (new: {extra}, gone: {gone}); "
                        f"use a new --name or delete the file to refold")
    found = set(folds["fold"].tolist())
    if found != set(range(n_splits)):
        raise FoldError(f"{path} has {len(found)} folds but cv.n_splits={n_splits} (fold numbers {sorted(found)[:10]}; "
                        f"wanted 0..{n_splits - 1}, each holding images); use a new --name or delete the file to refold")
    fold_of = dict(zip(folds["image"], folds["fold"]))
    first: dict[int, str] = {}
    for name, g in zip(df["image"], groups):
        other = first.setdefault(int(g), name)
        if fold_of[other] != fold_of[name]:
            raise FoldError(f"{path} splits a group of alike images across folds: {other} (fold {fold_of[other]}) and "
                            f"{name} (fold {fold_of[name]}) are linked (i2i, patient or near-duplicate), so one fold's "
                            f"model would train on what scores it; refold under a new --name (folds are made from "
                            f"the current grouping) or take cv.folds_from from a run made on this data")
