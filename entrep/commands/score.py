"""The scorer's command line (`python -m entrep.score`); the scoring itself is entrep.score.score."""
from __future__ import annotations

import argparse
import json
import math

from entrep.score import __doc__ as SCORE_DOC
from entrep.score import _load, score
from entrep.submission import TRACKS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.score", description=SCORE_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", required=True, choices=list(TRACKS))
    ap.add_argument("--submission", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = ap.parse_args(argv)
    from entrep.cli import make_console

    err = make_console(stderr=True)  # warnings on stderr: --json keeps stdout one JSON object
    result = score(args.track, _load(args.submission), _load(args.truth),
                   warn=lambda msg: err.print(f"warning: {msg}", highlight=False, soft_wrap=True, markup=False))
    if args.json:  # strict JSON: a figure that does not exist is null, never NaN
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()},
                         allow_nan=False))
        return 0
    from rich.table import Table

    from entrep.cli import make_console

    t = Table(title=f"{TRACKS[args.track]}: {args.submission}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if k != "confusion":
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    make_console().print(t)
    return 0
