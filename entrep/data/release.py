"""Read an ENTRep release folder, in any of its layouts, into one table of records.

Layouts (as the ENTRep organisers distribute them): the public sample `data.json` + `images/`; the training set
`train/{cls,i2i,t2i}.json` + `train/imgs/`; test folders of images + header-less query CSVs.
Every problem found is recorded in a `DataReport`, so `check` can show it and training can decide.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from entrep.data.images import refuse_bomb
from entrep.errors import EntrepError

log = logging.getLogger("entrep.data")



def _readable_extensions() -> frozenset[str]:
    """Every file extension PIL opens and decodes by itself: not its stubs (HDF5, GRIB, WMF on Linux:
    they need handlers), not EPS (it needs Ghostscript) nor MPEG (identified, never decoded)."""
    from PIL import Image, ImageFile

    Image.init()
    out = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if factory is not None and not stub and fmt not in ("EPS", "MPEG"):
            out.add(ext.lower())
    return frozenset(out)


IMAGE_EXTS = _readable_extensions()
COMMON_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} & IMAGE_EXTS  # named in messages


def macos_metadata(path: Path) -> bool:
    """macOS's zip and copy leftovers: AppleDouble `._name` files (resource forks, not images) and
    `__MACOSX` folders. Skipped wherever images or annotation files are looked for."""
    return path.name.startswith("._") or "__MACOSX" in path.parts


class DataError(EntrepError):
    """A release file that training cannot go on with; the message names the file and record."""


@dataclass
class DataReport:
    sources: list[str] = field(default_factory=list)
    case_fixes: list[tuple[str, str, str]] = field(default_factory=list)      # (annotation file, listed, on disk)
    missing: list[tuple[str, str]] = field(default_factory=list)              # (annotation file, listed name)
    unlabelled: list[str] = field(default_factory=list)                       # images with no class label
    unannotated: list[str] = field(default_factory=list)                      # files on disk named by nothing
    duplicate_keys: list[tuple[str, str]] = field(default_factory=list)       # (file, key)
    unknown_labels: list[tuple[str, str, str]] = field(default_factory=list)  # (file, image, label)
    bad_images: list[tuple[str, str]] = field(default_factory=list)           # (path, error)
    bad_captions: list[tuple[str, str, str]] = field(default_factory=list)    # (file, image, why)
    macos_skipped: list[str] = field(default_factory=list)                    # `._*` / __MACOSX files skipped
    i2i_entries: int = 0                                                      # i2i.json entries (directed)
    content_duplicates: list[tuple[str, str]] = field(default_factory=list)   # (kept, merged)
    label_conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # (image, label, other)


# ---------------------------------------------------------------- readers

class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so duplicate keys are seen, not overwritten."""


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"), object_pairs_hook=_Pairs)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise DataError(f"{path}: malformed JSON ({e})") from None


def read_json_object(path: Path, report: DataReport | None = None) -> list[tuple[str, str]]:
    """`{"key": "value", ...}` as pairs, in file order. Duplicate keys are reported and all kept."""
    data = _load_json(path)
    if not isinstance(data, _Pairs):
        raise DataError(f"{path}: expected a JSON object {{key: value}}, found a {type(data).__name__}")
    seen = set()
    for i, (k, v) in enumerate(data):
        if not isinstance(v, str):
            raise DataError(f"{path}: entry {i} ({k!r}): value must be a string, found {type(v).__name__}")
        if k in seen and report is not None:
            report.duplicate_keys.append((str(path), k))
        seen.add(k)
    return list(data)


