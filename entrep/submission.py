"""Track writers and validators: one JSON per track, checked against the query list, zipped alone."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from entrep.errors import EntrepError
from entrep.io import atomic_dir, atomic_path, atomic_write_json

TRACK_TITLES = {"cls": "Track 1 classification", "i2i": "Track 2 image-to-image", "t2i": "Track 3 text-to-image"}


class SubmissionError(EntrepError):
    pass


def validate(track: str, sub: dict, queries: list[str], gallery: set[str] | None = None,
             n_classes: int | None = None) -> None:
    """Every query present, no extra key, values of the track's type, retrieved images in the gallery."""
    if track not in TRACK_TITLES:
        raise SubmissionError(f"unknown track {track!r}; choose one of {list(TRACK_TITLES)}")
    problems = []
    missing = [q for q in queries if q not in sub]
    extra = [k for k in sub if k not in set(queries)]
    if missing:
        problems.append(f"{len(missing)} queries missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} keys not in the query list, e.g. {extra[:3]}")
    for q, v in sub.items():
        if track == "cls":
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (n_classes or 1 << 30):
                problems.append(f"{q!r}: class must be an int in 0..{(n_classes or 0) - 1}, got {v!r}")
            continue
        items = v if isinstance(v, list) else [v]
        if not items or not all(isinstance(x, str) and x for x in items):
            problems.append(f"{q!r}: expected an image name or a ranked list of names, got {v!r}")
        elif len(set(items)) != len(items):
            problems.append(f"{q!r}: the ranked list repeats an image")
        elif gallery is not None and (bad := [x for x in items if x not in gallery]):
            problems.append(f"{q!r}: retrieved {bad[:2]} not in the gallery")
        elif track == "i2i" and q in items:
            problems.append(f"{q!r}: an i2i query retrieved itself")
    if problems:
        raise SubmissionError(f"{TRACK_TITLES[track]} submission is invalid:\n  - " + "\n  - ".join(problems[:20]))


SUBMISSION_FILES = {f"{t}.{ext}" for t in TRACK_TITLES for ext in ("json", "zip")}


def write_track(track: str, sub: dict, out_dir: Path) -> tuple[Path, Path]:
    """`<track>.json` and `<track>.zip` (that JSON alone, at the zip's root), both atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{track}.json"
    atomic_write_json(js, sub)
    zp = out_dir / f"{track}.zip"
    with atomic_path(zp) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(js.name, json.dumps(sub, indent=2, ensure_ascii=False) + "\n")
    return js, zp


def write_submission(subs: dict[str, dict], out_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Every track's JSON and zip in `out_dir` as one unit (io.atomic_dir): the folder then holds this
    set and nothing of an earlier one; a failed write (a full disk) leaves the earlier set whole."""
    with atomic_dir(out_dir, SUBMISSION_FILES) as tmp:
        for track, sub in subs.items():
            write_track(track, sub, tmp)
    return {t: (out_dir / f"{t}.json", out_dir / f"{t}.zip") for t in subs}


def rankings_to_submission(rankings: dict[str, list[dict]], topk: int) -> dict:
    """{query: [{"image", "score"}, ...]} -> {query: top-1 name} or {query: [top-k names]}."""
    if topk < 1:
        raise SubmissionError("--topk must be >= 1")
    if empty := [q for q, r in rankings.items() if not r]:
        raise SubmissionError(f"{len(empty)} queries have no ranked answer (e.g. {empty[0]!r}); re-run infer.py")
    return {q: (r[0]["image"] if topk == 1 else [x["image"] for x in r[:topk]]) for q, r in rankings.items()}
