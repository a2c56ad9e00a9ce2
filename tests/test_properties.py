"""Generated inputs for every reader of the kit (issue 22): release JSON, query CSVs, config files and
`key=value` overrides, submissions and truth files, folds files, the kit's own JSON files in a run,
the image cache's index, and every gallery size for ranking. The property: nothing but the kit's
one-line errors (EntrepError) escapes a reader, and through an entry point (run_main) the exit code is
0 or 2, an error is one line, and there is no traceback.

Each test's example budget is small (the fast tier runs them); inputs are derandomized so CI is
reproducible, and `pytest --hypothesis-show-statistics tests/test_properties.py` counts them.
ENTREP_PROPERTY_SCALE=20 multiplies every budget and draws fresh inputs, for a deeper search by hand."""
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import placeholder
from entrep.cli import run_main
from entrep.errors import EntrepError
from entrep.labels import ENTREP_CLASSES

ROOT = Path(__file__).parents[1]


SCALE = float(os.environ.get("ENTREP_PROPERTY_SCALE", "1"))  # e.g. 20 for a deeper, randomized search by hand


def budget(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@contextmanager
def folder(template: Path | None = None):
    """A fresh folder per generated example (hypothesis runs many examples in one test call)."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "x"
        if template is not None:
            shutil.copytree(template, root)
        else:
            root.mkdir()
        yield root


def kit_errors_only(fn, *args, **kw):
    """fn's value, or None where it raised one of the kit's errors; anything else fails the test."""
    try:
        return fn(*args, **kw)
    except EntrepError as e:
        assert str(e) and "\n" not in str(e).strip() or "submission is invalid" in str(e), str(e)
        return None


def entry_point(capsys, main, argv) -> int:
    rc = run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    assert rc in (0, 2) and "Traceback" not in out.out + out.err, out.out + out.err
    if rc == 2:
        lines = out.out.strip().split("\n")
        assert lines and lines[-1].startswith("error: ") and len(lines[-1]) < 2000, out.out
    return rc


# ------------------------------------------------------------------ JSON of every shape

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
ODD_JSON = [b"", b"null", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"[" * 3000 + b"]" * 3000, b"1" * 5000,
            b'{"a": 1' + b"0" * 5000 + b"}", b"NaN", b'{"a": Infinity}', b'{"' + b"x" * 200_000 + b'": "y"}',
            b'{"a": "b", "a": "c"}', b'{"a": "\\ud800"}', b"\x00\x05\x16\x07AppleDouble"]


def json_bytes(values=json_values):
    """Bytes as a reader meets them: valid JSON of any shape (with a BOM or not), raw bytes, and the odd
    cases (deep nesting, a 5000-digit integer, a huge key, duplicate keys, a lone surrogate, UTF-16)."""
    return st.one_of(
        st.tuples(values, st.booleans()).map(lambda t: (b"\xef\xbb\xbf" if t[1] else b"") + json.dumps(t[0]).encode()),
        st.binary(max_size=40), st.sampled_from(ODD_JSON))


# ------------------------------------------------------------------ release JSON (cls/i2i/t2i.json, data.json)

@pytest.fixture(scope="module")
def release_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    for i, n in enumerate(["a.png", "B.png", "c_Image01.png"]):
        placeholder(root / "train/imgs" / n, i)
        placeholder(root / "public/images" / n.replace("c_", "p_"), 10 + i)
    return root


names = st.sampled_from(["a.png", "A.PNG", "b.png", "B.png", "c_image01.png", "missing.png", "", " a.png ", "../a.png"])
labels = st.sampled_from(ENTREP_CLASSES + ["elbow", " throat ", ""]) | json_values
release_objects = st.dictionaries(names, labels | names | st.text(max_size=10), max_size=5)
records = st.lists(st.fixed_dictionaries({}, optional={"Path": names | json_values, "Classification": labels,
                                                      "DescriptionEN": st.text(max_size=30) | json_values,
                                                      "Description": st.text(max_size=10)}) | json_values, max_size=4)


@budget(60)
@given(cls=json_bytes(release_objects), i2i=st.none() | json_bytes(release_objects),
       t2i=st.none() | json_bytes(st.dictionaries(st.text(max_size=20), names, max_size=4)),
       data=st.none() | json_bytes(records))
@example(cls=b'{"a.png": "throat", "A.PNG": "throat"}', i2i=b'{"a.png": "B.png", "b.png": "a.png"}',
         t2i=b'{"": "a.png"}', data=b'[{"Path": "p_image01.png", "Classification": ["throat"]}]')
def test_release_readers(release_template, cls, i2i, t2i, data):
    from entrep.data.release import load_release

    with folder(release_template) as root:
        for name, content in (("train/cls.json", cls), ("train/i2i.json", i2i), ("train/t2i.json", t2i),
                              ("public/data.json", data)):
            if content is not None:
                (root / name).write_bytes(content)
        got = kit_errors_only(load_release, root, ENTREP_CLASSES, check_images=False)
        if got is not None:
            df, rep = got
            assert df["image"].is_unique and set(df["label"].dropna()) <= set(ENTREP_CLASSES)


# ------------------------------------------------------------------ header-less query CSVs

line_parts = st.sampled_from(["a.png", "A.PNG", "b.png", "c.webp", "x.heic", '"a, b"', '""', "q,w", "\ufeff", " ",
                              "é", "\t", '"unclosed'])
csv_text = st.lists(st.lists(line_parts, max_size=3).map("".join), max_size=6).flatmap(
    lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda nl: nl.join(lines).encode()))


@budget(60)
@given(which=st.sampled_from(["cls.csv", "i2i.csv", "t2i.csv", "Track2/i2i.csv"]), content=csv_text | st.binary(max_size=40))
def test_query_csvs(tmp_path_factory, which, content):
    from entrep.data.release import load_test

    with folder() as root:
        placeholder(root / "imgs/a.png", 1)
        placeholder(root / "Track2/imgs/b.png", 2)
        (root / "x.heic").write_bytes(b"heic")
        (root / which).parent.mkdir(parents=True, exist_ok=True)
        (root / which).write_bytes(content)
        test = kit_errors_only(load_test, root)
        if test is not None:
            for track in ("cls", "i2i"):
                assert all(test.on_disk[q] in test.images for q in getattr(test, track) or [])
                assert set(test.galleries.get(track, [])) <= set(test.images)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                              min_size=1, max_size=30), max_size=8),
       ending=st.sampled_from(["\n", "\r\n", "\r"]))
@example(items=["erythema\u2028on the left eardrum", "a polyp\x0cin the nose", "x\x85y"], ending="\n")
def test_query_lines_split_at_line_endings_only(items, ending):
    """One item a line, whatever the item holds: a form feed, U+2028, U+0085 or a vertical tab inside a
    caption is part of it (str.splitlines split there); blank lines and surrounding spaces drop out."""
    from entrep.data.release import read_query_lines

    with folder() as root:
        (root / "t2i.csv").write_bytes(ending.join(items).encode("utf-8"))
        got = read_query_lines(root / "t2i.csv")
    want = []
    for x in (i.strip() for i in items):
        if len(x) >= 2 and x[0] == x[-1] == '"':
            x = x[1:-1].replace('""', '"').strip()
        if x:
            want.append(x)
    assert got == want


# ------------------------------------------------------------------ config files and key=value overrides

def _config_keys():
    from entrep.config import Config, _keys

    return _keys(Config)


config_keys = st.sampled_from(_config_keys()) | st.text(max_size=12)
yaml_values = st.sampled_from(["", "[", "{a: 1}", "- a\n- b", "!!python/object:os.system ls", "yes", "no", "null",
                               "1e400", ".nan", "[0, 2]", "2024-01-01", "&a [*a]", "~", "0x1F", "'quoted'"]) | st.text(max_size=12)


@budget(80)
@given(overrides=st.lists(st.tuples(config_keys, yaml_values | json_values.map(json.dumps)).map("=".join)
                          | st.text(max_size=10), max_size=4))
def test_config_overrides(overrides):
    from entrep.config import load_config

    kit_errors_only(load_config, None, overrides)


@budget(60)
@given(value=json_values | st.builds(Path, st.text(max_size=8)) | st.tuples(st.integers(), st.text(max_size=4)),
       key=st.sampled_from(_config_keys()))
def test_keyword_overrides_of_any_value(value, key):
    """entrep.predict(run, test, **{key: value}): any Python value, never a TypeError."""
    from entrep.config import load_config, override_item

    kit_errors_only(load_config, None, [override_item(key, value)])


@budget(60)
@given(content=st.binary(max_size=60) | st.dictionaries(config_keys, json_values | yaml_values, max_size=4).map(
    lambda d: json.dumps(d).encode()) | st.lists(st.tuples(config_keys, yaml_values)).map(
    lambda kv: "\n".join(f"{k}: {v}" for k, v in kv).encode()) | st.sampled_from(
    [b"\xff\xfe", b"train:\n  epochs: [", b"train: 3", b"[1, 2]", b"a: &x [*x]", b"\xef\xbb\xbftrain: {epochs: 2}",
     b"[" * 2000]))
def test_config_files(content):
    from entrep.config import load_config

    with folder() as root:
        (root / "c.yaml").write_bytes(content)
        kit_errors_only(load_config, root / "c.yaml")


# ------------------------------------------------------------------ submissions and truth files

answers = st.dictionaries(st.sampled_from(["a.png", "b.png", "c.png", "q"]) | st.text(max_size=6),
                          json_values | st.integers(-2, 9) | st.sampled_from(["a.png", "b.png"])
                          | st.lists(st.sampled_from(["a.png", "b.png", "c.png"]), max_size=3), max_size=5)


@budget(100)
@given(track=st.sampled_from(["cls", "i2i", "t2i"]), sub=answers, truth=answers)
def test_scoring_and_validation(track, sub, truth):
    from entrep.leaderboard import score
    from entrep.submission import validate

    got = kit_errors_only(score, track, sub, truth)
    if got is not None:
        assert got["missing"] == len([q for q in truth if q not in sub])
    kit_errors_only(validate, track, sub, list(truth), {"a.png", "b.png"}, n_classes=7)


@budget(60)
@given(sub=json_bytes(answers), truth=json_bytes(answers), as_zip=st.booleans(),
       member=st.sampled_from(["cls.json", "i2i.json", "t2i.json", "sub/t2i.json", "x.json", "__MACOSX/._cls.json"]),
       track=st.sampled_from([None, "cls", "i2i", "t2i"]), truth_dir=st.booleans())
def test_the_score_command(capsys, sub, truth, as_zip, member, track, truth_dir):
    from entrep.commands.score import main

    with folder() as root:
        if as_zip:
            s = root / "submission.zip"
            with zipfile.ZipFile(s, "w") as z:
                z.writestr(member, sub)
        else:
            s = root / Path(member).name
            s.write_bytes(sub)
        t = root / "truth"
        t.mkdir()
        (t / f"track_{track or Path(member).stem.strip('._')}.json").write_bytes(truth)
        entry_point(capsys, main, ["--submission", s, "--truth", t if truth_dir else next(t.iterdir())]
                    + (["--track", track] if track else []))


# ------------------------------------------------------------------ hand-edited folds files

def _table(n=12):
    return pd.DataFrame({"image": [f"i{j}.png" for j in range(n)], "label": ["a", "b"] * (n // 2),
                         "y": [0, 1] * (n // 2), "partners": [[] for _ in range(n)],
                         "sha1": [f"{j:040x}" for j in range(n)]})


cells = st.sampled_from(["", "0", "1", "2", "-1", "1.5", "nan", "NaN", "x", " 1", "1e3", "99999999999999999999"])


@budget(80)
@given(drop=st.sets(st.sampled_from(["image", "fold", "group", "fold_group", "sha1", "label"])),
       edits=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["image", "fold", "group"]), cells), max_size=3),
       dup=st.lists(st.integers(0, 11), max_size=2), extra=st.booleans(), gone=st.lists(st.integers(0, 11), max_size=2),
       raw=st.none() | st.binary(max_size=30))
def test_folds_files(drop, edits, dup, extra, gone, raw):
    from entrep.data.folds import load_or_make_folds, make_folds

    df = _table()
    folds = make_folds(df, 2, 0).astype(str)
    for row, col, value in edits:
        folds.loc[row, col] = value
    folds = pd.concat([folds, folds.iloc[dup]] + ([folds.iloc[[0]].assign(image="extra.png")] if extra else []))
    folds = folds.drop(index=[i for i in gone if i in folds.index]).drop(columns=list(drop))
    with folder() as root:
        if raw is not None:
            (root / "folds.csv").write_bytes(raw)
        else:
            folds.to_csv(root / "folds.csv", index=False)
        got = kit_errors_only(load_or_make_folds, root / "folds.csv", df, 2, 0)
        if got is not None:  # what training reads: every image once, in the table's order, folds 0..1
            assert got["image"].tolist() == df["image"].tolist() and set(got["fold"]) == {0, 1}


# ------------------------------------------------------------------ the kit's own JSON files in a run

@budget(60)
@given(content=json_bytes())
def test_read_json(content):
    from entrep.io import read_json

    with folder() as root:
        (root / "report.json").write_bytes(content)
        kit_errors_only(read_json, root / "report.json")


tuned_values = st.recursive(scalars | st.sampled_from([{"kept": {"dba": {"k": 2}}}, {"dba": {"k": "x"}}, {"kept": []}]),
                            lambda c: st.dictionaries(st.sampled_from(["alpha", "rerank", "kept", "dba", "k", "x"]), c,
                                                      max_size=3), max_leaves=6)


@budget(80)
@given(tuned=st.dictionaries(st.sampled_from(["head_weight", "tta_flip", "i2i", "t2i", "alpha", "rerank"]),
                             tuned_values, max_size=4))
def test_tuned_json_fields(tuned):
    from entrep.config import load_config
    from conftest import inference_settings
    from entrep.io import kit_file

    cfg = load_config(None, ["model.pretrained="])

    def read():
        with kit_file("tuned.json"):
            return inference_settings(cfg, tuned, set())

    got = kit_errors_only(read)
    if got is not None:
        assert isinstance(got["tta_flip"], bool) and 0 <= got["head_weight"] <= 1
        assert all(0 <= got[t]["alpha"] <= 1 and isinstance(got[t]["rerank"], dict) for t in ("i2i", "t2i"))


@pytest.fixture(scope="module")
def runs_template(tmp_path_factory) -> Path:
    from entrep.config import load_config, save_config

    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        save_config(load_config(None, ["model.pretrained="]), root / name / "config.yaml")
    (root / "ab").mkdir()
    return root


@budget(60)
@given(blend=json_bytes(st.fixed_dictionaries({"members": st.lists(st.sampled_from(["../a", "../b", "../c", ""])
                                                                     | json_values, max_size=3)})),
       tuned=json_bytes(st.fixed_dictionaries({"weights": st.dictionaries(st.sampled_from(["cls", "i2i", "t2i"]),
                                                                          st.lists(st.floats(0, 1) | json_values,
                                                                                   max_size=3)),
                                               "i2i": tuned_values, "t2i": tuned_values})))
def test_blend_json_and_its_tuned_json(runs_template, blend, tuned):
    from entrep.ensemble import read_blend

    with folder(runs_template) as root:
        (root / "ab/blend.json").write_bytes(blend)
        (root / "ab/tuned.json").write_bytes(tuned)
        got = kit_errors_only(read_blend, root / "ab")
        if got is not None:
            assert len(got.members) == len(got.weights["cls"]) and all(p.is_dir() for p in got.members)


@pytest.fixture(scope="module")
def fold_template(tmp_path_factory) -> Path:
    from test_bad_input import fake_fold

    root = tmp_path_factory.mktemp("fold") / "runs"
    fake_fold(root / "r/fold0")
    return root


@budget(60)
@given(meta=json_bytes(st.dictionaries(st.sampled_from(["lora", "model_name", "labels"]), json_values, max_size=3)),
       adapter_config=st.none() | json_bytes(), cut=st.none() | st.integers(0, 400))
def test_a_folds_meta_and_weight_files(fold_template, meta, adapter_config, cut):
    from entrep.model.checkpoint import check_compatible, verify_fold

    with folder(fold_template) as root:
        fold = root / "r/fold0"
        (fold / "meta.json").write_bytes(meta)
        if adapter_config is not None:
            (fold / "adapter/adapter_config.json").write_bytes(adapter_config)
        if cut is not None:
            data = (fold / "kit.safetensors").read_bytes()
            (fold / "kit.safetensors").write_bytes(data[:cut])
        got = kit_errors_only(verify_fold, fold, True)
        if got is not None:
            kit_errors_only(check_compatible, got, SimpleCfg, fold)


class SimpleCfg:
    class model:
        name = "entrep-tiny"

    class labels:
        names = list(ENTREP_CLASSES)


@budget(50)
@given(meta=json_bytes(st.fixed_dictionaries({"topk": json_values | st.integers(1, 3), "labels": json_values,
                                              "queries": st.fixed_dictionaries({"cls": json_values, "i2i": json_values}),
                                              "test_dir": scalars, "galleries": json_values, "on_disk": json_values})),
       rankings=json_bytes())
def test_submit_on_hand_edited_predictions(capsys, meta, rankings):
    from entrep.commands.submit import main
    from test_submission import _predictions

    with folder() as root:
        _predictions(root, {"cls": ["c.png"], "i2i": ["q.png"]})
        (root / "predictions/meta.json").write_bytes(meta)
        (root / "predictions/i2i.json").write_bytes(rankings)
        entry_point(capsys, main, ["--run", root])


@budget(40)
@given(index=json_bytes(st.fixed_dictionaries({"segments": json_values, "slots": json_values})))
def test_the_image_cache_index(tmp_path_factory, index):
    """A truncated or hand-edited index is rebuilt (its images decoded again), never a traceback."""
    from entrep.data.images import ImageCache
    from entrep.data.release import file_sha1

    with folder() as root:
        paths = []
        for i in range(2):
            placeholder(root / f"{i}.png", i)
            paths.append(str(root / f"{i}.png"))
        hashes = [file_sha1(Path(p)) for p in paths]
        want = np.asarray(ImageCache(root / "ref", 8).pixels(paths, hashes))
        (root / "cache").mkdir()
        (root / "cache/index-8.json").write_bytes(index)
        assert (np.asarray(ImageCache(root / "cache", 8).pixels(paths, hashes)) == want).all()


# ------------------------------------------------------------------ every gallery size, every re-ranking combination

METHODS = {"dba": {"k": 2}, "qe": {"k": 2, "alpha": 3.0}, "class_bonus": {"beta": 0.1},
           "kreciprocal": {"k1": 20, "k2": 6, "lam": 0.3}}
SEARCHES = ["torch"]
try:
    import faiss  # noqa: F401

    SEARCHES += ["faiss-flat", "faiss-ivf", "faiss-hnsw"]
except ImportError:
    pass


@budget(150)
@given(n=st.integers(1, 7), q=st.integers(1, 5), k=st.integers(1, 12), methods=st.sets(st.sampled_from(list(METHODS))),
       mode=st.sampled_from(["t2i", "i2i", "i2i-some-outside"]), copies=st.booleans(), search=st.sampled_from(SEARCHES),
       seed=st.integers(0, 3))
@example(n=1, q=1, k=10, methods={"kreciprocal"}, mode="i2i", copies=False, search="torch", seed=0)  # scipy ValueError
@example(n=2, q=1, k=10, methods=set(METHODS), mode="i2i", copies=True, search="torch", seed=0)  # NaN from copies
def test_rank_gallery_every_size(n, q, k, methods, mode, copies, search, seed):
    """Every gallery size with every re-ranking combination: (Q, min(k, N - excluded)) answers, valid,
    distinct, best first, never the excluded image; a gallery holding only the query gives none."""
    from entrep.retrieval import rank_gallery

    g = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    if copies:  # repeated pictures: every distance 0, where k-reciprocal's normalisation divided by ~0
        g[:] = g[0]
    exclude = None
    if mode == "t2i":
        queries = torch.randn(q, 8, generator=torch.Generator().manual_seed(seed + 7))
    else:
        q = min(q, n)
        queries = g[:q].clone()
        exclude = torch.arange(q)
        if mode == "i2i-some-outside":
            exclude[::2] = -1
    probs = torch.rand(n, 7, generator=torch.Generator().manual_seed(seed))
    rerank = {m: METHODS[m] for m in methods}
    s, i = rank_gallery(queries, g, k, rerank, exclude=exclude, query_probs=probs[:q] if mode != "t2i" else
                        torch.rand(q, 7), gallery_probs=probs, search=search if not rerank else "torch")
    width = min(k, n - int(exclude is not None and bool((exclude >= 0).any())))
    assert s.shape == i.shape == (q, width)
    exact = bool(rerank) or search in ("torch", "faiss-flat")
    for r in range(q):
        got = [j for j in i[r].tolist() if j >= 0 or not exact]
        assert all(0 <= j < n for j in got if j >= 0) and len(set(got)) == len(got)
        if exclude is not None and exclude[r] >= 0:
            assert int(exclude[r]) not in got
        scores = s[r][i[r] >= 0]
        assert not torch.isnan(s[r]).any() and (scores[:-1] >= scores[1:] - 1e-5).all()
        if exact:
            assert (i[r] >= 0).all() and torch.isfinite(s[r]).all()
