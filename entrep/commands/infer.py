"""Ensemble the folds of a run on a test folder: class probabilities and ranked retrieval lists.

    python infer.py --run runs/NAME --data TEST_DIR [--out DIR] [key=value ...]

The work is `entrep.predict` (entrep/inference.py); this writes what it returns to RUN/predictions/
(or --out), as one unit.
"""
from __future__ import annotations

from pathlib import Path

from entrep import rundir
from entrep.cli import console, parser, setup_logging
from entrep.io import check_replaceable, check_writable


def main(argv=None) -> int:
    ap = parser("infer.py", __doc__.splitlines()[0], config=None)
    ap.add_argument("--run", required=True, help="run directory written by train.py (or a blend's)")
    ap.add_argument("--data", required=True, help="test folder: images + cls.csv / i2i.csv / t2i.csv")
    ap.add_argument("--out", help="predictions folder (default: RUN/predictions); elsewhere, nothing is written "
                                  "under a read-only run (a Kaggle input dataset)")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    out = Path(args.out) if args.out else Path(args.run) / rundir.PREDICTIONS
    # a read-only run (a Kaggle input dataset), or an --out folder holding other files, is refused before the
    # embedding, not after it
    check_replaceable(out, set(rundir.PRED_FILES))
    check_writable(out)
    from entrep.inference import predict  # torch and the model stack: after the arguments are known good

    preds = predict(args.run, args.data, args.overrides)
    preds.write(out)
    console.print(f"predictions for {len(preds.classes)} images, {len(preds.i2i)} i2i and {len(preds.t2i)} t2i "
                  f"queries from {len(preds.meta['folds'])} folds -> {out}")
    return 0