def read_json_records(path: Path) -> list[dict]:
    """The public sample's `data.json`: an array of objects with at least Path and Classification."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found an object")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, _Pairs):
            raise DataError(f"{path}: record {i} is not an object")
        rec = dict(rec)
        if not isinstance(rec.get("Path"), str) or not rec["Path"]:
            raise DataError(f"{path}: record {i} has no 'Path'")
        out.append(rec)
    return out


def read_query_lines(path: Path) -> list[str]:
    """A header-less one-column CSV: each whole line is one item (captions may hold commas). Lines end at
    \n, \r\n or \r only: str.splitlines also splits at a form feed, U+2028 and other separators a
    caption may hold, which made one caption several queries."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the file that lists one item per line")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for line in re.split(r"\r\n|\r|\n", text):
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] == '"':  # a CSV writer quoted a caption with commas
            line = line[1:-1].replace('""', '"').strip()
        if line:
            out.append(line)
    return out


def split_lines(text) -> list[str]:
    if not isinstance(text, str):
        return []
    return [s.strip() for s in text.replace("\r\n", "\n").split("\n") if s.strip()]


# ---------------------------------------------------------------- file resolution

class ImageFolder:
    """The image files of one folder, found by exact name or, failing that, case-insensitively.
    macOS metadata (`._*`, __MACOSX) is skipped and listed in `skipped`; files of other extensions
    are kept by name in `others`, so a query naming one can be told why it is not an image; the same
    file (same bytes) under one name in two sub-folders is one image, its places in `copies`."""

    def __init__(self, folder: Path, recursive: bool = False, clash: str = "rename one"):
        self.folder = folder
        files = folder.rglob("*") if recursive else folder.glob("*")
        self.files: dict[str, Path] = {}
        self.copies: dict[str, list[Path]] = {}
        self.skipped: list[Path] = []
        self.others: dict[str, Path] = {}
        for p in sorted(files):
            if macos_metadata(p.relative_to(folder)):
                if p.is_file():
                    self.skipped.append(p)
                continue
            if not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                self.others.setdefault(p.name, p)
                continue
            if p.name in self.files:
                first = self.files[p.name]
                if first.stat().st_size != p.stat().st_size or first.read_bytes() != p.read_bytes():
                    raise DataError(f"two different images named {p.name}: {first} and {p}; {clash}")
                self.copies.setdefault(p.name, [first]).append(p)
                continue
            self.files[p.name] = p
        self.lower: dict[str, list[str]] = defaultdict(list)
        for name in self.files:
            self.lower[name.lower()].append(name)

    def places(self, name: str) -> list[Path]:
        """Every path of the image `name` (one, or its identical copies)."""
        return self.copies.get(name, [self.files[name]])

    def resolve(self, name: str) -> tuple[str | None, bool]:
        """(name on disk, whether the case was fixed); (None, False) when not found."""
        name = Path(name).name
        if name in self.files:
            return name, False
        hits = self.lower.get(name.lower(), [])
        return (hits[0], True) if len(hits) == 1 else (None, False)

    def not_an_image(self, name: str) -> Path | None:
        """The file `name` names when it exists with an extension the kit does not read."""
        name = Path(name).name
        if name in self.others:
            return self.others[name]
        hits = [p for n, p in self.others.items() if n.lower() == name.lower()]
        return hits[0] if len(hits) == 1 else None

    def path(self, name: str) -> Path:
        return self.files[name]


def check_image(path: Path) -> str | None:
    """None if PIL can read the file, else why not (zero bytes, not an image, truncated)."""
    try:
        if path.stat().st_size == 0:
            return "zero-byte file"
        with Image.open(path) as im:
            refuse_bomb(im).verify()  # checks PNG chunk CRCs without a full decode
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return None


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- training table

@dataclass
class _Rec:
    image: str
    path: Path
    label: str | None = None
    captions: list[str] = field(default_factory=list)
    captions_vi: list[str] = field(default_factory=list)
    partners: set = field(default_factory=set)
    sources: set = field(default_factory=set)
    listed_as: str = ""
    sha1: str = ""


