"""What each t2i out-of-fold rule lets a ranker score that cannot tell a caption's carriers apart, on the
real ENTRep annotations (tests/fixtures/entrep: train/t2i.json and the public sample's captions).

    python bench/t2i_rules.py [--splits 5] [--seed 42] [--markdown FILE]

Such a ranker puts a caption's k carriers in its held-out fold first, in random order, so the one
target is at each of ranks 1..k with probability 1/k: R@1 1/k and MRR H_k / k for that caption.
The rules (entrep.oof.RELEVANCE): per caption (the leaderboard's weighing: each fold caption once),
per pair (a caption of k carriers counts k times) and any carrier (every carrier is a hit: 1.0).
Folds are the kit's own (cv.n_splits, cv.seed; i2i links and patients, no near-duplicate pass:
the fixtures carry no pixels).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def carriers_per_fold(n_splits: int, seed: int) -> list[int]:
    """k of every (fold, caption) with k >= 1 carriers in that fold."""
    from conftest import write_real_release  # the fixtures' placeholder release
    from entrep.data.folds import make_folds
    from entrep.data.release import load_release
    from entrep.labels import ENTREP_CLASSES

    with tempfile.TemporaryDirectory() as tmp:
        table, _ = load_release(write_real_release(Path(tmp)), ENTREP_CLASSES)
    folds = make_folds(table, n_splits, seed)
    ks = []
    for f in range(n_splits):
        count: dict[str, int] = {}
        for caps in table["captions"][(folds["fold"] == f).to_numpy()]:
            for c in caps:
                count[c] = count.get(c, 0) + 1
        ks += list(count.values())
    return ks


def ceilings(ks: list[int]) -> dict[str, tuple[float, float]]:
    k = np.asarray(ks, dtype=float)
    h = np.array([np.sum(1.0 / np.arange(1, int(x) + 1)) for x in k])
    return {"per caption (the leaderboard's weighing; report.json t2i)": (float(np.mean(1 / k)), float(np.mean(h / k))),
            "per pair (report.json t2i_pairs)": (float(len(k) / k.sum()), float(h.sum() / k.sum())),
            "any carrier (report.json t2i_any)": (1.0, 1.0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    ks = carriers_per_fold(args.splits, args.seed)
    lines = [f"Real annotations, {args.splits} folds (seed {args.seed}): {len(ks)} (fold, caption) queries over "
             f"{sum(ks)} (caption, image) pairs; carriers per fold caption: median {int(np.median(ks))}, max {max(ks)}, "
             f"{sum(k > 1 for k in ks)} with more than one", "",
             "| rule | R@1 ceiling | MRR ceiling |", "| --- | ---: | ---: |"]
    lines += [f"| {rule} | {r1:.3f} | {mrr:.3f} |" for rule, (r1, mrr) in ceilings(ks).items()]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
