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


TRACKS = ("cls", "i2i", "t2i")


def parse_json_object(data: bytes, where: str) -> dict:
    """A submission or truth JSON object from its bytes; anything else is one line naming `where`."""
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ScoreError(f"{where}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ScoreError(f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
        raise ScoreError(f"{where}: malformed JSON ({type(e).__name__}: {e or 'nested too deeply'})") from None
    if not isinstance(obj, dict):
        raise ScoreError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_json_object(path: str | Path) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ScoreError(f"{path}: {e.strerror or e}") from None
    return parse_json_object(data, str(path))


def track_of(name: str) -> str | None:
    """The track a file is for, by its name (cls.json, track2_i2i.json, ...); None when the name names
    no track or several."""
    hits = [t for t in TRACKS if t in Path(name).name.lower()]
    return hits[0] if len(hits) == 1 else None


def _is_metadata(name: str) -> bool:
    """macOS's zip leftovers: __MACOSX/ entries and AppleDouble `._name` files."""
    return "__MACOSX" in Path(name).parts or Path(name).name.startswith("._")


# A real submission's JSON is under a few MB (top-10 lists for every query of a track); far above this is a
# zip bomb or the wrong file, refused before it is unpacked or read.
MAX_SUBMISSION_BYTES = 64 << 20


def read_submission(path: str | Path, track: str | None = None) -> dict[str, tuple[str, dict]]:
    """{track: (where, answers)} of a submission: one JSON (its track from `track` or its name), or the
    challenge's zip, or a folder, of JSONs named by track (cls.json, i2i.json, t2i.json). `track`
    restricts a zip or folder to that track."""
    import zipfile

    path = Path(path)
    for f in (sorted(path.glob("*.json")) if path.is_dir() else [path] if path.is_file() else []):
        if f.suffix.lower() == ".json" and f.stat().st_size > MAX_SUBMISSION_BYTES:
            raise ScoreError(f"{f}: {f.stat().st_size:,} bytes, far more than any submission "
                             f"(limit {MAX_SUBMISSION_BYTES:,}); not read")
    if path.is_dir():
        entries = [(str(p), p.name, p.read_bytes) for p in sorted(path.glob("*.json")) if not _is_metadata(p.name)]
    elif zipfile.is_zipfile(path):
        try:
            z = zipfile.ZipFile(path)
            names = [n for n in z.namelist() if n.lower().endswith(".json") and not _is_metadata(n)]
            if big := [i for i in z.infolist() if i.filename in names and i.file_size > MAX_SUBMISSION_BYTES]:
                raise ScoreError(f"{path}:{big[0].filename} unpacks to {big[0].file_size:,} bytes, far more than any "
                                 f"submission (limit {MAX_SUBMISSION_BYTES:,}); not read")
            entries = [(f"{path}:{n}", n, lambda n=n: z.read(n)) for n in names]
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:  # RuntimeError: encrypted
            raise ScoreError(f"{path}: not a readable zip ({type(e).__name__}: {e})") from None
    elif path.is_file():
        if path.suffix.lower() == ".zip":
            raise ScoreError(f"{path}: not a readable zip file")
        t = track or track_of(path.name)
        if t is None:
            raise ScoreError(f"{path}: cannot tell its track from the name; give --track cls|i2i|t2i")
        return {t: (str(path), load_json_object(path))}
    else:
        raise ScoreError(f"{path}: no such file or folder")
    if not entries:
        raise ScoreError(f"{path}: holds no JSON file (cls.json, i2i.json, t2i.json)")
    out: dict[str, tuple[str, dict]] = {}
    for where, name, read in entries:
        t = track_of(name) or (track if len(entries) == 1 else None)
        if t is None:
            raise ScoreError(f"{where}: cannot tell its track from the name; name it cls.json, i2i.json or t2i.json"
                             + (" (or give --track for a zip of one JSON)" if len(entries) == 1 else ""))
        if track is not None and t != track:
            continue
        if t in out:
            raise ScoreError(f"{path}: two files for {t} ({out[t][0]}, {where}); keep one")
        try:
            data = read()
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
            raise ScoreError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
        out[t] = (where, parse_json_object(data, where))
    if not out:
        raise ScoreError(f"{path}: holds no {track} JSON")
    return out


def read_truth(path: str | Path, tracks: list[str]) -> dict[str, tuple[str, dict]]:
    """{track: (where, truth)} for `tracks`: one truth JSON (one track), or a folder holding one truth
    JSON per track, found by name (*cls*.json, *i2i*.json, *t2i*.json, as the demo's truth/track1_cls.json)."""
    path = Path(path)
    if path.is_dir():
        files: dict[str, list[Path]] = {}
        for p in sorted(path.glob("*.json")):
            if not _is_metadata(p.name) and (t := track_of(p.name)):
                files.setdefault(t, []).append(p)
        out = {}
        for t in tracks:
            if not files.get(t):
                raise ScoreError(f"--truth {path}: no truth file for {t} (a JSON whose name holds '{t}', e.g. {t}.json)")
            if len(files[t]) > 1:
                raise ScoreError(f"--truth {path}: several truth files for {t}: {[p.name for p in files[t]]}; keep one")
            out[t] = (str(files[t][0]), load_json_object(files[t][0]))
        return out
    if len(tracks) > 1:
        raise ScoreError(f"--truth {path} is one file, but the submission holds {len(tracks)} tracks ({', '.join(tracks)}); "
                         f"give --truth a folder with one truth JSON per track")
    return {tracks[0]: (str(path), load_json_object(path))}


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
