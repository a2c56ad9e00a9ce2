"""Score a submission against a ground truth, for any track (`python -m entrep.score`,
entrep/commands/score.py).

Truth: Track 1 `{image: class index}`; Tracks 2/3 `{query: image}` or `{query: [relevant images]}`.
Submission: the challenge format; Tracks 2/3 accept a top-1 name or a ranked list per query.
A query missing from the submission counts as wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

from entrep.errors import EntrepError
from entrep.labels import ENTREP_CLASSES
from entrep.metrics import classification_metrics, retrieval_metrics


class ScoreError(EntrepError):
    pass


def load_json_object(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as e:
        raise ScoreError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_index(v, n: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


def _names(v) -> bool:
    """An image name, or a non-empty list of them."""
    items = v if isinstance(v, list) else [v]
    return bool(items) and all(isinstance(x, str) and x for x in items)


def score(track: str, sub: dict, truth: dict, names=ENTREP_CLASSES, warn=None) -> dict:
    """Scores, after checking both files: a malformed truth is an error naming the entry; answers
    that cannot be right (a class name or "3" where Track 1 wants an index) score as wrong, counted
    and reported through `warn`."""
    warn = warn or (lambda msg: None)
    if not truth:
        raise ScoreError("the truth file has no entries: nothing to score")
    n = len(names)
    if track == "cls":
        if bad := [(k, v) for k, v in truth.items() if not _is_index(v, n)]:
            raise ScoreError(f"truth: {len(bad)} entries are not class indices 0..{n - 1}, e.g. {bad[0][0]!r}: "
                             f"{bad[0][1]!r}")
        wrong_type = [(k, v) for k, v in sub.items() if k in truth and not _is_index(v, n)]
        if wrong_type:
            warn(f"{len(wrong_type)} answers are not class indices 0..{n - 1} (e.g. {wrong_type[0][0]!r}: "
                 f"{wrong_type[0][1]!r}); they score as wrong. Track 1 wants the integer index of "
                 f"{list(names)}")
        keys = list(truth)
        y_pred = [sub[k] if _is_index(sub.get(k), n) else -1 for k in keys]
        out = classification_metrics([truth[k] for k in keys], y_pred, [str(x) for x in names])
        out.pop("per_class")
        out["not_an_index"] = len(wrong_type)
    else:
        if bad := [(k, v) for k, v in truth.items() if not _names(v)]:
            raise ScoreError(f"truth: {len(bad)} entries are not an image name or a list of names, e.g. "
                             f"{bad[0][0]!r}: {bad[0][1]!r}")
        if bad := [(k, v) for k, v in sub.items() if k in truth and not _names(v)]:
            raise ScoreError(f"submission: {len(bad)} answers are not an image name or a ranked list of names, "
                             f"e.g. {bad[0][0]!r}: {type(bad[0][1]).__name__} {bad[0][1]!r}"[:300])
        rankings = [sub.get(q, []) if isinstance(sub.get(q, []), list) else [sub[q]] for q in truth]
        relevant = [set(v) if isinstance(v, list) else {v} for v in truth.values()]
        out = retrieval_metrics(rankings, relevant)
    missing = [q for q in truth if q not in sub]
    if missing:
        warn(f"{len(missing)} truth queries have no answer (e.g. {missing[0]!r}); they score as wrong")
    out["missing"] = len(missing)
    out["extra"] = len([q for q in sub if q not in truth])
    return out
