"""Score a submission JSON against a ground-truth JSON, for any track.

    python -m entrep.score --track {cls,i2i,t2i} --submission S.json --truth T.json [--json]

Truth: Track 1 `{image: class index}`; Tracks 2/3 `{query: image}` or `{query: [relevant images]}`.
Submission: the challenge format; Tracks 2/3 accept a top-1 name or a ranked list per query.
A query missing from the submission counts as wrong.
"""
from __future__ import annotations

import argparse
import json
import math

from rich.table import Table

from entrep.cli import make_console
from entrep.scoring import load_json_object, score
from entrep.submission import TRACK_TITLES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", required=True, choices=list(TRACK_TITLES))
    ap.add_argument("--submission", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = ap.parse_args(argv)
    err = make_console(stderr=True)  # warnings on stderr: --json keeps stdout one JSON object
    result = score(args.track, load_json_object(args.submission), load_json_object(args.truth),
                   warn=lambda msg: err.print(f"warning: {msg}", highlight=False, soft_wrap=True, markup=False))
    if args.json:  # strict JSON: a figure that does not exist is null, never NaN
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()},
                         allow_nan=False))
        return 0
    t = Table(title=f"{TRACK_TITLES[args.track]}: {args.submission}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if k != "confusion":
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    make_console().print(t)
    return 0