def find_train_sources(root: Path) -> tuple[list[Path], list[Path]]:
    """Folders holding cls.json (training layout) and data.json files (public-sample layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    train_dirs = sorted({p.parent for p in root.rglob("cls.json") if not macos_metadata(p.relative_to(root))})
    public = sorted(p for p in root.rglob("data.json") if not macos_metadata(p.relative_to(root)))
    if not train_dirs and not public:
        raise DataError(f"{root}: no cls.json (training layout) or data.json (public sample) found under it")
    return train_dirs, public


def _image_dir(base: Path, candidates: tuple[str, ...]) -> Path:
    for c in candidates:
        if (base / c).is_dir():
            return base / c
    return base


class _Reader:
    """The records of one release folder as they are read, keyed by file path, and what was wrong."""

    def __init__(self, label_names):
        self.label_names = list(label_names)
        self.report = DataReport()
        self.recs: dict[Path, _Rec] = {}
        self.folders: list[ImageFolder] = []

    def record(self, folder: ImageFolder, listed: str, ann: Path, source: str) -> _Rec | None:
        """The record of the image an annotation names (case-insensitively); None when it is missing."""
        name, fixed = folder.resolve(listed)
        if name is None:
            self.report.missing.append((str(ann), listed))
            return None
        if fixed:
            self.report.case_fixes.append((str(ann), listed, name))
        path = folder.path(name)
        rec = self.recs.get(path)
        if rec is None:
            rec = self.recs[path] = _Rec(name, path, listed_as=listed if fixed else "")
        rec.sources.add(source)
        return rec

    def set_label(self, rec: _Rec, label, ann: Path) -> None:
        label = label.strip() if isinstance(label, str) else label
        if not isinstance(label, str) or label not in self.label_names:  # a list or number is reported, not hashed
            self.report.unknown_labels.append((str(ann), rec.image, str(label)))
            return
        if rec.label is not None and rec.label != label:
            self.report.label_conflicts.append((rec.image, rec.label, label))
            return
        rec.label = label

    def add_caption(self, rec: _Rec, caption: str, ann: Path) -> None:
        text = caption.strip()
        if not text:
            self.report.bad_captions.append((str(ann), rec.image, "empty caption"))
        elif text not in rec.captions:
            rec.captions.append(text)

    def read_train_dir(self, d: Path) -> None:
        """The training layout: cls.json, and i2i.json / t2i.json where present, over imgs/."""
        folder = ImageFolder(_image_dir(d, ("imgs", "images")))
        self.folders.append(folder)
        self.report.sources.append(str(d))
        for name, label in read_json_object(d / "cls.json", self.report):
            if (rec := self.record(folder, name, d / "cls.json", "train")) is not None:
                self.set_label(rec, label, d / "cls.json")
        if (d / "i2i.json").is_file():
            pairs = read_json_object(d / "i2i.json", self.report)
            self.report.i2i_entries += len(pairs)
            for q, t in pairs:
                a, b = self.record(folder, q, d / "i2i.json", "train"), self.record(folder, t, d / "i2i.json", "train")
                if a is not None and b is not None and a is not b:
                    a.partners.add(b.path)
                    b.partners.add(a.path)
        if (d / "t2i.json").is_file():
            for caption, target in read_json_object(d / "t2i.json", self.report):
                if (rec := self.record(folder, target, d / "t2i.json", "train")) is not None:
                    self.add_caption(rec, caption, d / "t2i.json")

    def read_public(self, f: Path) -> None:
        """The public-sample layout: data.json records over images/."""
        folder = ImageFolder(_image_dir(f.parent, ("images", "imgs")))
        self.folders.append(folder)
        self.report.sources.append(str(f))
        for r in read_json_records(f):
            if (rec := self.record(folder, r["Path"], f, "public")) is None:
                continue
            self.set_label(rec, r.get("Classification"), f)
            for line in split_lines(r.get("DescriptionEN")):
                self.add_caption(rec, line, f)
            rec.captions_vi += [s for s in split_lines(r.get("Description")) if s not in rec.captions_vi]

    def drop_unreadable(self) -> None:
        log.info("decode-checking %d images (data.check_images=false skips this)", len(self.recs))
        for path in list(self.recs):
            if (err := check_image(path)) is not None:
                self.report.bad_images.append((str(path), err))
                del self.recs[path]

    def merge_content_duplicates(self) -> None:
        """The same picture filed twice (by content) becomes one record."""
        by_hash: dict[str, _Rec] = {}
        for path, rec in list(self.recs.items()):
            h = rec.sha1 = file_sha1(path)
            if h not in by_hash:
                by_hash[h] = rec
                continue
            keep = by_hash[h]
            self.report.content_duplicates.append((keep.image, rec.image))
            if rec.label is not None:
                self.set_label(keep, rec.label, path)
            keep.captions += [c for c in rec.captions if c not in keep.captions]
            keep.partners |= rec.partners
            keep.sources |= rec.sources
            del self.recs[path]
            for other in self.recs.values():
                if path in other.partners:
                    other.partners.discard(path)
                    other.partners.add(keep.path)

    def note_unannotated(self) -> None:
        """Image files that no annotation names (before unreadable ones and copies are dropped), and the
        macOS metadata files skipped."""
        named = set(self.recs)
        for folder in self.folders:
            self.report.unannotated += [str(p) for p in folder.files.values() if p not in named]
            self.report.macos_skipped += [str(p) for p in folder.skipped if str(p) not in self.report.macos_skipped]
        if self.report.macos_skipped:
            log.info("skipped %d macOS metadata files (._* AppleDouble files, __MACOSX folders), e.g. %s",
                     len(self.report.macos_skipped), self.report.macos_skipped[0])

    def table(self) -> pd.DataFrame:
        names = {r.path: r.image for r in self.recs.values()}
        rows = []
        for rec in self.recs.values():
            if rec.label is None:
                self.report.unlabelled.append(rec.image)
            rows.append(dict(
                image=rec.image, path=str(rec.path), label=rec.label,
                y=self.label_names.index(rec.label) if rec.label is not None else -1,
                captions=list(rec.captions), captions_vi=list(rec.captions_vi),
                # a link between two copies of one picture would make the merged record its own partner
                partners=sorted(names[p] for p in rec.partners if p in names and p != rec.path),
                source="+".join(sorted(rec.sources)), listed_as=rec.listed_as, sha1=rec.sha1,
            ))
        df = pd.DataFrame(rows, columns=["image", "path", "label", "y", "captions", "captions_vi",
                                         "partners", "source", "listed_as", "sha1"])
        if df["image"].duplicated().any():
            dup = df.loc[df["image"].duplicated(), "image"].tolist()[:5]
            raise DataError(f"different images share a file name across sources: {dup}; rename one copy")
        return df.reset_index(drop=True)


def load_release(root: str | Path, label_names, check_images: bool = True) -> tuple[pd.DataFrame, DataReport]:
    """Every training record under `root`, merged, as a DataFrame, plus what was wrong."""
    train_dirs, public_files = find_train_sources(Path(root))
    reader = _Reader(label_names)
    for d in train_dirs:
        reader.read_train_dir(d)
    for f in public_files:
        reader.read_public(f)
    reader.note_unannotated()
    if check_images:
        reader.drop_unreadable()
    reader.merge_content_duplicates()
    return reader.table(), reader.report


# ---------------------------------------------------------------- test folders

QUERY_FILES = ("cls.csv", "i2i.csv", "t2i.csv")
# a t2i.csv's first line that is a column name, not a caption (cls.csv and i2i.csv refuse one as a missing image)
HEADER_WORDS = re.compile(r"(?i)(captions?|texts?|quer(y|ies)|descriptions?|prompts?|sentences?|t2i)")


@dataclass
class TestSet:
    root: Path
    images: dict[str, Path]              # every image: name on disk -> path
    cls: list[str] | None = None         # image names as listed (submission keys)
    i2i: list[str] | None = None         # image names as listed (submission keys)
    t2i: list[str] | None = None         # captions as written
    on_disk: dict[str, str] = field(default_factory=dict)  # listed query name -> name on disk
    case_fixes: list[tuple[str, str, str]] = field(default_factory=list)
    duplicate_queries: list[tuple[str, str]] = field(default_factory=list)
    galleries: dict[str, list[str]] = field(default_factory=dict)  # track -> the images its queries rank
    folders: dict[str, Path] = field(default_factory=dict)        # track -> the folder its gallery is
    skipped: list[str] = field(default_factory=list)              # macOS metadata files skipped

    def spelling(self, track: str) -> dict[str, str]:
        """Name on disk -> the name as the query lists spell it, for every answer written for `track`: a
        submission's keys and answers must spell one image one way (cls.csv's `x.png` for `x.PNG` on
        disk), and the scorer compares names as written. The track's own list first, then the others."""
        out: dict[str, str] = {}
        for t in (track, *(t for t in ("cls", "i2i") if t != track)):
            for listed in getattr(self, t, None) or []:
                if listed in self.on_disk:
                    out.setdefault(self.on_disk[listed], listed)
        return out


