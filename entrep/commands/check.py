"""python -m entrep.data check DIR [--config C.yaml] [--test TEST_DIR]

Reports what a release folder holds and what is wrong with it, as tables. Exits 1 only where
training could not proceed (no labelled image, or a file the readers reject); 0 otherwise.
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from rich.console import Console
from rich.table import Table

from entrep.config import load_config
from entrep.data.folds import (FoldError, describe_shape, fold_groups, grouping_shape, make_folds, missing_classes,
                                near_duplicate_groups)
from entrep.data.near_dup import file_signatures, near_duplicate_pairs
from entrep.data.release import DataError, file_sha1, load_release, load_test


def _examples(items, n=3) -> str:
    return "; ".join(" | ".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in items[:n])


def near_duplicates(table, ts, threshold: float, sig, ids) -> tuple[list[list[str]], list[tuple[str, str, float]]]:
    """(near-duplicate groups within the training data, (test image, training image, score) leaks):
    `ids` the group of each training image (entrep.data.folds.near_duplicate_groups, the pass that
    groups folds; `sig`: the training images' signatures). Byte-identical copies are already merged by
    the reader."""
    members: dict[int, list[str]] = {}
    for i, g in enumerate(ids):
        members.setdefault(int(g), []).append(table["image"].iloc[i])
    members = {g: m for g, m in members.items() if len(m) > 1}
    leaks = []
    if ts is not None and ts.images:
        names = sorted(ts.images)
        st = file_signatures([str(ts.images[x]) for x in names], desc="test image signatures")
        best: dict[int, tuple[int, float]] = {}
        for i, j, score in near_duplicate_pairs(st, sig, threshold=threshold):
            if i not in best or score > best[i][1]:
                best[i] = (j, score)
        leaks = [(names[i], table["image"].iloc[j], d) for i, (j, d) in sorted(best.items())]
    return sorted(members.values(), key=len, reverse=True), leaks


def check(root: str, names, test_dir: str | None, console: Console, near_dup_threshold: float | None = 0.8,
          n_splits: int = 5, seed: int = 42) -> int:
    """near_dup_threshold: cv.near_dup_threshold, or None for no near-duplicate pass (cv.near_dup=false);
    n_splits, seed: the folds train.py would make (cv.n_splits, cv.seed)."""
    try:
        table, rep = load_release(root, names, check_images=True)
        ts = load_test(test_dir) if test_dir else None
    except DataError as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    console.print(_counts(root, table, names))
    sig = file_signatures(table["path"].tolist()) if near_dup_threshold else None
    ids, refused = np.arange(len(table)), None  # the pass once: the groups listed and the folds made from them
    if sig is not None:
        try:
            ids, _ = near_duplicate_groups(sig, table["y"].to_numpy(), near_dup_threshold)
        except FoldError as e:  # over the cap: the fold finding says so
            refused = str(e)
    clusters, leaks = near_duplicates(table, ts, near_dup_threshold, sig, ids) if near_dup_threshold else ([], [])
    rows = _findings(table, rep)
    rows += _fold_coverage(table, None if refused else fold_groups(table, near=ids if sig is not None else None),
                           refused, n_splits, seed)
    rows.append((f"near-duplicate groups (aligned correlation >= {near_dup_threshold} and the relative test; "
                 f"one fold each)"
                 if near_dup_threshold else "near-duplicate clusters (cv.near_dup=false: not searched)",
                 f"{len(clusters)} ({sum(map(len, clusters))} images)",
                 _examples([" ~ ".join(c[:3]) + (f" (+{len(c) - 3} more)" if len(c) > 3 else "") for c in clusters])))
    if ts is not None:
        rows += _test_findings(table, ts, leaks)
    issues = Table(title="findings")
    for col in ("finding", "count", "examples"):
        issues.add_column(col, overflow="fold")
    for r in rows:
        issues.add_row(r[0], str(r[1]), r[2])
    console.print(issues)
    if clusters:
        t = Table(title="near-duplicate clusters in the training data (each kept in one fold)")
        for col in ("size", "images"):
            t.add_column(col, overflow="fold")
        for c in clusters:
            t.add_row(str(len(c)), ", ".join(c))
        console.print(t)
    if leaks:
        t = Table(title="test images that are near-duplicates of a training image (train/test leak)")
        for col in ("test image", "training image", "label", "aligned correlation"):
            t.add_column(col, overflow="fold")
        label_of = dict(zip(table["image"], table["label"]))
        for a, b, d in leaks:
            t.add_row(a, b, str(label_of.get(b) or ""), f"{d:.3f}")
        console.print(t)
    if (table["y"] < 0).all():
        console.print("[red]error:[/red] no labelled image: training cannot proceed")
        return 1
    return 0


def _fold_coverage(table, groups, refused: str | None, n_splits: int, seed: int) -> list[tuple]:
    """Whether the folds train.py would make (cv settings; `groups`: fold_groups, or `refused`: why the
    near-duplicate grouping refused) can be made, which lack a class, and the grouping's shape."""
    what = f"classes missing from some of the {n_splits} folds (cv.n_splits)"
    if not (table["y"] >= 0).any():
        return [(what, "-", "no labelled image")]
    try:
        if refused:
            raise FoldError(refused)
        folds = make_folds(table, n_splits, seed, groups=groups)
    except FoldError as e:
        return [(what, "cannot fold", str(e))]
    lacking = missing_classes(folds, n_splits)
    shape = grouping_shape(folds)
    return [(what, len(lacking), _examples([f"{c}: folds {f}" for c, f in lacking.items()])),
            ("grouping the folds are built from", shape["groups"], describe_shape(shape))]


def _counts(root, table, names) -> Table:
    counts = Table(title=f"{root}: labelled images per class and source")
    sources = sorted(set(table["source"]))
    counts.add_column("class")
    for s in sources:
        counts.add_column(s, justify="right")
    counts.add_column("total", justify="right")
    for label in list(names) + [None]:
        sel = table[table["label"].isna()] if label is None else table[table["label"] == label]
        by = Counter(sel["source"])
        counts.add_row(label or "(unlabelled)", *[str(by.get(s, 0)) for s in sources], str(len(sel)))
    return counts


def _findings(table, rep) -> list[tuple]:
    n_captioned = int(table["captions"].map(bool).sum())
    n_pairs = int(table["partners"].map(len).sum()) // 2
    return [
        ("images (after merging)", len(table), ""),
        ("captioned images / i2i pairs (undirected: a->b and b->a are one pair)",
         f"{n_captioned} / {n_pairs}", f"from {rep.i2i_entries} i2i.json entries" if rep.i2i_entries else ""),
        ("macOS metadata files skipped (._*, __MACOSX)", len(rep.macos_skipped), _examples(rep.macos_skipped)),
        ("unlabelled images (contrastive losses only)", len(rep.unlabelled), _examples(rep.unlabelled)),
        ("image files named by no annotation", len(rep.unannotated), _examples(rep.unannotated)),
        ("labels or links naming missing files", len(rep.missing), _examples(rep.missing)),
        ("file names fixed by case", len(rep.case_fixes), _examples(rep.case_fixes)),
        ("duplicate keys in a JSON object", len(rep.duplicate_keys), _examples(rep.duplicate_keys)),
        ("unknown labels", len(rep.unknown_labels), _examples(rep.unknown_labels)),
        ("conflicting labels", len(rep.label_conflicts), _examples(rep.label_conflicts)),
        ("unreadable or corrupt images (skipped)", len(rep.bad_images), _examples(rep.bad_images)),
        ("empty captions", len(rep.bad_captions), _examples(rep.bad_captions)),
        ("same picture under two names (merged)", len(rep.content_duplicates), _examples(rep.content_duplicates)),
    ]


def _test_findings(table, ts, leaks) -> list[tuple]:
    by_name = sorted(set(ts.images) & set(table["image"]))
    train_hashes = set(table["sha1"])
    by_content = sorted(n for n, p in ts.images.items() if file_sha1(p) in train_hashes)
    captions = {c for caps in table["captions"] for c in caps}
    return [
        ("test images", len(ts.images), "; ".join(f"{t} gallery: {len(g)} under {ts.folders[t]}"
                                                   for t, g in ts.galleries.items() if t != "cls")),
        ("test macOS metadata files skipped (._*, __MACOSX)", len(ts.skipped), _examples(ts.skipped)),
        ("test queries cls / i2i / t2i", " / ".join(str(len(q or [])) for q in (ts.cls, ts.i2i, ts.t2i)), ""),
        ("test images also in training (by name)", len(by_name), _examples(by_name)),
        ("test images also in training (by content)", len(by_content), _examples(by_content)),
        ("test captions that are training captions", len([c for c in ts.t2i or [] if c in captions]), ""),
        ("test images near-duplicate of a training image", len(leaks),
         _examples([f"{a} ~ {b} ({d:.2f})" for a, b, d in leaks])),
        ("duplicate query lines", len(ts.duplicate_queries), _examples(ts.duplicate_queries)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check a release folder")
    c.add_argument("dir")
    c.add_argument("--config", help="config whose label set to use (default: ENTRep's seven classes)")
    c.add_argument("--test", help="a test folder to check too, and to compare with training for overlap")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    return check(args.dir, cfg.labels.names, args.test, Console(width=160),
                 cfg.cv.near_dup_threshold if cfg.cv.near_dup else None, cfg.cv.n_splits, cfg.cv.seed)
