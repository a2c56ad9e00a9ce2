"""Write the procedural demo dataset (entrep/data/synthetic.py) in the real release layouts.

    python -m entrep.demo OUT_DIR [--seed 0] [--size 80] [--cases 220] [--test-cases 60]

OUT_DIR/train/{cls,i2i,t2i}.json + imgs/      the training layout (UUID names)
OUT_DIR/public/data.json + images/            the public-sample layout (`_imageNN` listed, `_ImageNN` on disk)
OUT_DIR/test/imgs/ + cls.csv, i2i.csv, t2i.csv the test layout (header-less query lists)
OUT_DIR/truth/track{1,2,3}_*.json             test ground truth, so the demo can score itself
"""
from __future__ import annotations

import argparse
from pathlib import Path

from entrep.data.synthetic import make_demo
from entrep.errors import EntrepError
from entrep.io import atomic_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="an empty or new folder")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the whole dataset (default 0)")
    ap.add_argument("--size", type=int, default=80, help="image side in px, at least 32 (default 80)")
    ap.add_argument("--cases", type=int, default=220,
                    help="training cases; a third come as i2i pairs, a few as chains (default 220)")
    ap.add_argument("--test-cases", type=int, default=60,
                    help="test cases; a third come as pairs, the i2i queries (default 60)")
    args = ap.parse_args(argv)
    if args.size < 32 or min(args.cases, args.test_cases) < 1:
        raise EntrepError(f"--size {args.size} --cases {args.cases} --test-cases {args.test_cases}: the demo needs "
                          f"images of at least 32 px and at least one case of each kind")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise EntrepError(f"{args.out} exists and is not empty: the demo would mix with what is there; remove it "
                          f"or choose another folder")
    with atomic_dir(args.out, set()) as tmp:  # one unit: a full disk leaves no half dataset that blocks a re-run
        make_demo(tmp, args.seed, args.size, args.cases, args.test_cases)
    out = Path(args.out)
    n = sum(1 for _ in out.rglob("*.png"))
    print(f"demo dataset: {n} images under {out}")
    return 0