def _track_folder(csv: Path, root: Path, folder: ImageFolder) -> tuple[Path, list[str]]:
    """A query list's gallery: the images under the folder holding it when that folder holds images
    (the release's Track1_Public/{imgs,cls.csv}, Track2_Public/{imgs,i2i.csv}), else every image."""
    here = csv.parent
    if here != root:
        own = sorted(n for n in folder.files if any(here in p.parents for p in folder.places(n)))
        if own:
            return here, own
    return root, sorted(folder.files)


def load_test(root: str | Path) -> TestSet:
    """Images anywhere under `root` plus whichever of cls/i2i/t2i.csv it holds; each query list's
    gallery is the images of its own folder (`_track_folder`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"test folder not found: {root}")
    folder = ImageFolder(root, recursive=True, clash=(
        "one infer.py call reads a test folder as one set of names, and renaming either would change the "
        "submission's keys: run infer.py and submit.py once per track folder (--data on each, --out apart)"))
    if not folder.files:
        raise DataError(f"{root}: no image files under it" + (f" (extensions found: {sorted({p.suffix for p in folder.others.values()})}; "
                                                             f"the kit reads {', '.join(sorted(COMMON_EXTS))} and "
                                                             f"every other format PIL decodes)" if folder.others else ""))
    ts = TestSet(root=root, images=dict(folder.files), skipped=[str(p) for p in folder.skipped])
    for fname in QUERY_FILES:
        hits = sorted(p for p in root.rglob(fname) if not macos_metadata(p.relative_to(root)))
        if len(hits) > 1:
            raise DataError(f"{root}: several {fname} files ({', '.join(map(str, hits))}); point --data at one test set")
        if not hits:
            continue
        track = fname[:3]
        ts.folders[track], ts.galleries[track] = _track_folder(hits[0], root, folder)
        lines = read_query_lines(hits[0])
        seen = set()
        for line in lines:
            if line in seen:
                ts.duplicate_queries.append((str(hits[0]), line))
            seen.add(line)
        lines = list(dict.fromkeys(lines))
        if fname == "t2i.csv":
            if lines and HEADER_WORDS.fullmatch(lines[0]):
                raise DataError(f"{hits[0]} line 1: {lines[0]!r} reads as a column header, not a caption; the "
                                f"challenge's t2i.csv is one caption per line with no header: remove that line")
            ts.t2i = lines
            continue
        for n, line in enumerate(lines, 1):
            name, fixed = folder.resolve(line)
            if name is None:
                if (other := folder.not_an_image(line)) is not None:
                    raise DataError(f"{hits[0]} line {n}: {other} has the extension {other.suffix!r}, which is not "
                                    f"an image format the kit reads ({', '.join(sorted(COMMON_EXTS))} and every "
                                    f"other format PIL decodes); convert it, e.g. to PNG")
                raise DataError(f"{hits[0]} line {n}: query image {line!r} is not in the test folder {root}")
            if fixed:
                ts.case_fixes.append((str(hits[0]), line, name))
            ts.on_disk[line] = name
        setattr(ts, track, lines)
    return ts
